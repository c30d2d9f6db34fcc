"""Query-based black-box attacks on a ReID system's retrieval output: no gradient, no feature.

The attacker sees what a deployed system returns for a query image, through a :class:`BlackBox`
(no autograd, query counter, budget): its distances to the gallery (:meth:`RetrievalSystem.scores`,
for the score-based attack) or its top-k gallery list (:meth:`RetrievalSystem.top_k`, for the
decision-based one). As for the white-box attacks, the ground-truth identities define the goal, and
the evaluation's rules define what counts: a query is matched while a gallery image of its identity
from another camera is among its top k. Same-identity images from the query's own camera are
"junk" (Market-1501's rule: the evaluation drops them from the ranking), so the attack neither
pushes them away nor counts them, when the cameras are known (``camids``).

* :class:`NESAttack`, score-based: NES gradient estimates (Ilyas et al. 2018; antithetic
  :func:`rge`) of a margin read off the distances, mean distance to the query's same-ID gallery
  images minus mean distance to its ``negatives`` nearest other-ID ones, followed by L-inf sign
  steps (PGD). The perturbation lives on ``tile`` x ``tile`` pixel tiles (the bandits' tiling prior,
  Ilyas et al. 2019): fewer dimensions to estimate, the same L-inf budget.
* :class:`HSJAttack`, decision-based: HopSkipJump (Chen et al. 2020), L-inf version, on the decision
  "no same-ID gallery image in the top k": a random adversarial start, bisection towards the query
  along the L-inf projection, sign-of-estimate steps from Monte Carlo boundary-normal estimates with
  a geometric step search, until the L-inf distance is within ``eps`` or the budget runs out; the
  result is projected on the eps-ball (the attack stops early for samples already inside).

Budgets: ``eps`` in 1/255 units (L-inf), ``queries`` per image. Every query goes through one
:class:`PerImageQueries` per batch, which refuses any row past its budget; ``query_stats()`` reports
the queries used per image over every batch attacked so far.
"""
import math

import torch
import torch.nn.functional as F

from .black_box import BlackBox, QueryBudgetExceeded
from .losses import pairwise_distance
from .validation import eps_from_255, positive_int
from .zeroth_order import rge

__all__ = ["HSJAttack", "NESAttack", "PerImageQueries", "QUERY_ATTACKS", "RetrievalSystem"]


class RetrievalSystem:
    """What the attacker queries: ``features`` (x01 -> (B, D) features) ranked against a fixed
    gallery (``gallery_features`` (G, D), ``gallery_pids`` (G,), ``gallery_camids`` (G,) or None)
    with ``metric`` (euclidean or cosine). The attacker reads the outputs only; the identities and
    cameras define its goal."""

    def __init__(self, features, gallery_features, gallery_pids, metric, gallery_camids=None):
        self._features = features
        self._gallery = torch.as_tensor(gallery_features).float()
        self.gallery_pids = torch.as_tensor(gallery_pids)
        self.gallery_camids = None if gallery_camids is None else torch.as_tensor(gallery_camids)
        self.metric = metric

    def scores(self, x01):
        """(B, G) distances of the images to the gallery (the retrieval scores)."""
        return pairwise_distance(self._features(x01).float().to(self._gallery.device),
                                 self._gallery, self.metric)

    def top_k(self, k):
        """x01 -> (B, k) gallery indices of the k nearest (the returned ranked list)."""
        return lambda x01: self.scores(x01).topk(min(k, len(self._gallery)), largest=False).indices

    def match_masks(self, pids, camids=None):
        """(positives, junk), each (B, G) bool: the gallery images of each query's identity that the
        evaluation counts, and those it drops (same identity and camera; none when the cameras of
        the queries or of the gallery are unknown)."""
        same_id = torch.as_tensor(pids).view(-1, 1).cpu() == self.gallery_pids.view(1, -1)
        if camids is None or self.gallery_camids is None:
            return same_id, torch.zeros_like(same_id)
        same_camera = torch.as_tensor(camids).view(-1, 1).cpu() == self.gallery_camids.view(1, -1)
        return same_id & ~same_camera, same_id & same_camera


class PerImageQueries:
    """A :class:`BlackBox` asked about rows of one batch, each row with its own budget."""

    def __init__(self, fn, rows, budget):
        self.budget = int(budget)
        self.used = torch.zeros(rows, dtype=torch.long)
        self._box = BlackBox(fn, budget=self.budget * rows)

    def remaining(self, rows):
        return int((self.budget - self.used[rows]).min()) if len(rows) else 0

    def __call__(self, images, rows):
        """The box's outputs for ``images``, one per entry of ``rows`` (batch row indices)."""
        counts = torch.bincount(rows.cpu(), minlength=len(self.used))
        if bool((self.used + counts > self.budget).any()):
            raise QueryBudgetExceeded(f"a row would exceed its budget of {self.budget} queries")
        outputs = self._box(images)
        self.used += counts
        return outputs


class QueryAttack:
    """Settings, budgets and query statistics shared by the query-based attacks."""

    distance = None  # the system's metric, not an attack setting
    steps = None

    def __init__(self, system, *, eps, queries, tile=4):
        self.system = system
        self._eps01 = eps_from_255(eps)
        self.eps = float(eps)
        self.queries = positive_int(queries, "queries")
        self.tile = positive_int(tile, "tile")
        self._used = []

    @property
    def name(self):
        return type(self).__name__

    def query_stats(self):
        """Queries used per image over every image attacked so far: mean, max, budget."""
        used = torch.cat(self._used) if self._used else torch.zeros(0, dtype=torch.long)
        return {"query_budget": self.queries, "images": len(used),
                "queries_mean": float(used.float().mean()) if len(used) else 0.0,
                "queries_max": int(used.max()) if len(used) else 0}

    def _tiles(self, x):
        return (x.shape[0], x.shape[1], math.ceil(x.shape[2] / self.tile),
                math.ceil(x.shape[3] / self.tile))

    def _upsample(self, z, x):
        return F.interpolate(z, scale_factor=self.tile, mode="nearest")[..., :x.shape[2],
                                                                          :x.shape[3]]

    def perturb(self, x01, pids, guides=None, sample_index=None, camids=None):
        """Adversarial images for ``x01`` (B, 3, H, W) in [0, 1] with ``|adv - x01|_inf <= eps``;
        ``pids`` (B,) the queries' identities, ``camids`` (B,) their cameras (None: every
        same-identity gallery image counts); ``guides`` and ``sample_index`` are not used (the
        attacker knows the retrieval output only)."""
        x = x01.detach()
        if self._eps01 == 0.0:
            self._used.append(torch.zeros(len(x), dtype=torch.long))
            return x.clone()
        adv, used = self._attack(x, *self.system.match_masks(pids, camids))
        self._used.append(used)
        delta = (adv - x).clamp(-self._eps01, self._eps01)
        return (x + delta).clamp(0.0, 1.0).detach()


class NESAttack(QueryAttack):
    """Score-based: NES (antithetic RGE) estimates of the retrieval margin, L-inf sign steps.

    ``samples`` directions per estimate (2 queries each), smoothing ``sigma`` (per-coordinate, in
    1/255 units; default eps/2), ``step_size`` in 1/255 units (default eps/4), ``negatives`` the
    nearest other-ID gallery images the margin averages over.
    """

    def __init__(self, system, *, eps, queries, samples=10, sigma=None, step_size=None,
                 negatives=10, tile=4):
        super().__init__(system, eps=eps, queries=queries, tile=tile)
        self.samples = positive_int(samples, "samples")
        self.negatives = positive_int(negatives, "negatives")
        self.sigma = float(sigma) if sigma is not None else self.eps / 2
        self.step_size = float(step_size) if step_size is not None else self.eps / 4
        self.iterations = self.queries // (2 * self.samples)

    def margin(self, distances, positives, junk=None):
        """Mean distance to the ``positives`` (B, G) minus mean distance to the nearest other-ID
        gallery images (B,): the larger, the further the true matches fall down the list. ``junk``
        (B, G): same-ID images the evaluation drops, in neither term."""
        positive = (distances * positives).sum(1) / positives.sum(1).clamp_min(1)
        others = distances.masked_fill(positives if junk is None else positives | junk,
                                       float("inf"))
        nearest = others.topk(min(self.negatives, others.shape[1]), largest=False).values
        return positive - nearest.masked_fill(nearest.isinf(), 0).mean(1)

    def _attack(self, x, positives, junk):
        box = PerImageQueries(self.system.scores, len(x), self.queries)
        rows = torch.arange(len(x))
        z = torch.zeros(self._tiles(x), dtype=x.dtype, device=x.device)
        dim = z[0].numel()

        def objective(points):  # one query per row
            return self.margin(box(self._image(x, points), rows), positives, junk).to(x.device)

        xi = self.sigma / 255.0 * math.sqrt(dim)  # probes of L2 radius xi: sigma per coordinate
        step, eps = self.step_size / 255.0, self._eps01
        for _ in range(self.iterations):
            grad = rge(objective, z, self.samples, xi, difference="central")
            z = (z + step * grad.sign()).clamp(-eps, eps)
        return self._image(x, z), box.used

    def _image(self, x, z):
        return (x + self._upsample(z, x)).clamp(0.0, 1.0)


class HSJAttack(QueryAttack):
    """Decision-based: HopSkipJump (L-inf) on "no positive in the top ``k``" (junk images left
    out of the list, which is read that much longer).

    ``samples`` boundary probes per estimate (one query each), ``bisection`` steps per boundary
    search, ``step_search`` the most halvings of the geometric step search, ``starts`` random
    uniform images tried as the adversarial start.
    """

    def __init__(self, system, *, eps, queries, k=1, samples=20, bisection=8, step_search=6,
                 starts=5, tile=4):
        super().__init__(system, eps=eps, queries=queries, tile=tile)
        self.k = positive_int(k, "k")
        self.samples = positive_int(samples, "samples")
        self.bisection = positive_int(bisection, "bisection")
        self.step_search = positive_int(step_search, "step_search")
        self.starts = positive_int(starts, "starts")

    def _attack(self, x, positives, junk):
        # the returned list is long enough to hold the top k once the junk is taken out
        box = PerImageQueries(self.system.top_k(self.k + int(junk.sum(1).max())), len(x),
                              self.queries)

        def adversarial(images, rows):  # one query per row: no positive in the top k
            top = box(images, rows).cpu()
            kept = ~junk[rows].gather(1, top)
            counted = kept & (kept.cumsum(1) <= self.k)
            return ~(positives[rows].gather(1, top) & counted).any(1)

        all_rows = torch.arange(len(x))
        if self.queries < 1 + self.bisection:
            return x.clone(), box.used
        best = x.clone()
        done = adversarial(x, all_rows)  # already unmatched: nothing to do
        start = x.clone()
        found = done.clone()
        for _ in range(self.starts):
            rows = (~found).nonzero().flatten()
            if not len(rows) or box.remaining(rows) < 1 + self.bisection:
                break
            noise = torch.rand_like(x[rows])
            hit = adversarial(noise, rows)
            start[rows[hit]] = noise[hit]
            found[rows[hit]] = True
        active = (found & ~done).nonzero().flatten()
        radius = torch.zeros(len(x), device=x.device)
        if len(active):
            radius[active] = self._bisect(x[active], start[active], active, adversarial)
            best[active] = self._project(x[active], start[active], radius[active])
        iteration = 0
        while True:
            active = active[radius[active] > self._eps01]
            cost = self.samples + self.step_search + self.bisection
            if not len(active) or box.remaining(active) < cost:
                break
            iteration += 1
            boundary = best[active]
            r = radius[active].view(-1, 1, 1, 1)
            direction = self._estimate(boundary, r, active, adversarial).sign()
            step = r / math.sqrt(iteration)
            candidate = boundary.clone()
            moved = torch.zeros(len(active), dtype=torch.bool)
            for _ in range(self.step_search):
                trying = (~moved).nonzero().flatten()
                if not len(trying):
                    break
                points = (boundary[trying] + step[trying] * direction[trying]).clamp(0.0, 1.0)
                hit = adversarial(points, active[trying])
                candidate[trying[hit]] = points[hit]
                moved[trying[hit]] = True
                step[trying[~hit]] /= 2
            new_radius = self._bisect(x[active], candidate, active, adversarial)
            better = new_radius < radius[active]
            improved = active[better]
            radius[improved] = new_radius[better]
            best[improved] = self._project(x[improved], candidate[better], new_radius[better])
        return best, box.used

    @staticmethod
    def _project(x, target, radius):
        """``target`` projected on the L-inf ball of ``radius`` (B,) around ``x``."""
        r = radius.view(-1, 1, 1, 1)
        return torch.max(torch.min(target, x + r), x - r)

    def _bisect(self, x, target, rows, adversarial):
        """Per row, the smallest L-inf radius (to the bisection's precision) at which ``target``
        projected on the ball around ``x`` is adversarial; ``target`` must be adversarial."""
        low = torch.zeros(len(x), device=x.device)
        high = (target - x).abs().flatten(1).max(1).values
        for _ in range(self.bisection):
            middle = (low + high) / 2
            hit = adversarial(self._project(x, target, middle), rows).to(x.device)
            high = torch.where(hit, middle, high)
            low = torch.where(hit, low, middle)
        return high

    def _estimate(self, boundary, radius, rows, adversarial):
        """Monte Carlo estimate of the boundary's normal (pointing to the adversarial side) at
        each row of ``boundary``: the mean of random tile sign directions weighted by the
        baseline-corrected decision at boundary + probe (HopSkipJump's estimator)."""
        probe = 0.1 * radius
        total = torch.zeros(self._tiles(boundary), device=boundary.device)
        decisions, directions = [], []
        for _ in range(self.samples):
            u = torch.randint(0, 2, self._tiles(boundary), device=boundary.device) * 2.0 - 1.0
            point = (boundary + probe * self._upsample(u, boundary)).clamp(0.0, 1.0)
            decisions.append(adversarial(point, rows).float().to(boundary.device) * 2 - 1)
            directions.append(u)
        decisions = torch.stack(decisions)  # (samples, B)
        baseline = decisions.mean(0, keepdim=True)
        for phi, u in zip(decisions - baseline, directions):
            total += phi.view(-1, 1, 1, 1) * u
        return self._upsample(total, boundary)


QUERY_ATTACKS = {"NES": NESAttack, "HSJA": HSJAttack}

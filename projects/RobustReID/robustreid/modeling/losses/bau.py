"""BAU losses (Cho et al., NeurIPS 2024, "Generalizable Person Re-identification via Balancing
Alignment and Uniformity"), as plain functions of L2-normalised features.

Notation follows the paper: ``weak`` are the features f_j of the original (weakly augmented) view,
``strong`` the features f~_i of the strongly augmented view of the same B images, so row i of both
shares ``pids[i]``. Equation numbers refer to the paper.

Where the paper leaves a detail open, the published code settles it (see
shared/notes/reference-implementations.md); where paper and code differ, the paper is the default
and the code's variant an option:
- k-reciprocal sets are computed over the 2B features of both views, and each top-k list includes
  the sample itself (code).
- Uniformity uses *squared* distances. Eq. (6) prints ||.||_2 without the square, but eq. (2), the
  cited definition of Wang & Isola and eq. (8) all square it, as does the code.
- The two views' uniformity (eq. 6) and domain (eq. 8) terms are *summed* as printed;
  ``view_reduction="mean"`` averages them as the code does.
- Domain uniformity excludes the feature's own class by label as the paper says;
  ``exclude_own_class=False`` drops the nearest same-domain prototype instead (code).
- Prototypes start as the normalised class centroids and are renormalised after every momentum
  update (code; the paper says nothing about either).
"""
import torch
import torch.nn as nn

from ...parallel import all_gather_rows

__all__ = [
    "kreciprocal_jaccard_weights", "alignment_loss", "uniformity_loss",
    "two_view_uniformity_loss", "PrototypeMemory", "domain_uniformity_loss", "bau_loss",
]

_VIEW_REDUCTIONS = ("sum", "mean")


def _squared_distances(a, b):
    """||a_i - b_j||^2 for all pairs, via the expansion (no sqrt, so gradients stay finite at 0)."""
    d2 = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None, :] - 2.0 * a @ b.t()
    return d2.clamp_min(0.0)


def _check_view_reduction(view_reduction):
    if view_reduction not in _VIEW_REDUCTIONS:
        raise ValueError(f"view_reduction must be one of {_VIEW_REDUCTIONS}, "
                         f"got {view_reduction!r}")


def _combine_views(a, b, view_reduction):
    _check_view_reduction(view_reduction)
    return a + b if view_reduction == "sum" else 0.5 * (a + b)


@torch.no_grad()
def kreciprocal_jaccard_weights(features, k=10):
    """Jaccard similarity of k-reciprocal neighbour sets, for every pair of rows (eq. 4).

    R_k(a) = {b : b in topk(a) and a in topk(b)}, topk by Euclidean distance and including a itself
    (its own nearest neighbour), so |R_k(a)| >= 1 and every union is non-empty.
    Returns an (n, n) matrix W[a, b] = |R(a) & R(b)| / |R(a) | R(b)| in [0, 1] with W[a, a] = 1.

    The weights are piecewise constant in the features (they only depend on neighbour ranks), so
    they carry no useful gradient; they are computed under no_grad, as in the code.
    """
    f = features.detach()
    n = f.size(0)
    k = min(int(k), n)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    d2 = _squared_distances(f, f)
    d2.fill_diagonal_(-1.0)  # self first even when another row is an exact duplicate
    topk = d2.topk(k, dim=1, largest=False).indices
    neighbours = torch.zeros(n, n, dtype=f.dtype, device=f.device)
    neighbours.scatter_(1, topk, 1.0)
    reciprocal = neighbours * neighbours.t()  # a in topk(b) and b in topk(a)
    intersection = reciprocal @ reciprocal.t()
    sizes = reciprocal.sum(1)
    union = sizes[:, None] + sizes[None, :] - intersection
    return intersection / union


def alignment_loss(strong, weak, pids, k=10, weighted=True):
    """Weighted alignment between augmented and original features (eq. 3-5).

    L_align = sum_{(i,j): y_i = y_j} w_ij ||f~_i - f_j||^2 / sum_{(i,j): y_i = y_j} w_ij,
    over all same-ID pairs including i = j, with w_ij = Jaccard(R_k(f~_i), R_k(f_j)) (eq. 4)
    computed over the 2B features of both views. The weights are constants (no gradient).
    ``weighted=False`` is the unweighted eq. (3): the plain mean over positive pairs.
    """
    pids = pids.view(-1)
    b = weak.size(0)
    positives = (pids[:, None] == pids[None, :]).to(strong.dtype)
    if weighted:
        jaccard = kreciprocal_jaccard_weights(torch.cat([weak, strong], 0), k)
        w = jaccard[b:, :b].to(strong.dtype) * positives  # rows: strong i, columns: weak j
    else:
        w = positives
    d2 = _squared_distances(strong, weak)
    # w_ii is > 0 whenever f~_i and f_i are mutual neighbours; if no positive pair is, return 0
    return (w * d2).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)


def uniformity_loss(features, t=2.0):
    """log of the mean Gaussian potential over distinct pairs (eq. 2 / one term of eq. 6):
    log( 1/|I| sum_{i != j} exp(-t ||f_i - f_j||^2) ), t = 2 in the paper."""
    n = features.size(0)
    if n < 2:
        raise ValueError("uniformity needs at least two features")
    d2 = _squared_distances(features, features)
    iu = torch.triu_indices(n, n, offset=1, device=features.device)
    # the (i, j) and (j, i) terms are equal, so the mean over i < j is the mean over i != j
    return d2[iu[0], iu[1]].mul(-t).exp().mean().log()


def two_view_uniformity_loss(weak, strong, t=2.0, view_reduction="sum"):
    """Eq. (6): uniformity of the original view plus that of the augmented view
    (``view_reduction="mean"``: their average, as the code does)."""
    return _combine_views(uniformity_loss(weak, t), uniformity_loss(strong, t), view_reduction)


class PrototypeMemory(nn.Module):
    """Class prototypes c_1..c_N (the memory bank M of eq. 7-8) and the source domain of each class.

    Both are buffers, so checkpoints save and restore them with the model. Fill them with
    ``initialize`` (class centroids of the initial model's features), then call ``update`` with each
    batch's original-view features after the losses are computed.
    """

    def __init__(self, num_classes, dim, momentum=0.1, normalize=True):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.momentum = float(momentum)  # mu of eq. (7): the weight of the *old* prototype
        self.normalize = bool(normalize)
        self.register_buffer("prototypes", torch.zeros(self.num_classes, self.dim))
        self.register_buffer("domains", torch.full((self.num_classes,), -1, dtype=torch.long))

    def _check_pids(self, pids):
        if pids.numel() and (int(pids.min()) < 0 or int(pids.max()) >= self.num_classes):
            raise ValueError(f"pids must lie in [0, {self.num_classes}), "
                             f"got [{int(pids.min())}, {int(pids.max())}]")

    @torch.no_grad()
    def initialize(self, features, pids, domains):
        """Prototypes := per-class mean feature (L2-normalised); domain of a class := its samples'
        domain. Every class must have at least one sample, and all its samples one domain."""
        features = features.detach().to(self.prototypes)
        pids = torch.as_tensor(pids, device=self.prototypes.device).long().view(-1)
        domains = torch.as_tensor(domains, device=self.prototypes.device).long().view(-1)
        if not len(features) == len(pids) == len(domains):
            raise ValueError("features, pids and domains must have the same length")
        self._check_pids(pids)
        counts = torch.bincount(pids, minlength=self.num_classes)
        if bool((counts == 0).any()):
            missing = torch.nonzero(counts == 0).view(-1)[:10].tolist()
            raise ValueError(f"classes without samples cannot be initialised, e.g. {missing}")
        sums = torch.zeros_like(self.prototypes).index_add_(0, pids, features)
        centroids = sums / counts[:, None].to(sums)
        class_domain = torch.full_like(self.domains, -1).scatter_(0, pids, domains)
        if not torch.equal(class_domain[pids], domains):
            raise ValueError("every class must belong to a single domain")
        self.prototypes.copy_(self._maybe_normalize(centroids))
        self.domains.copy_(class_domain)

    def _maybe_normalize(self, x):
        return nn.functional.normalize(x, dim=1) if self.normalize else x

    @torch.no_grad()
    def update(self, features, pids, momentum=None):
        """c_y <- mu c_y + (1 - mu) f for each sample (f, y) in batch order (eq. 7), renormalised
        after each step. Samples of one class are applied one after another, as eq. (7) reads
        for a single f; classes are updated in parallel, so the loop runs over the number of
        instances per identity in the batch, not over samples.

        In a multi-process run every process applies the rows of every process (in rank order),
        as one process would with the whole batch, so the memories stay identical; every process
        must then call it, in the same order (the training forwards do)."""
        mu = self.momentum if momentum is None else float(momentum)
        features = features.detach().to(self.prototypes)
        pids = pids.detach().to(self.prototypes.device).long().view(-1)
        features, pids = all_gather_rows(features, pids)
        self._check_pids(pids)
        if not len(pids):
            return
        # occurrence rank of each sample within its class, in batch order
        order = torch.sort(pids, stable=True).indices
        sorted_pids = pids[order]
        new_group = torch.ones_like(sorted_pids, dtype=torch.bool)
        new_group[1:] = sorted_pids[1:] != sorted_pids[:-1]
        positions = torch.arange(len(pids), device=pids.device)
        group_start = torch.cummax(torch.where(new_group, positions, 0), 0).values
        rank = torch.empty_like(pids)
        rank[order] = positions - group_start
        for r in range(int(rank.max()) + 1):
            rows = rank == r  # at most one sample per class
            ys = pids[rows]
            mixed = mu * self.prototypes[ys] + (1.0 - mu) * features[rows]
            self.prototypes[ys] = self._maybe_normalize(mixed)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, dim={self.dim}, momentum={self.momentum}, "
                f"normalize={self.normalize}")


def domain_uniformity_loss(features, pids, domains, memory, k=None, t=2.0,
                           exclude_own_class=True):
    """Domain-specific uniformity of one view against the memory prototypes (one term of eq. 8).

    For each feature f_i, N(f_i) are its k nearest prototypes among those of the same source domain
    and a different class; k defaults to the mini-batch size (the paper's N = batch size):
        L = log( sum_i sum_{j in N(f_i)} exp(-t ||f_i - c_j||^2) / sum_i |N(f_i)| ).
    |N(f_i)| is k unless the domain has fewer other classes, in which case all of them are used
    and the mean runs over the prototypes actually found. The prototypes are constants (buffers).
    ``exclude_own_class=False`` is the code's variant: drop the single nearest same-domain
    prototype (assumed to be the own class) instead of the own class by label.
    """
    prototypes = memory.prototypes.to(features.dtype)
    class_domains = memory.domains
    pids = pids.to(class_domains.device).long().view(-1)
    domains = domains.to(class_domains.device).long().view(-1)
    n_proto = prototypes.size(0)
    k = features.size(0) if k is None else int(k)
    d2 = _squared_distances(features, prototypes)
    valid = class_domains[None, :] == domains[:, None]
    if exclude_own_class:
        valid &= torch.arange(n_proto, device=valid.device)[None, :] != pids[:, None]
        skip = 0
    else:
        skip = 1
    take = min(k + skip, n_proto)
    masked = d2.masked_fill(~valid, float("inf"))
    nearest = masked.topk(take, dim=1, largest=False).values[:, skip:]
    found = torch.isfinite(nearest)
    if not bool(found.any()):
        return features.sum() * 0.0  # no same-domain prototype of another class anywhere
    potentials = torch.where(found, nearest, torch.zeros_like(nearest)).mul(-t).exp()
    return (potentials * found).sum().div(found.sum()).log()


def bau_loss(strong, weak, pids, domains=None, memory=None, lam=1.5, k=10, t=2.0,
             num_prototypes=None, view_reduction="sum", exclude_own_class=True,
             ce_loss=None, triplet_loss=None, return_terms=False):
    """Eq. (9): L_BAU = L_ce + L_tri + lam * L_align + L_uniform + L_domain, lam = 1.5.

    lam weights the alignment term only. L_ce and L_tri (original view only) come from the
    host model and are added when given. L_domain needs ``domains`` and ``memory`` and is 0 without
    them. The memory is not updated here: call ``memory.update(weak, pids)`` afterwards, as the
    loss uses the prototypes from before this batch (as the code does).
    With ``return_terms`` also returns the unweighted terms for logging.
    """
    _check_view_reduction(view_reduction)
    terms = {
        "align": alignment_loss(strong, weak, pids, k=k),
        "uniform": two_view_uniformity_loss(weak, strong, t=t, view_reduction=view_reduction),
    }
    if memory is not None and domains is not None:
        per_view = [domain_uniformity_loss(view, pids, domains, memory, num_prototypes, t,
                                           exclude_own_class) for view in (weak, strong)]
        terms["domain"] = _combine_views(*per_view, view_reduction)
    else:
        terms["domain"] = weak.new_zeros(())
    total = lam * terms["align"] + terms["uniform"] + terms["domain"]
    if ce_loss is not None:
        total = total + ce_loss
    if triplet_loss is not None:
        total = total + triplet_loss
    return (total, terms) if return_terms else total

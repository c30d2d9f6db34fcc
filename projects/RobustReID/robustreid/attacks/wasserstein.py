"""The Wasserstein metric attack (WMA, thesis chapter 4, Algorithm 1) and its projection onto a
Wasserstein ball by projected Sinkhorn iterations (Wong, Schmidt & Kolter 2019; thesis eq. 4.6-4.9).

Units and conventions (the thesis leaves them open; chosen here, and tested):

* **Mass.** A [0, 1] image is a distribution of pixel mass, one value per channel and pixel. Mass
  moves only inside its own channel (moving it between channels at one position would change colours
  at zero positional cost) and only inside a ``kernel_size`` x ``kernel_size`` window around its pixel
  (thesis 4.2, "Transport Plan"; 7 x 7 by default).
* **Ground cost.** The Euclidean distance between pixel positions (thesis 4.4.1: the 1-Wasserstein
  distance): moving mass m from (i, j) to (k, l) costs m * sqrt((i - k)^2 + (j - l)^2).
* **Budget ``eps``.** A transport cost per unit of image mass: the cost of the cheapest local plan
  from the clean image to the adversarial one, divided by the clean image's total mass (summed over
  all channels and pixels). This is W(I, I~) of thesis eq. 4.1-4.2 with both images normalised to
  sum 1 over the whole vectorised image, as the thesis and Wong et al. normalise. ``eps = 0.1`` moves
  10% of the image's mass by one pixel (Wong et al.'s CIFAR-10 radius). It is NOT in 1/255 units.
  Budgets lie in [0, 1] here: the thesis's "eps = 8, 16" state no unit and cannot be such costs (no
  7 x 7 plan costs more than 3 * sqrt(2) = 4.24 per unit of mass); [INF] if they are 1/255 units, as
  the thesis's L-inf comparisons suggest, they would read 8/255 = 0.031 and 16/255 = 0.063 here.
* **Entropy ``lam``.** 3000 (thesis 4.4.1, Wong et al.'s CIFAR-10 value), applied to masses in [0, 1]
  pixel units. Wong et al. apply it to the normalised masses; at CIFAR-10 size (3 x 32 x 32) a pixel's
  normalised mass is about 1/3000, so there lam * mass ~ 1. On 3 x 128 x 64 ReID images normalised
  masses are about 40x smaller, the entropy term dominates and the projection returns a blur of the
  clean image that ignores the attack step (measured: correlation 0.07 between the projection's and
  the step's changes at eps 0.01, 0.96 with pixel units). Pixel units keep lam's effect independent
  of image size (the thesis's Fig. 4.6: lam = 3000 gives sharp images, smaller lam blurs).

Projection. :func:`project_wasserstein` solves thesis eq. 4.6: min 1/2 |v - w|^2 + 1/lam sum T log T
over local plans T >= 0 with T 1 = x (the clean image), T^T 1 = w and <T, C> <= eps * mass(x). It
ascends the dual (eq. 4.7-4.8; duals x_dual per pixel for the rows, y per pixel for the columns,
z >= 0 per image for the cost) block by block: exactly in x_dual (a Sinkhorn row scaling), exactly
in y (closed form with the Lambert W function), and by one Newton step in z on log <T, C>. With
``upper`` the output also stays <= upper: Algorithm 1's clip to [0, 1] (line 5) then removes no mass
the plan paid for (the y step caps each column sum; the output is >= 0 anyway, as T >= 0). The image
is read off the final plan, w = T^T 1 (eq. 4.9's v - y/lam at convergence), after an exact row step,
so w is exactly reachable from x at cost <T, C>; if the finitely many iterations leave that cost
above the budget, T is mixed with the zero-cost identity plan until it fits. So w is always within
eps (up to float rounding), and it approaches the entropic projection as the iterations converge.
The plan is never stored: T = e^{x_dual} K e^{y} with one kernel K = exp(-z C - 1) per window
offset, so every sum the solver takes over T is a window sum of one factor against K. It is a
depthwise convolution of exp(dual - its row maximum), and an exact log-sum-exp over the k^2 shifted
views of the dual where one shift per row would underflow (duals spread by over ~65 in float32:
projecting far-away points; never in attack steps of 2/255 at eps 0.001-0.1, measured).

Measured behaviour: the plan's cost bounds the exact distance from above, and the entropic plan
also spends budget on exchanging mass between neighbours, so WMA's images lie well inside the ball
(exact optimal transport: 0.04-0.05 after 5 steps at eps 0.1 on 3 x 16 x 8 images, while projecting
a far-away point uses 99.98% of the budget). Larger ``lam`` sharpens the projection but needs more
iterations (at 50 iterations lam = 3e5 attacks less than 3000).

Memory and time: no tensor has B * C * H * W * k^2 entries; peak use measured ~11 MB per
3 x 256 x 128 image (0.7 GB for a batch of 64; the former unfold-based solver: ~105 MB). Time is
linear in B * C * H * W * k^2 times ``sinkhorn_iters`` times ``steps``. Measured on a 2-core Xeon
(AVX-512) at the defaults (k = 7, lam = 3000, 50 iterations, upper = 1, warm start), 3 x 128 x 64
images, batch 8, the model's forward and backward not included: on 1 thread an iteration takes
1.5 ms per image and a projection (one attack step) 0.11 s per image, 26x less than the former
solver in the same run (2.8 s); 2 threads, beside another job on the machine, 3.8 ms and 0.27 s
(former: 9.6 s). The iterations do not stop early: at lam = 3000 the output still moves ~0.6/255
between 50 and 200 iterations (measured), so a tolerance loose enough to stop would change it.
"""
import math

import torch
import torch.nn.functional as F

from .base import ReidAttack
from .losses import FurthestNegativeLoss, MetricIFGSMLoss, same_id_distance_sum
from .registry import ATTACK_REGISTRY
from .validation import AttackConfigError, check_choice, non_negative_float, positive_int

WMA_LOSSES = ("push", "ama", "fna")
DEFAULT_EPS = 0.1  # transport cost per unit of image mass (see the module doc)
DEFAULT_KERNEL_SIZE = 7  # thesis 4.4.1
DEFAULT_LAMBDA = 3000.0  # thesis 4.4.1
DEFAULT_SINKHORN_ITERS = 50
# Lambert W by Newton on s + exp(s) = u (s = log W): monotone from the starting point used below;
# 12 steps reach float64 precision over the range the y step produces.
_LAMBERT_NEWTON_STEPS = 12
# Rounds of sending a pixel's excess over ``upper`` back to its sources (:func:`_return_overflow`).
_OVERFLOW_ROUNDS = 20


def check_wasserstein_eps(value):
    """A WMA budget (transport cost per unit of image mass) as a float; AttackConfigError naming it
    unless it is a finite number in [0, 1]."""
    eps = non_negative_float(value, "eps")
    if eps > 1:
        raise AttackConfigError(
            f"eps={value!r} is not a Wasserstein budget: WMA budgets are transport costs per unit of "
            f"image mass in [0, 1] (0.1 moves 10% of the image's mass one pixel), not 1/255 units")
    return eps


def check_kernel_size(value):
    """An odd positive window size (the window is centred on each pixel)."""
    size = positive_int(value, "kernel_size")
    if size % 2 == 0:
        raise AttackConfigError(f"kernel_size must be odd (a window centred on each pixel), got "
                                f"{value!r}")
    return size


def window_costs(kernel_size, dtype=torch.float32, device=None):
    """(k*k,) Euclidean distances of the window offsets (dy, dx), dy-major: the local ground cost."""
    r = kernel_size // 2
    d = torch.arange(-r, r + 1, dtype=dtype, device=device)
    return (d.view(-1, 1) ** 2 + d.view(1, -1) ** 2).sqrt().reshape(-1)


def _exp(t):
    """exp(t); on CPU, entries whose exp would be subnormal or 0 are set to 0 without computing it:
    the CPU's slow path for those made whole projections 10-60x slower (measured)."""
    if t.device.type != "cpu":
        return t.exp()
    floor = math.log(torch.finfo(t.dtype).tiny) + 2  # exp(floor) is still well inside the normals
    return torch.where(t > floor, t.clamp_min(floor).exp(), 0.0)


def _window_logsumexp(t, log_kernel, cost=None, moments=0):
    """Log window sums of a local plan in factored form: for p = 0..``moments``, the (N, H, W)
    tensor log sum_o cost_o^p exp(t[n, (h, w) + o] + log_kernel[n, o]) over the window offsets o
    (dy-major) that stay inside the image; -inf where no term is finite. ``t`` (N, H, W) may hold
    -inf (no mass); ``log_kernel`` (N, k*k) is finite; ``cost`` (k*k,) is needed for moments > 0.
    The p = 0 sum is accurate to rounding per pixel (it yields a dual), the moments to rounding
    relative to it (they only enter totals). The windows are symmetric, so the same sum serves
    "targets of a source" and "sources of a target"."""
    sums = _window_logsumexp_conv(t, log_kernel, cost, moments)
    return sums if sums is not None else _window_logsumexp_shifted(t, log_kernel, cost, moments)


def _window_logsumexp_conv(t, log_kernel, cost, moments):
    """:func:`_window_logsumexp` as depthwise convolutions of exp(t - max t) (one shift per row),
    5-7x faster on CPU than :func:`_window_logsumexp_shifted` (measured). None when some pixel's
    sum falls so far below its row's maximum that the terms lost to underflow could matter (t
    spread over ~65 in float32, ~650 in float64, or a large z in the kernel)."""
    n, height, width = t.shape
    size = math.isqrt(log_kernel.shape[1])
    r = size // 2
    top = t.amax((1, 2), keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows without mass
    scaled = F.pad(_exp(t - top), (r, r, r, r)).unsqueeze(0)  # zero padding: nothing outside
    kernel = _exp(log_kernel)
    allow_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # cuDNN's default TF32 keeps 10 mantissa bits: too few
    try:
        sums = [F.conv2d(scaled, (kernel * cost ** p if p else kernel).view(n, 1, size, size),
                         groups=n)[0] for p in range(moments + 1)]
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32
    # A sum of at least 512 tiny / eps has a term >= 10 tiny / eps: the (< k^2) terms that underflow
    # to 0 change it by less than one rounding. All-(-inf) windows are exact zeros.
    finfo = torch.finfo(t.dtype)
    small = sums[0] < 512 * finfo.tiny / finfo.eps
    if bool(small.any()):
        finite = F.pad(torch.isfinite(t).to(t.dtype), (r, r, r, r)).unsqueeze(0)
        reachable = F.conv2d(finite, finite.new_ones(n, 1, size, size), groups=n)[0] > 0
        if bool((small & reachable).any()):
            return None
    return [s.log() + top for s in sums]


def _window_logsumexp_shifted(t, log_kernel, cost, moments):
    """:func:`_window_logsumexp` exactly for any spread: one pass over the k*k shifted views of t
    for each pixel's largest term, one summing the terms shifted by it (cache-sized (N, H, W)
    temporaries instead of a B*C*H*W*k^2 tensor)."""
    n, height, width = t.shape
    size = math.isqrt(log_kernel.shape[1])
    r = size // 2
    padded = F.pad(t, (r, r, r, r), value=-math.inf)  # no mass comes from or goes to outside
    windows = [padded[:, dy:dy + height, dx:dx + width] for dy in range(size) for dx in range(size)]
    log_kernel = log_kernel.view(n, -1, 1, 1)
    term = torch.empty_like(t)
    top = torch.full_like(t, -math.inf)
    for o, window in enumerate(windows):
        torch.maximum(top, torch.add(window, log_kernel[:, o], out=term), out=top)
    shift = torch.where(top > -math.inf, top, torch.zeros_like(top))
    # Terms below exp(floor) relative to the largest (1) are kept at exp(floor): negligible, and it
    # avoids exp's slow subnormal path on CPU (see _exp).
    floor = math.log(torch.finfo(t.dtype).tiny) + 2
    weights = cost.tolist() if moments else []
    sums = t.new_zeros((moments + 1,) + t.shape)
    for o, window in enumerate(windows):
        torch.add(window, log_kernel[:, o], out=term).sub_(shift).clamp_min_(floor).exp_()
        sums[0] += term
        for p in range(1, moments + 1):
            if weights[o]:
                sums[p].add_(term, alpha=weights[o] ** p)
    return list(sums.log() + top)


def _lambert_w_exp(u):
    """W(exp(u)) elementwise, stable for large u (W is the Lambert W function)."""
    u = u.clamp_min(-60.0)  # W(exp(-60)) = 9e-27: such a pixel receives no mass anyway
    s = torch.where(u > 1, u.clamp_min(1.0).log(), u)  # s + exp(s) >= u: Newton decreases to the root
    # Newton's error after a step is at most step^2 / 2 (f''/2f' <= 1/2 here): once every step is
    # below sqrt(eps), the iterate is exact to rounding. 3-5 of the 12 steps do (measured).
    tolerance = torch.finfo(u.dtype).eps ** 0.5
    for _ in range(_LAMBERT_NEWTON_STEPS):
        es = s.exp()
        step = (s + es - u) / (1 + es)
        s = s - step
        if float(step.abs().max()) <= tolerance:
            break
    return s.exp()


def _return_overflow(x_dual, y, log_b, log_kernel, upper, rounds=_OVERFLOW_ROUNDS):
    """The plan T[n, o, j] = exp(x_dual[n, j + o] + log_kernel[n, o] + y[n, j]) (T 1 = x) with every
    pixel's incoming mass <= ``upper`` up to a remainder (Sinkhorn's residual): each round, a pixel
    above ``upper`` sends the excess of its inflow from other pixels back to their sources, pro rata
    (kept at the source: zero cost, rows unchanged). A pixel keeps at most its own clean mass
    (<= upper), so its excess never exceeds its inflow and one round fixes every current excess; a
    source pushed above ``upper`` by returned mass is fixed in the next. Whatever remains after
    ``rounds`` is left to the caller's clip. Scaling a pixel's inflow keeps T factored: the result
    is T's column sums ``w`` and ``y`` with the off-diagonal columns rescaled; T's diagonal (each
    pixel's own kept mass) is ``w`` minus the inflow."""
    centre = log_kernel.shape[1] // 2
    own = (x_dual + log_kernel[:, centre].view(-1, 1, 1) + y).exp()  # the diagonal of T
    inflow = ((y + log_b).exp() - own).clamp_min(0)
    y = y.clone()  # the caller's y stays the warm start
    for _ in range(rounds):
        excess = (own + inflow - upper).clamp_min(0)
        if not bool((excess > 0).any()):
            break
        # <= 1 but for rounding, which can also leave `own` a hair above upper with no inflow
        share = (excess / inflow.clamp_min(torch.finfo(y.dtype).tiny)).clamp_max(1.0)
        # Source i gets back sum_{o != centre} T[i - o, o] share[i - o]: the window sum of y + log
        # share (the windows are symmetric) less its centre term, times e^{x_dual}.
        moved = y + share.log()
        back = (x_dual + _window_logsumexp(moved, log_kernel)[0]).exp()
        back -= (x_dual + log_kernel[:, centre].view(-1, 1, 1) + moved).exp()
        own += back.clamp_min(0)
        inflow -= inflow * share
        y += torch.log1p(-share)
    return own + inflow, y


@torch.no_grad()
def project_wasserstein(x, v, eps, *, kernel_size=DEFAULT_KERNEL_SIZE, lam=DEFAULT_LAMBDA,
                        iters=DEFAULT_SINKHORN_ITERS, upper=None, warm_start=None):
    """Project ``v`` onto the Wasserstein ball of radius ``eps`` around the clean images ``x``.

    ``x`` (B, C, H, W) >= 0 (pixel mass, [0, 1] images); ``v`` the same shape, any values (the
    point after an attack step); ``eps`` a float or (B,) tensor, the budget per unit of each clean
    image's mass (module doc); ``upper`` None or a float, an upper bound on the output's pixels.
    Returns ``(w, cost, state)``: ``w`` of x's shape and dtype, mass-preserving per channel;
    ``cost`` (B,), the normalised cost of the local transport plan from ``x`` to ``w`` that the
    solver built, <= eps; ``state``, the dual variables to pass as ``warm_start`` to the next
    projection of the same ``x`` (an attack's next step), which then needs fewer iterations.
    Computes in float32 at least. Memory: tensors of B*C*H*W entries only (module doc).
    """
    if x.shape != v.shape or x.dim() != 4:
        raise ValueError(f"x and v must both be (B, C, H, W), got {tuple(x.shape)} and "
                         f"{tuple(v.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    batch, channels, height, width = x.shape
    n = batch * channels
    tiny = torch.finfo(dtype).tiny
    a = x.detach().to(dtype)
    vv = v.detach().to(dtype).reshape(n, height, width)
    mass = a.sum((1, 2, 3))
    budget = torch.as_tensor(eps, dtype=dtype, device=x.device).expand(batch) * mass  # absolute
    active = budget > 0
    budget = torch.where(active, budget, torch.ones_like(budget))  # inactive rows: returned as x

    cost_k = window_costs(kernel_size, dtype, x.device)
    log_a = a.log().reshape(n, height, width)  # -inf on black pixels: they send no mass
    log_upper = None if upper is None else math.log(upper)
    # Duals of eq. 4.7-4.8 (the thesis's x, y, z; x_dual here, x is the clean image): x_dual for
    # T 1 = x, y for T^T 1 = w, z >= 0 for the cost. y = lam (v - w) at the optimum changes little
    # between attack steps: warm-started, 50 iterations land about twice as close (measured).
    if warm_start is None:
        y = torch.zeros_like(vv)
        z = torch.ones(batch, dtype=dtype, device=x.device)
    else:
        y, z = warm_start[0].clone(), warm_start[1].clone()

    # The plan is never stored: T[n, o, j] = exp(x_dual[n, j + o] + log_kernel[n, o] + y[n, j]) is
    # the mass moved from pixel j + o to pixel j (eq. 4.9), and every sum over it that the solver
    # needs is a window sum of one factor (:func:`_window_logsumexp`) times the other.
    def log_kernel():  # log of eq. 4.9's exp(-z C - 1) per window offset, per channel row
        return -z.repeat_interleave(channels).view(n, 1) * cost_k - 1

    def row_step(y, kernel):  # exact maximisation of eq. 4.8 in x_dual: every row of T sums to x
        return log_a - _window_logsumexp(y, kernel)[0]

    def total(log_t):  # per image, the sum of exp(log_t) over channels and pixels
        return log_t.exp().view(batch, -1).sum(1)

    for _ in range(iters):
        kernel = log_kernel()
        x_dual = row_step(y, kernel)
        # Exact maximisation in y: v_j - y_j / lam = b_j exp(y_j) with b_j = sum_i e^{x_i} K_ij, so
        # w_j = v_j - y_j / lam = W(lam b_j e^{lam v_j}) / lam (Lambert W); the upper bound caps w_j.
        log_b, log_cost, log_second = _window_logsumexp(x_dual, kernel, cost_k, moments=2)
        y = lam * vv - _lambert_w_exp(math.log(lam) + log_b + lam * vv)
        if log_upper is not None:
            y = torch.minimum(y, log_upper - log_b)
        # One Newton step in z on log(cost(z)) = log(budget) (log cost is convex and decreasing in
        # z, so the step does not overshoot from below); z = 0 when the budget does not bind.
        cost, second = total(y + log_cost), total(y + log_second)
        slope = (second / cost.clamp_min(tiny)).clamp_min(1e-12)
        z = (z + (cost.clamp_min(tiny).log() - budget.log()) / slope).clamp_min(0.0)

    # Read the image off the plan after an exact row step: T 1 = x exactly, so w = T^T 1 is reachable
    # from x at cost <T, C>. Then the bound and the budget are made exact: both fixes only move mass
    # back to where it came from, which keeps T 1 = x and lowers the cost.
    kernel = log_kernel()
    x_dual = row_step(y, kernel)
    log_b, log_cost = _window_logsumexp(x_dual, kernel, cost_k, moments=1)
    if upper is None:
        w, y_columns = (y + log_b).exp(), y
    else:
        w, y_columns = _return_overflow(x_dual, y, log_b, kernel, upper)
    cost = total(y_columns + log_cost)  # the diagonal (all that the fix adds) costs nothing
    w = w.view(batch, channels, height, width)
    shrink = (budget / cost.clamp_min(tiny)).clamp(max=1.0)
    w = a + shrink.view(-1, 1, 1, 1) * (w - a)  # the identity plan mixed in: cost 0, w <= upper kept
    w = torch.where(active.view(-1, 1, 1, 1), w, a)
    cost = torch.where(active, cost * shrink / mass.clamp_min(tiny), torch.zeros_like(cost))
    return w.to(x.dtype), cost, (y, z)


class SameIdPushLoss:
    """Thesis eq. 4.3: push f(x+d) away from the same-ID guides (the query's same-identity gallery
    images in the thesis), sum_{g in P} d(f(x+d), g) on raw features with ``distance`` ("euclidean":
    squared L2). Samples with no other same-ID guide have a zero gradient and stay unchanged."""

    needs_guides = True
    needs_clean_features = False

    def __init__(self, distance):
        self.distance = distance

    def targets(self, guides, pids, clean_features, sample_index):
        return guides.same_id(pids, sample_index, normalize=self.distance == "cosine")

    def __call__(self, features, targets):
        return same_id_distance_sum(features, targets, self.distance).sum()


@ATTACK_REGISTRY.register()
class WMA(ReidAttack):
    """Wasserstein metric attack (thesis ch. 4, Algorithm 1): ``steps`` times, a sign-gradient step
    of ``step_size`` on the metric loss (eq. 4.4), projection onto the Wasserstein ball of radius
    ``eps`` around the clean image by projected Sinkhorn (eq. 4.5-4.9, :func:`project_wasserstein`),
    and a clip to [0, 1] (line 5). Starts from the clean image (I~^0 = I).

    ``eps``: transport cost per unit of image mass, in [0, 1] (module doc; NOT 1/255 units); the
    thesis gives no unit-bearing default, :data:`DEFAULT_EPS` = 0.1 is Wong et al.'s. ``step_size``:
    the sign step in 1/255 units of pixel intensity, default 1 (the thesis gives none). ``loss``:
    "push" (default, eq. 4.3: away from the same-ID guides), "ama" or "fna" (module :mod:`.metric`).
    ``kernel_size`` (7), ``lam`` (3000): thesis 4.4.1; ``sinkhorn_iters`` (50) per projection.
    Time grows with B * C * H * W * kernel_size^2, memory with B * C * H * W (module doc).

    After :meth:`perturb`, ``plan_cost`` (B,) holds the normalised cost of each image's final
    transport plan (<= eps) and ``clipped_mass`` (B,) the share of its mass the final clip removed
    (~0: the projection keeps pixels <= 1 itself).
    """

    def __init__(self, extractor, *, eps=DEFAULT_EPS, loss="push", kernel_size=DEFAULT_KERNEL_SIZE,
                 lam=DEFAULT_LAMBDA, sinkhorn_iters=DEFAULT_SINKHORN_ITERS, **kwargs):
        self.loss_name = check_choice(loss, WMA_LOSSES, "loss")
        self.kernel_size = check_kernel_size(kernel_size)
        self.lam = non_negative_float(lam, "lam")
        if self.lam == 0:
            raise AttackConfigError(f"lam must be > 0, got {lam!r}")
        self.sinkhorn_iters = positive_int(sinkhorn_iters, "sinkhorn_iters")
        super().__init__(extractor, eps=eps, **kwargs)
        if self.rand_init:  # the engine's random start is a point of an L-inf ball
            raise AttackConfigError("WMA starts from the clean image (thesis Algorithm 1); "
                                    "rand_init=True is not supported")
        self.plan_cost = self.clipped_mass = None

    eps_unit = ""  # a normalised transport cost, not an L-inf budget

    @classmethod
    def check_eps(cls, value):
        return check_wasserstein_eps(value)

    def __repr__(self):
        return (f"WMA(eps={self.eps:g} transport cost/mass, steps={self.steps}, "
                f"step_size={self.step_size:g}/255, loss={self.loss_name}, distance={self.distance}, "
                f"kernel_size={self.kernel_size}, lam={self.lam:g}, "
                f"sinkhorn_iters={self.sinkhorn_iters}, eot_samples={self.eot_samples})")

    def build_loss(self):
        if self.loss_name == "ama":
            return MetricIFGSMLoss(self.distance)
        if self.loss_name == "fna":
            return FurthestNegativeLoss(self.distance)
        return SameIdPushLoss(self.distance)

    def perturb(self, x01, pids, guides=None, sample_index=None):
        zeros = torch.zeros(len(x01), device=x01.device)
        self.plan_cost, self.clipped_mass = zeros, zeros.clone()  # eps 0 returns x untouched
        return super().perturb(x01, pids, guides, sample_index)

    def ascend(self, x, targets, predict, loss_fn, delta_init):
        adv, state = (x + delta_init).detach(), None
        for _ in range(self.steps):  # Algorithm 1
            point = adv.clone().requires_grad_(True)
            grad, = torch.autograd.grad(loss_fn(predict(point), targets), point)  # line 2
            stepped = adv + self._step01 * grad.sign()  # line 3, eq. 4.4
            projected, self.plan_cost, state = project_wasserstein(  # line 4, eq. 4.5-4.9
                x, stepped, self._eps01, kernel_size=self.kernel_size, lam=self.lam,
                iters=self.sinkhorn_iters, upper=1.0, warm_start=state)
            adv = projected.clamp(0.0, 1.0)  # line 5
        mass = x.sum((1, 2, 3)).clamp_min(torch.finfo(x.dtype).tiny)
        self.clipped_mass = ((projected - adv).sum((1, 2, 3)) / mass).detach()
        return adv

    def budget_used(self, x01, adv01):
        """The largest normalised transport cost among the last :meth:`perturb`'s plans (its own
        accounting: an exact optimal-transport solve at ReID image sizes is out of reach; the tests
        check it against one on small images)."""
        if self.plan_cost is None or len(self.plan_cost) != len(x01):
            raise AttackConfigError("budget_used needs the batch of the last perturb() call")
        return float(self.plan_cost.max()) if len(self.plan_cost) else 0.0


__all__ = ["WMA", "SameIdPushLoss", "check_wasserstein_eps", "project_wasserstein", "window_costs"]

"""Zeroth-order gradient estimates: the gradient of a function known only through its values.

``f`` maps a batch of points (B, *D) to one value per point (B,); row i of every call belongs to
sample i, so a per-sample function (e.g. ``lambda z: (black_box(z) * weights).sum(1)``) gets one
estimate per sample. Each estimator calls ``f`` on B rows at a time; "evaluations" below count calls
per sample, i.e. black-box queries per sample when ``f`` queries a :class:`BlackBox` once.

* :func:`rge`, random gradient estimate (thesis eq. 6.16; Liu et al. 2020), with q directions u_k
  drawn uniformly from the unit sphere of R^d and smoothing xi:
  - "forward" (eq. 6.16): ``d / (xi q) sum_k [f(x + xi u_k) - f(x)] u_k``; q evaluations plus one
    for f(x) unless ``f_x`` is given;
  - "central" (antithetic): ``d / (2 xi q) sum_k [f(x + xi u_k) - f(x - xi u_k)] u_k``; 2q
    evaluations, no f(x). Its bias is O(xi^2) rather than O(xi).
  Both estimate the gradient of the Gaussian-smoothed f (unbiased for a quadratic); the error of
  one estimate shrinks like sqrt(d / q).
* :func:`cge`, coordinate-wise gradient estimate (thesis eq. 6.19, Algorithm 5), for low
  dimensions (the autoencoder's latent):
  - "central" (Algorithm 5): ``sum_k [f(x + xi e_k) - f(x - xi e_k)] / (2 xi) e_k``; 2d evaluations.
    Eq. 6.19 divides by xi, not 2 xi: that is twice the derivative, so we divide by 2 xi (exact for
    a quadratic);
  - "forward": ``sum_k [f(x + xi e_k) - f(x)] / xi e_k``; d evaluations plus one for f(x) unless
    ``f_x`` is given (bias xi/2 times the curvature).

Directions come from ``generator`` (torch's global generator when None).
"""
import torch

__all__ = ["DIFFERENCES", "cge", "estimator_evaluations", "rge", "sphere_directions"]

DIFFERENCES = ("forward", "central")


def _check_difference(difference):
    if difference not in DIFFERENCES:
        raise ValueError(f"difference must be one of {DIFFERENCES}, got {difference!r}")


def estimator_evaluations(method, difference, q=None, dim=None, with_f_x=True):
    """Evaluations of ``f`` per sample one estimate costs: ``method`` "rge" (q directions) or "cge"
    (``dim`` coordinates); ``with_f_x``: f(x) is passed in, so forward differences do not query it."""
    _check_difference(difference)
    count = {"rge": q, "cge": dim}[method]
    if difference == "central":
        return 2 * count
    return count + (0 if with_f_x else 1)


def sphere_directions(like, generator=None):
    """One direction per row of ``like`` (B, *D), uniform on the unit sphere of R^d (d = the numel
    of a row): normalised standard Gaussian vectors."""
    u = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return u / u.flatten(1).norm(dim=1).view(-1, *[1] * (like.dim() - 1))


def _per_row(values, like):
    return values.view(-1, *[1] * (like.dim() - 1))


def rge(f, x, q, xi, difference="forward", f_x=None, generator=None):
    """Random gradient estimate of ``f`` at each row of ``x`` (see the module doc)."""
    _check_difference(difference)
    if q < 1 or xi <= 0:
        raise ValueError(f"rge needs q >= 1 and xi > 0, got q={q}, xi={xi}")
    x = x.detach()
    dim = x[0].numel()
    if difference == "forward" and f_x is None:
        f_x = f(x)
    estimate = torch.zeros_like(x)
    for _ in range(q):
        u = sphere_directions(x, generator)
        if difference == "forward":
            delta = f(x + xi * u) - f_x
        else:
            delta = f(x + xi * u) - f(x - xi * u)
        estimate += _per_row(delta, x) * u
    scale = dim / (xi * q) if difference == "forward" else dim / (2 * xi * q)
    return estimate * scale


def cge(f, x, xi, difference="central", f_x=None):
    """Coordinate-wise gradient estimate of ``f`` at each row of ``x`` (see the module doc)."""
    _check_difference(difference)
    if xi <= 0:
        raise ValueError(f"cge needs xi > 0, got {xi}")
    x = x.detach()
    flat = x.flatten(1)
    if difference == "forward" and f_x is None:
        f_x = f(x)
    estimate = torch.zeros_like(flat)
    for k in range(flat.shape[1]):
        step = torch.zeros_like(flat)
        step[:, k] = xi
        plus = f((flat + step).view_as(x))
        if difference == "forward":
            estimate[:, k] = (plus - f_x) / xi
        else:
            estimate[:, k] = (plus - f((flat - step).view_as(x))) / (2 * xi)
    return estimate.view_as(x)

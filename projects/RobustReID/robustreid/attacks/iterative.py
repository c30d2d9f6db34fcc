"""The L-inf engines every attack runs on, over [0, 1] images.

* :func:`sign_gradient_ascent`: advertorch's ``perturb_iterative`` (I-FGSM / PGD: step along the sign
  of the gradient, project onto the eps-ball and onto [0, 1]);
* :func:`momentum_sign_ascent`: MI-FGSM and NI-FGSM, which advertorch 0.2.3 does not provide for
  structured (guide) targets or with a Nesterov look-ahead.

Budgets and steps here are Python floats in [0, 1] units (advertorch asserts floats).
"""
import numpy as np
import torch
from advertorch.attacks.iterative_projected_gradient import perturb_iterative
from advertorch.attacks.utils import rand_init_delta


def random_start(x, eps):
    """A uniform random point of the eps-ball around ``x``, clipped to [0, 1], as a delta
    (advertorch's ``rand_init_delta``, so seeds reproduce advertorch's PGD)."""
    delta = torch.zeros_like(x)
    rand_init_delta(delta, x, np.inf, eps, 0.0, 1.0)
    return delta


def sign_gradient_ascent(x, targets, predict, loss_fn, *, eps, steps, step_size, delta_init):
    """``steps`` iterations of delta <- clip(delta + step_size * sign(grad loss)) from ``delta_init``."""
    return perturb_iterative(x, targets, predict, nb_iter=steps, eps=eps, eps_iter=step_size,
                             loss_fn=loss_fn, delta_init=delta_init, clip_min=0.0, clip_max=1.0)


def momentum_sign_ascent(x, targets, predict, loss_fn, *, eps, steps, step_size, delta_init, decay,
                         nesterov=False):
    """MI-FGSM (Dong et al. 2018): g <- decay * g + grad / mean|grad| (per sample, as in Bai et al.'s
    and Lin et al.'s code), delta <- clip(delta + step_size * sign(g)). ``nesterov``: NI-FGSM (Lin et
    al. 2020), the gradient is taken at the look-ahead x + delta + step_size * decay * g (kept in
    [0, 1])."""
    delta = delta_init.detach().clone()
    momentum = torch.zeros_like(x)
    sample_dims = tuple(range(1, x.dim()))
    for _ in range(steps):
        point = x + delta
        if nesterov:
            point = (point + step_size * decay * momentum).clamp(0.0, 1.0)
        point.requires_grad_(True)
        grad, = torch.autograd.grad(loss_fn(predict(point), targets), point)
        scale = grad.abs().mean(dim=sample_dims, keepdim=True).clamp_min(1e-12)
        momentum = decay * momentum + grad / scale
        delta = (delta + step_size * momentum.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0.0, 1.0) - x
    return (x + delta).clamp(0.0, 1.0)

"""Farthest negative extension softening, FNES (DDDefense eq. 4).

After the metric attack, the perturbation is scaled by gamma and mixed back with the clean image
with a random weight omega ~ U(a, b), so adversarial examples no longer all sit on the attack's
fixed sign-step lattice; their labels are softened toward the identity FNA pulled them to:

    x_temp = x + gamma (x_hat - x),          x_adv = omega x + (1 - omega) x_temp
    y_adv  = omega phi(y, lambda1) + (1 - omega) tau(phi(y, lambda2), v)

omega is drawn per sample (the paper's "diversifying the attack budget"). x_adv's perturbation is
(1 - omega) gamma (x_hat - x), up to 1.05 eps with the defaults; x_adv is clipped to the valid
[0, 1] image range.
"""
from typing import NamedTuple

import torch

from ..modeling.losses.soft_labels import move_label_mass, smooth_labels


class FnesSettings(NamedTuple):
    gamma: float = 1.5
    omega_range: tuple = (0.3, 0.8)
    lambda1: float = 0.9
    lambda2: float = 0.95
    v: float = 0.01

    @classmethod
    def from_config(cls, cfg):
        fnes = cfg.ADV_TRAIN.FNES
        return cls(fnes.GAMMA, tuple(fnes.OMEGA_RANGE), fnes.LAMBDA1, fnes.LAMBDA2, fnes.V)


def fnes_images(x, x_hat, omega, gamma):
    """x_adv of eq. 4 for images in [0, 1]; ``omega`` is (B,)."""
    x_temp = x + gamma * (x_hat - x)
    w = omega.view(-1, *([1] * (x.dim() - 1)))
    return (w * x + (1 - w) * x_temp).clamp_(0.0, 1.0)


def fnes_labels(pids, far_pids, omega, num_classes, settings, has_far=None):
    """y_adv of eq. 4 (B, K); rows sum to 1. ``has_far`` False rows keep phi(y, lambda2) unmoved."""
    w = omega[:, None]
    pulled = move_label_mass(smooth_labels(pids, num_classes, settings.lambda2), pids, far_pids,
                             settings.v, where=has_far)
    return w * smooth_labels(pids, num_classes, settings.lambda1) + (1 - w) * pulled


def sample_omega(batch_size, settings, device):
    """omega ~ U(a, b), one per sample, from torch's global generator (seeded runs reproduce)."""
    low, high = settings.omega_range
    return torch.empty(batch_size).uniform_(low, high).to(device)

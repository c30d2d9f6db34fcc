"""The crafter of AMD's offline adversarial training set (data/adversarial_set.py writes the files):
the online Metric AT step's adversarial phase, run once by an already-trained model."""
from typing import Callable

import torch

from ..data.adversarial_set import quantise_within_budget
from .train_steps import MetricAdversarialBatch


def make_crafter(model, attack: str, eps: float, steps: int, step_size: float, distance: str,
                 device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``craft(images255, pids) -> uint8 adversarial images``: Metric AT's batch phase (the batch is
    its own guide set) with the model frozen in eval mode, quantised by :func:`quantise_within_budget`."""
    phase = MetricAdversarialBatch(attack, eps, steps, step_size, distance, include_clean=False)

    def craft(images255, pids):
        images255, pids = images255.to(device), pids.to(device)
        adv = phase(model, {"images": images255, "targets": pids})
        return quantise_within_budget(adv["images"].detach(), images255, eps).cpu()

    return craft

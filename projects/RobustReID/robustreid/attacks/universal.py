"""Universal adversarial perturbation (UAP) for ReID: one L-inf perturbation for every image.

Learned on training images (never the test queries) by sign-gradient ascent on the feature distance
to the clean features, d(F(x + delta), F(x)) averaged over each batch ("push away from the clean
features": no identity or guide set needed), from a uniform random point of the eps-ball (torch's
generator), delta kept in the eps-ball; the images then get
``clip(x + delta, 0, 1)``. Crafted on a surrogate's extractor it is a transfer attack.
"""
import itertools
import time

import torch

from .losses import DISTANCES, paired_distance
from .validation import check_choice, eps_from_255, positive_int, step_from_255

__all__ = ["UniversalPerturbation"]


class UniversalPerturbation:
    """A universal L-inf perturbation of budget ``eps`` (1/255 units), fitted with ``steps``
    sign-gradient steps of ``step_size`` (1/255 units, default 1) on ``extractor``'s features with
    ``distance`` (euclidean: squared L2, or cosine)."""

    name = "UAP"

    def __init__(self, extractor, *, eps, steps, step_size=None, distance="euclidean"):
        self.extractor = extractor
        self._eps01 = eps_from_255(eps)
        self.eps = float(eps)
        self.steps = positive_int(steps, "steps")
        self.step_size = float(step_size) if step_size else 1.0
        self._step01 = step_from_255(self.step_size)
        self.distance = check_choice(distance, DISTANCES, "distance")
        self.delta = None
        self.fit_stats = {}

    def fit(self, batches):
        """Learn delta on ``batches`` (an iterable of [0, 1] image batches of one size, one step
        each, its first ``steps``: e.g. an endless stream of epochs); returns self."""
        start, images, loss, steps = time.perf_counter(), 0, float("nan"), 0
        with self.extractor.frozen_eval():
            for x in itertools.islice(batches, self.steps):
                x = x.detach()
                if self.delta is None:  # a random start: at delta 0 the distance's gradient is 0
                    self.delta = (torch.rand_like(x[:1]) * 2 - 1) * self._eps01
                with torch.no_grad():
                    clean = self.extractor(x)
                delta = self.delta.clone().requires_grad_(True)
                objective = paired_distance(self.extractor((x + delta).clamp(0, 1)), clean,
                                            self.distance).mean()
                grad, = torch.autograd.grad(objective, delta)
                self.delta = (self.delta + self._step01 * grad.sign()).clamp(-self._eps01,
                                                                             self._eps01)
                images, loss, steps = images + len(x), objective.item(), steps + 1
        self.fit_stats = {"fit_steps": steps, "fit_images_seen": images,
                          "fit_final_objective": loss,
                          "fit_seconds": time.perf_counter() - start,
                          "delta_linf_255": float(self.delta.abs().max()) * 255}
        return self

    def perturb(self, x01, pids=None, guides=None, sample_index=None):
        """``clip(x01 + delta, 0, 1)``: the same delta for every image (after :meth:`fit`)."""
        if self.delta is None:
            raise RuntimeError("UniversalPerturbation.perturb before fit()")
        if self.delta.shape[1:] != x01.shape[1:]:
            raise ValueError(f"the perturbation was learned on images of shape "
                             f"{tuple(self.delta.shape[1:])}, got {tuple(x01.shape[1:])}")
        return (x01.detach() + self.delta.to(x01.device)).clamp(0.0, 1.0)

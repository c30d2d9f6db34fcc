"""The training step as a short pipeline of named phases.

fastreid's SimpleTrainer does "load batch -> forward -> backward -> step". Robust methods insert
phases between loading and the model update (craft adversarial examples, update a discriminator,
...). ``PhasedTrainer`` runs ``batch_phases`` in order, times each one into the event storage
(``time/<phase>``, so attack cost never hides in fastreid's ``data_time``), then does fastreid's
update, with AMP when a grad scaler is given.
"""
import time

import torch
from fastreid.engine.train_loop import SimpleTrainer
from fastreid.utils.events import get_event_storage

from ..attacks import GuideSet, ReidFeatureExtractor, build_attack


class MetricAdversarialBatch:
    """Phase "adversarial": replace (or extend) the batch with metric adversarial examples.

    Each step crafts ``ADV_TRAIN.ATTACK`` (FNA by default) examples of the training batch with the
    batch itself as the guide set A (DDDefense eq. 3), budget ``ADV_TRAIN.EPS``/255 and
    ``ADV_TRAIN.STEPS`` iterations (5/255, 8 steps: DDDefense supplementary). The model is in eval
    mode while crafting (BN running statistics untouched, see ReidFeatureExtractor). With
    ``ADV_TRAIN.INCLUDE_CLEAN`` the clean images stay in the batch (clean + adversarial, both
    labelled with the true identity); without it the model trains on adversarial images only
    (Bouniot et al.'s online adversarial training, the "Adv_train" row).
    """

    name = "adversarial"

    def __init__(self, attack_name, eps, steps, step_size, distance, include_clean):
        self.attack_name = attack_name
        self.eps = eps
        self.steps = steps
        self.step_size = step_size or None
        self.distance = distance
        self.include_clean = include_clean

    @classmethod
    def from_config(cls, cfg):
        adv = cfg.ADV_TRAIN
        return cls(adv.ATTACK, adv.EPS, adv.STEPS, adv.STEP_SIZE, adv.DISTANCE, adv.INCLUDE_CLEAN)

    def __call__(self, model, batch):
        extractor = ReidFeatureExtractor(model)
        attack = build_attack(self.attack_name, extractor, eps=self.eps, steps=self.steps,
                              step_size=self.step_size, distance=self.distance)
        images01 = batch["images"].div(255.0)  # loader images are in [0, 255]
        pids = batch["targets"]
        with torch.no_grad():
            guides = GuideSet(extractor(images01), pids)
        rows = torch.arange(len(pids), device=pids.device)
        adv01 = attack.perturb(images01, pids, guides, sample_index=rows)
        adv_images = adv01.mul(255.0)
        if not self.include_clean:
            return dict(batch, images=adv_images)
        out = dict(batch)
        out["images"] = torch.cat([batch["images"], adv_images])
        for key in ("targets", "camids"):
            out[key] = torch.cat([batch[key], batch[key]])
        if "img_paths" in batch:
            out["img_paths"] = list(batch["img_paths"]) * 2
        return out


def build_batch_phases(cfg):
    """The phases the config switches on, in execution order."""
    phases = []
    if cfg.ADV_TRAIN.ENABLED:
        phases.append(MetricAdversarialBatch.from_config(cfg))
    return phases


class PhasedTrainer(SimpleTrainer):
    """SimpleTrainer whose step runs ``batch_phases`` between loading and the update."""

    def __init__(self, model, data_loader, optimizer, param_wrapper, batch_phases=(),
                 grad_scaler=None):
        super().__init__(model, data_loader, optimizer, param_wrapper)
        self.batch_phases = list(batch_phases)
        self.grad_scaler = grad_scaler

    def run_step(self):
        assert self.model.training, "[PhasedTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        storage = get_event_storage()
        for phase in self.batch_phases:
            start = time.perf_counter()
            data = phase(self.model, data)
            storage.put_scalar(f"time/{phase.name}", time.perf_counter() - start,
                               smoothing_hint=True)

        with torch.autocast(device_type="cuda", enabled=self.grad_scaler is not None):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        if self.grad_scaler is None:
            losses.backward()
        else:
            self.grad_scaler.scale(losses).backward()
        self._write_metrics(loss_dict, data_time)
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

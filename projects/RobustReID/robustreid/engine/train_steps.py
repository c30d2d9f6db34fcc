"""The training step as a short pipeline of named parts.

fastreid's SimpleTrainer does "load batch -> forward -> backward -> step". Robust methods insert
work between loading and the update (craft adversarial examples, update a discriminator, split the
batch for meta-learning). ``PhasedTrainer`` runs ``batch_phases`` in order (each times itself into
the event storage as ``time/<phase>``, so attack cost never hides in fastreid's ``data_time``),
then asks its ``objective`` for the loss dict, and does fastreid's update, with AMP when a grad
scaler is given. Every method is a set of config switches choosing phases and objective parts:

================================  ===============================================================
INPUT.GAUSSIAN_NOISE.ENABLED      GaussianNoiseBatch: Gaussian data augmentation (Cohen et al.),
                                  for models that randomized smoothing certifies
ADV_TRAIN.ENABLED                 MetricAdversarialBatch (Metric AT; Adv_train; AT_PGD with PGD)
ADV_TRAIN.FNES.ENABLED            FNES images and soft labels in that phase (eq. 4)
ADV_TRAIN.DISCRIMINATOR.ENABLED   FeatureAdversary: D update + the encoder's L_E (eq. 6-8)
META_LEARNING.ENABLED             self-meta learning: the objective becomes eq. 13
EAT.ENABLED                       EnsembleAdversarialBatch (engine/eat.py): EAT, eq. 10; the
                                  EnsembleReID model's losses are Algorithm 1 line 9
DML_DEFENSE.METHOD                EAT's baselines in DML form (engine/dml_defenses.py): AT's
                                  MetricAdversarialBatch, MixUpBatch, and the objective's
                                  embedding-target terms (mix-up, IAT, TRADES)
================================  ===============================================================

With every switch off the step is fastreid's, bit for bit.
"""
import time

import torch
from fastreid.engine.train_loop import SimpleTrainer
from fastreid.utils import comm
from fastreid.utils.events import get_event_storage
from torch.func import functional_call

from ..attacks import GuideSet, ReidFeatureExtractor, build_attack
from ..config import ConfigError, check_pixel_sigma
from ..modeling.dg_config import check_dg_config
from ..modeling.losses.soft_labels import smooth_labels
from ..parallel import all_gather_rows, unwrap
from .adversarial_learning import FeatureAdversary
from .distributed import mean_across_ranks
from .eat import check_eat_config
from .fnes import FnesSettings, fnes_images, fnes_labels, sample_omega
from .meta_step import meta_losses, split_by_identity, subset


class GaussianNoiseBatch:
    """Phase "gaussian_noise": add N(0, sigma^2) to every pixel of the training batch, sigma in
    [0, 1] pixel units (the loader's images are [0, 255], so the noise is scaled by 255).

    Cohen et al. train the base classifier of randomized smoothing on such noise, at the sigma that
    smoothing will use, and they do not clip to [0, 1]. Neither does this phase, so the model trains
    on the very inputs it is certified on. It runs first, so every later phase (adversarial
    examples, ...) sees the noisy batch. Draws come from torch's global generator, which
    checkpoints hold (a resumed run draws the same noise). Only training steps run it:
    evaluation, attacks and certification never see it.
    """

    name = "gaussian_noise"

    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, model, batch):
        images = batch["images"]
        return {**batch, "images": images + torch.randn_like(images) * (self.sigma * 255.0)}


class MetricAdversarialBatch:
    """Phase "adversarial": replace (or extend) the batch with adversarial examples.

    Each step crafts ``ADV_TRAIN.ATTACK`` (FNA by default) examples of the training batch with the
    batch itself as the guide set A (DDDefense eq. 3; with several processes each crafts its own
    images' examples against the whole batch, as one process would), budget ``ADV_TRAIN.EPS``/255 and
    ``ADV_TRAIN.STEPS`` iterations (5/255, 8 steps: DDDefense supplementary). The model is in eval
    mode with frozen parameters while crafting (input gradients only; BN statistics untouched, see
    ReidFeatureExtractor). With ``ADV_TRAIN.INCLUDE_CLEAN`` the clean images stay in the batch;
    without it the model trains on adversarial images only (Bouniot et al.'s "Adv_train", and
    Madry's AT with ATTACK PGD). ``is_adversarial`` (B,) marks the adversarial rows.

    ``fnes`` (FnesSettings) applies FNES (eq. 4) to the attack's output and adds ``soft_targets``
    (B, K): y_adv for adversarial rows, phi(y, ``clean_lambda``) for clean ones.
    """

    name = "adversarial"

    def __init__(self, attack_name, eps, steps, step_size, distance, include_clean, fnes=None,
                 num_classes=None, clean_lambda=None):
        self.attack_name = attack_name
        self.eps = eps
        self.steps = steps
        self.step_size = step_size or None
        self.distance = distance
        self.include_clean = include_clean
        self.fnes = fnes
        self.num_classes = num_classes
        self.clean_lambda = clean_lambda
        self._extractor = None

    @classmethod
    def from_config(cls, cfg):
        adv = cfg.ADV_TRAIN
        fnes = FnesSettings.from_config(cfg) if adv.FNES.ENABLED else None
        return cls(adv.ATTACK, adv.EPS, adv.STEPS, adv.STEP_SIZE, adv.DISTANCE, adv.INCLUDE_CLEAN,
                   fnes=fnes, num_classes=cfg.MODEL.HEADS.NUM_CLASSES,
                   clean_lambda=1.0 - cfg.MODEL.LOSSES.CE.EPSILON)

    def extractor(self, model):
        """One extractor per model across steps: its BN-folded copy is built once and refreshed
        in place each step, never deep-copied again."""
        if self._extractor is None or self._extractor.model is not unwrap(model):
            self._extractor = ReidFeatureExtractor(model)
        return self._extractor

    def __call__(self, model, batch):
        extractor = self.extractor(model)
        attack = build_attack(self.attack_name, extractor, eps=self.eps, steps=self.steps,
                              step_size=self.step_size, distance=self.distance)
        images01 = batch["images"].div(255.0)  # loader images are in [0, 255]
        pids = batch["targets"]
        with extractor.frozen_eval():  # one block: the eval-mode model is prepared once per step
            with torch.no_grad():
                clean_features = extractor(images01)
            guides, rows = whole_batch_guides(clean_features, pids)
            adv01 = attack.perturb(images01, pids, guides, sample_index=rows)
        adv = {"targets": pids}
        if self.fnes is not None:
            omega = sample_omega(len(pids), self.fnes, pids.device)
            adv01 = fnes_images(images01, adv01, omega, self.fnes.gamma)
            far_pids, has_far = guides.farthest_identities(clean_features, pids, self.distance)
            adv["soft_targets"] = fnes_labels(pids, far_pids, omega, self.num_classes, self.fnes,
                                              has_far)
        adv["images"] = adv01.mul(255.0)
        adv["is_adversarial"] = torch.ones(len(pids), dtype=torch.bool, device=pids.device)
        if not self.include_clean:
            return {**batch, **adv}
        clean = {"images": batch["images"], "targets": pids,
                 "is_adversarial": torch.zeros_like(adv["is_adversarial"])}
        if self.fnes is not None:
            clean["soft_targets"] = smooth_labels(pids, self.num_classes, self.clean_lambda)
        out = dict(batch)
        out.update({key: torch.cat([clean[key], adv[key]]) for key in adv})
        out["camids"] = torch.cat([batch["camids"], batch["camids"]])
        if "img_paths" in batch:
            out["img_paths"] = list(batch["img_paths"]) * 2
        return out


def whole_batch_guides(clean_features, pids):
    """The training batch as a guide set, every process's rows in rank order (the batch one process
    would have), and the rows of this process's samples in it."""
    rank = comm.get_rank()
    features, batch_pids, owners = all_gather_rows(clean_features, pids, torch.full_like(pids, rank))
    return GuideSet(features, batch_pids), (owners == rank).nonzero().squeeze(1)


def build_batch_phases(cfg):
    """The phases the config switches on, in execution order."""
    phases = []
    if cfg.INPUT.GAUSSIAN_NOISE.ENABLED:
        phases.append(GaussianNoiseBatch(cfg.INPUT.GAUSSIAN_NOISE.SIGMA))
    if cfg.ADV_TRAIN.ENABLED:
        phases.append(MetricAdversarialBatch.from_config(cfg))
    return phases


class TrainingObjective:
    """The loss dict of one step: the model's losses (+ L_E with a ``FeatureAdversary``), or the
    self-meta objective of eq. 13 over them (``meta_test_fraction`` set).

    ``inner_lr`` is alpha of eq. 9; 0 means the optimizer's current learning rate (the paper gives
    no value).
    """

    def __init__(self, adversary=None, meta_test_fraction=None, inner_lr=0.0, first_order=False,
                 nuisance=None, defense=None):
        self.adversary = adversary
        self.nuisance = nuisance  # ADIN's nuisance classifier (engine/dg_steps.NuisanceAdversary)
        # a DML defense's embedding-target terms (engine/dml_defenses.EmbeddingTargetTerms)
        self.defense = defense
        self.meta_test_fraction = meta_test_fraction
        self.inner_lr = inner_lr
        self.first_order = first_order

    @classmethod
    def from_config(cls, cfg, device):
        adversary = (FeatureAdversary.from_config(cfg, device)
                     if cfg.ADV_TRAIN.DISCRIMINATOR.ENABLED else None)
        meta = cfg.META_LEARNING
        return cls(adversary, meta.TEST_FRACTION if meta.ENABLED else None, meta.INNER_LR,
                   meta.FIRST_ORDER)

    @property
    def functional_step(self):
        """Whether the step's forwards bypass DDP (gradients then need the manual all-reduce)."""
        return self.meta_test_fraction is not None

    @property
    def is_plain(self):
        return self.adversary is None and self.meta_test_fraction is None and \
            self.nuisance is None and self.defense is None

    def checkpointables(self):
        parts = {}
        for part in (self.adversary, self.nuisance):
            if part is not None:
                parts.update(part.checkpointables())
        return parts

    def __call__(self, model, data, optimizer):
        if self.is_plain:
            return model(data)
        if self.meta_test_fraction is None:
            if self.defense is not None:
                data = {**data, "loss_rows": self.defense.loss_rows(data)}
            losses, outputs = model(data, return_outputs=True)
            if self.defense is not None:
                losses.update(self.defense(outputs, data))
            return self._with_adversaries(losses, outputs, data, update=True)
        module = unwrap(model)
        test_rows = split_by_identity(data["targets"], self.meta_test_fraction)
        meta_train, meta_test = subset(data, ~test_rows), subset(data, test_rows)

        def loss_fn(params, batch):
            losses, outputs = functional_call(module, params, (batch,), {"return_outputs": True})
            # D learns from the meta-train forward (at theta, before the model update: Algorithm 1)
            return self._with_adversaries(losses, outputs, batch, update=batch is meta_train)

        inner_lr = self.inner_lr or optimizer.param_groups[0]["lr"]
        return meta_losses(module, loss_fn, meta_train, meta_test, inner_lr, self.first_order)

    def _with_adversaries(self, losses, outputs, batch, update):
        if self.nuisance is not None:
            losses = self.nuisance(losses, outputs, batch, update)
        if self.adversary is None:
            return losses
        features, is_adv = outputs["features"], batch["is_adversarial"]
        if update:
            get_event_storage().put_scalar("loss_discriminator", self.adversary.update(features,
                                                                                       is_adv))
        losses["loss_adv_encoder"] = self.adversary.encoder_loss(features, is_adv)
        return losses


def check_training_config(cfg):
    """Switch combinations that cannot work, as ConfigErrors naming the keys."""
    needs_outputs = cfg.ADV_TRAIN.FNES.ENABLED or cfg.ADV_TRAIN.DISCRIMINATOR.ENABLED or \
        cfg.META_LEARNING.ENABLED
    if needs_outputs and cfg.MODEL.META_ARCHITECTURE != "RobustBaseline":
        raise ConfigError(f"ADV_TRAIN.FNES / ADV_TRAIN.DISCRIMINATOR / META_LEARNING need "
                          f"MODEL.META_ARCHITECTURE RobustBaseline, got "
                          f"{cfg.MODEL.META_ARCHITECTURE!r}")
    if (cfg.ADV_TRAIN.FNES.ENABLED or cfg.ADV_TRAIN.DISCRIMINATOR.ENABLED) and \
            not cfg.ADV_TRAIN.ENABLED:
        raise ConfigError("ADV_TRAIN.FNES / ADV_TRAIN.DISCRIMINATOR need ADV_TRAIN.ENABLED True")
    if cfg.ADV_TRAIN.DISCRIMINATOR.ENABLED and not cfg.ADV_TRAIN.INCLUDE_CLEAN:
        raise ConfigError("ADV_TRAIN.DISCRIMINATOR needs ADV_TRAIN.INCLUDE_CLEAN True: D learns "
                          "clean vs adversarial features")
    if cfg.ADV_TRAIN.FNES.ENABLED:
        fnes = cfg.ADV_TRAIN.FNES
        low, high = fnes.OMEGA_RANGE
        if fnes.GAMMA < 1 or not 0 < low <= high < 1 or not 0 < fnes.V < fnes.LAMBDA2 < 1 \
                or not 0 < fnes.LAMBDA1 < 1:
            raise ConfigError(f"ADV_TRAIN.FNES needs GAMMA >= 1, 0 < OMEGA_RANGE < 1, "
                              f"0 < V < LAMBDA2 < 1, 0 < LAMBDA1 < 1 (eq. 4), got {dict(fnes)}")
        if cfg.MODEL.LOSSES.CE.EPSILON < 0:
            raise ConfigError("ADV_TRAIN.FNES needs MODEL.LOSSES.CE.EPSILON >= 0 (fixed smoothing "
                              "of the clean labels)")
    if cfg.INPUT.GAUSSIAN_NOISE.ENABLED:
        check_pixel_sigma(cfg.INPUT.GAUSSIAN_NOISE.SIGMA, "INPUT.GAUSSIAN_NOISE.SIGMA")
    if cfg.META_LEARNING.ENABLED and not 0 < cfg.META_LEARNING.TEST_FRACTION < 1:
        raise ConfigError(f"META_LEARNING.TEST_FRACTION must be in (0, 1), got "
                          f"{cfg.META_LEARNING.TEST_FRACTION}")
    check_dg_config(cfg)
    check_eat_config(cfg)


class PhasedTrainer(SimpleTrainer):
    """SimpleTrainer whose step runs ``batch_phases``, then ``objective`` for the losses."""

    def __init__(self, model, data_loader, optimizer, param_wrapper, batch_phases=(),
                 objective=None, grad_scaler=None):
        super().__init__(model, data_loader, optimizer, param_wrapper)
        self.batch_phases = list(batch_phases)
        self.objective = objective or TrainingObjective()
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
            loss_dict = self.objective(self.model, data, self.optimizer)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        if self.grad_scaler is None:
            losses.backward()
        else:
            self.grad_scaler.scale(losses).backward()
        if self.objective.functional_step:  # forwards bypassed DDP: it did not sync gradients
            mean_across_ranks([p.grad for p in self.model.parameters() if p.grad is not None])
        self._write_metrics(loss_dict, data_time)
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

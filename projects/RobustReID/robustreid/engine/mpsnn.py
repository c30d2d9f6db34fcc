"""MP-SNN training (thesis chapter 5.2): the objective of one step and the noise scales' own update.

Pieces for RobustTrainer / PhasedTrainer (config MPSNN.*, modules MODEL.NOISE.*):

* :func:`build_mpsnn_phases` - the batch phase crafting L_Adv's examples (eq. 5.7: untargeted L-inf
  PGD, 8/255, 7 iterations), i.e. ``MetricAdversarialBatch`` with the PGD attack, clean rows kept.
* :class:`MpsnnObjective` - stands in for ``TrainingObjective``: the loss dict of L_Tot (eq. 5.7) or,
  with MPSNN.META.ENABLED, of the meta objective over the tasks V, P, PA (Algorithm 3) computed by the
  shared functional step :func:`robustreid.engine.meta_step.meta_losses`.
* Algorithm 2: theta and phi_a are in the model optimizer; the isotropic scales phi are not
  (:func:`excluding_noise_scales` around fastreid's ``build_optimizer``) and are stepped by the
  objective's own SGD (lr beta = MPSNN.NOISE_LR) and scheduler in :class:`MpsnnHook`'s
  ``after_step``, i.e. after the model optimizer's step. The noise optimizer and scheduler are in
  ``checkpointables()``.

Meta training (Algorithm 3), as implemented:
  1. the batch's identities are split (``split_by_identity``) into meta-train rows (the k images)
     and meta-test rows (the N - k images); every meta-train task uses the same meta-train rows
     [open: the thesis samples "k non-overlapping images ... for each training task"];
  2. a task t is drawn uniformly from MPSNN.META.TASKS as meta-test, the others are meta-train;
     the draw uses one seeded Python RNG with the same seed on every rank, so all ranks run the same
     tasks (same loss keys and the same set of parameters with gradients for the all-reduce);
  3. L_mtr(Theta) = sum of the meta-train tasks' losses (eq. 5.8; means over rows, not sums);
     Theta' = Theta - inner_lr grad L_mtr (noise scales and phi_a included: Theta = {theta, phi,
     phi_a}); L_meta = L_mte(Theta) + L_mte(Theta') (eq. 5.11; MPSNN.META.OUTER_LOSS "mldg" uses
     L_mtr(Theta) + L_mte(Theta') instead).
Task losses: V = eq. 5.1 with every noise module off; P = eq. 5.6; PA = eq. 5.7.
"""
import contextlib
import random

import torch
from fastreid.engine.hooks import HookBase
from torch.func import functional_call

from ..config import ConfigError
from ..modeling.losses.mpsnn import fca_loss, mpsnn_loss_terms, noise_regularizer
from ..modeling.noise import (META_TASKS, anisotropic_factor, isotropic_scale_names, noise_disabled,
                              split_noise_parameters, take_clean_features)
from ..parallel import unwrap
from ..rng_state import PythonRandomState
from .distributed import mean_across_ranks
from .meta_step import meta_losses, split_by_identity, subset
from .train_steps import MetricAdversarialBatch

__all__ = ["MpsnnHook", "MpsnnObjective", "build_mpsnn_phases", "build_noise_optimizer",
           "check_mpsnn_config", "excluding_noise_scales"]

ALTERNATIONS = ("sequential", "shared")
OUTER_LOSSES = ("thesis", "mldg")


@contextlib.contextmanager
def excluding_noise_scales(model):
    """Inside the block the isotropic scales do not require gradients, so fastreid's
    ``build_optimizer`` (which skips such parameters) leaves them out of the model optimizer."""
    scales, _ = split_noise_parameters(model)
    flags = [(p, p.requires_grad) for p in scales]
    for p in scales:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def build_noise_optimizer(cfg, model):
    """(SGD over the isotropic scales, its MultiStepLR over epochs), or (None, None) without them."""
    scales, _ = split_noise_parameters(model)
    if not scales:
        return None, None
    m = cfg.MPSNN
    optimizer = torch.optim.SGD(scales, lr=m.NOISE_LR, momentum=m.NOISE_MOMENTUM,
                                weight_decay=m.NOISE_WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(m.NOISE_STEPS), m.NOISE_GAMMA)
    return optimizer, scheduler


def _needs_adversarial(cfg):
    m = cfg.MPSNN
    return m.ENABLED and m.ETA > 0 and (not m.META.ENABLED or "PA" in m.META.TASKS)


def build_mpsnn_phases(cfg):
    """[the PGD batch phase] when L_Adv is used (MPSNN.ENABLED, ETA > 0 and task PA), else []."""
    if not _needs_adversarial(cfg):
        return []
    adv = cfg.MPSNN.ADV
    return [MetricAdversarialBatch(adv.ATTACK, adv.EPS, adv.STEPS, adv.STEP_SIZE, "euclidean",
                                   include_clean=True)]


def check_mpsnn_config(cfg):
    """MODEL.NOISE / MPSNN settings that cannot work, as ConfigErrors naming the keys."""
    noise, m = cfg.MODEL.NOISE, cfg.MPSNN
    if noise.ENABLED and not noise.BLOCKS and not noise.ANISOTROPIC.ENABLED:
        raise ConfigError("MODEL.NOISE.ENABLED needs MODEL.NOISE.BLOCKS or "
                          "MODEL.NOISE.ANISOTROPIC.ENABLED")
    if cfg.TEST.NOISE_DRAWS < 1:
        raise ConfigError(f"TEST.NOISE_DRAWS must be >= 1, got {cfg.TEST.NOISE_DRAWS}")
    if not m.ENABLED:
        return
    if not noise.ENABLED:
        raise ConfigError("MPSNN.ENABLED needs MODEL.NOISE.ENABLED True (the noise modules)")
    if cfg.MODEL.META_ARCHITECTURE != "RobustBaseline":
        raise ConfigError(f"MPSNN needs MODEL.META_ARCHITECTURE RobustBaseline, got "
                          f"{cfg.MODEL.META_ARCHITECTURE!r}")
    if cfg.ADV_TRAIN.ENABLED or cfg.META_LEARNING.ENABLED:
        raise ConfigError("MPSNN brings its own adversarial batch (MPSNN.ADV) and meta step "
                          "(MPSNN.META): set ADV_TRAIN.ENABLED and META_LEARNING.ENABLED False")
    if m.ETA < 0 or m.LAMBDA < 0:
        raise ConfigError(f"MPSNN.ETA and MPSNN.LAMBDA must be >= 0, got {m.ETA}, {m.LAMBDA}")
    if m.ALTERNATION not in ALTERNATIONS:
        raise ConfigError(f"MPSNN.ALTERNATION must be one of {ALTERNATIONS}, got {m.ALTERNATION!r}")
    if m.ALTERNATION == "shared" and cfg.SOLVER.AMP.ENABLED:
        raise ConfigError("MPSNN.ALTERNATION shared steps the noise scales on the backward's "
                          "gradients, which AMP scales: use sequential or SOLVER.AMP.ENABLED False")
    if m.META.ENABLED:
        tasks = list(m.META.TASKS)
        if len(set(tasks)) != len(tasks) or len(tasks) < 2 or not set(tasks) <= set(META_TASKS):
            raise ConfigError(f"MPSNN.META.TASKS must be >= 2 distinct names of {META_TASKS}, got "
                              f"{tuple(tasks)}")
        if not 0 < m.META.TEST_FRACTION < 1:
            raise ConfigError(f"MPSNN.META.TEST_FRACTION must be in (0, 1), got "
                              f"{m.META.TEST_FRACTION}")
        if m.META.OUTER_LOSS not in OUTER_LOSSES:
            raise ConfigError(f"MPSNN.META.OUTER_LOSS must be one of {OUTER_LOSSES}, got "
                              f"{m.META.OUTER_LOSS!r}")


class _TaskRows:
    """The rows a set of tasks runs on: clean rows and the matching adversarial rows (or None)."""

    def __init__(self, tasks, clean, adv):
        self.tasks, self.clean, self.adv = list(tasks), clean, adv


class MpsnnObjective:
    """The loss dict of one MP-SNN step (see the module doc), with the noise scales' optimizer.

    Duck-types ``TrainingObjective`` for ``PhasedTrainer``/``RobustTrainer``: ``adversary`` (None),
    ``meta_test_fraction`` (never None: every forward is functional on the DDP-unwrapped module, so
    PhasedTrainer must all-reduce the gradients itself), ``checkpointables()``, and ``__call__(model,
    data, optimizer)``. ``epoch`` (tau of eq. 5.2) is set by :class:`MpsnnHook`.
    """

    adversary = None
    is_plain = False
    functional_step = True  # forwards bypass DDP: gradients need the manual all-reduce

    def __init__(self, noise_optimizer=None, noise_scheduler=None, *, lam=1e-4, eta=0.5,
                 meta=True, tasks=META_TASKS, test_fraction=0.5, inner_lr=0.0, first_order=False,
                 outer_loss="thesis", alternation="sequential", task_seed=0):
        self.noise_optimizer = noise_optimizer
        self.noise_scheduler = noise_scheduler
        self.lam, self.eta = float(lam), float(eta)
        self.meta, self.tasks = bool(meta), tuple(tasks)
        self.test_fraction, self.inner_lr = float(test_fraction), float(inner_lr)
        self.first_order, self.outer_loss = bool(first_order), outer_loss
        self.alternation = alternation
        self.task_rng = random.Random(task_seed)  # same seed on every rank (module doc, step 2)
        self.epoch = 0
        self._freeze_buffers = False
        self._last = None

    @classmethod
    def from_config(cls, cfg, model):
        m = cfg.MPSNN
        optimizer, scheduler = build_noise_optimizer(cfg, model)
        return cls(optimizer, scheduler, lam=m.LAMBDA, eta=m.ETA, meta=m.META.ENABLED,
                   tasks=m.META.TASKS, test_fraction=m.META.TEST_FRACTION,
                   inner_lr=m.META.INNER_LR, first_order=m.META.FIRST_ORDER,
                   outer_loss=m.META.OUTER_LOSS, alternation=m.ALTERNATION,
                   task_seed=max(cfg.ROBUSTREID.SEED, 0))

    @property
    def meta_test_fraction(self):
        # PhasedTrainer all-reduces the gradients itself when this is not None (functional step).
        return self.test_fraction if self.meta else 0.0

    def checkpointables(self):
        parts = {"mpsnn_task_rng": PythonRandomState(self.task_rng)}  # a resumed run draws on
        if self.noise_optimizer is not None:
            parts.update(noise_optimizer=self.noise_optimizer, noise_scheduler=self.noise_scheduler)
        return parts

    def hook(self):
        return MpsnnHook(self)

    # --- the loss ---------------------------------------------------------------------------------
    def __call__(self, model, data, optimizer):
        module = unwrap(model)
        self._last = (module, data, optimizer)
        is_adv = data.get("is_adversarial")
        if is_adv is not None:
            clean, adv = subset(data, ~is_adv), subset(data, is_adv)
        else:
            clean, adv = data, None
        if not self.meta:  # Algorithm 2 alone: L_Tot (eq. 5.7)
            return self._task_losses(module, None, "PA", clean, adv)

        test_task = self.task_rng.choice(self.tasks)
        test_rows = split_by_identity(clean["targets"], self.test_fraction)
        meta_train = _TaskRows([t for t in self.tasks if t != test_task], subset(clean, ~test_rows),
                               None if adv is None else subset(adv, ~test_rows))
        meta_test = _TaskRows([test_task], subset(clean, test_rows),
                              None if adv is None else subset(adv, test_rows))

        def loss_fn(params, rows):
            losses = {}
            for task in rows.tasks:
                task_losses = self._task_losses(module, params, task, rows.clean, rows.adv)
                losses.update({f"{task}/{k}": v for k, v in task_losses.items()})
            return losses

        inner_lr = self.inner_lr or optimizer.param_groups[0]["lr"]
        losses = meta_losses(module, loss_fn, meta_train, meta_test, inner_lr, self.first_order)
        if self.outer_loss == "thesis":  # eq. 5.11: L_mtr enters through Theta' only
            losses = {k: v for k, v in losses.items() if not k.startswith("meta_train/")}
            losses.update({f"meta_test_theta/{k}": v for k, v in loss_fn(None, meta_test).items()})
        return losses

    def _forward(self, module, params, batch):
        """(model losses, pre-noise final features) of ``batch`` under ``params`` (None: the
        module's own)."""
        batch = {**batch, "images": batch["images"].clone()}  # fastreid normalises it in place
        if self._freeze_buffers:  # the noise step's second pass must not move BN statistics
            params = {**(params or {}), **{n: b.clone() for n, b in module.named_buffers()}}
        if params is None:
            losses, _ = module(batch, return_outputs=True)
        else:
            losses, _ = functional_call(module, params, (batch,), {"return_outputs": True})
        return losses, take_clean_features(module)

    def _task_losses(self, module, params, task, clean, adv):
        if task == "V":  # eq. 5.1: the vanilla model, no noise
            with noise_disabled(module):
                return self._forward(module, params, clean)[0]

        def tensor(name):
            return params[name] if params is not None and name in params \
                else module.get_parameter(name)

        losses, features = self._forward(module, params, clean)
        scale_names = isotropic_scale_names(module)
        regularizer = (noise_regularizer([tensor(n) for n in scale_names], self.epoch)
                       if scale_names and self.lam else None)
        phi_name, _ = anisotropic_factor(module)
        fca = (fca_loss(features, clean["targets"], tensor(phi_name))
               if phi_name is not None and features is not None else None)
        adv_losses = None
        if task == "PA" and self.eta:
            if adv is None:
                raise ValueError("task PA needs adversarial rows (build_mpsnn_phases)")
            adv_losses, _ = self._forward(module, params, adv)
        return mpsnn_loss_terms(losses, regularizer=regularizer, lam=self.lam, fca=fca,
                                adv_losses=adv_losses, eta=self.eta)

    # --- Algorithm 2, step 3 ----------------------------------------------------------------------
    def noise_step(self):
        """Step the isotropic scales with their own optimizer, after the model optimizer's step.

        "sequential": phi's gradient of L_Tot (or L_meta) recomputed on the last batch at the
        updated (theta, phi_a), BN statistics untouched; "shared": the gradient left by the step's
        backward (already all-reduced by PhasedTrainer). Gradients are cleared afterwards (the model
        optimizer's zero_grad does not reach the scales).
        """
        last, self._last = self._last, None
        if self.noise_optimizer is None or last is None:
            return
        scales = [p for group in self.noise_optimizer.param_groups for p in group["params"]]
        if self.alternation == "sequential":
            module, data, optimizer = last
            self._freeze_buffers = True
            try:
                losses = self(module, data, optimizer)
            finally:
                self._freeze_buffers = False
                self._last = None
            grads = torch.autograd.grad(sum(losses.values()), scales, allow_unused=True)
            for p, g in zip(scales, grads):
                p.grad = g
            mean_across_ranks([p.grad for p in scales if p.grad is not None])
        self.noise_optimizer.step()
        self.noise_optimizer.zero_grad(set_to_none=True)


class MpsnnHook(HookBase):
    """Feeds the epoch to the objective (tau of eq. 5.2), runs the noise step after each model
    step, and steps the noise scheduler at each epoch end."""

    def __init__(self, objective):
        self.objective = objective

    def before_epoch(self):
        self.objective.epoch = self.trainer.epoch

    def after_step(self):
        self.objective.noise_step()
        optimizer = self.objective.noise_optimizer
        if optimizer is not None:
            self.trainer.storage.put_scalar("lr_noise", optimizer.param_groups[0]["lr"],
                                            smoothing_hint=False)
            scales = [p for group in optimizer.param_groups for p in group["params"]]
            self.trainer.storage.put_scalar(
                "noise_scale_mean", float(torch.cat([p.detach().abs().flatten() for p in scales])
                                          .mean()))

    def after_epoch(self):
        if self.objective.noise_scheduler is not None:
            self.objective.noise_scheduler.step()

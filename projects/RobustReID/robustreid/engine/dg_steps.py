"""Engine parts of the domain-generalization methods: ADIN's nuisance adversary and schedule, BAU's
prototype-memory initialisation. Each is built from the config and is inert when its switch is off.

* :class:`NuisanceAdversary` (``DG.ADIN.ENABLED``): the nuisance classifier f_N with its own
  optimizer and scheduler, as ``FeatureAdversary`` is for DDDefense's D. Each step it is updated on
  the detached retrieval features (L_N, cross-entropy on the nuisance label: f_N stays "a strong
  competitor", sec. 3.1) and gives the encoder beta * L_adv (eq. 3-6) through a frozen copy of its
  weights. Which terms a step gets depends on the schedule's stage (below). Y_N: camera id, time
  of day, or their joint label (DG.ADIN.NUISANCE); CaNE's p_k is the class frequency of Y_N over
  the training images, computed from the data set.
* :class:`ADINSchedule` (``DG.ADIN.SCHEDULE.ENABLED``), ADIN sec. 3.3 as a fastreid hook:

  1. ``pretrain``: E and f_I alone (the model's own losses) for PRETRAIN_EPOCHS epochs;
  2. f_N pre-trained for NUISANCE_PRETRAIN_ITERS iterations on the frozen E (eval mode, no grad);
  3. alternation of eq. 7's two sub-problems, checked every VAL_PERIOD iterations against the
     identity classification error on a validation split held out from the training identities'
     images: ``adversarial`` (E minimises beta * L_adv; the identity losses are dropped unless
     ID_LOSS_IN_ADV) runs while the error stays <= THRESHOLD_I_TRIGGER; ``identity`` (E and f_I
     minimise L_I) then runs until the error is back <= THRESHOLD_I_TARGET, and the next round
     starts. f_N keeps training on L_N in both.

  Reading of the paper: sec. 3.3 says the first objective is optimised "until the validation error
  of identity classification reduc[es] below threshold_I-target", then the second is optimised
  while monitoring that error, switching back when it passes threshold_I-trigger. Minimising
  L_adv cannot reduce the identity error, so the thresholds are read as: the identity
  sub-problem restores the error to I_TARGET, the adversarial sub-problem may degrade it up to
  I_TRIGGER (hence I_TARGET <= I_TRIGGER). The published code does the same with a state machine
  driven by validation accuracies (shared/notes/reference-implementations.md).

  With the schedule off, every step trains f_N and adds beta * L_adv to the identity losses (eq. 3).
* :class:`PrototypeMemoryInit` (``DG.BAU.DOMAIN``): before training, fills BAU's prototype memory
  with the class centroids of the initial model's (L2-normalised) retrieval features of every
  training image (test transforms, eval mode). A resumed run restores the memory from the
  checkpoint (it is a buffer of the model) and skips this.

Multi-process runs: f_N is not under DDP. It starts as rank 0's copy, its gradients and BatchNorm
statistics are averaged over the processes at each update, and the schedule's validation error is
one number for all processes, so every process holds the same f_N and takes the same decisions. The
prototype memory is initialised on every process and then set to rank 0's (its updates keep it
identical, see PrototypeMemory.update). In the adversarial sub-problem the identity classifier gets
no gradient: DDP must then look for unused parameters (:func:`steps_may_leave_parameters_unused`).

Wiring: ``build_nuisance_adversary`` (TrainingObjective's ``nuisance``), ``build_dg_hooks``
(RobustTrainer.build_hooks); see the module's users.
"""
import logging
import warnings

import torch
import torch.nn.functional as F
from fastreid.engine.hooks import HookBase
from fastreid.utils import comm
from fastreid.utils.events import get_event_storage
from torch.func import functional_call

from ..data.synth_reid import TIME_LABELS
from ..data.test_loader import plain_test_loader
from ..modeling.losses.adin import (NuisanceHead, calibrated_negative_entropy_loss,
                                    focal_entropy_loss, negative_entropy_loss,
                                    nuisance_class_prior, reverse_gradient_loss)
from ..parallel import unwrap
from .distributed import average_buffers_across_ranks, broadcast_from_rank0, mean_across_ranks
from .hooks import StepSchedulerEachEpoch
from .part_optimizer import build_part_optimizer

logger = logging.getLogger(__name__)

__all__ = ["ScheduleState", "NuisanceAdversary", "build_nuisance_adversary", "ADINSchedule",
           "PrototypeMemoryInit", "build_dg_hooks", "identity_logits",
           "steps_may_leave_parameters_unused",
           "IDENTITY_LOSSES", "STAGES"]

# fastreid's identity losses (Baseline.losses); the adversarial sub-problem drops them
IDENTITY_LOSSES = ("loss_cls", "loss_triplet", "loss_circle", "loss_cosface")
STAGES = ("pretrain", "adversarial", "identity", "joint")


class ScheduleState:
    """ADIN's schedule position, saved in checkpoints (plain ints / strings)."""

    def __init__(self, stage="pretrain"):
        self.stage = stage
        self.rounds = 0           # completed adversarial -> identity -> adversarial cycles
        self.last_val_error = -1.0

    def state_dict(self):
        return {"stage": self.stage, "rounds": self.rounds, "last_val_error": self.last_val_error}

    def load_state_dict(self, state):
        if state["stage"] not in STAGES:
            raise ValueError(f"unknown ADIN stage {state['stage']!r} in the checkpoint")
        self.stage = state["stage"]
        self.rounds = int(state["rounds"])
        self.last_val_error = float(state["last_val_error"])


class NuisanceAdversary:
    """f_N, its optimizer and scheduler, and the per-step ADIN terms (see the module docstring)."""

    def __init__(self, head, optimizer, scheduler, kind, loss, beta, prior, time_of=None,
                 scheduled=True, id_loss_in_adv=False):
        self.head = head
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.kind = kind
        self.loss = loss
        self.beta = float(beta)
        self.prior = prior
        self.time_of = time_of or {}
        self.state = ScheduleState("pretrain" if scheduled else "joint")
        self.id_loss_in_adv = id_loss_in_adv

    @classmethod
    def from_config(cls, cfg, train_set, device):
        adin = cfg.DG.ADIN
        if adin.NUISANCE == "camera":
            num_classes = train_set.num_cameras
        elif adin.NUISANCE == "time":
            num_classes = len(TIME_LABELS)
        else:
            num_classes = train_set.num_cameras * len(TIME_LABELS)
        in_dim = cfg.MODEL.HEADS.EMBEDDING_DIM or cfg.MODEL.BACKBONE.FEAT_DIM
        head = NuisanceHead(num_classes, in_dim, adin.HIDDEN_DIM, dropout=adin.DROPOUT).to(device)
        broadcast_from_rank0(head)
        optimizer, scheduler = build_part_optimizer(cfg, head.parameters(), adin.BASE_LR,
                                                    adin.WEIGHT_DECAY, adin.GAMMA)
        adversary = cls(head, optimizer, scheduler, adin.NUISANCE, adin.LOSS, adin.BETA, None,
                        getattr(train_set, "time_of", {}), adin.SCHEDULE.ENABLED,
                        adin.SCHEDULE.ID_LOSS_IN_ADV)
        _, cams, _ = train_set.labels()
        paths = [item[0] for item in train_set.img_items]
        labels = adversary.labels({"camids": cams, "img_paths": paths}, len(paths))
        adversary.prior = nuisance_class_prior(labels, num_classes).to(device)
        logger.info("ADIN: nuisance %r, %d classes, prior p_k = %s", adin.NUISANCE, num_classes,
                    [round(float(p), 4) for p in adversary.prior])
        return adversary

    @property
    def num_classes(self):
        return self.head.fc2.out_features

    def checkpointables(self):
        return {"nuisance_head": self.head, "nuisance_optimizer": self.optimizer,
                "nuisance_scheduler": self.scheduler, "nuisance_schedule": self.state}

    def labels(self, batch, num_rows):
        """Y_N of a batch's rows: camera id, time of day (looked up by image path) or joint."""
        cams = torch.as_tensor(batch["camids"]).long()
        if self.kind == "camera":
            labels = cams
        else:
            try:
                times = torch.tensor([self.time_of[p] for p in batch["img_paths"]])
            except KeyError as e:
                raise KeyError(f"DG.ADIN.NUISANCE {self.kind!r}: no time-of-day label for "
                               f"{e.args[0]}") from None
            labels = times if self.kind == "time" else cams * len(TIME_LABELS) + times
        if len(labels) != num_rows:
            if num_rows % len(labels):
                raise ValueError(f"{len(labels)} nuisance labels for {num_rows} feature rows")
            labels = labels.repeat(num_rows // len(labels))
        return labels

    def update(self, features, labels):
        """One step of f_N on L_N (cross-entropy) over detached features; returns (loss, acc)."""
        self.head.train()
        logits = self.head(features.detach().float())
        labels = labels.to(logits.device)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad()
        loss.backward()
        mean_across_ranks([p.grad for p in self.head.parameters()])  # f_N is not in DDP
        self.optimizer.step()
        average_buffers_across_ranks(self.head)  # BN statistics of the processes' batches
        return loss.detach(), (logits.argmax(1) == labels).float().mean()

    def encoder_loss(self, features, labels):
        """beta * L_adv (eq. 4-6) as a function of the features only: f_N's parameters enter as
        constants (eval mode: no dropout, running BN statistics), so the encoder's backward never
        touches f_N."""
        frozen = {name: p.detach() for name, p in self.head.named_parameters()}
        was_training = self.head.training
        self.head.eval()
        try:
            logits = functional_call(self.head, frozen, (features.float(),))
        finally:
            self.head.train(was_training)
        labels = labels.to(logits.device)
        if self.loss == "cane":
            loss = calibrated_negative_entropy_loss(logits, self.prior)
        elif self.loss == "ne":
            loss = negative_entropy_loss(logits)
        elif self.loss == "rg":
            loss = reverse_gradient_loss(logits, labels)
        elif self.loss == "focal":
            loss = focal_entropy_loss(logits, labels, self.prior)
        else:
            raise ValueError(f"unknown DG.ADIN.LOSS {self.loss!r}")
        return self.beta * loss

    def __call__(self, losses, outputs, batch, update=True):
        """The step's loss dict for the current stage (``update``: also train f_N)."""
        stage = self.state.stage
        if stage == "pretrain":
            return losses
        features = outputs["neck_features"]
        labels = self.labels(batch, len(features))
        if update:
            loss_n, acc_n = self.update(features, labels)
            storage = get_event_storage()
            storage.put_scalar("loss_nuisance", loss_n)
            storage.put_scalar("nuisance_accuracy", acc_n)
        if stage == "identity":
            return losses
        if stage == "adversarial" and not self.id_loss_in_adv:
            losses = {k: v for k, v in losses.items() if k not in IDENTITY_LOSSES}
        losses["loss_nuisance_adv"] = self.encoder_loss(features, labels)
        return losses


def steps_may_leave_parameters_unused(cfg):
    """True when some training steps give model parameters no gradient: ADIN's adversarial
    sub-problem drops the identity losses (DistributedDataParallel's find_unused_parameters)."""
    adin = cfg.DG.ADIN if "DG" in cfg else None
    return bool(adin and adin.ENABLED and adin.SCHEDULE.ENABLED and
                not adin.SCHEDULE.ID_LOSS_IN_ADV)


def build_nuisance_adversary(cfg, train_set, device):
    """The ADIN component for TrainingObjective, or None when DG.ADIN is off."""
    if "DG" not in cfg or not cfg.DG.ADIN.ENABLED:
        return None
    return NuisanceAdversary.from_config(cfg, train_set, device)


def identity_logits(model, neck_features):
    """f_I's logits from eval-mode retrieval features (fastreid's EmbeddingHead or ours)."""
    heads = unwrap(model).heads
    if hasattr(heads, "identity_logits"):
        return heads.identity_logits(neck_features)
    if heads.cls_layer.__class__.__name__ == "Linear":
        return F.linear(neck_features, heads.weight)
    return F.linear(F.normalize(neck_features), F.normalize(heads.weight))


def _to_device(batch, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class ADINSchedule(HookBase):
    """ADIN sec. 3.3 (see the module docstring); state lives in ``adversary.state``."""

    def __init__(self, adversary, val_loader, pretrain_epochs, nuisance_pretrain_iters,
                 threshold_target, threshold_trigger, val_period):
        self.adversary = adversary
        self.val_loader = val_loader
        self.pretrain_epochs = int(pretrain_epochs)
        self.nuisance_pretrain_iters = int(nuisance_pretrain_iters)
        self.target = float(threshold_target)
        self.trigger = float(threshold_trigger)
        self.val_period = int(val_period)

    @classmethod
    def from_config(cls, cfg, adversary, train_set):
        sched = cfg.DG.ADIN.SCHEDULE
        items = [(path, train_set.pid_dict[pid], 0) for path, pid, *_ in train_set.val_items]
        # each process validates its share of the split (see validation_error)
        items = items[comm.get_rank()::comm.get_world_size()]
        loader = plain_test_loader(cfg, items)
        return cls(adversary, loader, sched.PRETRAIN_EPOCHS, sched.NUISANCE_PRETRAIN_ITERS,
                   sched.THRESHOLD_I_TARGET, sched.THRESHOLD_I_TRIGGER, sched.VAL_PERIOD)

    @property
    def state(self):
        return self.adversary.state

    @torch.no_grad()
    def validation_error(self, model):
        """Identity classification error of f_I on the held-out images. With several processes,
        their BatchNorm statistics are averaged first (every process then holds the same model, as
        at an epoch end), each scores its share of the split, and the counts are pooled: every
        process gets the same error and takes the same decision."""
        average_buffers_across_ranks(model)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        correct, total = 0, 0
        try:
            for batch in self.val_loader:
                batch = _to_device(batch, device)
                logits = identity_logits(model, model(batch))
                correct += int((logits.argmax(1) == batch["targets"]).sum())
                total += len(logits)
        finally:
            model.train(was_training)
        counts = torch.tensor([correct, total], dtype=torch.float64, device=device)
        mean_across_ranks([counts])  # means of both counts: the same ratio as their sums
        correct, total = counts.tolist()
        return 1.0 - correct / max(total, 1.0)

    def pretrain_nuisance(self):
        """f_N alone on the frozen E: eval-mode features without gradient, training batches."""
        if not self.nuisance_pretrain_iters:
            return
        model = self.trainer.model
        was_training = model.training
        model.eval()
        data_iter = self.trainer._trainer._data_loader_iter
        try:
            for _ in range(self.nuisance_pretrain_iters):
                batch = next(data_iter)
                with torch.no_grad():
                    features = model(batch)
                loss, acc = self.adversary.update(features, self.adversary.labels(
                    batch, len(features)))
        finally:
            model.train(was_training)
        logger.info("ADIN: f_N pre-trained %d iterations on the frozen E: L_N %.3f, acc %.3f",
                    self.nuisance_pretrain_iters, float(loss), float(acc))

    def _start_alternation(self):
        self.pretrain_nuisance()
        self.state.stage = "adversarial"
        self._validate_and_switch()

    def _validate_and_switch(self):
        error = self.validation_error(self.trainer.model)
        self.state.last_val_error = error
        stage = self.state.stage
        if stage == "adversarial" and error > self.trigger:
            self.state.stage = "identity"
        elif stage == "identity" and error <= self.target:
            self.state.stage = "adversarial"
            self.state.rounds += 1
        if stage != self.state.stage:
            logger.info("ADIN: identity validation error %.3f -> %s sub-problem", error,
                        self.state.stage)
        try:
            storage = get_event_storage()
        except AssertionError:  # outside a training loop (tests)
            return error
        storage.put_scalar("adin/val_id_error", error, smoothing_hint=False)
        storage.put_scalar("adin/adversarial_stage", float(self.state.stage == "adversarial"),
                           smoothing_hint=False)
        return error

    def before_train(self):
        if self.state.stage == "pretrain" and self.pretrain_epochs == 0:
            self._start_alternation()

    def after_epoch(self):
        if self.state.stage == "pretrain" and self.trainer.epoch + 1 >= self.pretrain_epochs:
            self._start_alternation()

    def after_step(self):
        if self.state.stage in ("adversarial", "identity") and \
                (self.trainer.iter + 1) % self.val_period == 0:
            self._validate_and_switch()


class PrototypeMemoryInit(HookBase):
    """Before training: BAU's prototypes := class centroids of the initial model's features."""

    def __init__(self, cfg, train_set):
        self.cfg = cfg
        self.train_set = train_set

    @torch.no_grad()
    def before_train(self):
        module = unwrap(self.trainer.model)
        memory = getattr(module, "bau_memory", None)
        if memory is None or module.memory_ready():
            return
        train_set = self.train_set
        pids, _, domains = train_set.labels()
        items = [(item[0], int(pid), 0) for item, pid in zip(train_set.img_items, pids)]
        loader = plain_test_loader(self.cfg, items, self.cfg.DG.BAU.INIT_BATCH_SIZE)
        model = self.trainer.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        features = []
        try:
            for batch in loader:
                features.append(F.normalize(model(_to_device(batch, device)).float(), dim=1))
        finally:
            model.train(was_training)
        memory.initialize(torch.cat(features), pids, domains)
        broadcast_from_rank0(memory)  # the same start on every process, whatever the arithmetic
        logger.info("BAU: prototype memory initialised from %d images, %d classes, %d domains",
                    len(items), memory.num_classes, int(domains.max()) + 1)


class _StepNuisanceScheduler(StepSchedulerEachEpoch):
    """f_N's epoch scheduler; f_N does not step during the pre-training epochs, which torch's
    "scheduler before optimizer" warning would report every epoch."""

    def after_epoch(self):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            super().after_epoch()


def build_dg_hooks(trainer):
    """The DG hooks a RobustTrainer needs (empty when DG is off); insert them first."""
    cfg = trainer.cfg
    if "DG" not in cfg:
        return []
    train_set = trainer.data_loader.dataset
    hooks = []
    if cfg.DG.BAU.ENABLED and getattr(unwrap(trainer.model), "bau_memory", None) is not None:
        hooks.append(PrototypeMemoryInit(cfg, train_set))
    adversary = getattr(trainer.objective, "nuisance", None)
    if adversary is not None:
        hooks.append(_StepNuisanceScheduler(adversary.scheduler))
        if cfg.DG.ADIN.SCHEDULE.ENABLED:
            hooks.append(ADINSchedule.from_config(cfg, adversary, train_set))
    return hooks

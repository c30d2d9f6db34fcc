"""IPESTrainer: IPES-GAN's training (thesis sec. 3.2-3.3) as a fastreid trainer.

Each iteration draws SOLVER.IMS_PER_BATCH / 2 labelled source and as many unlabelled target images
(robustreid.data.ipes), renders the step's images (IPESGAN.translate), then

1. updates the generator G (pose / style encoders, decoders) and the identity encoder E_id on
   eq. 3.19, sum_k w_k L_k with w2 (L_con) and w4 (L_KL) ramped (IPES.LOSS), D frozen;
2. updates D on the least-squares real / generated loss.

G and D have their own Adam, E_id its SGD (IPES.SOLVER), each with an iteration-stepped MultiStepLR;
the three optimizers, schedulers and the model (E_id, G, D and the teacher) are in every
checkpoint, with both data streams' positions and the random generators (TrainingState), so
``--resume`` continues a run exactly. An "epoch" is IPES.ITERS_PER_EPOCH iterations: SOLVER.
MAX_EPOCH, SOLVER.CHECKPOINT_PERIOD and TEST.EVAL_PERIOD count in it, and evaluation (E_id's
features on DATASETS.TESTS, the target's query / gallery) is RobustTrainer's. Every IPES.VIS.PERIOD
iterations a grid of fixed source / target pairs re-rendered into each other's pose and style goes
to OUTPUT_DIR/ipes_images/ and tensorboard; the loss terms, their weights and the rates go to
fastreid's event storage (console, metrics.json, tensorboard). One process.
"""
import logging
import os
import time

import numpy as np
import torch
from fastreid.data.build import fast_batch_collator
from fastreid.engine import hooks as fastreid_hooks
from fastreid.engine.train_loop import HookBase, TrainerBase
from fastreid.utils import comm
from fastreid.utils.events import get_event_storage

from ..config import ConfigError
from ..data.ipes import build_ipes_data, ipes_train_items, posed_images
from ..data.keypoints import build_keypoint_source
from ..data.validation import check_train_batches
from ..modeling.losses.ipes import ipes_objective_weights, weighted_total
from .checkpoint import RobustCheckpointer, WeightsNotFoundError, fit_problem, read_checkpoint
from .defaults import RobustTrainer
from .hooks import EpochBoundary
from .ipes_images import save_grid, translation_grid
from .model_selection import BestMetricCheckpoint
from .training_state import TrainingState

logger = logging.getLogger(__name__)

__all__ = ["IPESTrainer", "IPESStep", "build_trainer", "check_ipes_config", "check_ipes_training"]

OPTIMIZED_PARTS = ("gen", "dis", "id")  # checkpoint names: <part>_optimizer, <part>_scheduler


def check_ipes_config(cfg, world_size=1):
    """IPES's switches and files, before anything is built (ConfigError / WeightsNotFoundError)."""
    ipes = cfg.IPES
    if (cfg.MODEL.META_ARCHITECTURE == "IPESGAN") != bool(ipes.ENABLED):
        raise ConfigError("IPES.ENABLED True and MODEL.META_ARCHITECTURE IPESGAN go together, got "
                          f"{ipes.ENABLED} and {cfg.MODEL.META_ARCHITECTURE}")
    if cfg.MODEL.HEADS.NAME != "EmbeddingHead":
        raise ConfigError(f"IPES's identity encoder needs MODEL.HEADS.NAME EmbeddingHead, got "
                          f"{cfg.MODEL.HEADS.NAME}")
    if not ipes.TARGET:
        raise ConfigError("IPES.TARGET: name the unlabelled target dataset (a registered name)")
    if world_size > 1:
        raise ConfigError("IPES trains in one process: drop --num-gpus")
    batch = cfg.SOLVER.IMS_PER_BATCH
    if batch % 2 or batch // 2 % cfg.DATALOADER.NUM_INSTANCE:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH {batch} is half source, half target: each half "
                          f"must be a multiple of DATALOADER.NUM_INSTANCE "
                          f"{cfg.DATALOADER.NUM_INSTANCE}")
    if ipes.ITERS_PER_EPOCH < 1:
        raise ConfigError(f"IPES.ITERS_PER_EPOCH must be >= 1, got {ipes.ITERS_PER_EPOCH}")
    for key in ("VIS.PERIOD", "VIS.PAIRS", "LOSS.RAMP_START", "LOSS.RAMP_ITERS"):
        section, name = key.split(".")
        if ipes[section][name] < 0:
            raise ConfigError(f"IPES.{key} must be >= 0, got {ipes[section][name]}")
    if ipes.KEYPOINTS.SIGMA <= 0:
        raise ConfigError(f"IPES.KEYPOINTS.SIGMA must be positive, got {ipes.KEYPOINTS.SIGMA}")
    if ipes.KEYPOINTS.MIN_VISIBILITY not in (1, 2):  # 0 would draw absent joints
        raise ConfigError(f"IPES.KEYPOINTS.MIN_VISIBILITY must be 1 (occluded too) or 2 (visible "
                          f"only), got {ipes.KEYPOINTS.MIN_VISIBILITY}")
    if ipes.TEACHER_WEIGHTS and not os.path.isfile(ipes.TEACHER_WEIGHTS):
        raise WeightsNotFoundError(f"IPES.TEACHER_WEIGHTS file not found: {ipes.TEACHER_WEIGHTS}")


def check_ipes_teacher(cfg):
    """L_KL needs a source-trained teacher. Checked when training starts, not in pre-flight: a
    run that fine-tunes another run's model (tools/evidence.py's weights_from) is pre-flighted
    before that model exists."""
    if cfg.IPES.LOSS.KL and not (cfg.IPES.TEACHER_WEIGHTS or cfg.MODEL.WEIGHTS):
        raise ConfigError("IPES.LOSS.KL needs the source-trained teacher E_std: MODEL.WEIGHTS (the "
                          "source model E_id starts from) or IPES.TEACHER_WEIGHTS")


def check_ipes_training(cfg, world_size=1):
    """check_ipes_config, then both streams can draw batches and every training image of both
    domains has its keypoints (pre-flight)."""
    check_ipes_config(cfg, world_size)
    source, target = ipes_train_items(cfg)
    half = cfg.clone()
    half.defrost()
    half.SOLVER.IMS_PER_BATCH = cfg.SOLVER.IMS_PER_BATCH // 2
    half.DATALOADER.SAMPLER_TRAIN = "NaiveIdentitySampler"
    check_train_batches(half, source)
    if len(target) < half.SOLVER.IMS_PER_BATCH:
        raise ConfigError(f"IPES.TARGET {cfg.IPES.TARGET} has {len(target)} training images, fewer "
                          f"than half of SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH}")
    keypoints = build_keypoint_source(cfg.IPES.KEYPOINTS.SOURCE, cfg.IPES.KEYPOINTS.DIR)
    keypoints.check([item[0] for item in source + target])


def _with_camera_counts(cfg, data):
    """IPES.SOURCE_CAMERAS / TARGET_CAMERAS from the data where 0. Read again by every run (also a
    resumed one) and not written to OUTPUT_DIR/config.yaml: evaluation does not use the camera
    classifiers, and the dumped config stays the one the run was asked for."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.IPES.SOURCE_CAMERAS = cfg.IPES.SOURCE_CAMERAS or data.source.num_cameras
    cfg.IPES.TARGET_CAMERAS = cfg.IPES.TARGET_CAMERAS or data.target.num_cameras
    cfg.freeze()
    return cfg


def build_ipes_optimizers(cfg, model):
    """{part: optimizer}, {part: scheduler} for G (Adam), D (Adam) and E_id (SGD)."""
    s = cfg.IPES.SOLVER
    adam = dict(betas=tuple(s.BETAS))
    optimizers = {
        "gen": torch.optim.Adam(model.generator.parameters(), lr=s.GEN_LR,
                                weight_decay=s.GEN_WEIGHT_DECAY, **adam),
        "dis": torch.optim.Adam(model.discriminator.parameters(), lr=s.DIS_LR,
                                weight_decay=s.GEN_WEIGHT_DECAY, **adam),
        "id": torch.optim.SGD([p for p in model.identity_parameters() if p.requires_grad],
                              lr=s.ID_LR, momentum=s.ID_MOMENTUM, weight_decay=s.ID_WEIGHT_DECAY),
    }
    schedulers = {name: torch.optim.lr_scheduler.MultiStepLR(opt, list(s.STEPS), gamma=s.GAMMA)
                  for name, opt in optimizers.items()}
    return optimizers, schedulers


class IPESStep:
    """One iteration: G + E_id update on eq. 3.19, then D's (see the module docs)."""

    def __init__(self, model, streams, optimizers, cfg):
        model.train()
        self.model = model
        self.data_loader = streams
        self.optimizers = optimizers
        self.cfg = cfg
        self.iter = 0

    def run_step(self):
        model, opt = self.model, self.optimizers
        start = time.perf_counter()
        source, target = next(self.data_loader)
        data_time = time.perf_counter() - start
        weights = ipes_objective_weights(self.cfg, self.iter)

        model.discriminator.requires_grad_(False)  # L_adv's generator side must not move D
        views = model.translate(source, target)
        terms = model.generator_terms(views, source, target)
        total = weighted_total(terms, weights)
        opt["gen"].zero_grad()
        opt["id"].zero_grad()
        total.backward()
        opt["gen"].step()
        opt["id"].step()
        model.discriminator.requires_grad_(True)

        loss_dis = model.discriminator_loss(views)
        opt["dis"].zero_grad()
        loss_dis.backward()
        opt["dis"].step()
        self._write_metrics(terms, weights, total, loss_dis, data_time)

    def _write_metrics(self, terms, weights, total, loss_dis, data_time):
        metrics = {name: float(value.detach()) for name, value in terms.items()}
        metrics.update(total_loss=float(total.detach()), loss_dis=float(loss_dis.detach()))
        if not np.isfinite(list(metrics.values())).all():
            raise FloatingPointError(f"IPES loss became infinite or NaN at iteration {self.iter}: "
                                     f"{metrics}")
        storage = get_event_storage()
        storage.put_scalars(**metrics, weight_con=weights["loss_con"], weight_kl=weights["loss_kl"],
                            data_time=data_time, smoothing_hint=False)
        lrs = {f"lr_{name}": opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}
        storage.put_scalars(lr=lrs["lr_id"], **lrs, smoothing_hint=False)


class StepSchedulers(HookBase):
    """Steps iteration-based LR schedulers after every iteration."""

    def __init__(self, schedulers):
        self.schedulers = list(schedulers)

    def after_step(self):
        for scheduler in self.schedulers:
            scheduler.step()


class TranslationGrids(HookBase):
    """Every ``period`` iterations and after the last: fixed pairs re-rendered into each other's
    pose and style (engine/ipes_images.py), as OUTPUT_DIR/ipes_images/iter_<n>.png and in
    tensorboard. Generated in eval mode without gradients; no random number is drawn."""

    def __init__(self, period, source, target, output_dir):
        self.period, self.source, self.target = period, source, target
        self.output_dir = os.path.join(output_dir, "ipes_images")

    def after_step(self):
        done = self.trainer.iter + 1
        if done % self.period and done != self.trainer.max_iter:
            return
        model = self.trainer.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            grid = translation_grid(model.translate(self.source, self.target))
        model.train(was_training)
        os.makedirs(self.output_dir, exist_ok=True)
        save_grid(grid, os.path.join(self.output_dir, f"iter_{done:07d}.png"))
        get_event_storage().put_image("ipes/translations",
                                      torch.from_numpy(grid).permute(2, 0, 1).float() / 255.0)


def fixed_pairs(cfg, data, count):
    """``count`` source and target images spread over each training set, unflipped: the grids'
    columns (the same every time, so grids of a run compare)."""
    def batch(dataset):
        items = [dataset.img_items[int(i)] for i in np.linspace(0, len(dataset) - 1, count)]
        unflipped = posed_images(cfg, items, flip=False)
        return fast_batch_collator([unflipped[i] for i in range(count)])

    return batch(data.source), batch(data.target)


class IPESTrainer(RobustTrainer):
    """RobustTrainer's loop, hooks, checkpointer, resume and evaluation around IPES's step."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        check_ipes_config(cfg, comm.get_world_size())
        check_ipes_teacher(cfg)
        if comm.is_main_process() and cfg.OUTPUT_DIR:
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        data = build_ipes_data(cfg)
        # NUM_CLASSES: the source identities (fastreid's, written to config.yaml when it was 0)
        cfg = _with_camera_counts(self.auto_scale_hyperparams(cfg, data.source.num_classes), data)
        model = self.build_model(cfg)
        self.optimizers, self.schedulers = build_ipes_optimizers(cfg, model)
        self._trainer = IPESStep(model, data.streams, self.optimizers, cfg)
        self.vis_pairs = fixed_pairs(cfg, data, cfg.IPES.VIS.PAIRS) if \
            cfg.IPES.VIS.PERIOD and cfg.IPES.VIS.PAIRS else None

        self.iters_per_epoch = cfg.IPES.ITERS_PER_EPOCH
        self.training_state = TrainingState(data.streams)
        self.best_robust = BestMetricCheckpoint(cfg.TEST.ROBUST.BEST_METRIC)
        self.checkpointer = RobustCheckpointer(
            model, cfg.OUTPUT_DIR, save_to_disk=comm.is_main_process(),
            weights_only=cfg.ROBUSTREID.WEIGHTS_ONLY,
            **{f"{name}_optimizer": opt for name, opt in self.optimizers.items()},
            **{f"{name}_scheduler": sched for name, sched in self.schedulers.items()},
            best_robust=self.best_robust, training_state=self.training_state)
        self.epoch_boundary = EpochBoundary(self.training_state, self.checkpointer)
        self.start_epoch = 0
        self.max_epoch = cfg.SOLVER.MAX_EPOCH
        self.max_iter = self.max_epoch * self.iters_per_epoch
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        cfg = self.cfg
        hooks = [fastreid_hooks.IterationTimer(), StepSchedulers(self.schedulers.values())]
        if self.vis_pairs is not None and comm.is_main_process():
            hooks.append(TranslationGrids(cfg.IPES.VIS.PERIOD, *self.vis_pairs, cfg.OUTPUT_DIR))
        hooks.append(fastreid_hooks.EvalHook(cfg.TEST.EVAL_PERIOD, self._test_and_save_results))
        hooks.append(self.epoch_boundary)  # after the evaluation, before the periodic checkpoint
        if comm.is_main_process():
            hooks.append(fastreid_hooks.PeriodicCheckpointer(self.checkpointer,
                                                             cfg.SOLVER.CHECKPOINT_PERIOD))
            hooks.append(fastreid_hooks.PeriodicWriter(self.build_writers(), 20))
        return hooks

    def resume_or_load(self, resume=True):
        """RobustTrainer's (--resume continues everything; else E_id starts from MODEL.WEIGHTS),
        then, in a new run, the teacher E_std starts as IPES.TEACHER_WEIGHTS' model, or as E_id
        (the source-trained MODEL.WEIGHTS)."""
        resuming = resume and self.checkpointer.has_checkpoint()
        super().resume_or_load(resume)
        if resuming:
            return
        path = self.cfg.IPES.TEACHER_WEIGHTS
        if not path:
            self.model.start_teacher()
            return
        label = f"IPES.TEACHER_WEIGHTS {path}"
        state = {k: v for k, v in read_checkpoint(path, label, self.cfg.ROBUSTREID.WEIGHTS_ONLY)
                 ["model"].items() if k.startswith(("backbone.", "heads."))}
        problem = fit_problem(RobustCheckpointer(self.model.teacher)._load_model({"model": state}),
                              strict=True)
        if problem:
            raise ConfigError(f"{label} does not fit the identity encoder's model: {problem}")
        logger.info("The KL teacher E_std is %s", path)


def build_trainer(cfg):
    """The trainer of ``cfg``: IPESTrainer with IPES.ENABLED, else RobustTrainer."""
    return IPESTrainer(cfg) if cfg.IPES.ENABLED else RobustTrainer(cfg)

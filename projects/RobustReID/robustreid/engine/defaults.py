"""RobustTrainer and the set-up shared by tools/train_net.py and the other tools.

The same config runs on CPU and GPU: ``resolve_device`` moves MODEL.DEVICE to "cpu" and disables AMP
when no CUDA device is visible, and multi-process training uses gloo on CPU (see robustreid.compat).
"""
import logging
import os
import socket
from urllib.parse import urlparse

import torch
from fastreid.data import build_reid_test_loader
from fastreid.data.common import CommDataset
from fastreid.data.transforms import build_transforms
from fastreid.engine import DefaultTrainer, default_setup
from fastreid.engine import hooks as fastreid_hooks
from fastreid.engine.train_loop import TrainerBase
from fastreid.solver import build_optimizer
from fastreid.utils import comm
from fastreid.utils.env import seed_all_rng
from fastreid.utils.events import EventStorage
from fastreid.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError, load_config
from ..data.dg import build_dg_train_set
from ..data.train_stream import build_train_stream
from ..data.validation import DatasetError, build_dataset, check_datasets, check_train_batches
from ..evaluation.clustering_evaluator import check_clustering_config
from ..evaluation.indexes import check_index_config
from ..modeling.dg_config import dg_loader_needed
from ..modeling.losses.proxy_anchor import check_proxy_anchor_config
from ..modeling.noise import attach_noise_modules, noise_averaged
from .checkpoint import (RobustCheckpointer, WeightsNotFoundError, check_epochs_left,
                         check_weights_fit)
from .dg_steps import build_dg_hooks, build_nuisance_adversary, steps_may_leave_parameters_unused
from .dml_defenses import (build_dml_defense_phases, build_dml_defense_terms,
                           check_dml_defense_config, leaves_parameters_unused)
from .eat import build_eat_phases, load_member_weights
from .hooks import EpochBoundary, StepSchedulerEachEpoch, SyncBufferStats
from .model_selection import BestMetricCheckpoint, PeriodicBestState
from .mpsnn import MpsnnObjective, build_mpsnn_phases, check_mpsnn_config, excluding_noise_scales
from .proxy_anchor import build_proxy_anchor_hooks, set_proxy_lr, warmup_epochs
from .train_steps import PhasedTrainer, TrainingObjective, build_batch_phases, check_training_config
from .training_state import TrainingState

logger = logging.getLogger(__name__)

# Errors that mean "the user's input is wrong": tools print them as one line, without a traceback.
USER_ERRORS = (ConfigError, DatasetError, WeightsNotFoundError)


def resolve_device(cfg):
    """Run a GPU config on a CPU-only machine: MODEL.DEVICE -> cpu, SOLVER.AMP.ENABLED -> False.
    A MODEL.DEVICE that is not cpu, cuda or cuda:N (of a visible GPU) is a ConfigError."""
    try:
        device = torch.device(cfg.MODEL.DEVICE)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"MODEL.DEVICE must be cpu, cuda or cuda:N, got {cfg.MODEL.DEVICE!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but CUDA is not available: running on cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    elif device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"MODEL.DEVICE {cfg.MODEL.DEVICE}: this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        logger.warning("SOLVER.AMP.ENABLED needs CUDA: disabled on %s", cfg.MODEL.DEVICE)
        cfg.SOLVER.AMP.ENABLED = False
    return cfg


def check_output_dir(path, key="OUTPUT_DIR"):
    """``path`` can be created and written. Checked first: fastreid creates it only after the
    datasets are read (and, with DATALOADER.VERIFY_IMAGES, every image decoded)."""
    if not path:
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{key} {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {path} cannot be created: {existing} is not writable")


# fastreid's ResNet trunk (also under RobustReID's APNet and dual-branch backbones) downloads its
# ImageNet weights into $TORCH_HOME/checkpoints when PRETRAIN is True and PRETRAIN_PATH is empty.
_RESNET_TRUNK_BACKBONES = ("build_resnet_backbone", "build_apnet_backbone",
                           "build_dual_branch_backbone")


def _resnet_pretrain_download(cfg):
    """(url, cached file) of the ImageNet weights fastreid's ResNet trunk downloads for this
    config (fastreid's own URL table and cache path), or None for other backbones."""
    backbone = cfg.MODEL.BACKBONE
    if backbone.NAME not in _RESNET_TRUNK_BACKBONES:
        return None
    from fastreid.modeling.backbones.resnet import model_urls

    key = ("se_" if backbone.WITH_SE else "") + ("ibn_" if backbone.WITH_IBN else "") + \
        backbone.DEPTH
    if key not in model_urls:
        return None
    torch_home = os.path.expanduser(os.getenv(
        "TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch")))
    return model_urls[key], os.path.join(torch_home, "checkpoints",
                                         os.path.basename(model_urls[key]))


def check_pretrain_download(cfg, timeout=5.0):
    """MODEL.BACKBONE.PRETRAIN True without PRETRAIN_PATH makes fastreid download ImageNet weights
    while it builds the model: refuse before anything is built when they are not cached and their
    host cannot be reached (a machine without internet), naming the keys to set. Backbones
    without fastreid's ResNet trunk are not checked (their download code differs)."""
    backbone = cfg.MODEL.BACKBONE
    download = None if backbone.PRETRAIN_PATH or not backbone.PRETRAIN else \
        _resnet_pretrain_download(cfg)
    if download is None or os.path.isfile(download[1]):
        return
    url = download[0]
    host = urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"MODEL.BACKBONE.PRETRAIN True without MODEL.BACKBONE.PRETRAIN_PATH "
                          f"downloads {url}, but {host} cannot be reached ({e}): set "
                          f"MODEL.BACKBONE.PRETRAIN_PATH /path/to/{os.path.basename(url)}, or "
                          f"MODEL.BACKBONE.PRETRAIN False") from None


def check_weights(cfg, eval_only=False):
    """Weights paths named in the config must exist before anything is built; ImageNet weights
    for training must be on disk or downloadable."""
    if eval_only and not cfg.MODEL.WEIGHTS:
        raise ConfigError("--eval-only needs trained weights: pass MODEL.WEIGHTS /path/to/model.pth")
    if cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise WeightsNotFoundError(f"MODEL.WEIGHTS file not found: {cfg.MODEL.WEIGHTS}")
    path = cfg.MODEL.BACKBONE.PRETRAIN_PATH
    if cfg.MODEL.BACKBONE.PRETRAIN and path and not os.path.isfile(path):
        raise WeightsNotFoundError(f"MODEL.BACKBONE.PRETRAIN_PATH file not found: {path}")
    if not eval_only and cfg.EAT.ENABLED and cfg.EAT.MEMBER_WEIGHTS and \
            not os.path.isfile(cfg.EAT.MEMBER_WEIGHTS):
        raise WeightsNotFoundError(f"EAT.MEMBER_WEIGHTS file not found: {cfg.EAT.MEMBER_WEIGHTS}")
    if not eval_only:  # evaluation loads MODEL.WEIGHTS over a model built without them
        check_pretrain_download(cfg)


def build_config(args):
    """Config from the CLI (file + KEY VALUE opts) with the device resolved; frozen."""
    cfg = load_config(args.config_file, args.opts)
    resolve_device(cfg)
    cfg.freeze()
    return cfg


def training_items(cfg):
    """The (path, pid, camid) list the training loader samples from: fastreid's concatenation of
    DATASETS.NAMES, or the DG set (after ADIN's validation split) when that loader is used."""
    if dg_loader_needed(cfg):
        return build_dg_train_set(cfg).img_items
    return [item for name in cfg.DATASETS.NAMES
            for item in build_dataset(name, combineall=cfg.DATASETS.COMBINEALL).train]


def preflight(cfg, eval_only=False, world_size=1):
    """Every input check that can fail, before training starts, cheapest first: output directory,
    weights, config switches, training batches, datasets (every image decoded).
    ``world_size``: the training processes (each draws SOLVER.IMS_PER_BATCH / world_size images)."""
    check_output_dir(cfg.OUTPUT_DIR)
    check_weights(cfg, eval_only=eval_only)
    if cfg.MODEL.WEIGHTS:  # fastreid only warns and skips mismatching tensors
        check_weights_fit(cfg, training=not eval_only)
    if cfg.TEST.EVALUATOR == "ClusteringEvaluator":
        check_clustering_config(cfg)
    check_index_config(cfg)
    if not eval_only:
        check_training_config(cfg)
        check_dml_defense_config(cfg)
        check_mpsnn_config(cfg)
        check_proxy_anchor_config(cfg)
        if cfg.IPES.ENABLED:  # its two streams and keypoints (engine/ipes.py imports this module)
            from .ipes import check_ipes_training

            check_ipes_training(cfg, world_size)
        else:
            check_train_batches(cfg, training_items(cfg), world_size)
    train_names = () if eval_only else cfg.DATASETS.NAMES
    check_datasets(train_names, cfg.DATASETS.TESTS, verify=cfg.DATALOADER.VERIFY_IMAGES)
    if cfg.TEST.ROBUST.ENABLED:
        from ..evaluation.attack_grid import check_robust_config  # imports the attacks only when used

        check_robust_config(cfg)


def setup(args):
    """fastreid's default_setup (logger, output dir, config dump) plus a reproducible seed."""
    cfg = build_config(args)
    default_setup(cfg, args)
    # fastreid's set-up logs only its own package: RobustReID's lines go to the same console/log.txt
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="robustreid")
    if cfg.ROBUSTREID.SEED >= 0:
        # Distinct but reproducible streams per rank; samplers draw their shared seed from numpy.
        seed_all_rng(cfg.ROBUSTREID.SEED + comm.get_rank())
    return cfg


class RobustTrainer(DefaultTrainer):
    """fastreid's DefaultTrainer with RobustReID's evaluator, checkpointer and CPU/GPU-neutral DDP.

    The training step's extra trainable parts (the feature discriminator with its optimizer and
    scheduler, ...) come from ``TrainingObjective`` and are saved and restored by the checkpointer
    with the model; ``extra_checkpointables()`` is the hook for subclasses to add more.

    A resumed run continues the interrupted one exactly (same weights, bit for bit): checkpoints
    also hold every process's random generators and the position of the training batch stream
    (``TrainingState``), and the stream's batches depend on their position alone
    (robustreid.data.train_stream).
    """

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if cfg.IPES.ENABLED:
            raise ConfigError("IPES.ENABLED configs train with IPESTrainer (engine.build_trainer)")
        check_training_config(cfg)
        check_dml_defense_config(cfg)
        check_mpsnn_config(cfg)
        check_proxy_anchor_config(cfg)
        if comm.is_main_process() and cfg.OUTPUT_DIR:
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)  # also when used without default_setup
        data_loader = self.build_train_loader(cfg)
        # before the loader is iterated: a sampler that cannot fill a batch would hang there
        check_train_batches(cfg, data_loader.dataset.img_items, comm.get_world_size())
        cfg = self.auto_scale_hyperparams(cfg, data_loader.dataset.num_classes)
        model = self.build_model(cfg)
        optimizer, param_wrapper = self.build_optimizer(cfg, model)

        if comm.get_world_size() > 1:
            on_gpu = next(model.parameters()).device.type == "cuda"
            model = DistributedDataParallel(
                model, device_ids=[comm.get_local_rank()] if on_gpu else None,
                broadcast_buffers=False,
                # the Proxy-Anchor warm-up leaves the backbone without gradients
                find_unused_parameters=steps_may_leave_parameters_unused(cfg) or
                leaves_parameters_unused(cfg) or warmup_epochs(cfg) > 0)

        grad_scaler = torch.amp.GradScaler("cuda") if cfg.SOLVER.AMP.ENABLED else None
        if cfg.MPSNN.ENABLED:  # the stochastic network's own objective (thesis Algorithms 2-3)
            self.objective = MpsnnObjective.from_config(cfg, model)
        else:
            device = next(model.parameters()).device
            self.objective = TrainingObjective.from_config(cfg, device)
            self.objective.nuisance = build_nuisance_adversary(cfg, data_loader.dataset, device)
            self.objective.defense = build_dml_defense_terms(cfg)
        self._trainer = PhasedTrainer(model, data_loader, optimizer, param_wrapper,
                                      build_batch_phases(cfg) +
                                      build_eat_phases(cfg, data_loader.dataset.img_items) +
                                      build_dml_defense_phases(cfg) +
                                      build_mpsnn_phases(cfg),
                                      self.objective, grad_scaler)
        self.best_robust = BestMetricCheckpoint(cfg.TEST.ROBUST.BEST_METRIC)

        self.iters_per_epoch = len(data_loader.dataset) // cfg.SOLVER.IMS_PER_BATCH
        self.scheduler = self.build_lr_scheduler(cfg, optimizer, self.iters_per_epoch)
        self.training_state = TrainingState(data_loader)
        self.checkpointer = RobustCheckpointer(
            model, cfg.OUTPUT_DIR, save_to_disk=comm.is_main_process(),
            weights_only=cfg.ROBUSTREID.WEIGHTS_ONLY, optimizer=optimizer, **self.scheduler,
            **self.objective.checkpointables(), best_robust=self.best_robust,
            training_state=self.training_state,
            **({"grad_scaler": grad_scaler} if grad_scaler is not None else {}),
            **self.extra_checkpointables())
        self.epoch_boundary = EpochBoundary(self.training_state, self.checkpointer)

        self.start_epoch = 0
        self.max_epoch = cfg.SOLVER.MAX_EPOCH
        self.max_iter = self.max_epoch * self.iters_per_epoch
        self.warmup_iters = cfg.SOLVER.WARMUP_ITERS
        self.delay_epochs = cfg.SOLVER.DELAY_EPOCHS
        self.cfg = cfg
        self.register_hooks(self.build_hooks())
        periodic = [h for h in self._hooks if isinstance(h, fastreid_hooks.PeriodicCheckpointer)]
        if periodic:  # the main process only (fastreid builds it there)
            self.checkpointer.checkpointables["periodic_best"] = PeriodicBestState(periodic[0])

    def extra_checkpointables(self):
        """Objects with state_dict()/load_state_dict() saved beside model/optimizer/schedulers."""
        return {}

    def build_hooks(self):
        hooks = super().build_hooks()
        hooks[0:0] = build_dg_hooks(self)  # BAU memory initialisation, ADIN schedule, f_N's LR
        hooks[0:0] = build_proxy_anchor_hooks(self)  # the backbone's warm-up
        if comm.get_world_size() > 1:
            hooks.insert(0, SyncBufferStats())  # first, so evaluation and checkpoint see it
        if isinstance(self.objective, MpsnnObjective):
            hooks.insert(0, self.objective.hook())  # noise-scale optimizer and scheduler steps
        elif self.objective.adversary is not None:
            hooks.insert(0, StepSchedulerEachEpoch(self.objective.adversary.scheduler))
        # fastreid's EvalHook calls test() without the epoch; ours tells it whether the robust
        # evaluation (TEST.ROBUST.PERIOD) is due, so both land in one results dict.
        evaluation = [i for i, h in enumerate(hooks) if isinstance(h, fastreid_hooks.EvalHook)][0]
        hooks[evaluation] = fastreid_hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD,
                                                    self._test_and_save_results)
        # After the evaluation (it draws random numbers too), before the periodic checkpoint.
        hooks.insert(evaluation + 1, self.epoch_boundary)
        return hooks

    def resume_or_load(self, resume=True):
        """``resume``: continue the run of OUTPUT_DIR's last checkpoint exactly (everything in it
        must fit: RobustCheckpointer.resume); otherwise, or with nothing to resume, load
        MODEL.WEIGHTS' model weights only (none if empty), as fastreid does."""
        if resume and self.checkpointer.has_checkpoint():
            path = self.checkpointer.get_checkpoint_file()
            self.start_epoch = self.checkpointer.resume(path).get("epoch", -1) + 1
            check_epochs_left(path, self.start_epoch, self.max_epoch)
            logger.info("Resuming %s: training continues at epoch %d", path, self.start_epoch)
            return
        if resume:
            logger.info("--resume: %s holds no checkpoint (no last_checkpoint file): a new run "
                        "starts", self.cfg.OUTPUT_DIR)
        if self.cfg.EAT.ENABLED and self.cfg.EAT.MEMBER_WEIGHTS:  # under MODEL.WEIGHTS, if any
            load_member_weights(self.model, self.cfg.EAT.MEMBER_WEIGHTS,
                                self.cfg.ROBUSTREID.WEIGHTS_ONLY)
        self.checkpointer.load(self.cfg.MODEL.WEIGHTS, checkpointables=[])

    def train(self):
        """fastreid's loop (TrainerBase.train, DefaultTrainer.train), except for a run that stops
        early, by Ctrl-C or any exception: fastreid then still runs every hook's after_train, whose
        final evaluation and robust model selection (model_best_robust.pth) would judge a
        half-trained model. Here it runs none of the evaluation, writes the last epoch boundary for
        --resume (EpochBoundary), logs where it stopped, and re-raises."""
        logger.info("Starting training from epoch %d", self.start_epoch)
        self.iter = self.start_iter = self.start_epoch * self.iters_per_epoch
        with EventStorage(self.start_iter) as self.storage:
            try:
                self.before_train()
                for self.epoch in range(self.start_epoch, self.max_epoch):
                    self.before_epoch()
                    for _ in range(self.iters_per_epoch):
                        self.before_step()
                        self.run_step()
                        self.after_step()
                        self.iter += 1
                    self.after_epoch()
            except BaseException as e:
                self._stop_early(e)
                raise
            self.after_train()
        if comm.is_main_process():
            return self._last_eval_results

    def before_train(self):
        super().before_train()
        self.training_state.restore_generators()  # the set-up hooks' draws must not shift them

    def _stop_early(self, error):
        path = self.epoch_boundary.write_last() or self.checkpointer.get_checkpoint_file()
        self.storage.iter = self.iter
        for hook in self._hooks:  # the rest of after_train: timing summary, flushing the writers
            if not isinstance(hook, fastreid_hooks.EvalHook):
                hook.after_train()
        cause = type(error).__name__ + (f" ({error})" if str(error) else "")
        logger.warning("Training stopped in epoch %d (iteration %d) by %s: no evaluation, no model "
                       "selection; --resume continues from %s",
                       getattr(self, "epoch", self.start_epoch), self.iter, cause,
                       path or "nothing (no checkpoint yet)")

    def _robust_due(self):
        """TEST.ROBUST.PERIOD: every PERIOD epochs (when the clean evaluation runs) and at the end."""
        epoch, period = self.epoch + 1, self.cfg.TEST.ROBUST.PERIOD
        return epoch >= self.max_epoch or (period > 0 and epoch % period == 0)

    def _test_and_save_results(self):
        self._last_eval_results = self.test(self.cfg, self.model, robust=self._robust_due())
        if comm.is_main_process():
            self.best_robust.update(self._last_eval_results, self.checkpointer, self.epoch)
        return self._last_eval_results

    @classmethod
    def test(cls, cfg, model, robust=True):
        """fastreid's clean evaluation, then (TEST.ROBUST.ENABLED and ``robust``) the adversarial
        one on every test dataset, merged as flat floats (``FNA_8_16/mAP``, ...).

        The robust evaluation runs on the main process only (the attacks are not sharded); other
        ranks wait at EvalHook's barrier, so keep it short (TEST.ROBUST.MAX_QUERIES) in
        multi-process runs: gloo's default barrier timeout is 30 minutes.
        """
        # A stochastic model (MODEL.NOISE) is scored on features averaged over TEST.NOISE_DRAWS;
        # the attacks see the plain model (EOT is their own setting).
        results = super().test(cfg, noise_averaged(model, cfg.TEST.NOISE_DRAWS))
        if not (robust and cfg.TEST.ROBUST.ENABLED and comm.is_main_process()):
            return results
        from ..evaluation.robust import robust_test

        robust_results = robust_test(cfg, model)
        if len(cfg.DATASETS.TESTS) == 1:  # DefaultTrainer.test un-nests a single dataset
            results.update(robust_results[cfg.DATASETS.TESTS[0]])
        else:
            for name, flat in robust_results.items():
                results[name].update(flat)
        return results

    @classmethod
    def build_train_loader(cls, cfg):
        # BAU/ADIN batches carry a strong view / domain labels (robustreid.data.dg)
        return build_train_stream(cfg, build_dg_train_set(cfg) if dg_loader_needed(cfg) else None)

    @classmethod
    def build_model(cls, cfg):
        return attach_noise_modules(super().build_model(cfg), cfg)  # MODEL.NOISE (no-op if off)

    @classmethod
    def build_optimizer(cls, cfg, model):
        # contiguous=False: ContiguousParams does not train under torch 2 (see robustreid.compat).
        # Noise scales have their own optimizer (thesis Algorithm 2).
        with excluding_noise_scales(model):
            optimizer, param_wrapper = build_optimizer(cfg, model, contiguous=False)
        set_proxy_lr(cfg, optimizer, model)  # Proxy-Anchor's proxies: LR_MULTIPLIER x BASE_LR
        return optimizer, param_wrapper

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # fastreid's from-config path always starts 4 loader workers; honour DATALOADER.NUM_WORKERS.
        data = build_dataset(dataset_name)
        test_set = CommDataset(data.query + data.gallery, build_transforms(cfg, is_train=False),
                               relabel=False)
        return build_reid_test_loader(test_set=test_set, test_batch_size=cfg.TEST.IMS_PER_BATCH,
                                      num_query=len(data.query),
                                      num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_dir=None):
        from ..evaluation import build_reid_evaluator

        data_loader, num_query = cls.build_test_loader(cfg, dataset_name)
        return data_loader, build_reid_evaluator(cfg, num_query, output_dir)

    @classmethod
    def load_for_eval(cls, cfg):
        """A model in eval mode with MODEL.WEIGHTS loaded (for --eval-only and the tools)."""
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.BACKBONE.PRETRAIN = False
        model = cls.build_model(cfg)
        RobustCheckpointer(model, weights_only=cfg.ROBUSTREID.WEIGHTS_ONLY).load(cfg.MODEL.WEIGHTS)
        model.eval()
        return model

"""fastreid's Checkpointer, loading with torch.load(weights_only=True), writing atomically, and the
checks that a checkpoint fits a config (MODEL.WEIGHTS, --resume) before anything is built."""
import io
import logging
import os

import torch
from fastreid.utils.checkpoint import Checkpointer

from ..config import ConfigError

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"  # fastreid's tag file: names the checkpoint --resume continues


class WeightsNotFoundError(FileNotFoundError):
    """MODEL.WEIGHTS (or a --resume checkpoint) names a file that does not exist."""


def load_checkpoint_file(path, weights_only=True):
    """torch.load on CPU, with clear errors for a missing file and for pickled Python objects."""
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=torch.device("cpu"), weights_only=weights_only)
    except Exception as e:
        if weights_only and "weights_only" in str(e):
            raise RuntimeError(
                f"{path} holds Python objects that torch.load(weights_only=True) refuses; if you "
                f"trust this file, set ROBUSTREID.WEIGHTS_ONLY False") from e
        raise


def _write_atomically(path, payload):
    """A run killed while writing leaves the previous file, never a truncated one."""
    with open(path + ".tmp", "wb") as f:
        f.write(payload)
    os.replace(path + ".tmp", path)


class RobustCheckpointer(Checkpointer):
    """Checkpointer that never unpickles arbitrary objects unless the user opts out, writes through a
    temporary file, and resumes only what fits exactly (:meth:`resume`).

    ``weights_only=False`` (config ROBUSTREID.WEIGHTS_ONLY False) restores fastreid's behaviour for
    trusted checkpoints that store non-tensor Python objects.
    """

    def __init__(self, model, save_dir="", *, weights_only=True, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.weights_only = weights_only

    def _load_file(self, f):
        return load_checkpoint_file(f, self.weights_only)

    @property
    def writes(self):
        return bool(self.save_dir) and self.save_to_disk

    def serialize(self, **extra):
        """The bytes :meth:`save` writes: the model, every checkpointable and ``extra``."""
        data = {"model": self.model.state_dict(),
                **{key: obj.state_dict() for key, obj in self.checkpointables.items()}, **extra}
        buffer = io.BytesIO()
        torch.save(data, buffer)
        return buffer.getvalue()

    def save(self, name, **extra):
        if self.writes:
            self.write(name, self.serialize(**extra))

    def write(self, name, payload):
        """Write :meth:`serialize`'s bytes as ``name``.pth and tag it for --resume; returns its path."""
        path = os.path.join(self.save_dir, f"{name}.pth")
        logger.info("Saving checkpoint to %s", path)
        _write_atomically(path, payload)
        self.tag_last_checkpoint(os.path.basename(path))
        return path

    def get_checkpoint_file(self):
        return last_checkpoint(self.save_dir)

    def tag_last_checkpoint(self, last_filename_basename):
        _write_atomically(os.path.join(self.save_dir, LAST_CHECKPOINT),
                          last_filename_basename.encode())

    def resume(self, path):
        """Load everything a run saved in ``path`` (the model and every checkpointable) for that run
        to continue, refusing what does not fit exactly: fastreid's load() skips mismatching or
        missing tensors and states with a log line, which would continue a partly re-initialised
        run. Returns the other entries (epoch, ...)."""
        label = f"--resume checkpoint {path}"
        checkpoint = self._load_file(path)
        if not isinstance(checkpoint, dict) or "model" not in checkpoint:
            raise ConfigError(f"{label} is not a fastreid checkpoint (no 'model' state dict)")
        problem = fit_problem(self._load_model(checkpoint), strict=True)
        if problem:
            raise ConfigError(f"{label} does not match the config: {problem}")
        for key, obj in self.checkpointables.items():
            if key not in checkpoint:
                if isinstance(obj, TRAINED_STATE):
                    raise ConfigError(f"{label} has no {key!r}: it was written by a run with other "
                                      f"settings than this config's")
                logger.warning("%s has no %r (written by older code): the resumed run does not "
                               "continue the interrupted one exactly", path, key)
                continue
            try:
                obj.load_state_dict(checkpoint.pop(key))
            except (ValueError, KeyError, RuntimeError, TypeError) as e:
                raise ConfigError(f"{label}: its {key!r} does not fit this config's "
                                  f"({str(e).splitlines()[0]})") from None
        return checkpoint


# A checkpoint that lacks one of these was written with other settings (e.g. without the
# discriminator); anything else missing (RNG states, ...) only makes the continuation inexact.
TRAINED_STATE = (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)


def last_checkpoint(output_dir):
    """The checkpoint --resume continues (named by OUTPUT_DIR/last_checkpoint), or "" if none."""
    tag = os.path.join(output_dir, LAST_CHECKPOINT)
    if not os.path.isfile(tag):
        return ""
    with open(tag) as f:
        return os.path.join(output_dir, f.read().strip())


def inference_tensor_names(model, cfg):
    """State-dict keys the eval-mode features depend on: every buffer and every parameter that
    receives a gradient (the identity classifier, sized by the training set, does not).
    Raises RuntimeError when the model cannot run on a TEST-sized batch."""
    height, width = cfg.INPUT.SIZE_TEST
    model.eval()
    model({"images": torch.full((2, 3, height, width), 128.0)}).sum().backward()
    used = {name for name, p in model.named_parameters() if p.grad is not None}
    return used | {name for name, _ in model.named_buffers()}


# Parts a training run adds to a model it fine-tunes (they start from their own initialisation):
# a checkpoint without them is a valid MODEL.WEIGHTS for training, not for evaluation. A
# meta-architecture names its own in its ADDED_BY_TRAINING attribute (IPESGAN: its generator, ...).
ADDED_BY_TRAINING = ("noise_modules.",)


def read_checkpoint(path, label, weights_only=True):
    """A fastreid checkpoint dict from ``path``, or a ConfigError naming ``label``."""
    try:
        checkpoint = load_checkpoint_file(path, weights_only)
    except WeightsNotFoundError:
        raise
    except Exception as e:  # torch.load raises many types for files that are not checkpoints
        raise ConfigError(f"{label} cannot be read (truncated, or not a torch checkpoint): "
                          f"{str(e).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ConfigError(f"{label} is not a fastreid checkpoint (no 'model' state dict)")
    return checkpoint


def fit_problem(incompatible, used=None, optional=(), strict=False):
    """Why a checkpoint does not fit a model (None if it does), from Checkpointer._load_model's
    incompatible keys. ``used``: the tensor names that matter (None: all); ``optional``: name
    prefixes the checkpoint may lack; ``strict``: it may not hold tensors the model lacks either.
    Tensors the config leaves unsized (a 0 dimension: the identity classifier before the training
    set is read) are not compared."""
    def counts(key):
        return used is None or key in used

    wrong = [(k, c, m) for k, c, m in incompatible.incorrect_shapes if counts(k) and 0 not in m]
    if wrong:
        key, in_checkpoint, in_model = wrong[0]
        return (f"{key} has shape {in_checkpoint} in the checkpoint but {in_model} in the model "
                f"({len(wrong)} mismatching tensor(s))")
    unsized = {k for k, _, _ in incompatible.incorrect_shapes}  # _load_model lists them as missing
    missing = [k for k in incompatible.missing_keys
               if counts(k) and k not in unsized and not k.startswith(optional)]
    if missing:
        return f"{missing[0]} is missing from the checkpoint ({len(missing)} missing tensor(s))"
    if strict and incompatible.unexpected_keys:
        extra = incompatible.unexpected_keys
        return (f"the checkpoint holds {extra[0]}, which the model lacks ({len(extra)} such "
                f"tensor(s)): it was written for another model")
    return None


def check_checkpoint_fits(cfg, checkpoint, label, training=False, strict=False):
    """Refuse a checkpoint dict (named ``label`` in errors) whose tensors do not fit the config's
    model (built on CPU); consumes ``checkpoint["model"]``.

    fastreid's checkpointer only warns about tensors whose shape differs (and skips them) or that
    are missing, which would silently evaluate a partly random model. ``training``: the weights
    initialise a training run, which may add parts (``ADDED_BY_TRAINING``) they lack. ``strict``
    (--resume): every tensor counts, and tensors the model lacks mean another architecture.
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.PRETRAIN = False
    from fastreid.modeling.meta_arch import build_model

    from ..modeling.noise import attach_noise_modules
    try:
        model = attach_noise_modules(build_model(cfg), cfg)  # as RobustTrainer.build_model
    except (KeyError, AssertionError, ValueError) as e:  # registry names, inconsistent sizes
        raise ConfigError(f"cannot build the model of {cfg.MODEL.META_ARCHITECTURE}: "
                          f"{e.args[0] if e.args else e}") from None
    incompatible = RobustCheckpointer(model)._load_model(checkpoint)
    used, failure = None, None
    if not strict:
        try:
            used = inference_tensor_names(model, cfg)
        except RuntimeError as e:  # reported after the weights, the likelier cause
            failure = str(e).splitlines()[0]
    added = ADDED_BY_TRAINING + tuple(getattr(model, "ADDED_BY_TRAINING", ()))
    problem = fit_problem(incompatible, used, added if training else (), strict)
    if problem:
        raise ConfigError(f"{label} does not match the config: {problem}")
    if failure:
        raise ConfigError(f"the model of {cfg.MODEL.META_ARCHITECTURE} / {cfg.MODEL.BACKBONE.NAME} "
                          f"cannot run on INPUT.SIZE_TEST images: {failure}")


def check_weights_fit(cfg, training=False):
    """Refuse MODEL.WEIGHTS whose tensors do not fit the config's model (see check_checkpoint_fits)."""
    label = f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}"
    check_checkpoint_fits(cfg, read_checkpoint(cfg.MODEL.WEIGHTS, label,
                                               cfg.ROBUSTREID.WEIGHTS_ONLY), label, training)


def check_epochs_left(path, start_epoch, max_epoch):
    if start_epoch >= max_epoch:
        raise ConfigError(f"--resume checkpoint {path} ends at epoch {start_epoch - 1}, the last of "
                          f"SOLVER.MAX_EPOCH {max_epoch}: nothing left to train (raise "
                          f"SOLVER.MAX_EPOCH to train longer)")


def check_resume(cfg):
    """--resume's checkpoint (OUTPUT_DIR/last_checkpoint) checked before anything is built: it must
    exist, be readable, have epochs left and fit the config's model exactly. Returns its path, or
    "" when there is none (a new run starts)."""
    path = last_checkpoint(cfg.OUTPUT_DIR)
    if not path:
        return ""
    if not os.path.isfile(path):
        raise WeightsNotFoundError(
            f"--resume: {os.path.join(cfg.OUTPUT_DIR, LAST_CHECKPOINT)} names "
            f"{os.path.basename(path)}, which does not exist (delete it to start a new run)")
    label = f"--resume checkpoint {path}"
    checkpoint = read_checkpoint(path, label, cfg.ROBUSTREID.WEIGHTS_ONLY)
    check_epochs_left(path, checkpoint.get("epoch", -1) + 1, cfg.SOLVER.MAX_EPOCH)
    check_checkpoint_fits(cfg, checkpoint, label, strict=True)
    return path

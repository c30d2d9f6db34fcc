"""fastreid's Checkpointer, loading with torch.load(weights_only=True) and clear missing-file errors."""
import os

import torch
from fastreid.utils.checkpoint import Checkpointer

from ..config import ConfigError


class WeightsNotFoundError(FileNotFoundError):
    """MODEL.WEIGHTS (or a --resume checkpoint) names a file that does not exist."""


class RobustCheckpointer(Checkpointer):
    """Checkpointer that never unpickles arbitrary objects unless the user opts out.

    ``weights_only=False`` (config ROBUSTREID.WEIGHTS_ONLY False) restores fastreid's behaviour for
    trusted checkpoints that store non-tensor Python objects.
    """

    def __init__(self, model, save_dir="", *, weights_only=True, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.weights_only = weights_only

    def _load_file(self, f):
        if not os.path.isfile(f):
            raise WeightsNotFoundError(f"checkpoint file not found: {f}")
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=self.weights_only)
        except Exception as e:
            if self.weights_only and "weights_only" in str(e):
                raise RuntimeError(
                    f"{f} holds Python objects that torch.load(weights_only=True) refuses; if you "
                    f"trust this file, set ROBUSTREID.WEIGHTS_ONLY False") from e
            raise


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
# a checkpoint without them is a valid MODEL.WEIGHTS for training, not for evaluation.
ADDED_BY_TRAINING = ("noise_modules.",)


def check_weights_fit(cfg, training=False):
    """Refuse MODEL.WEIGHTS whose tensors do not fit the config's model (checked on CPU).

    fastreid's checkpointer only warns about tensors whose shape differs (and skips them) or that
    are missing, which would silently evaluate a partly random model. ``training``: the weights
    initialise a training run, which may add parts (``ADDED_BY_TRAINING``) they lack.
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
    checkpointer = RobustCheckpointer(model, weights_only=cfg.ROBUSTREID.WEIGHTS_ONLY)
    try:
        checkpoint = checkpointer._load_file(cfg.MODEL.WEIGHTS)
    except Exception as e:  # torch.load raises many types for files that are not checkpoints
        raise ConfigError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} cannot be read: "
                          f"{str(e).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ConfigError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} is not a fastreid checkpoint "
                          f"(no 'model' state dict)")
    incompatible = checkpointer._load_model(checkpoint)
    try:
        used, failure = inference_tensor_names(model, cfg), None
    except RuntimeError as e:  # reported after the weights, the likelier cause
        used, failure = None, str(e).splitlines()[0]
    wrong = [(k, c, m) for k, c, m in incompatible.incorrect_shapes if used is None or k in used]
    missing = [k for k in incompatible.missing_keys if (used is None or k in used)
               and not (training and k.startswith(ADDED_BY_TRAINING))]
    if wrong:
        key, in_checkpoint, in_model = wrong[0]
        raise ConfigError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} does not match the config: {key} has "
                          f"shape {in_checkpoint} in the checkpoint but {in_model} in the model "
                          f"({len(wrong)} mismatching tensor(s))")
    if missing:
        raise ConfigError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} does not match the config: {missing[0]} "
                          f"is missing from the checkpoint ({len(missing)} missing tensor(s))")
    if failure:
        raise ConfigError(f"the model of {cfg.MODEL.META_ARCHITECTURE} / {cfg.MODEL.BACKBONE.NAME} "
                          f"cannot run on INPUT.SIZE_TEST images: {failure}")

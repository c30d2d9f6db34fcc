from .checkpoint import (RobustCheckpointer, WeightsNotFoundError, check_resume, check_weights_fit,
                         last_checkpoint)
from .defaults import (USER_ERRORS, RobustTrainer, build_config, check_output_dir, check_weights,
                       preflight, resolve_device, setup)
from .ipes import IPESTrainer, build_trainer
from .surrogate import build_surrogate_extractor
from fastreid.engine import launch  # CPU-capable once robustreid.compat is applied

__all__ = ["IPESTrainer", "RobustCheckpointer", "RobustTrainer", "USER_ERRORS",
           "WeightsNotFoundError", "build_config", "build_surrogate_extractor", "build_trainer",
           "check_output_dir", "check_resume", "check_weights", "check_weights_fit",
           "last_checkpoint", "launch", "preflight", "resolve_device", "setup"]

from .checkpoint import RobustCheckpointer, WeightsNotFoundError
from .defaults import (USER_ERRORS, RobustTrainer, build_config, preflight, resolve_device,
                       setup)
from fastreid.engine import launch  # CPU-capable once robustreid.compat is applied

__all__ = ["RobustCheckpointer", "RobustTrainer", "USER_ERRORS", "WeightsNotFoundError",
           "build_config", "launch", "preflight", "resolve_device", "setup"]

from .ensemble import EnsembleReID
from .robust_baseline import RobustBaseline

__all__ = ["EnsembleReID", "RobustBaseline"]

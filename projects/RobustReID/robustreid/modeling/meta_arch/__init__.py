from .ensemble import EnsembleReID
from .ipes_gan import IPESGAN
from .robust_baseline import RobustBaseline

__all__ = ["EnsembleReID", "IPESGAN", "RobustBaseline"]

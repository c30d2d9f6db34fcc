from .robust_baseline import RobustBaseline

__all__ = ["RobustBaseline"]

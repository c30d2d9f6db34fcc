"""RobustReID heads, registered in fastreid's REID_HEADS_REGISTRY on import."""
from .mlp_head import MLPClassifierHead  # noqa: F401

__all__ = ["MLPClassifierHead"]

"""RobustReID backbones, registered in fastreid's BACKBONE_REGISTRY on import."""
from . import apnet  # noqa: F401
from .apnet import add_apnet_config, build_apnet_backbone  # noqa: F401

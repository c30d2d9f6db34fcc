"""RobustReID backbones, registered in fastreid's BACKBONE_REGISTRY on import."""
from . import apnet, bninception, dual_branch  # noqa: F401
from .apnet import add_apnet_config, build_apnet_backbone  # noqa: F401
from .bninception import add_bninception_config, build_bninception_backbone  # noqa: F401

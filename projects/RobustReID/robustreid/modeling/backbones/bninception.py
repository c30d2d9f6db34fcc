"""BN-Inception: the Inception network with Batch Normalization of Ioffe & Szegedy (ICML 2015,
"Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift",
Figure 5 and section 4.2), the 1024-d backbone of deep-metric-learning papers (EAT's Table 2).

The architecture is the paper's table: a 7x7/2 convolution, 3x3 max pooling, a 1x1 + 3x3 convolution
pair, 3x3 max pooling, then ten Inception modules (3a-3c, 4a-4e, 5a-5b) whose branches are a 1x1
convolution, a 1x1 reduction + one 3x3, a 1x1 reduction + two 3x3 (the paper's replacement of the
5x5), and a pooling branch with an optional 1x1 projection. Modules 3c and 4e halve the resolution
(stride-2 3x3s, max pooling passed through, no 1x1 branch). Every convolution is followed by Batch
Normalization and a ReLU. A 224 x 224 input gives a (B, 1024, 7, 7) map; fastreid's head pools it.

Layer names are those of the released Caffe model (``conv1_7x7_s2``, ``inception_3a_1x1``,
``inception_3a_double_3x3_1``, ..., each BN as ``<conv>_bn``), so the state dict converted from it,
the ImageNet weights DML papers start from, loads as it is (MODEL.BACKBONE.PRETRAIN_PATH). Those
weights take BGR images in [0, 255] minus the per-channel mean (104, 117, 128): with
MODEL.BACKBONE.BNINCEPTION.BGR_WEIGHTS True the first convolution's input channels are reversed at
load, so the model takes fastreid's RGB input; set MODEL.PIXEL_MEAN [128, 117, 104] and
MODEL.PIXEL_STD [1, 1, 1] to match (configs/EAT/backbones/BNInception.yml does).
"""
import torch
from torch import nn
import torch.nn.functional as F

from fastreid.config import CfgNode as CN
from fastreid.layers import get_norm
from fastreid.modeling.backbones.build import BACKBONE_REGISTRY

from .pretrained import load_pretrained

__all__ = ["add_bninception_config", "build_bninception_backbone", "BNInception", "MODULES"]

# The paper's Figure 5 table: module, #1x1, #3x3 reduce, #3x3, double #3x3 reduce, double #3x3,
# pool ("avg"/"max"), pool projection (0 = pass-through), stride of the 3x3s and of the pooling.
MODULES = (
    ("3a", 64, 64, 64, 64, 96, "avg", 32, 1),
    ("3b", 64, 64, 96, 64, 96, "avg", 64, 1),
    ("3c", 0, 128, 160, 64, 96, "max", 0, 2),
    ("4a", 224, 64, 96, 96, 128, "avg", 128, 1),
    ("4b", 192, 96, 128, 96, 128, "avg", 128, 1),
    ("4c", 160, 128, 160, 128, 160, "avg", 128, 1),
    ("4d", 96, 128, 192, 160, 192, "avg", 128, 1),
    ("4e", 0, 128, 192, 192, 256, "max", 0, 2),
    ("5a", 352, 192, 320, 160, 224, "avg", 128, 1),
    ("5b", 352, 192, 320, 192, 224, "max", 128, 1),
)


def add_bninception_config(cfg):
    """Declare MODEL.BACKBONE.BNINCEPTION (idempotent)."""
    if "BNINCEPTION" in cfg.MODEL.BACKBONE:
        return cfg
    frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.MODEL.BACKBONE.BNINCEPTION = CN()
    # The PRETRAIN_PATH weights take BGR input (the Caffe model's): reverse conv1's input channels
    # at load so the backbone takes RGB.
    cfg.MODEL.BACKBONE.BNINCEPTION.BGR_WEIGHTS = False
    if frozen:
        cfg.freeze()
    return cfg


class BNInception(nn.Module):
    """The backbone: features (B, 1024, H/32, W/32) of images (B, 3, H, W)."""

    def __init__(self, bn_norm="BN"):
        super().__init__()
        self._bn_norm = bn_norm
        self._stem = [self._unit("conv1_7x7_s2", 3, 64, 7, 2), "pool",
                      self._unit("conv2_3x3_reduce", 64, 64, 1),
                      self._unit("conv2_3x3", 64, 192, 3), "pool"]
        channels = 192
        self._blocks = []
        for name, n1, n3r, n3, nd_r, nd, pool, proj, stride in MODULES:
            prefix = f"inception_{name}_"
            branches = []
            if n1:
                branches.append([self._unit(prefix + "1x1", channels, n1, 1)])
            branches.append([self._unit(prefix + "3x3_reduce", channels, n3r, 1),
                             self._unit(prefix + "3x3", n3r, n3, 3, stride)])
            branches.append([self._unit(prefix + "double_3x3_reduce", channels, nd_r, 1),
                             self._unit(prefix + "double_3x3_1", nd_r, nd, 3),
                             self._unit(prefix + "double_3x3_2", nd, nd, 3, stride)])
            project = [self._unit(prefix + "pool_proj", channels, proj, 1)] if proj else []
            self._blocks.append((branches, pool, stride, project))
            channels = n1 + n3 + nd + (proj or channels)
        self.out_channels = channels
        self._initialize()

    def _unit(self, name, cin, cout, kernel, stride=1):
        """A convolution ``name`` (with bias, as the Caffe model) and its BN ``name_bn``."""
        self.add_module(name, nn.Conv2d(cin, cout, kernel, stride, kernel // 2))
        self.add_module(name + "_bn", get_norm(self._bn_norm, cout))
        return name

    def _run(self, name, x):
        return F.relu(getattr(self, name + "_bn")(getattr(self, name)(x)), inplace=True)

    def _initialize(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        for step in self._stem:  # Caffe pools round up: 112 -> 56, 56 -> 28
            x = F.max_pool2d(x, 3, 2, ceil_mode=True) if step == "pool" else self._run(step, x)
        for branches, pool, stride, project in self._blocks:
            outputs = []
            for branch in branches:
                y = x
                for name in branch:
                    y = self._run(name, y)
                outputs.append(y)
            if pool == "max":
                y = F.max_pool2d(x, 3, stride, 1 if stride == 1 else 0, ceil_mode=True)
            else:
                y = F.avg_pool2d(x, 3, stride, 1, ceil_mode=True)
            for name in project:
                y = self._run(name, y)
            x = torch.cat(outputs + [y], dim=1)
        return x


@BACKBONE_REGISTRY.register()
def build_bninception_backbone(cfg):
    """BN-Inception from MODEL.BACKBONE.*: NORM, and with PRETRAIN the state dict at PRETRAIN_PATH
    (every backbone tensor required; no download exists for it)."""
    backbone = cfg.MODEL.BACKBONE
    model = BNInception(backbone.NORM)
    if backbone.PRETRAIN:
        load_pretrained(model, backbone.PRETRAIN_PATH)
        if backbone.BNINCEPTION.BGR_WEIGHTS:
            with torch.no_grad():
                model.conv1_7x7_s2.weight.copy_(model.conv1_7x7_s2.weight.flip(1))
    return model

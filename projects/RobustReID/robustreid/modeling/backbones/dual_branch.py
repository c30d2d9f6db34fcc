"""The dual-branch feature extractor f_E of ADIN (Yuan et al., Fig. 4): a global and a part branch.

The paper shows the design only in its Fig. 4 ("inspired by PCB, MGN and ABD-Net": a global branch
and a part branch on a shared ResNet-50). The text gives no sizes, so this module fixes them, each
a ``MODEL.BACKBONE.DUAL_BRANCH`` key:

* shared trunk: fastreid's ResNet (``build_resnet_backbone``: DEPTH, WITH_IBN/SE/NL, NORM,
  PRETRAIN(_PATH) as usual) through layer3;
* global branch: the trunk's layer4 (stride MODEL.BACKBONE.LAST_STRIDE) + global average pooling
  -> C channels (2048 for ResNet-50);
* part branch: a copy of layer4 (initialised from the same, possibly pre-trained, weights) with
  stride PART_STRIDE (1 keeps the finer map, as PCB / MGN's part branches do), cut into NUM_PARTS
  horizontal stripes, each average-pooled and reduced by its own 1x1 conv + BN + ReLU to PART_DIM;
* output: [global | part_1 | ... | part_P] as a (B, C + P * PART_DIM, 1, 1) map, so fastreid's
  head (pooling over a 1x1 map is the identity, BNNeck, classifier) works unchanged.
  MODEL.BACKBONE.FEAT_DIM must equal C + P * PART_DIM (checked at build time).
"""
import copy

import torch
from torch import nn

from fastreid.layers import get_norm
from fastreid.modeling.backbones.build import BACKBONE_REGISTRY
from fastreid.modeling.backbones.resnet import build_resnet_backbone

__all__ = ["DualBranch", "build_dual_branch_backbone", "dual_branch_feat_dim"]


def _layer_out_channels(layer):
    last = layer[-1]  # a fastreid BasicBlock (conv2 is its last conv) or Bottleneck (conv3)
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


def _set_first_block_stride(layer, stride):
    """Change a ResNet stage's down-sampling stride (the first block's strided convs) in place."""
    for module in layer[0].modules():
        if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
            module.stride = (stride, stride)
    return layer


class DualBranch(nn.Module):
    """Shared ResNet trunk + global branch + part branch; returns (B, C + P * part_dim, 1, 1)."""

    def __init__(self, trunk, num_parts=3, part_dim=256, part_stride=1, norm="BN"):
        super().__init__()
        if num_parts < 1 or part_dim < 1 or part_stride not in (1, 2):
            raise ValueError(f"MODEL.BACKBONE.DUAL_BRANCH needs NUM_PARTS >= 1, PART_DIM >= 1 and "
                             f"PART_STRIDE 1 or 2, got {num_parts}, {part_dim}, {part_stride}")
        for name, module in trunk.named_children():
            self.add_module(name, module)
        self._nl_idx = {k: [i for i in getattr(trunk, f"NL_{k}_idx") if i >= 0]
                        for k in range(1, 5)}
        channels = _layer_out_channels(trunk.layer4)
        self.part_layer4 = _set_first_block_stride(copy.deepcopy(trunk.layer4), part_stride)
        self.num_parts = int(num_parts)
        self.part_pool = nn.AdaptiveAvgPool2d((self.num_parts, 1))
        self.part_reduce = nn.ModuleList([
            nn.Sequential(nn.Conv2d(channels, part_dim, 1, bias=False), get_norm(norm, part_dim),
                          nn.ReLU(inplace=True))
            for _ in range(self.num_parts)])
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = channels + self.num_parts * part_dim
        for m in self.part_reduce.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, k, x, layer=None):
        nl_idx, nl = self._nl_idx[k], getattr(self, f"NL_{k}", None)
        done = 0
        for i, block in enumerate(layer if layer is not None else getattr(self, f"layer{k}")):
            x = block(x)
            if done < len(nl_idx) and i == nl_idx[done]:
                x = nl[done](x)
                done += 1
        return x

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for k in range(1, 4):
            x = self._stage(k, x)
        global_feat = self.global_pool(self._stage(4, x))
        part_map = self.part_pool(self.part_layer4(x))  # (B, C, P, 1)
        parts = [reduce(part_map[:, :, i:i + 1]) for i, reduce in enumerate(self.part_reduce)]
        return torch.cat([global_feat, *parts], dim=1)


def dual_branch_feat_dim(cfg):
    """The FEAT_DIM a config's dual-branch backbone produces."""
    depth = cfg.MODEL.BACKBONE.DEPTH
    channels = 512 if depth in ("18x", "34x") else 2048
    db = cfg.MODEL.BACKBONE.DUAL_BRANCH
    return channels + db.NUM_PARTS * db.PART_DIM


@BACKBONE_REGISTRY.register()
def build_dual_branch_backbone(cfg):
    """ADIN's dual-branch backbone from MODEL.BACKBONE.* and MODEL.BACKBONE.DUAL_BRANCH.*."""
    db = cfg.MODEL.BACKBONE.DUAL_BRANCH
    model = DualBranch(build_resnet_backbone(cfg), db.NUM_PARTS, db.PART_DIM, db.PART_STRIDE,
                       cfg.MODEL.BACKBONE.NORM)
    if cfg.MODEL.BACKBONE.FEAT_DIM != model.feat_dim:
        raise ValueError(f"MODEL.BACKBONE.FEAT_DIM is {cfg.MODEL.BACKBONE.FEAT_DIM} but the dual-"
                         f"branch backbone gives {model.feat_dim} (layer4 channels + NUM_PARTS x "
                         f"PART_DIM): set MODEL.BACKBONE.FEAT_DIM {model.feat_dim}")
    return model

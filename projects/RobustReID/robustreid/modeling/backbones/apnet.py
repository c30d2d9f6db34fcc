"""APNet: "Person Re-identification via Attention Pyramid" (Chen, Gu, Lu, Bao, Zhou; IEEE TIP 30, 2021).

DDDefense (supplementary, Tables 1-3) uses APNet as its second backbone. The attention pyramid follows the
paper's "split-attend-merge-stack" principle (paper abstract; Figure 1 caption of the authors' README):

* split:  at pyramid level ``l`` (1-based) the C channels of a feature map are split into ``2**(l-1)``
          contiguous groups ("parts"), so level 1 looks at the whole map and deeper levels are finer;
* attend: every part gets its own attention: an SE-like channel gate (global average pooling ->
          bottleneck -> sigmoid) and/or a spatial gate (an H x W map per part);
* merge:  the part attentions are concatenated back into one C-channel attention for that level;
* stack:  levels are applied coarse to fine, each level attending to the features already re-weighted
          by the coarser ones (the fine attention is "guided by coarse attentions"), so the pyramid
          multiplies the input by the stacked attentions element-wise.

The pyramid is a plug-in placed after the ResNet stem and after each of the four residual stages, as in the
authors' released (channel-attention, "APNet-C") implementation; the ResNet itself is fastreid's, built by
``build_resnet_backbone`` so DEPTH, LAST_STRIDE, NORM, WITH_IBN/SE/NL and PRETRAIN(_PATH) behave exactly as
for ``build_resnet_backbone``, and a fastreid ResNet state dict loads into the trunk unchanged (the trunk's
parameter names are ResNet's; the pyramid's live under ``apnet.``).
"""
from torch import nn

from fastreid.config import CfgNode as CN
from fastreid.modeling.backbones.build import BACKBONE_REGISTRY
from fastreid.modeling.backbones.resnet import build_resnet_backbone

__all__ = ["add_apnet_config", "build_apnet_backbone", "APNet", "AttentionPyramid", "PyramidLevel"]

ATTENTION_KINDS = ("channel", "spatial", "channel_spatial")
# Attention sites: 0 is the stem output (after max-pool), 1..4 are res_conv2..res_conv5 (layer1..layer4).
_SITE_NAMES = {0: "stem", 1: "layer1", 2: "layer2", 3: "layer3", 4: "layer4"}
_MIN_HIDDEN = 8  # floor on a part's bottleneck width, so small parts (ResNet-18, deep levels) keep capacity


def add_apnet_config(cfg):
    """Declare MODEL.BACKBONE.APNET (idempotent). Defaults follow the APNet paper / authors' release."""
    if "APNET" in cfg.MODEL.BACKBONE:
        return cfg
    frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.MODEL.BACKBONE.APNET = CN()
    # Pyramid levels; level l splits channels into 2**(l-1) parts. 2 is the authors' released default
    # (configs/default.yml APNET.LEVEL: 2); 0 disables the pyramid (plain ResNet, as the release's LEVEL 0).
    cfg.MODEL.BACKBONE.APNET.LEVELS = 2
    # SE bottleneck ratio inside each part (hidden = max(part_channels // REDUCTION, 8)). 16 is SE-Net's
    # ratio (APNet-C's agent is an SE layer); the paper states no other value that we could confirm.
    cfg.MODEL.BACKBONE.APNET.REDUCTION = 16
    # Where pyramids sit: 0 = stem, 1..4 = after layer1..layer4. The authors' release attends after the
    # stem and after every residual stage.
    cfg.MODEL.BACKBONE.APNET.STAGES = (0, 1, 2, 3, 4)
    # Attention agent: "channel" (APNet-C, the paper's headline results and the released code),
    # "spatial" (APNet-S) or "channel_spatial" (both gates multiplied per part).
    cfg.MODEL.BACKBONE.APNET.ATTENTION = "channel"
    if frozen:
        cfg.freeze()
    return cfg


class PyramidLevel(nn.Module):
    """One pyramid level: split C channels into ``parts`` groups, attend per part, merge by concatenation.

    Grouped 1x1/3x3 convolutions give every part its own weights while running all parts in one call; the
    grouped output *is* the concatenation of the parts' attentions (the paper's "merge").
    """

    def __init__(self, channels, parts, reduction, attention="channel"):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"MODEL.BACKBONE.APNET.ATTENTION must be one of {ATTENTION_KINDS}, "
                             f"got {attention!r}")
        if channels % parts:
            raise ValueError(f"APNet: a pyramid level with {parts} parts cannot split {channels} channels "
                             f"evenly; lower MODEL.BACKBONE.APNET.LEVELS")
        self.channels, self.parts = channels, parts
        part_channels = channels // parts
        hidden = max(part_channels // reduction, _MIN_HIDDEN)
        self.channel_gate = self.spatial_gate = None
        if attention in ("channel", "channel_spatial"):
            # SE per part: squeeze (GAP) -> excite (bottleneck MLP as 1x1 convs) -> sigmoid gate per channel.
            self.channel_gate = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(channels, hidden * parts, 1, groups=parts),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden * parts, channels, 1, groups=parts),
                nn.Sigmoid(),
            )
        if attention in ("spatial", "channel_spatial"):
            # One H x W map per part from that part's channels (1x1 reduce, 3x3 context), broadcast over the
            # part's channels. A light stand-in for the relation-aware agent the paper's APNet-S plugs in.
            self.spatial_gate = nn.Sequential(
                nn.Conv2d(channels, hidden * parts, 1, groups=parts),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden * parts, parts, 3, padding=1, groups=parts),
                nn.Sigmoid(),
            )

    def forward(self, x):
        """The merged attention for ``x``, values in (0, 1): (B, C, 1, 1) for "channel", else (B, C, H, W)."""
        att = None
        if self.channel_gate is not None:
            att = self.channel_gate(x)
        if self.spatial_gate is not None:
            spatial = self.spatial_gate(x).repeat_interleave(self.channels // self.parts, dim=1)
            att = spatial if att is None else att * spatial
        return att


class AttentionPyramid(nn.Module):
    """Levels 1..L applied coarse to fine; each level attends to the output of the coarser ones (stack)."""

    def __init__(self, channels, levels, reduction, attention="channel"):
        super().__init__()
        self.levels = nn.ModuleList(
            PyramidLevel(channels, 2 ** level, reduction, attention) for level in range(levels))

    def attend(self, x):
        """Returns (re-weighted features, [attention of level 1, ..., level L])."""
        maps = []
        for level in self.levels:
            att = level(x)
            maps.append(att)
            x = x * att
        return x, maps

    def forward(self, x):
        return self.attend(x)[0]


def _stage_out_channels(stage):
    last = stage[-1]  # a fastreid BasicBlock (conv2 is its last conv) or Bottleneck (conv3)
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


class APNet(nn.Module):
    """fastreid's ResNet with attention pyramids after the stem and residual stages; returns (B, C, H, W).

    The ResNet's modules are adopted under their own names (conv1, bn1, layer1, ..., NL_*), so state dicts
    written from ``build_resnet_backbone`` models load here with only the ``apnet.*`` keys missing.
    """

    def __init__(self, trunk, levels=2, reduction=16, stages=(0, 1, 2, 3, 4), attention="channel"):
        super().__init__()
        levels = int(levels)
        if levels < 0:
            raise ValueError(f"MODEL.BACKBONE.APNET.LEVELS must be >= 0, got {levels}")
        if int(reduction) < 1:
            raise ValueError(f"MODEL.BACKBONE.APNET.REDUCTION must be >= 1, got {reduction}")
        stages = tuple(int(s) for s in stages)
        if len(set(stages)) != len(stages) or not set(stages) <= set(_SITE_NAMES):
            raise ValueError(f"MODEL.BACKBONE.APNET.STAGES must be distinct values in 0..4, got {stages}")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"MODEL.BACKBONE.APNET.ATTENTION must be one of {ATTENTION_KINDS}, "
                             f"got {attention!r}")

        for name, module in trunk.named_children():
            self.add_module(name, module)
        # Non-local block positions per stage, as fastreid's ResNet.forward uses them (empty without WITH_NL).
        self._nl_idx = {k: [i for i in getattr(trunk, f"NL_{k}_idx") if i >= 0] for k in range(1, 5)}

        channels = {0: trunk.conv1.out_channels}
        channels.update({k: _stage_out_channels(getattr(trunk, f"layer{k}")) for k in range(1, 5)})
        self.apnet = nn.ModuleDict()
        if levels > 0:
            for site in sorted(stages):
                self.apnet[_SITE_NAMES[site]] = AttentionPyramid(
                    channels[site], levels, int(reduction), attention)

    def _stage(self, k, x):
        nl_idx, nl = self._nl_idx[k], getattr(self, f"NL_{k}", None)
        done = 0
        for i, block in enumerate(getattr(self, f"layer{k}")):
            x = block(x)
            if done < len(nl_idx) and i == nl_idx[done]:
                x = nl[done](x)
                done += 1
        return x

    def _attend(self, site, x, maps):
        if site not in self.apnet:
            return x
        x, site_maps = self.apnet[site].attend(x)
        if maps is not None:
            maps[site] = site_maps
        return x

    def forward(self, x, return_attention=False):
        """Features (B, C, H, W); with ``return_attention`` also {site: [per-level attention maps]}."""
        maps = {} if return_attention else None
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self._attend("stem", x, maps)
        for k in range(1, 5):
            x = self._attend(f"layer{k}", self._stage(k, x), maps)
        return (x, maps) if return_attention else x


@BACKBONE_REGISTRY.register()
def build_apnet_backbone(cfg):
    """APNet from MODEL.BACKBONE.*; the trunk (PRETRAIN/PRETRAIN_PATH loading included) is fastreid's."""
    ap = cfg.MODEL.BACKBONE.APNET
    trunk = build_resnet_backbone(cfg)
    return APNet(trunk, levels=ap.LEVELS, reduction=ap.REDUCTION, stages=ap.STAGES, attention=ap.ATTENTION)

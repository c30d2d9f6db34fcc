"""Eval-mode BatchNorm folded into the preceding convolution, for attack forwards.

An attack runs the model in eval mode, where BN is a fixed per-channel affine map; folding it into
the convolution's weights computes the same function (to float rounding) without the BN passes,
about 13% less time per attack step of the demo ResNet-18 on CPU (tools/bench_train_cost.py). The
fold is made on a copy, so the trained model is never touched.
"""
import copy

import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _conv_bn_pairs(parent):
    """(conv name, bn name) children of ``parent`` where BN directly follows the conv: fastreid's and
    torchvision's ResNet naming (convN / bnN) and Sequential(conv, bn, ...) (downsample)."""
    children = dict(parent.named_children())
    for name, child in children.items():
        if not isinstance(child, nn.Conv2d):
            continue
        if isinstance(parent, nn.Sequential) and name.isdigit():
            bn_name = str(int(name) + 1)
        elif name.startswith("conv"):
            bn_name = "bn" + name[len("conv"):]
        else:
            continue
        bn = children.get(bn_name)
        # Only plain BN (fastreid's BatchNorm subclass included): not IBN, GhostBN, SyncBN...
        if isinstance(bn, nn.BatchNorm2d) and type(bn).forward is nn.BatchNorm2d.forward \
                and bn.track_running_stats:
            yield name, bn_name


def fold_batchnorm(model):
    """A copy of ``model`` (which must be in eval mode) with every foldable BN folded."""
    folded = copy.deepcopy(model)
    for parent in list(folded.modules()):
        for conv_name, bn_name in list(_conv_bn_pairs(parent)):
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            fused = fuse_conv_bn_eval(conv, bn)
            fused.weight.requires_grad_(False)
            fused.bias.requires_grad_(False)
            setattr(parent, conv_name, fused)
            setattr(parent, bn_name, nn.Identity())
    return folded


def can_fold(model):
    """Whether folding applies: some conv -> BN pair, and no forward hooks (hooks may read module
    state a copy would not share, e.g. noise switches)."""
    hooks = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    return not hooks and any(True for m in model.modules() for _ in _conv_bn_pairs(m))

"""Eval-mode BatchNorm folded into the preceding convolution, for attack forwards.

An attack runs the model in eval mode, where BN is a fixed per-channel affine map; folding it into
the convolution's weights computes the same function (to float rounding) without the BN passes,
about 13% less time per attack step of the demo ResNet-18 on CPU (tools/bench_train_cost.py). The
fold is made on a copy, so the trained model is never touched; the copy is built once and refreshed
in place from the live weights (:class:`FoldedModel`).
"""
import copy

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights


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


class FoldedModel:
    """A BN-folded copy of a model, made once and refreshed in place from the live weights.

    Training attacks every step (Metric AT, DDDefense) fold the current weights each step; a fresh
    ``deepcopy`` per step would allocate and build a whole module tree each time, so the copy's
    structure is built once and :meth:`refresh` writes the live weights into it: the fused
    convolutions from their live conv + BN, every other parameter and buffer copied as is.
    """

    def __init__(self, model, channels_last=False):
        self.module = copy.deepcopy(model).eval()
        self._pairs = []  # (fused conv in the copy, live conv, live bn)
        fused_names = set()
        for parent_name, parent in list(self.module.named_modules()):
            for conv_name, bn_name in list(_conv_bn_pairs(parent)):
                prefix = f"{parent_name}." if parent_name else ""
                live_conv = model.get_submodule(prefix + conv_name)
                live_bn = model.get_submodule(prefix + bn_name)
                fused = fuse_conv_bn_eval(getattr(parent, conv_name), getattr(parent, bn_name))
                setattr(parent, conv_name, fused)
                setattr(parent, bn_name, nn.Identity())
                self._pairs.append((fused, live_conv, live_bn))
                fused_names.update({prefix + conv_name + ".weight", prefix + conv_name + ".bias"})
        if channels_last:  # before collecting tensors: conversion may replace them; copy_ keeps it
            self.module.to(memory_format=torch.channels_last)
        live = dict(_named_tensors(model))
        self._copies = [(tensor, live[name]) for name, tensor in _named_tensors(self.module)
                        if name not in fused_names]
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def refresh(self):
        """Write the live model's current weights into the copy; returns the copy."""
        for fused, conv, bn in self._pairs:
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                                bn.running_var, bn.eps, bn.weight, bn.bias)
            fused.weight.copy_(weight)
            fused.bias.copy_(bias)
        for tensor, source in self._copies:
            tensor.copy_(source)
        return self.module


def _named_tensors(module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def can_fold(model):
    """Whether folding applies: some conv -> BN pair, and no forward hooks (hooks may read module
    state a copy would not share, e.g. noise switches)."""
    hooks = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    return not hooks and any(True for m in model.modules() for _ in _conv_bn_pairs(m))

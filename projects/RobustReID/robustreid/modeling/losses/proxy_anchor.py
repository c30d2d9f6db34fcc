"""Proxy-Anchor loss (Kim et al., CVPR 2020), EAT's metric loss, as a fastreid loss.

pytorch-metric-learning's ``ProxyAnchorLoss`` computes it; this module only owns it inside the
model, so its proxies (one per class, MODEL.HEADS.NUM_CLASSES) are model parameters: the optimizer
trains them (at SOLVER.BASE_LR x MODEL.LOSSES.PA.LR_MULTIPLIER, robustreid.engine.proxy_anchor)
and every checkpoint holds them (``proxy_anchor.loss.proxies``).

It reads ``outputs["features"]``, the tensor fastreid's triplet loss reads: with NECK_FEAT "after"
and EMBEDDING_DIM d > 0 the d-dimensional embedding layer's output (the authors' model: a linear
embedding, d = 512, no BNNeck, i.e. WITH_BNNECK False); with NECK_FEAT "before" the pooled backbone
feature. pml's default distance, cosine similarity, L2-normalises it inside, as the authors' model
does before the loss.
"""
import warnings

from pytorch_metric_learning.losses import ProxyAnchorLoss as PmlProxyAnchorLoss
from torch import nn

from ...config import ConfigError

LOSS_NAME = "ProxyAnchorLoss"


def proxy_anchor_enabled(cfg):
    """True when MODEL.LOSSES.NAME names the Proxy-Anchor loss."""
    return LOSS_NAME in cfg.MODEL.LOSSES.NAME


def loss_feature_dim(cfg):
    """Width of the heads' ``outputs["features"]`` (EmbeddingHead and MLPClassifierHead alike)."""
    heads = cfg.MODEL.HEADS
    if heads.NECK_FEAT == "after" and heads.EMBEDDING_DIM > 0:
        return heads.EMBEDDING_DIM
    return cfg.MODEL.BACKBONE.FEAT_DIM


def check_proxy_anchor_config(cfg):
    """MODEL.LOSSES.PA values and switch combinations that cannot work, as ConfigErrors naming the
    key (only when the loss is named). NUM_CLASSES 0 is legal here: RobustTrainer sets it from the
    training set after this check; the loss refuses it when it is computed."""
    if not proxy_anchor_enabled(cfg):
        return
    # in an EAT ensemble the members compute the losses: their architecture must build this one
    key, architecture = (("EAT.MEMBER_ARCHITECTURE", cfg.EAT.MEMBER_ARCHITECTURE)
                         if cfg.MODEL.META_ARCHITECTURE == "EnsembleReID" else
                         ("MODEL.META_ARCHITECTURE", cfg.MODEL.META_ARCHITECTURE))
    if architecture != "RobustBaseline":
        raise ConfigError(f"MODEL.LOSSES.NAME {LOSS_NAME} needs {key} RobustBaseline "
                          f"(fastreid's Baseline ignores it), got {architecture!r}")
    pa = cfg.MODEL.LOSSES.PA
    for key, bad, must in (("MARGIN", pa.MARGIN < 0, ">= 0"), ("ALPHA", pa.ALPHA <= 0, "> 0"),
                           ("LR_MULTIPLIER", pa.LR_MULTIPLIER <= 0, "> 0"),
                           ("WARMUP_EPOCHS", pa.WARMUP_EPOCHS < 0, ">= 0 (0 = off)")):
        if bad:
            raise ConfigError(f"MODEL.LOSSES.PA.{key} must be {must}, got {pa[key]!r}")


class ProxyAnchor(nn.Module):
    """``loss_proxy_anchor`` = SCALE x pml's ProxyAnchorLoss(features, targets)."""

    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32.0, scale=1.0):
        super().__init__()
        with warnings.catch_warnings():  # NUM_CLASSES 0: unsized proxies, as fastreid's classifier
            warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
            self.loss = PmlProxyAnchorLoss(num_classes, embedding_size, margin=margin, alpha=alpha)
        self.scale = scale

    @classmethod
    def from_config(cls, cfg):
        pa = cfg.MODEL.LOSSES.PA
        return cls(cfg.MODEL.HEADS.NUM_CLASSES, loss_feature_dim(cfg), margin=pa.MARGIN,
                   alpha=pa.ALPHA, scale=pa.SCALE)

    @property
    def proxies(self):
        return self.loss.proxies

    def forward(self, features, targets):
        if self.loss.num_classes == 0:
            raise ConfigError(f"MODEL.LOSSES.NAME {LOSS_NAME} needs one proxy per training "
                              f"identity: MODEL.HEADS.NUM_CLASSES is 0 (RobustTrainer sets it from "
                              f"the training set; set it when building the model yourself)")
        # float32: pml casts the proxies to the features' dtype in place (fp16 under AMP)
        return self.loss(features.float(), targets) * self.scale

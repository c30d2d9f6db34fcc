"""ADIN's identity head f_I: two fully connected layers on the feature (Yuan et al. sec. 4.2).

Layout as the nuisance head f_N (robustreid.modeling.losses.adin.NuisanceHead, the published
code's sizes): Linear(d, HIDDEN_DIM) - BN - LeakyReLU(NEGATIVE_SLOPE) - Dropout(DROPOUT) -
Linear(HIDDEN_DIM, num_classes). Pooling and BNNeck are fastreid's (MODEL.HEADS.POOL_LAYER,
WITH_BNNECK, NORM, EMBEDDING_DIM), so the retrieval feature (eval output) is the BNNeck feature,
exactly as with EmbeddingHead, and the classifier reads it in training.
"""
from fastreid.config import configurable
from fastreid.layers import get_norm, pooling
from fastreid.layers.weight_init import weights_init_kaiming
from fastreid.modeling.heads.build import REID_HEADS_REGISTRY
from torch import nn

from ..losses.adin import NuisanceHead

__all__ = ["MLPClassifierHead"]


@REID_HEADS_REGISTRY.register()
class MLPClassifierHead(nn.Module):
    """pool -> [1x1 conv to EMBEDDING_DIM] -> BNNeck -> two-layer classifier."""

    @configurable
    def __init__(self, *, feat_dim, embedding_dim, num_classes, neck_feat, pool_type, with_bnneck,
                 norm_type, hidden_dim, dropout, negative_slope):
        """NOTE: this interface is experimental (fastreid's @configurable convention)."""
        super().__init__()
        if not hasattr(pooling, pool_type):
            raise ValueError(f"unknown MODEL.HEADS.POOL_LAYER {pool_type!r}")
        self.pool_layer = getattr(pooling, pool_type)()
        self.neck_feat = neck_feat
        neck = []
        if embedding_dim > 0:
            neck.append(nn.Conv2d(feat_dim, embedding_dim, 1, 1, bias=False))
            feat_dim = embedding_dim
        if with_bnneck:
            neck.append(get_norm(norm_type, feat_dim, bias_freeze=True))
        self.bottleneck = nn.Sequential(*neck)
        self.bottleneck.apply(weights_init_kaiming)
        self.classifier = NuisanceHead(num_classes, feat_dim, hidden_dim, negative_slope, dropout)

    @classmethod
    def from_config(cls, cfg):
        heads, mlp = cfg.MODEL.HEADS, cfg.MODEL.HEADS.MLP
        return {"feat_dim": cfg.MODEL.BACKBONE.FEAT_DIM, "embedding_dim": heads.EMBEDDING_DIM,
                "num_classes": heads.NUM_CLASSES, "neck_feat": heads.NECK_FEAT,
                "pool_type": heads.POOL_LAYER, "with_bnneck": heads.WITH_BNNECK,
                "norm_type": heads.NORM, "hidden_dim": mlp.HIDDEN_DIM, "dropout": mlp.DROPOUT,
                "negative_slope": mlp.NEGATIVE_SLOPE}

    def identity_logits(self, neck_feat):
        """f_I's logits from retrieval features (for the identity validation of ADIN's schedule)."""
        return self.classifier(neck_feat)

    def forward(self, features, targets=None):
        pool_feat = self.pool_layer(features)
        neck_feat = self.bottleneck(pool_feat)[..., 0, 0]
        if not self.training:
            return neck_feat
        logits = self.classifier(neck_feat)
        if self.neck_feat == "before":
            feat = pool_feat[..., 0, 0]
        elif self.neck_feat == "after":
            feat = neck_feat
        else:
            raise KeyError(f"{self.neck_feat} is invalid for MODEL.HEADS.NECK_FEAT")
        return {"cls_outputs": logits, "pred_class_logits": logits, "features": feat}

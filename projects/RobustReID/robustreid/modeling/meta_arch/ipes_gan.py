"""IPESGAN: IPES-GAN's networks as one fastreid meta-architecture (thesis ch. 3, Fig. 3.2-3.9).

The model *is* the identity encoder E_id: fastreid's Baseline (``backbone`` + ``heads``, any
registered backbone, an EmbeddingHead), so a source-trained ReID checkpoint loads into it as
MODEL.WEIGHTS and, in eval mode, the model returns E_id's retrieval features like any fastreid
model (the evaluator, robust_eval and the attacks need nothing else). Beside it (state-dict
prefixes ``ADDED_BY_TRAINING``, absent from a source checkpoint):

* ``generator``: per-domain pose encoders E_p^S, E_p^T, style encoders / camera classifiers
  E_s^S, E_s^T and AdaIN decoders G_S, G_T (robustreid.modeling.ipes.networks);
* ``discriminator``: the LSGAN discriminator D, one for both domains (real vs generated);
* ``teacher``: E_std of eq. 3.18, a frozen copy of E_id as it starts (the source-trained model),
  always in eval mode (:meth:`IPESGAN.start_teacher`).

One step's images (:meth:`IPESGAN.translate`), for a source batch I_S (heatmaps H_S) and a target
batch I_T (H_T) paired row by row. A pose encoder reads a person's image with the *other* domain's
heatmaps (sec. 3.2.1, item 1), so it encodes the pose that person is rendered in (Fig. 3.1b: the
source image with the target pose gives the source person in the target pose); f_id is E_id's
pooled feature, the style the other image's:

    I_S->G = G_S(E_p^S(I_S, H_T), E_s^T(I_T), f_id(I_S))     source person, target pose and style
    I_T->G = G_T(E_p^T(I_T, H_S), E_s^S(I_S), f_id(I_T))     target person, source pose and style

The environment f_env^S (source pose and style) is (E_p^T(I_T, H_S), E_s^S(I_S)), the features
I_T->G was rendered from; E_env^S(I) = (E_p^T(I, H_S), E_s^S(I)) re-encodes it from an image, and
symmetrically for T. The cycle (eq. 3.6) and the consistency terms (eq. 3.1-3.4) read exactly these:

    I~_S = G_S(E_env^S(I_T->G), f_id(I_S->G)),   I~_T = G_T(E_env^T(I_S->G), f_id(I_T->G))

The thesis's text labels the environment features by domain but routes the pose heatmaps across
domains; the wiring above is the one reading in which its equations 3.1-3.6 and Fig. 3.1b agree
[INF]. Images enter the generator in [-1, 1] (loader images / 127.5 - 1) and E_id in fastreid's
normalisation; generated images reach E_id through the same conversion, differentiably.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from fastreid.config import configurable
from fastreid.modeling.meta_arch.baseline import Baseline
from fastreid.modeling.meta_arch.build import META_ARCH_REGISTRY

from ..ipes.networks import AdaINDecoder, PatchDiscriminator, PoseEncoder, StyleEncoder
from ..losses.ipes import (camera_loss, cyclic_reconstruction_loss, feature_consistency_loss,
                           lsgan_discriminator_loss, lsgan_generator_loss, soft_label_cross_entropy,
                           teacher_kl_divergence)

__all__ = ["IPESGAN", "IPESGenerator", "class_logits"]

NUM_KEYPOINTS = 18


def class_logits(heads, neck_features):
    """An EmbeddingHead's identity logits (scaled, no margin) of its BNNeck features, in either
    mode (in eval mode the head itself returns the features only)."""
    if heads.cls_layer.__class__.__name__ == "Linear":
        logits = F.linear(neck_features, heads.weight)
    else:  # cosine classifiers (CircleSoftmax, ArcSoftmax, CosSoftmax)
        logits = F.linear(F.normalize(neck_features), F.normalize(heads.weight))
    return logits * heads.cls_layer.s


def encode_identity(backbone, heads, images):
    """(pooled feature f_id (B, FEAT_DIM), identity logits (B, classes)) of normalised images."""
    pooled = heads.pool_layer(backbone(images))
    neck = heads.bottleneck(pooled)[..., 0, 0]
    return pooled[..., 0, 0], class_logits(heads, neck)


class IPESGenerator(nn.Module):
    """E_p^S, E_p^T, E_s^S, E_s^T, G_S, G_T (state-dict names pose_s, ..., decoder_t)."""

    def __init__(self, id_dim, source_cameras, target_cameras, dim=64, res_blocks=4,
                 aspp_rates=(1, 2, 4, 6), style_dim=64, mlp_dim=256):
        super().__init__()
        self.pose_s, self.pose_t = (PoseEncoder(dim, NUM_KEYPOINTS, res_blocks, tuple(aspp_rates))
                                    for _ in range(2))
        self.style_s = StyleEncoder(dim, style_dim, source_cameras)
        self.style_t = StyleEncoder(dim, style_dim, target_cameras)
        pose_dim = self.pose_s.out_dim
        self.decoder_s, self.decoder_t = (AdaINDecoder(pose_dim, style_dim + id_dim, res_blocks,
                                                       mlp_dim) for _ in range(2))

    @classmethod
    def from_config(cls, cfg):
        gen = cfg.IPES.GEN
        return cls(cfg.MODEL.BACKBONE.FEAT_DIM, cfg.IPES.SOURCE_CAMERAS, cfg.IPES.TARGET_CAMERAS,
                   gen.DIM, gen.RES_BLOCKS, gen.ASPP_RATES, gen.STYLE_DIM, gen.MLP_DIM)


class _FrozenTeacher(nn.Module):
    """E_std: a backbone and head that never train (eval mode, no gradients)."""

    def __init__(self, backbone, heads):
        super().__init__()
        self.backbone, self.heads = backbone, heads
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images):
        return encode_identity(self.backbone, self.heads, images)[1]


@META_ARCH_REGISTRY.register()
class IPESGAN(Baseline):
    ADDED_BY_TRAINING = ("generator.", "discriminator.", "teacher.")

    @configurable
    def __init__(self, *, generator, discriminator, soft_ce_epsilon=0.1, **kwargs):
        """NOTE: this interface is experimental (fastreid's @configurable convention)."""
        super().__init__(**kwargs)
        self.generator = generator
        self.discriminator = discriminator
        self.teacher = _FrozenTeacher(copy.deepcopy(self.backbone), copy.deepcopy(self.heads))
        self.soft_ce_epsilon = soft_ce_epsilon

    @classmethod
    def from_config(cls, cfg):
        kwargs = super().from_config(cfg)
        kwargs.update(generator=IPESGenerator.from_config(cfg),
                      discriminator=PatchDiscriminator(cfg.IPES.DIS.DIM, cfg.IPES.DIS.LAYERS),
                      soft_ce_epsilon=cfg.IPES.LOSS.SOFT_CE_EPSILON)
        return kwargs

    def start_teacher(self):
        """E_std := E_id as it is now: the source-trained model, once MODEL.WEIGHTS is loaded."""
        self.teacher.backbone.load_state_dict(self.backbone.state_dict())
        self.teacher.heads.load_state_dict(self.heads.state_dict())

    def identity_parameters(self):
        return list(self.backbone.parameters()) + list(self.heads.parameters())

    def teacher_features(self, images):
        """E_std's retrieval features (its head's eval output) of loader-range images [0, 255]."""
        x = (images.to(self.device) - self.pixel_mean) / self.pixel_std
        return self.teacher.heads(self.teacher.backbone(x))

    # ------------------------------------------------------------------ images
    def to_reid(self, images):
        """Generator images in [-1, 1] as E_id's normalised input (not in place)."""
        return ((images + 1.0) * 127.5 - self.pixel_mean) / self.pixel_std

    def identity(self, images):
        """E_id's (f_id, logits) of generator-range images."""
        return encode_identity(self.backbone, self.heads, self.to_reid(images))

    def translate(self, source, target):
        """Every image and feature of one step for paired batches ``source`` and ``target``
        (dicts with ``images`` in [0, 255] and ``heatmaps`` (B, 18, H, W)); see the module docs."""
        g = self.generator
        x_s = source["images"].to(self.device) / 127.5 - 1.0
        x_t = target["images"].to(self.device) / 127.5 - 1.0
        h_s, h_t = source["heatmaps"].to(self.device), target["heatmaps"].to(self.device)
        n = len(x_s)
        v = {"x_s": x_s, "x_t": x_t, "h_s": h_s, "h_t": h_t}
        f_id, logits = self.identity(torch.cat([x_s, x_t]))
        v["id_s"], v["id_t"], v["logits_s"] = f_id[:n], f_id[n:], logits[:n]
        v["style_s"], v["cam_s"] = g.style_s(x_s)
        v["style_t"], v["cam_t"] = g.style_t(x_t)
        v["pose_sg"] = g.pose_s(x_s, h_t)  # target pose for the source person (f_env^T's pose)
        v["pose_tg"] = g.pose_t(x_t, h_s)  # source pose for the target person (f_env^S's pose)
        v["x_sg"] = g.decoder_s(v["pose_sg"], torch.cat([v["style_t"], v["id_s"]], 1))
        v["x_tg"] = g.decoder_t(v["pose_tg"], torch.cat([v["style_s"], v["id_t"]], 1))

        f_id, logits = self.identity(torch.cat([v["x_sg"], v["x_tg"]]))
        v["id_sg"], v["id_tg"], v["logits_sg"] = f_id[:n], f_id[n:], logits[:n]
        v["style_s_of_tg"], v["cam_s_of_tg"] = g.style_s(v["x_tg"])  # E_env^S(I_T->G)
        v["style_t_of_sg"], v["cam_t_of_sg"] = g.style_t(v["x_sg"])  # E_env^T(I_S->G)
        v["pose_s_of_tg"] = g.pose_t(v["x_tg"], h_s)
        v["pose_t_of_sg"] = g.pose_s(v["x_sg"], h_t)
        v["x_s_cyc"] = g.decoder_s(v["pose_s_of_tg"], torch.cat([v["style_s_of_tg"], v["id_sg"]], 1))
        v["x_t_cyc"] = g.decoder_t(v["pose_t_of_sg"], torch.cat([v["style_t_of_sg"], v["id_tg"]], 1))
        return v

    # ------------------------------------------------------------------ losses
    def generator_terms(self, v, source, target):
        """The unweighted terms of eq. 3.19 (every one but the discriminator's side of L_adv)."""
        cam_s, cam_t = source["camids"].to(self.device), target["camids"].to(self.device)
        pids = source["targets"].to(self.device)
        return {
            "loss_cyc": cyclic_reconstruction_loss(v["x_s"], v["x_s_cyc"], v["x_t"], v["x_t_cyc"]),
            "loss_con": feature_consistency_loss([
                (v["pose_tg"], v["pose_s_of_tg"]), (v["style_s"], v["style_s_of_tg"]),  # eq. 3.1
                (v["pose_sg"], v["pose_t_of_sg"]), (v["style_t"], v["style_t_of_sg"]),  # eq. 3.2
                (v["id_s"], v["id_sg"]), (v["id_t"], v["id_tg"])]),                     # 3.3-3.4
            "loss_cam": camera_loss([(v["cam_t_of_sg"], cam_t), (v["cam_s_of_tg"], cam_s),  # 3.7-3.8
                                     (v["cam_s"], cam_s), (v["cam_t"], cam_t)]),             # 3.9-3.10
            "loss_adv": lsgan_generator_loss([self.discriminator(v["x_sg"]),
                                              self.discriminator(v["x_tg"])]),
            "loss_ce": F.cross_entropy(v["logits_s"], pids),
            "loss_soft_ce": soft_label_cross_entropy(v["logits_sg"], pids, self.soft_ce_epsilon),
            "loss_kl": teacher_kl_divergence(v["logits_sg"], self.teacher(self.to_reid(v["x_sg"]))),
        }

    def discriminator_loss(self, v):
        """D's side of L_adv (LSGAN): real I_S, I_T against generated I_S->G, I_T->G (detached)."""
        d = self.discriminator
        return lsgan_discriminator_loss([d(v["x_s"]), d(v["x_t"])],
                                        [d(v["x_sg"].detach()), d(v["x_tg"].detach())])

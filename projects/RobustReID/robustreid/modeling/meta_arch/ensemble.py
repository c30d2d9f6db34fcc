"""EnsembleReID: the N models of EAT (Ke et al., "Towards Adversarially Robust Deep Metric Learning",
Algorithm 1) as one fastreid meta-architecture, so one optimizer step updates every member and one
checkpoint holds them all (``members.<i>.*`` in the state dict).

Training (the batch comes from robustreid.engine.eat.EnsembleAdversarialBatch) carries
``ensemble_mask`` (B, N) bool, row j trains member i, and ``is_adversarial`` (B,). Member i's loss is
Algorithm 1 line 9, L_EAT = beta * L_ml(its clean rows) + (1 - beta) * L_adv(its adversarial rows),
each term the member's own fastreid losses on those rows alone (two forwards); the result is every
member's loss dict, keys prefixed ``m<i>/``, summed by the trainer.

Inference ("Model inference", EAT.INFERENCE): the members' L2-normalised embeddings e_i, either
"mean" (1/N sum e_i) or, for "concat" and "vote", concatenated (N*d): a clustering evaluator votes
over the N blocks (the paper's undifferentiable voting). An attack cannot differentiate through a
vote, so robust evaluation of a voting ensemble must attack a differentiable surrogate of the
whole ensemble, the mean embedding (:meth:`EnsembleReID.mean_embedding`, or
``EnsembleEmbedding(model.members, "mean")`` under an attack extractor), and say so: attacking one
member, or nothing, would be gradient masking.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastreid.config import configurable
from fastreid.modeling.meta_arch.build import META_ARCH_REGISTRY, build_model

from ...parallel import unwrap

INFERENCE_MODES = ("vote", "mean", "concat")
REDUCTIONS = ("concat", "mean")


def member_embeddings(members, images):
    """The L2-normalised eval embeddings (B, d) of each member (in eval mode) for ``images`` in
    fastreid's [0, 255] input units; every member gets its own copy (fastreid normalises its input
    in place). Differentiable in ``images``."""
    return [F.normalize(member({"images": images.clone()}), dim=1) for member in members]


def reduce_embeddings(embeddings, reduction):
    """N (B, d) embeddings -> (B, N*d) concatenated, or (B, d) their mean."""
    if reduction == "mean":
        return torch.stack(embeddings).mean(0)
    return torch.cat(embeddings, dim=1)


class EnsembleEmbedding(nn.Module):
    """Some members' embedding as a model of its own (eval forward: a batch dict in, features out),
    for an attack extractor: ``ReidFeatureExtractor(EnsembleEmbedding(members))`` folds and freezes
    these members only.

    With "concat", the squared Euclidean distance of two outputs is the sum of the members' squared
    distances, sum_i ||e_i(x') - e_i(x)||^2, so SMA on it ascends eq. 10's summed gradient; for unit
    blocks the cosine distance of the concatenation is 1/N times the sum of the members' cosine
    distances (same gradient sign).
    """

    def __init__(self, members, reduction="concat"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
        self.members = nn.ModuleList(members)
        self.reduction = reduction

    def forward(self, batched_inputs):
        return reduce_embeddings(member_embeddings(self.members, batched_inputs["images"]),
                                 self.reduction)


def check_ensemble_config(cfg):
    """The EAT keys the model reads, as ConfigErrors naming key and value."""
    from ...config import ConfigError

    eat = cfg.EAT
    members = eat.MEMBERS
    if isinstance(members, bool) or not isinstance(members, int) or members < 2:
        raise ConfigError(f"EAT.MEMBERS must be an integer >= 2, got {members!r}")
    arch = eat.MEMBER_ARCHITECTURE
    if arch == "EnsembleReID" or arch not in META_ARCH_REGISTRY._obj_map:
        raise ConfigError(f"EAT.MEMBER_ARCHITECTURE must be a registered single-model "
                          f"meta-architecture, got {arch!r}")
    if isinstance(eat.BETA, bool) or not isinstance(eat.BETA, (int, float)) or \
            not 0 <= eat.BETA <= 1:
        raise ConfigError(f"EAT.BETA must be in [0, 1], got {eat.BETA!r}")
    if eat.INFERENCE not in INFERENCE_MODES:
        raise ConfigError(f"EAT.INFERENCE must be one of {list(INFERENCE_MODES)}, got "
                          f"{eat.INFERENCE!r}")


def member_seed(seed, index):
    """The initialisation seed of member ``index`` under run seed ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def build_members(cfg):
    """EAT.MEMBERS models of EAT.MEMBER_ARCHITECTURE from ``cfg``. With ROBUSTREID.SEED >= 0 member
    i is initialised from its own seed (random parts differ, reproducibly; torch's generator is
    left as it was); otherwise from consecutive draws."""
    member_cfg = cfg.clone()
    member_cfg.defrost()
    member_cfg.MODEL.META_ARCHITECTURE = cfg.EAT.MEMBER_ARCHITECTURE
    seed = cfg.ROBUSTREID.SEED
    members = []
    for index in range(cfg.EAT.MEMBERS):
        if seed < 0:
            members.append(build_model(member_cfg))
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(member_seed(seed, index))
            members.append(build_model(member_cfg))
    return members


def single_models(model):
    """The single-model meta-architectures ``model`` is made of, each with its own backbone (and
    losses): an EnsembleReID's members, or the model itself; DistributedDataParallel unwrapped."""
    model = unwrap(model)
    return list(model.members) if isinstance(model, EnsembleReID) else [model]


@META_ARCH_REGISTRY.register()
class EnsembleReID(nn.Module):
    """N member meta-architectures trained and evaluated as one model (module docstring)."""

    @configurable
    def __init__(self, *, members, beta=0.5, inference="vote"):
        """NOTE: this interface is experimental (fastreid's @configurable convention)."""
        super().__init__()
        self.members = nn.ModuleList(members)
        self.beta = float(beta)
        self.inference = inference

    @classmethod
    def from_config(cls, cfg):
        check_ensemble_config(cfg)
        return {"members": build_members(cfg), "beta": cfg.EAT.BETA,
                "inference": cfg.EAT.INFERENCE}

    def member_embeddings(self, images):
        """Each member's L2-normalised embedding of ``images`` ([0, 255]); members in eval mode."""
        return member_embeddings(self.members, images)

    def mean_embedding(self, images):
        """The differentiable mean of the members' embeddings: the ensemble as one attack target."""
        return reduce_embeddings(self.member_embeddings(images), "mean")

    def forward(self, batched_inputs):
        if not self.training:
            reduction = "mean" if self.inference == "mean" else "concat"
            return reduce_embeddings(self.member_embeddings(batched_inputs["images"]), reduction)
        if "ensemble_mask" not in batched_inputs:
            raise ValueError("EnsembleReID trains on batches with 'ensemble_mask' (EAT.ENABLED: "
                             "robustreid.engine.eat.EnsembleAdversarialBatch)")
        images = batched_inputs["images"]
        mask = batched_inputs["ensemble_mask"].to(images.device)
        adversarial = batched_inputs.get("is_adversarial")
        adversarial = (torch.zeros(len(mask), dtype=torch.bool) if adversarial is None
                       else adversarial).to(images.device)
        losses = {}
        for index, member in enumerate(self.members):
            for rows, weight in ((mask[:, index] & ~adversarial, self.beta),
                                 (mask[:, index] & adversarial, 1.0 - self.beta)):
                if not rows.any():
                    continue
                part = member({"images": images[rows],
                               "targets": batched_inputs["targets"][rows]})
                for name, value in part.items():
                    key = f"m{index}/{name}"
                    losses[key] = losses.get(key, 0) + weight * value
        return losses

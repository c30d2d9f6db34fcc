"""Attack objectives, maximised by the attacks: plain functions of features, summed over the batch.

Each loss object has ``targets(guides, pids, clean_features, sample_index)`` (run once per batch,
without gradients) and ``__call__(features, targets) -> scalar``; ``needs_guides`` and
``needs_clean_features`` tell the attack what to compute for ``targets``.
Distances: "euclidean" is the squared L2 distance, "cosine" is 1 - cosine similarity.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .validation import AttackConfigError

DISTANCES = ("euclidean", "cosine")


def pairwise_distance(a, b, distance):
    """(B, D) x (N, D) -> (B, N) distances."""
    if distance == "cosine":
        return 1 - F.normalize(a) @ F.normalize(b).T
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)).clamp_min(0)


def paired_distance(a, b, distance):
    """Row-wise distances of two (B, D) tensors -> (B,)."""
    if distance == "cosine":
        return 1 - F.cosine_similarity(a, b, dim=1)
    return (a - b).pow(2).sum(1)


def same_id_distance_sum(features, same_id, distance):
    """sum_k d(f_i, g_ik) over each sample's same-ID guides (B,), in O(B*D) from their statistics:
    count*|f|^2 - 2 f.total + sq_norm_total (squared Euclidean), count - f/|f|.total (cosine, with the
    statistics of L2-normalised guides)."""
    if distance == "cosine":
        return same_id.count - (F.normalize(features) * same_id.total).sum(1)
    return (same_id.count * features.pow(2).sum(1) - 2 * (features * same_id.total).sum(1)
            + same_id.sq_norm_total)


class FurthestNegativeTargets(NamedTuple):
    same_id: Optional[tuple]  # SameIdGuides, None for the pull-only variant
    far_centroid: torch.Tensor  # (B, D)
    has_far: torch.Tensor  # (B,) 1.0 where another identity exists in the guide set, else 0.0


class FurthestNegativeLoss:
    """FNA (Bouniot et al. 2020; DDDefense eq. 3 with A = the guide set):
    sum_{g in P} d(f(x+d), g) - d(f(x+d), c_far), P = the sample's same-ID guides (itself excluded),
    c_far = the centroid of the identity farthest from the clean feature f(x). ``push=False`` keeps
    only the pull term (FNA_PULL). ``include_self=True`` counts the sample's own guide row (its clean
    feature, when ``sample_index`` names it) among P, as Bouniot et al.'s code does: an extra
    d(f(x+d), f(x)) push, SMA's loss, whose gradient is zero at d = 0."""

    needs_guides = True
    needs_clean_features = True

    def __init__(self, distance, push=True, include_self=False):
        self.distance = distance
        self.push = push
        self.include_self = include_self

    def targets(self, guides, pids, clean_features, sample_index):
        excluded = None if self.include_self else sample_index
        same_id = (guides.same_id(pids, excluded, normalize=self.distance == "cosine")
                   if self.push else None)
        return FurthestNegativeTargets(same_id, *guides.farthest_centroids(clean_features, pids,
                                                                           self.distance))

    def __call__(self, features, targets):
        loss = -paired_distance(features, targets.far_centroid, self.distance) * targets.has_far
        if self.push:
            loss = loss + same_id_distance_sum(features, targets.same_id, self.distance)
        return loss.sum()


class MetricIFGSMLoss:
    """Metric I-FGSM / AMA (Bai et al. 2020): sum_{g in P} d(f^(x+d), g^) on L2-normalised features,
    P = the sample's same-ID guides (itself excluded). For unit vectors the squared Euclidean distance
    is twice the cosine distance, so both distances give the same attack direction."""

    needs_guides = True
    needs_clean_features = False

    def __init__(self, distance):
        self.distance = distance

    def targets(self, guides, pids, clean_features, sample_index):
        return guides.same_id(pids, sample_index, normalize=True)

    def __call__(self, features, targets):
        return same_id_distance_sum(F.normalize(features), targets, self.distance).sum()


class SelfMetricLoss:
    """SMA (Bouniot et al. 2020): d(f(x+d), f(x)), the clean feature as the only (pushing) guide."""

    needs_guides = False
    needs_clean_features = True

    def __init__(self, distance):
        self.distance = distance

    def targets(self, guides, pids, clean_features, sample_index):
        return clean_features

    def __call__(self, features, targets):
        return paired_distance(features, targets, self.distance).sum()


class IdentityCrossEntropy:
    """Classification PGD's objective (Madry et al. 2018): cross-entropy of the identity logits,
    summed over the batch (advertorch's default ``CrossEntropyLoss(reduction="sum")``)."""

    needs_guides = False
    needs_clean_features = False

    def __init__(self, num_classes):
        self.num_classes = num_classes

    def targets(self, guides, pids, clean_features, sample_index):
        labels = pids.long()
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):  # one sync/batch
            raise AttackConfigError(
                f"PGD labels must be training class indices in [0, {self.num_classes}), got values "
                f"in [{int(labels.min())}, {int(labels.max())}]; pass targets=<class indices>")
        return labels

    def __call__(self, logits, targets):
        return F.cross_entropy(logits, targets, reduction="sum")

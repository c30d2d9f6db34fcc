"""The guide set A of metric attacks (DDDefense eq. 3): clean features and identities of accessible
samples, typically the current batch during training; at evaluation the query set (FNA) or the clean
gallery (the I-FGSM family and WMA, whose references push a query away from its true matches)."""
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .losses import pairwise_distance
from .validation import AttackConfigError


class SameIdGuides(NamedTuple):
    """Each attacked sample's same-ID guides, as the statistics a sum of distances to them needs."""
    count: torch.Tensor  # (B,) number of guides
    total: torch.Tensor  # (B, D) sum of the guide features
    sq_norm_total: torch.Tensor  # (B,) sum of their squared norms


class GuideSet:
    """Clean guide features (N, D) (detached) with their identity labels (N,).

    ``sample_index`` arguments name, for each attacked sample, its own row in this set (None when the
    attacked samples are not in it), so that a sample is never its own same-ID guide. Everything is
    computed for the whole batch at once.
    """

    def __init__(self, features, pids):
        features = torch.as_tensor(features).detach()
        if features.dim() != 2:
            raise AttackConfigError(f"guide features must be (N, D), got shape {tuple(features.shape)}")
        self.features = features
        self.pids = torch.as_tensor(pids, device=features.device).long()
        if self.pids.shape != (len(features),):
            raise AttackConfigError(f"guide pids must be ({len(features)},), got shape "
                                    f"{tuple(self.pids.shape)}")

    def __len__(self):
        return len(self.features)

    def check_batch(self, pids, sample_index):
        """``sample_index`` as a device tensor, after checking it names rows with the batch's pids."""
        if sample_index is None:
            return None
        sample_index = torch.as_tensor(sample_index, device=self.features.device).long()
        if sample_index.shape != pids.shape:
            raise AttackConfigError(f"sample_index must have one row per attacked sample "
                                    f"({tuple(pids.shape)}), got {tuple(sample_index.shape)}")
        if len(pids) and (sample_index.min() < 0 or sample_index.max() >= len(self)
                          or not torch.equal(self.pids[sample_index], pids.to(self.pids.device))):
            raise AttackConfigError("sample_index must name guide rows with the attacked samples' pids")
        return sample_index

    def same_id(self, pids, sample_index=None, normalize=False):
        """:class:`SameIdGuides` per attacked sample (of L2-normalised guides if ``normalize``)."""
        pids = pids.to(self.pids.device)
        mask = pids[:, None] == self.pids[None, :]
        if sample_index is not None:
            mask[torch.arange(len(pids), device=mask.device), sample_index] = False
        guides = F.normalize(self.features) if normalize else self.features
        weights = mask.to(guides.dtype)
        return SameIdGuides(weights.sum(1), weights @ guides, weights @ guides.pow(2).sum(1))

    @functools.cached_property
    def centroids(self):
        """(ids (C,), centroids (C, D)): the mean guide feature of each identity."""
        ids, inverse = torch.unique(self.pids, return_inverse=True)
        counts = torch.bincount(inverse, minlength=len(ids)).to(self.features.dtype)
        sums = torch.zeros(len(ids), self.features.shape[1], dtype=self.features.dtype,
                           device=self.features.device).index_add_(0, inverse, self.features)
        return ids, sums / counts[:, None]

    def _farthest(self, clean_features, pids, distance):
        ids, centroids = self.centroids
        other = pids.to(ids.device)[:, None] != ids[None, :]
        dist = pairwise_distance(clean_features, centroids, distance)
        return dist.masked_fill(~other, float("-inf")).argmax(1), other.any(1)

    def farthest_centroids(self, clean_features, pids, distance):
        """For each sample, the centroid of the other identity farthest from its clean feature (B, D)
        and has_far (B,): 1.0 where another identity exists, else 0.0 (its centroid row is then
        arbitrary and must be ignored)."""
        far, has_far = self._farthest(clean_features, pids, distance)
        centroids = self.centroids[1]
        return centroids[far], has_far.to(centroids.dtype)

    def farthest_identities(self, clean_features, pids, distance):
        """The identity FNA pulls each sample toward (the N of eq. 3) (B,), and has_far (B,) bool
        (False where the guide set holds no other identity; the id is then arbitrary)."""
        far, has_far = self._farthest(clean_features, pids, distance)
        return self.centroids[0][far], has_far

"""The denoiser's objective of ZO-RUDS / ZO-AE-RUDS (thesis eq. 6.9-6.13), on model outputs.

``DenoisingLoss(clean, denoised)`` compares the frozen model's outputs on clean images, ``clean``
(B, K), with its outputs on the denoised noisy images, ``denoised`` (B, K); it needs nothing else
from the model, so it serves white-box and black-box training alike:

    L_Tot = w_match * L_match + lambda_CS * L_CS + lambda_MMD * L_MMD        (eq. 6.13)

* L_match: with identity logits, the cross-entropy of eq. 6.9 between the model's softmax on the
  clean image (soft label) and on the denoised one; with retrieval features (no classifier), the
  mean squared difference of the features (feature matching; our analogue for an embedding model).
* L_CS: 1 - cosine similarity of the two outputs (eq. 6.10 writes the similarity, to be raised).
* L_MMD: squared maximum mean discrepancy between the batch's clean and denoised outputs (eq. 6.11-
  6.12), biased (V-statistic) estimate. Kernel "linear": the squared distance between the two
  means; "gaussian": exp(-||a - b||^2 / (2 s^2)) averaged over bandwidths s = multiplier x the
  median pairwise distance of the pooled outputs (the thesis names no kernel).
"""
import torch
import torch.nn.functional as F

from .soft_labels import soft_cross_entropy

__all__ = ["DenoisingLoss", "MMD_KERNELS", "OUTPUTS", "mmd"]

OUTPUTS = ("logits", "features")
MMD_KERNELS = ("gaussian", "linear")


def _median_distance(points):
    distances = torch.cdist(points, points)
    upper = torch.triu(torch.ones_like(distances, dtype=torch.bool), diagonal=1)
    return distances[upper].median()


def mmd(p, q, kernel="gaussian", bandwidths=(1.0,)):
    """Squared MMD between the rows of ``p`` and of ``q`` (see the module doc)."""
    if kernel == "linear":
        return (p.mean(0) - q.mean(0)).pow(2).sum()
    if kernel != "gaussian":
        raise ValueError(f"MMD kernel must be one of {MMD_KERNELS}, got {kernel!r}")
    pooled = torch.cat([p, q])
    squared = torch.cdist(pooled, pooled).pow(2)
    # the bandwidth is a scale, not something to optimise: no gradient through the median
    median = _median_distance(pooled.detach()).clamp_min(1e-12)
    kernels = torch.stack([torch.exp(-squared / (2 * (m * median) ** 2)) for m in bandwidths]).mean(0)
    n = len(p)
    return kernels[:n, :n].mean() + kernels[n:, n:].mean() - 2 * kernels[:n, n:].mean()


class DenoisingLoss:
    """L_Tot of eq. 6.13 for outputs of kind ``output`` ("logits" or "features")."""

    def __init__(self, output="logits", match=1.0, cosine=1.0, mmd=4.0, kernel="gaussian",
                 bandwidths=(1.0,)):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.output = output
        self.weights = {"match": match, "cosine": cosine, "mmd": mmd}
        self.kernel = kernel
        self.bandwidths = tuple(bandwidths)

    @classmethod
    def from_config(cls, cfg):
        loss = cfg.DENOISER.LOSS
        return cls(cfg.DENOISER.OUTPUT, match=loss.MATCH, cosine=loss.CS, mmd=loss.MMD,
                   kernel=loss.MMD_KERNEL, bandwidths=loss.MMD_BANDWIDTHS)

    def terms(self, clean, denoised):
        """The unweighted terms {"match", "cosine", "mmd"}."""
        if self.output == "logits":
            match = soft_cross_entropy(denoised, F.softmax(clean, dim=1))
        else:
            match = F.mse_loss(denoised, clean)
        return {"match": match,
                "cosine": (1 - F.cosine_similarity(denoised, clean, dim=1)).mean(),
                "mmd": mmd(clean, denoised, self.kernel, self.bandwidths)}

    def __call__(self, clean, denoised):
        """(L_Tot, its unweighted terms)."""
        terms = self.terms(clean, denoised)
        return sum(self.weights[name] * value for name, value in terms.items()), terms

"""ADIN adversarial nuisance losses (Yuan et al., "Calibrated Domain-Invariant Learning for Highly
Generalizable Large Scale Re-Identification"), as plain functions of nuisance-classifier logits.

The nuisance classifier f_N predicts a nuisance label Y_N (camera id, time period, or both jointly)
from the re-id feature; the feature extractor is trained to make that prediction uninformative
with one of the paper's three L_adv options (sec. 3.2), all to be *minimised* by f_E (eq. 3):
  #1 reverse gradient (eq. 4), #2 negative entropy NE (eq. 5), #3 calibrated NE, CaNE (eq. 6).
c = softmax(z) is f_N's output over the K nuisance classes. Per-sample losses are averaged over
the batch (the paper gives the per-sample form only).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "reverse_gradient", "reverse_gradient_loss", "negative_entropy_loss",
    "calibrated_negative_entropy_loss", "focal_entropy_loss", "nuisance_class_prior",
    "NuisanceHead", "joint_nuisance_labels",
]


class _ReverseGradient(torch.autograd.Function):
    """Identity forward, -scale * grad backward (the gradient reversal layer of Ganin et al.)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return -ctx.scale * grad_output, None


def reverse_gradient(x, scale=1.0):
    """Gradient reversal: ``f_N(reverse_gradient(f))`` trained with cross-entropy makes f_N minimise
    L_N while f_E receives -scale * dL_N/df, i.e. maximises L_N (option #1, eq. 2 and 4)."""
    return _ReverseGradient.apply(x, float(scale))


def reverse_gradient_loss(logits, labels):
    """Eq. (4): L_adv = -L_N = sum_k 1[k = Y*] log c_k, i.e. minus the cross-entropy, averaged.

    Minimising it maximises f_N's nuisance cross-entropy. To keep f_N itself a classifier in the
    same backward pass, use ``F.cross_entropy(f_N(reverse_gradient(f)), labels)`` instead, which
    gives f_E exactly the gradient of this loss (scale 1) and f_N that of L_N.
    """
    return -F.cross_entropy(logits, labels.long())


def _entropy_terms(logits):
    """c_k log c_k per sample and class (log-softmax for stability; 0 log 0 = 0)."""
    log_c = F.log_softmax(logits, dim=1)
    return log_c.exp() * log_c


def negative_entropy_loss(logits):
    """Eq. (5): L_adv = sum_k c_k log c_k (negative entropy), averaged over samples. Minimal
    (-log K) at the uniform prediction."""
    return _entropy_terms(logits).sum(1).mean()


def calibrated_negative_entropy_loss(logits, class_prior):
    """Eq. (6), CaNE: L_adv = sum_k p_k c_k log c_k, averaged over samples, with p_k the nuisance
    class distribution of the training set (``nuisance_class_prior``).

    Its minimiser over the simplex is not uniform: stationarity gives p_k (log c_k + 1) = const, so
    c_k = exp(lambda / p_k - 1) (lambda < 0), increasing in p_k; a class with p_k = 0 gets no
    gradient at all.
    """
    prior = torch.as_tensor(class_prior, dtype=logits.dtype, device=logits.device)
    if prior.shape != logits.shape[1:]:
        raise ValueError(f"class_prior has shape {tuple(prior.shape)}, "
                         f"expected ({logits.size(1)},)")
    return (_entropy_terms(logits) * prior).sum(1).mean()


def focal_entropy_loss(logits, labels, class_prior):
    """The published code's calibrated loss ("focal entropy"), kept as a variant of eq. (6):
    mean_i w_{y_i} KL(c_i || U) with w the class frequencies, i.e. each sample's negative entropy
    plus log K, weighted by the frequency of its *own* nuisance class instead of per class k."""
    prior = torch.as_tensor(class_prior, dtype=logits.dtype, device=logits.device)
    kl_to_uniform = _entropy_terms(logits).sum(1) + torch.log(
        torch.tensor(float(logits.size(1)), dtype=logits.dtype, device=logits.device))
    return (prior[labels.long()] * kl_to_uniform).mean()


def nuisance_class_prior(labels, num_classes):
    """p_k = n_k / N over the training set's nuisance labels (eq. 6); classes never seen get 0."""
    labels = torch.as_tensor(labels).long().view(-1)
    if not len(labels):
        raise ValueError("no labels to estimate the nuisance class prior from")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), "
                         f"got [{int(labels.min())}, {int(labels.max())}]")
    counts = torch.bincount(labels, minlength=num_classes).double()
    return (counts / counts.sum()).float()


def joint_nuisance_labels(camids, time_ids, num_times=3):
    """One label per (camera, time period) pair: camid * num_times + time_id, both 0-based
    (fastreid's camids are; the code's (cam - 1) * 3 + period is the same for 1-based cameras).
    MSMT17: 15 cameras x 3 periods (morning / noon / afternoon) = 45 classes."""
    camids = torch.as_tensor(camids).long()
    time_ids = torch.as_tensor(time_ids).long()
    if bool((time_ids < 0).any()) or bool((time_ids >= num_times).any()):
        raise ValueError(f"time_ids must lie in [0, {num_times})")
    if bool((camids < 0).any()):
        raise ValueError("camids must be 0-based (non-negative)")
    return camids * num_times + time_ids


class NuisanceHead(nn.Module):
    """f_N: the paper's two fully connected layers on the feature (sec. 4.2); the sizes and the
    layers between them are the code's: Linear(in, 512) - BN - LeakyReLU(0.1) - Dropout(0.5) -
    Linear(512, K). Returns logits."""

    def __init__(self, num_classes, in_dim=2048, hidden_dim=512, negative_slope=0.1, dropout=0.5):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.bn = nn.BatchNorm1d(hidden_dim)
        self.act = nn.LeakyReLU(negative_slope)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, num_classes)

    def forward(self, features):
        return self.fc2(self.drop(self.act(self.bn(self.fc1(features)))))

"""Soft identity labels and the cross-entropy that reads them (DDDefense eq. 4-5).

Labels are (B, K) rows of probabilities over the K training identities. ``smooth_labels`` is the
label-smoothing function phi of eq. 4 (Szegedy et al.), ``move_label_mass`` its tau, and
``soft_cross_entropy`` the classification loss on such rows. With phi(y, 1 - eps) rows it is
fastreid's ``cross_entropy_loss(logits, y, eps)`` exactly, so clean samples train as before.
"""
import torch
import torch.nn.functional as F


def smooth_labels(pids, num_classes, lam):
    """phi(y, lambda) (eq. 4): ``lam`` on the true class, (1 - lam) / (K - 1) on each other class."""
    labels = torch.full((len(pids), num_classes), (1.0 - lam) / (num_classes - 1),
                        device=pids.device)
    return labels.scatter_(1, pids.long()[:, None], lam)


def move_label_mass(labels, pids, to_pids, v, where=None):
    """tau(labels, v) (eq. 4): move ``v`` of each row's mass from class ``pids`` to class ``to_pids``
    (the farthest negative identity of FNA). ``where`` (B,) bool limits it to some rows (samples
    with no other identity in their guide set have no farthest negative)."""
    rows = torch.arange(len(pids), device=labels.device)
    amount = torch.full((len(pids),), float(v), device=labels.device)
    if where is not None:
        amount = amount * where.to(labels.dtype)
    labels = labels.clone()
    labels[rows, pids.long()] -= amount
    labels[rows, to_pids.long()] += amount
    return labels


def soft_cross_entropy(logits, labels):
    """-sum_k q_k log p_k per row, summed and divided by the number of non-zero rows (fastreid's
    normalisation, so phi(y, 1 - eps) rows reproduce its label-smoothed cross-entropy bit for bit)."""
    loss = (-labels * F.log_softmax(logits, dim=1)).sum(dim=1)
    with torch.no_grad():
        non_zero = max(loss.nonzero(as_tuple=False).size(0), 1)
    return loss.sum() / non_zero

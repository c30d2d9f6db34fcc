"""MP-SNN's losses (thesis chapter 5.2.1) as plain functions of tensors.

    L_V   = L_CE + L_Tri                                                      (eq. 5.1)
    L_Iso = L_CE + L_Tri + lambda r(phi),   r(phi) = -sum_j |phi_j|^(1/2) / tau(epoch)   (eq. 5.2)
    L_FCA = log( 1/B sum_i (f_p^i - f_n^i)^T Sigma (f_p^i - f_n^i) ),  Sigma = phi_a phi_a^T  (eq. 5.3)
    L_Mix = L_Iso - L_FCA                       (FCA is maximised)                          (eq. 5.6)
    L_Tot = L_Mix + eta L_Adv,  L_Adv = L_CE + L_Tri on PGD examples                        (eq. 5.7)

r's "theta" in eq. 5.2 are the isotropic noise scales (Learn2Perturb's regulariser, which pushes the
noise up while tau, a harmonic series of the epoch, grows); r sums over every scale entry.
tau(e) = sum_{k=1}^{e+1} 1/k for the 0-based epoch e [open: the thesis says "a harmonic series with
input as the value of current epoch"; we start the series at 1 so tau(0) = 1].
"""
import torch

__all__ = ["fca_loss", "hard_pairs", "harmonic_temperature", "mpsnn_loss_terms",
           "noise_regularizer"]


def harmonic_temperature(epoch):
    """tau(epoch) = H_{epoch + 1} = 1 + 1/2 + ... + 1/(epoch + 1) (epoch 0-based)."""
    return sum(1.0 / k for k in range(1, int(epoch) + 2))


def noise_regularizer(scales, epoch):
    """r = -sum_j sqrt(|phi_j|) / tau(epoch) over the entries of every tensor in ``scales`` (eq. 5.2).

    The 1e-12 keeps the root's gradient finite at a scale of exactly 0 (abs's gradient there is 0).
    """
    total = sum((s.abs() + 1e-12).sqrt().sum() for s in scales)
    return -total / harmonic_temperature(epoch)


@torch.no_grad()
def hard_pairs(features, targets):
    """Batch-hard mining (Hermans et al.): per anchor the farthest other sample of its identity and
    the nearest sample of another identity, by Euclidean distance. Returns (pos_index, neg_index,
    valid) where ``valid`` marks anchors that have both."""
    dist = torch.cdist(features.float(), features.float())
    same = targets.view(-1, 1) == targets.view(1, -1)
    eye = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    pos_mask, neg_mask = same & ~eye, ~same
    pos = dist.masked_fill(~pos_mask, -1.0).argmax(1)
    neg = dist.masked_fill(~neg_mask, float("inf")).argmin(1)
    return pos, neg, pos_mask.any(1) & neg_mask.any(1)


def fca_loss(features, targets, phi):
    """L_FCA (eq. 5.3) of (B, D) ``features`` with identities ``targets`` and the (D, K) anisotropic
    factor ``phi``: log of the mean of (f_p - f_n)^T phi phi^T (f_p - f_n) = |phi^T (f_p - f_n)|^2
    over the anchors' hardest positive/negative pairs (anchors lacking either are left out).

    Returned as is: the caller maximises it (eq. 5.6 subtracts it). A batch without any valid anchor
    gives 0 (with a zero gradient). The mean is floored at 1e-12 so the log stays finite.
    """
    pos, neg, valid = hard_pairs(features.detach(), targets)
    if not bool(valid.any()):
        return phi.sum() * 0.0
    with torch.autocast(features.device.type, enabled=False):  # float32 also under AMP
        diff = (features[pos[valid]] - features[neg[valid]]).float()
        quadratic = (diff @ phi.float()).pow(2).sum(1)
        return quadratic.mean().clamp_min(1e-12).log()


def mpsnn_loss_terms(model_losses, *, regularizer=None, lam=0.0, fca=None, adv_losses=None, eta=0.0):
    """The loss dict whose sum is L_V (eq. 5.1: only ``model_losses``), L_Mix (eq. 5.6: with
    ``regularizer`` r and ``fca`` L_FCA) or L_Tot (eq. 5.7: also ``adv_losses``).

    ``model_losses`` / ``adv_losses`` are the model's CE + triplet loss dicts on clean / adversarial
    images; the returned keys are theirs, ``loss_noise_reg`` (lambda r), ``loss_fca`` (-L_FCA) and
    ``adv/<key>`` (eta times each adversarial term).
    """
    terms = dict(model_losses)
    if regularizer is not None:
        terms["loss_noise_reg"] = lam * regularizer
    if fca is not None:
        terms["loss_fca"] = -fca
    if adv_losses is not None:
        terms.update({f"adv/{k}": eta * v for k, v in adv_losses.items()})
    return terms

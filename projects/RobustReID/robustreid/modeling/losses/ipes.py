"""IPES-GAN's losses (thesis eq. 3.1-3.19) as plain functions of tensors, and the weight ramp.

Images are in the generator's [-1, 1] range; ``mean |.|`` is the mean over every element (the
expectation E[||.||_1] of the thesis, per element, so weights do not depend on the image size).
"""
import torch
import torch.nn.functional as F

__all__ = ["cyclic_reconstruction_loss", "feature_consistency_loss", "camera_loss",
           "lsgan_generator_loss", "lsgan_discriminator_loss", "soft_label_cross_entropy",
           "teacher_kl_divergence", "ramped_weight", "ipes_objective_weights", "weighted_total"]


def cyclic_reconstruction_loss(source, source_cycled, target, target_cycled):
    """L_cyc (eq. 3.6): mean |I_S - I~_S| + mean |I_T - I~_T|."""
    return (source - source_cycled).abs().mean() + (target - target_cycled).abs().mean()


def feature_consistency_loss(pairs):
    """L_con (eq. 3.1-3.5): the sum over (features of the real images, the same features
    re-encoded from the generated images) of mean |f - f'|. The real features are targets
    (detached) [INF]: the loss trains the generator to produce images whose features can be
    recovered, it cannot shrink the features themselves towards each other."""
    return sum((real.detach() - regenerated).abs().mean() for real, regenerated in pairs)


def camera_loss(pairs):
    """L_cam (eq. 3.7-3.11): the sum over (camera logits, camera labels) of the cross-entropy."""
    return sum(F.cross_entropy(logits, labels) for logits, labels in pairs)


def lsgan_generator_loss(fake_scores):
    """The generator's side of L_adv (eq. 3.12) in least squares (LSGAN, sec. 3.3.2): the sum over
    generated batches of mean (D(I_G) - 1)^2."""
    return sum(((scores - 1.0) ** 2).mean() for scores in fake_scores)


def lsgan_discriminator_loss(real_scores, fake_scores):
    """The discriminator's side: the sum of mean (D(I) - 1)^2 over real batches and mean D(I_G)^2
    over generated ones."""
    return (sum(((scores - 1.0) ** 2).mean() for scores in real_scores) +
            sum((scores ** 2).mean() for scores in fake_scores))


def soft_label_cross_entropy(logits, labels, epsilon):
    """L_softCE (eq. 3.17), batch mean: -(1 - eps) log p(y) - eps / C sum_c log p(c), i.e. the
    cross-entropy to eq. 3.16's labels (1 - eps + eps / C on y, eps / C elsewhere)."""
    log_p = F.log_softmax(logits, dim=1)
    true = log_p.gather(1, labels.long()[:, None])[:, 0]
    return (-(1.0 - epsilon) * true - epsilon * log_p.mean(dim=1)).mean()


def teacher_kl_divergence(logits, teacher_logits):
    """L_KL (eq. 3.18), batch mean: sum_c q(c) log(q(c) / p(c)), q the frozen teacher's
    probabilities (no gradient), p the identity encoder's."""
    log_q = F.log_softmax(teacher_logits.detach(), dim=1)
    return (log_q.exp() * (log_q - F.log_softmax(logits, dim=1))).sum(dim=1).mean()


def ramped_weight(iteration, final, start, length):
    """w2 / w4 of eq. 3.19: 0 for the first ``start`` iterations, then linear up to ``final`` over
    ``length`` iterations, ``final`` from then on (sec. 3.2.2: 0 -> 3 over 20K-26K)."""
    if iteration <= start:
        return 0.0
    if length <= 0 or iteration >= start + length:
        return float(final)
    return float(final) * (iteration - start) / length


def ipes_objective_weights(cfg, iteration):
    """{term: weight} of eq. 3.19 at ``iteration`` (IPES.LOSS)."""
    loss = cfg.IPES.LOSS
    ramp = dict(start=loss.RAMP_START, length=loss.RAMP_ITERS)
    return {"loss_cyc": loss.CYC, "loss_con": ramped_weight(iteration, loss.CON, **ramp),
            "loss_cam": loss.CAM, "loss_adv": loss.ADV, "loss_ce": loss.CE,
            "loss_soft_ce": loss.SOFT_CE, "loss_kl": ramped_weight(iteration, loss.KL, **ramp)}


def weighted_total(terms, weights):
    """sum_k w_k L_k over the terms with a non-zero weight (a zero weight skips the term, so an
    unused term's graph is not back-propagated)."""
    total = [weights[name] * value for name, value in terms.items() if weights[name]]
    return sum(total) if total else torch.zeros((), device=next(iter(terms.values())).device)

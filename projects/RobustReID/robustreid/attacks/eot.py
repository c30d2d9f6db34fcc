"""Expectation over transformation (EOT, Athalye et al. 2018): attack the mean loss of several
forwards, so that a stochastic model or random-transform defense is attacked through the expectation
of its gradient rather than through one random draw."""
import copy

import torch

from .. import rng_state
from .validation import positive_int


def identity(x):
    return x


def averaged_objective(predict, loss_fn, transforms):
    """A (predict, loss_fn) pair for advertorch-style engines whose loss is the mean of
    ``loss_fn(predict(t(x)), targets)`` over ``transforms``: EOT with ``[identity] * n`` and a
    stochastic ``predict``, and the scale copies of SI-NI-FGSM. One transform: the pair unchanged."""
    if len(transforms) == 1 and transforms[0] is identity:
        return predict, loss_fn

    def predict_all(x):
        return [predict(transform(x)) for transform in transforms]

    def mean_loss(outputs, targets):
        return sum(loss_fn(output, targets) for output in outputs) / len(outputs)

    return predict_all, mean_loss


@torch.no_grad()
def draws_needed(predict, x, num_samples):
    """``num_samples``, or 1 when ``predict`` is deterministic: the mean over N draws of a model
    without randomness is N copies of one forward, so EOT on an undefended model would cost N times
    as much for the same gradient. Stochastic: one forward of one image draws from a global random
    generator (noise modules, randomized defenses), or two forwards differ (a private generator).
    The probe leaves every generator where it was: attack results do not depend on it."""
    if num_samples == 1:
        return 1
    state = rng_state.capture()
    try:
        first = predict(x[:1])
        drew = not rng_state.unchanged_since(state)
        stochastic = drew or not torch.equal(first, predict(x[:1]))
    finally:
        rng_state.restore(state)
    return num_samples if stochastic else 1


@torch.no_grad()
def expected_output(predict, x, num_samples):
    """The mean of ``num_samples`` forwards of ``x`` (clean features under EOT)."""
    if num_samples == 1:
        return predict(x)
    return torch.stack([predict(x) for _ in range(num_samples)]).mean(0)


def EOTAttack(attack, num_samples):  # noqa: N802  (reads like the attack classes it returns)
    """A copy of ``attack`` whose every gradient (and clean reference feature) is averaged over
    ``num_samples`` forwards; the same as building it with ``eot_samples=num_samples``.

    The forwards of one step are kept in one graph: memory grows with ``num_samples``.
    """
    eot = copy.copy(attack)
    eot.eot_samples = positive_int(num_samples, "num_samples")
    return eot

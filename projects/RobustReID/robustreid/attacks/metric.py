"""Metric (feature-space) attacks on ReID models: FNA, FNA_PULL, SMA and the I-FGSM family.

Defaults (eps and step sizes in 1/255 units), and where they come from:

=========  ==========================  ===============  ======================================
name       loss                        start            step size
=========  ==========================  ===============  ======================================
FNA        furthest-negative           random (eq. 3)   1 (Bouniot et al.'s code)
                                       (x in robust evaluation, as Bouniot et al.'s code)
FNA_PULL   pull term of FNA            random           1
SMA        self metric                 random, always   1 (Bouniot et al.'s code)
IFGSM      metric I-FGSM / AMA         x                1 (Bai et al.)
FGSM       metric I-FGSM / AMA         x                eps, one step
MIFGSM     metric I-FGSM / AMA         x                1, momentum decay 1 (Bai et al.)
NIFGSM     metric I-FGSM / AMA         x                eps/steps (Lin et al.), decay 1
SINIFGSM   metric I-FGSM / AMA         x                eps/steps, 5 scale copies (Lin et al.)
=========  ==========================  ===============  ======================================

The FGSM family (FGSM, IFGSM, MIFGSM, NIFGSM, SINIFGSM) shares one loss, chosen with ``loss=``:
"ama" (default: Bai et al.'s adversarial metric attack, which their FGSM/I-FGSM/MI-FGSM extend, and
which NI-/SI-NI-FGSM extend in turn) or "fna" (the furthest-negative loss). With "ama", a sample with
no other same-ID guide has a zero gradient and is left unchanged.
"""
from .base import ReidAttack
from .iterative import momentum_sign_ascent
from .losses import FurthestNegativeLoss, MetricIFGSMLoss, SelfMetricLoss
from .registry import ATTACK_REGISTRY
from .validation import AttackConfigError, check_choice, non_negative_float, positive_int

FGSM_FAMILY_LOSSES = ("ama", "fna")


@ATTACK_REGISTRY.register()
class FNA(ReidAttack):
    """Furthest-negative attack (Bouniot et al. 2020; DDDefense eq. 3): push away from the same-ID
    guides, pull toward the farthest other identity's centroid (:class:`FurthestNegativeLoss`).

    Starts from a uniform random point of the eps-ball (DDDefense eq. 3's x + eta); Bouniot et al.'s
    code starts from x, which ``rand_init=False`` reproduces. ``include_self=True`` also counts the
    sample's own clean feature among the push guides, as Bouniot et al.'s code does (DDDefense eq. 3
    does not say whether x itself is in P); by default it is excluded. Robust evaluation runs FNA as
    Bouniot et al.'s evaluation does, from x and with its own feature (measured stronger there:
    ``robustreid.evaluation.robust.EVALUATION_OPTIONS``); training keeps these defaults.
    """

    rand_init = True
    push = True

    def __init__(self, extractor, *, include_self=False, **kwargs):
        self.include_self = check_choice(include_self, (False, True), "include_self")
        if self.include_self and not self.push:
            raise AttackConfigError(f"{self.name} has no push guides: include_self does not apply")
        super().__init__(extractor, **kwargs)

    def build_loss(self):
        return FurthestNegativeLoss(self.distance, push=self.push, include_self=self.include_self)


@ATTACK_REGISTRY.register()
class FNA_PULL(FNA):  # noqa: N801  (the registered name)
    """FNA's pull-only variant (Bouniot et al. 2020): only -d(f(x+d), c_far)."""

    push = False


@ATTACK_REGISTRY.register()
class SMA(ReidAttack):
    """Self metric attack (Bouniot et al. 2020): push f(x+d) away from the clean f(x)
    (:class:`SelfMetricLoss`). Always starts from a random point: the gradient is zero at d = 0."""

    rand_init = True

    def __init__(self, extractor, **kwargs):
        super().__init__(extractor, **kwargs)
        if not self.rand_init:
            raise AttackConfigError("SMA needs rand_init=True: the gradient of d(f(x+d), f(x)) is "
                                    "zero at d = 0")

    def build_loss(self):
        return SelfMetricLoss(self.distance)


@ATTACK_REGISTRY.register()
class IFGSM(ReidAttack):
    """Metric I-FGSM (Bai et al. 2020's AMA): from x, 1/255 sign steps on the ``loss`` (module doc).
    Bai et al.'s guides are the attacked image's same-ID images of the other, clean split (robust
    evaluation: the gallery for attacked queries, ``robustreid.evaluation.guide_choice``).

    Bai et al. divide the gradient by its mean absolute value before the sign, which does not change
    a sign step: this is plain I-FGSM on advertorch's engine.
    """

    def __init__(self, extractor, *, loss="ama", **kwargs):
        self.loss_name = check_choice(loss, FGSM_FAMILY_LOSSES, "loss")
        super().__init__(extractor, **kwargs)

    def build_loss(self):
        if self.loss_name == "fna":
            return FurthestNegativeLoss(self.distance)
        return MetricIFGSMLoss(self.distance)


@ATTACK_REGISTRY.register()
class FGSM(IFGSM):
    """FGSM (Goodfellow et al. 2015) on the metric loss: one sign step of size eps from x.
    Single-step by definition: any ``steps`` given is recorded as 1."""

    def __init__(self, extractor, **kwargs):
        super().__init__(extractor, **kwargs)
        self.steps = 1

    def default_step_size(self):
        return self.eps


@ATTACK_REGISTRY.register()
class MIFGSM(IFGSM):
    """MI-FGSM (Dong et al. 2018) as Bai et al. use it: momentum ``decay`` 1.0, 1/255 steps."""

    nesterov = False

    def __init__(self, extractor, *, decay=1.0, **kwargs):
        self.decay = non_negative_float(decay, "decay")
        super().__init__(extractor, **kwargs)

    def ascend(self, x, targets, predict, loss_fn, delta_init):
        return momentum_sign_ascent(x, targets, predict, loss_fn, eps=self._eps01, steps=self.steps,
                                    step_size=self._step01, delta_init=delta_init, decay=self.decay,
                                    nesterov=self.nesterov)


@ATTACK_REGISTRY.register()
class NIFGSM(MIFGSM):
    """NI-FGSM (Lin et al. 2020): MI-FGSM with the gradient at the Nesterov look-ahead point;
    step eps/steps as in Lin et al."""

    nesterov = True

    def default_step_size(self):
        return self.eps / self.steps


@ATTACK_REGISTRY.register()
class SINIFGSM(NIFGSM):
    """SI-NI-FGSM (Lin et al. 2020): NI-FGSM whose every gradient is the mean over the ``scales``
    copies x / 2^i, i = 0..scales-1 (5 in Lin et al.). Our images are in [0, 1], so the copies scale
    toward black (Lin et al.'s [-1, 1] images scale toward grey)."""

    def __init__(self, extractor, *, scales=5, **kwargs):
        self.scales = positive_int(scales, "scales")
        super().__init__(extractor, **kwargs)

    def input_transforms(self, draws):
        copies = [_Scale(0.5 ** i) for i in range(self.scales)]
        return [scaled for scaled in copies for _ in range(draws)]


class _Scale:
    """x -> factor * x (a scale copy of SI-NI-FGSM)."""

    def __init__(self, factor):
        self.factor = factor

    def __call__(self, x):
        return x * self.factor


__all__ = ["FGSM", "FNA", "FNA_PULL", "IFGSM", "MIFGSM", "NIFGSM", "SINIFGSM", "SMA"]

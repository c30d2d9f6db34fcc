"""Classification PGD on the identity classifier (for the AT_PGD baseline, Madry et al. 2018)."""
from .base import ReidAttack
from .losses import IdentityCrossEntropy
from .registry import ATTACK_REGISTRY


@ATTACK_REGISTRY.register()
class PGD(ReidAttack):
    """L-inf PGD (Madry et al. 2018) maximising the cross-entropy of the identity logits
    (:meth:`ReidFeatureExtractor.logits`); random start, step 2.5 * eps / steps (Madry et al.).

    Labels are training class indices: ``perturb(x01, pids, targets=labels)``, or ``pids`` when they
    already are. ``distance`` is not used. With ``rand_init=False`` this is advertorch's
    ``LinfPGDAttack`` with ``CrossEntropyLoss(reduction="sum")`` on the same logits.
    """

    rand_init = True

    @property
    def predict(self):
        return self.extractor.logits

    def build_loss(self):
        return IdentityCrossEntropy(self.extractor.num_classes)

    def default_step_size(self):
        return 2.5 * self.eps / self.steps

    def perturb(self, x01, pids, guides=None, sample_index=None, targets=None):
        """:meth:`ReidAttack.perturb` with ``targets`` (class indices) as labels when given."""
        return super().perturb(x01, pids if targets is None else targets, guides, sample_index)

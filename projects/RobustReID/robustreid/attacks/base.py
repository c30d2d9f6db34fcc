"""The attack object shared by every registered attack: settings, guides, EOT, and perturb()."""
import torch

from .eot import averaged_objective, draws_needed, expected_output, identity
from .guides import GuideSet
from .iterative import random_start, sign_gradient_ascent
from .losses import DISTANCES
from .validation import (AttackConfigError, check_choice, eps_from_255, positive_int,
                         step_from_255)


class ReidAttack:
    """An L-inf attack on a :class:`ReidFeatureExtractor`, over [0, 1] images.

    ``eps`` and ``step_size`` are in 1/255 units (``eps=8`` is 8/255); ``step_size=None`` takes the
    attack's published default (see each class). ``distance`` is "euclidean" (squared L2) or
    "cosine". ``rand_init=None`` keeps the attack's default start (x, or a uniform point of the
    eps-ball). ``eot_samples`` > 1 averages every gradient over that many forwards (EOT); a model
    whose two forwards agree bitwise (no randomness) gets one (eot.draws_needed).

    Subclasses set ``predict`` (features or logits), ``build_loss()`` and may override
    ``default_step_size()``, ``input_transforms()`` and ``ascend()``.
    """

    rand_init = False

    def __init__(self, extractor, *, eps, steps, step_size=None, distance="euclidean", rand_init=None,
                 eot_samples=1):
        self.extractor = extractor
        self._eps01 = self.check_eps(eps)
        self.eps = float(eps)
        self.steps = positive_int(steps, "steps")
        self.distance = check_choice(distance, DISTANCES, "distance")
        if rand_init is not None:
            self.rand_init = bool(rand_init)
        self.eot_samples = positive_int(eot_samples, "eot_samples")
        if step_size is None:
            step_size = self.default_step_size()  # derived from the checked eps/steps (0 at eps 0)
            self._step01 = step_size / 255.0
        else:
            self._step01 = step_from_255(step_size)
        self.step_size = float(step_size)
        self.loss = self.build_loss()

    @property
    def name(self):
        return type(self).__name__

    def __repr__(self):
        return (f"{self.name}(eps={self.eps:g}/255, steps={self.steps}, step_size={self.step_size:g}"
                f"/255, distance={self.distance}, rand_init={self.rand_init}, "
                f"eot_samples={self.eot_samples})")

    # --- what subclasses define ---------------------------------------------------------------------
    eps_unit = "/255"  # how budgets are written in tables ("8/255"); "" for unitless budgets

    @classmethod
    def check_eps(cls, value):
        """The budget ``value`` checked and in the units the engine uses: here an L-inf budget in
        1/255 units -> [0, 1] units (:func:`eps_from_255`). Attacks with another kind of budget
        (WMA) override it; robust evaluation checks configured budgets with it."""
        return eps_from_255(value)

    def budget_used(self, x01, adv01):
        """The largest budget any image of the batch uses, in ``eps``'s units (here max |adv - x|
        in 1/255 units); robust evaluation checks it against ``eps`` batch by batch."""
        return float((adv01 - x01).abs().max()) * 255.0

    @property
    def predict(self):
        """x01 -> what the loss reads (features by default)."""
        return self.extractor

    def build_loss(self):
        raise NotImplementedError

    def default_step_size(self):
        """Step size in 1/255 units when none is given: 1/255 (Bai et al.; Bouniot et al.'s code)."""
        return 1.0

    def input_transforms(self, draws):
        """The transforms whose losses are averaged at each step: one identity per EOT draw."""
        return [identity] * draws

    def ascend(self, x, targets, predict, loss_fn, delta_init):
        """The engine: advertorch's sign-gradient ascent by default."""
        return sign_gradient_ascent(x, targets, predict, loss_fn, eps=self._eps01, steps=self.steps,
                                    step_size=self._step01, delta_init=delta_init)

    # --- the public API -----------------------------------------------------------------------------
    def perturb(self, x01, pids, guides=None, sample_index=None):
        """Adversarial images for ``x01`` (B, 3, H, W) in [0, 1].

        ``pids`` (B,) are the samples' identities; ``guides`` the :class:`GuideSet` of this
        extractor's clean features (on the images' device; None: the batch is its own guide set, as
        during training); ``sample_index`` (B,) the guide rows of the batch samples, which then also
        serve as their clean features (otherwise one more, EOT-averaged, forward).

        Returns a detached tensor of ``x01``'s shape in [0, 1] with ``|adv - x01|_inf <= eps/255``;
        ``x01`` is not modified; ``eps == 0`` returns a copy of it. Runs with gradients enabled, also
        inside a caller's ``torch.no_grad()``.
        """
        x = x01.detach()
        if self._eps01 == 0.0:
            return x.clone()
        with torch.enable_grad(), self.extractor.frozen_eval():
            targets, predict, loss_fn = self._prepare(x, pids, guides, sample_index)
            delta = random_start(x, self._eps01) if self.rand_init else torch.zeros_like(x)
            return self.ascend(x, targets, predict, loss_fn, delta).detach()

    def objective(self, x01, pids, guides=None, sample_index=None):
        """The scalar function of adversarial images that :meth:`perturb` maximises for the clean
        images ``x01`` (for inspection and tests)."""
        with self.extractor.frozen_eval():
            targets, predict, loss_fn = self._prepare(x01.detach(), pids, guides, sample_index)

        def value(adv01):
            with self.extractor.frozen_eval():
                return loss_fn(predict(adv01), targets)

        return value

    def _prepare(self, x, pids, guides, sample_index):
        pids = torch.as_tensor(pids, device=x.device)
        if pids.shape != (len(x),):
            raise AttackConfigError(f"pids must have one entry per image ({len(x)}), got shape "
                                    f"{tuple(pids.shape)}")
        if guides is not None and (self.loss.needs_guides or self.loss.needs_clean_features):
            sample_index = guides.check_batch(pids, sample_index)
        clean = None
        draws = draws_needed(self.predict, x, self.eot_samples)
        if self.loss.needs_guides and guides is None:  # DDDefense eq. 3 during training: A = the batch
            clean = expected_output(self.predict, x, draws)
            guides, sample_index = GuideSet(clean, pids), torch.arange(len(x), device=x.device)
        elif self.loss.needs_clean_features:
            if guides is not None and sample_index is not None:  # its guide row is its clean feature
                clean = guides.features[sample_index]
            else:
                clean = expected_output(self.predict, x, draws)
        targets = self.loss.targets(guides=guides, pids=pids, clean_features=clean,
                                    sample_index=sample_index)
        predict, loss_fn = averaged_objective(self.predict, self.loss, self.input_transforms(draws))
        return targets, predict, loss_fn

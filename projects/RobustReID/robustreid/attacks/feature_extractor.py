"""The differentiable view of a fastreid model that every attack works on: [0, 1] images in,
eval-mode features (or identity logits) out."""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from fastreid.layers.any_softmax import Linear as LinearClassifier

from ..parallel import unwrap
from .folding import FoldedModel, can_fold
from .validation import AttackConfigError


class ReidFeatureExtractor(nn.Module):
    """Eval-mode features of a fastreid meta-architecture as a function of [0, 1] images.

    ``forward(x01)`` returns the model's eval features (B, D) (BN-neck features for ``Baseline``) with
    gradients flowing to ``x01``. fastreid takes images in [0, 255] and normalises
    ``batched_inputs["images"]`` in place, so every call forwards a fresh tensor,
    ``defense(x01) * 255`` (or ``x01 * 255``): the caller's tensor is never modified.

    ``defense`` (an nn.Module on [0, 1] images, see :mod:`robustreid.attacks.defenses`) is applied
    inside the model, so attacks differentiate through it (naively, or with :func:`bpda`).

    The extractor is for attacking and evaluating, not training: during each call (or a whole
    :meth:`frozen_eval` block) the model is in eval mode and its parameters do not require gradients,
    so backward passes compute input gradients only and never touch parameters' ``.grad``; the
    caller's train/eval modes and ``requires_grad`` flags are restored afterwards.

    ``fold_bn`` runs a copy of the model with eval-mode BatchNorm folded into the convolutions (same
    function, fewer passes: :mod:`robustreid.attacks.folding`). The copy is built on first use and
    refreshed from the live weights once per outermost :meth:`frozen_eval` block (the weights cannot
    change inside one; wrap many calls in one block to refresh once), so an extractor kept across
    training steps never deep-copies the model again; models with forward hooks (e.g. noise modules)
    always run as they are. ``channels_last`` stores the copy's weights channels-last, so its
    convolutions run in NHWC (oneDNN on CPU, cuDNN on GPU): 14% less time per Metric AT step of
    the demo ResNet-18 on a 2-core CPU (tools/bench_train_cost.py), same features to float rounding.
    """

    def __init__(self, model, defense=None, fold_bn=True, channels_last=True):
        super().__init__()
        # The module inside DistributedDataParallel: attack forwards/backwards must not trigger
        # DDP's gradient synchronisation.
        self.model = unwrap(model)
        self.defense = defense
        self.fold_bn = fold_bn
        self.channels_last = channels_last
        self._frozen = False
        self._folded = []  # a plain list: the copy must not become a registered submodule
        self._folded_is_current = False

    @contextlib.contextmanager
    def frozen_eval(self):
        """Model in eval mode with frozen parameters inside the block; restored on exit (re-entrant)."""
        if self._frozen:
            yield
            return
        modes = [(m, m.training) for m in self.model.modules()]
        grad_flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in grad_flags:
            p.requires_grad_(False)
        self._frozen = True
        try:
            yield
        finally:
            self._frozen = False
            self._folded_is_current = False  # weights may change before the next block
            for m, mode in modes:
                m.training = mode
            for p, flag in grad_flags:
                p.requires_grad_(flag)

    def eval_model(self):
        """The module every forward runs inside :meth:`frozen_eval`: the BN-folded copy when
        allowed, else the model itself (tools that time the attack's forwards hook this one)."""
        if not self.fold_bn or not can_fold(self.model):
            return self.model
        if not self._folded:
            self._folded.append(FoldedModel(self.model, self.channels_last))
        elif not self._folded_is_current:
            self._folded[0].refresh()
        self._folded_is_current = self._frozen  # outside a block every call refreshes
        return self._folded[0].module

    def forward(self, x01):
        images = x01 if self.defense is None else self.defense(x01)
        with self.frozen_eval():
            return self.eval_model()({"images": images * 255})

    @property
    def _classifier(self):
        heads = getattr(self.model, "heads", None)
        if not (isinstance(getattr(heads, "weight", None), torch.Tensor)
                and hasattr(heads, "cls_layer")):
            raise AttackConfigError("classification attacks need an identity classifier: the model has "
                                    "no heads.weight / heads.cls_layer")
        return heads

    @property
    def num_classes(self):
        """Number of identity classes of the model's classifier."""
        return self._classifier.weight.shape[0]

    def logits(self, x01):
        """Identity-class logits, as fastreid's ``pred_class_logits``: the margin-free classifier
        output times the classifier's scale (``F.linear(neck_feat, heads.weight) * s`` for "Linear",
        cosine logits ``* s`` for the margin-based classifiers)."""
        heads = self._classifier
        features = self(x01)
        if type(heads.cls_layer) is LinearClassifier:  # subclasses (CosSoftmax, ...) use cosines
            logits = F.linear(features, heads.weight)
        else:
            logits = F.linear(F.normalize(features), F.normalize(heads.weight))
        return logits * heads.cls_layer.s

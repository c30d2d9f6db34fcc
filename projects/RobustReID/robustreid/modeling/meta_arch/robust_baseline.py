"""RobustBaseline: fastreid's Baseline for robust and domain-generalizing training steps.

Additions, all inert for a plain batch with every switch off (same losses as Baseline, bit for bit):

* ``batched_inputs["soft_targets"]`` (B, K) label rows, when present, replace the hard identities in
  the classification loss (FNES's softened adversarial labels, DDDefense eq. 4-5); clean rows are
  phi(y, 1 - MODEL.LOSSES.CE.EPSILON), which is fastreid's label-smoothed cross-entropy.
* ``forward(batch, return_outputs=True)`` also returns the head outputs, so a training step can read
  the features (for a discriminator) without a second forward pass; ``outputs["neck_features"]``
  are the retrieval features (what the model returns in eval mode, before L2 normalisation) of the
  same rows (ADIN's nuisance classifier reads them).
* ``ADV_TRAIN.SEPARATE_LOSSES``: with clean + adversarial rows (``batched_inputs["is_adversarial"]``)
  the losses are computed on each part and summed (DDDefense eq. 10 as written) instead of once over
  the combined batch.
* ``DG.BAU.ENABLED``: BAU (Cho et al., NeurIPS 2024). The batch carries a strongly augmented view
  ``images_strong`` of its first S rows (S = B, or the clean half when ADV_TRAIN doubles the batch);
  both views go through the backbone and head in one forward. CE and triplet see the original rows
  only; BAU's terms (eq. 3-8) use the L2-normalised retrieval features: ``loss_bau_align``
  (LAMBDA x weighted alignment strong -> original), ``loss_bau_uniform`` (both views),
  ``loss_bau_domain`` (both views against the prototype memory ``bau_memory``, a buffer module saved
  with the model; it stays off until the memory is initialised from class centroids, see
  robustreid.engine.dg_steps.PrototypeMemoryInit), and with adversarial rows
  ``loss_bau_adv_uniform`` / ``loss_bau_adv_align``. The memory is updated with the original view's
  features after the losses (eq. 7).
* ``batched_inputs["loss_rows"]`` (B,) bool, when present: the losses read these rows only (none:
  no losses); every row is forwarded (in one batch) and returned in the outputs. The DML defenses
  (robustreid.engine.dml_defenses) train the other rows on their embeddings alone.
* ``"ProxyAnchorLoss"`` in MODEL.LOSSES.NAME: ``loss_proxy_anchor`` on ``outputs["features"]``, the
  Proxy-Anchor loss of the module ``proxy_anchor`` (its proxies are model parameters;
  robustreid.modeling.losses.proxy_anchor).
"""
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fastreid.config import configurable
from fastreid.modeling.meta_arch.baseline import Baseline
from fastreid.modeling.meta_arch.build import META_ARCH_REGISTRY

from ..losses.bau import PrototypeMemory, alignment_loss, domain_uniformity_loss, uniformity_loss
from ..losses.proxy_anchor import ProxyAnchor, proxy_anchor_enabled
from ..losses.soft_labels import soft_cross_entropy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BauSettings:
    """DG.BAU.* as the model uses them."""
    align: bool = True
    uniform: bool = True
    domain: bool = True
    lam: float = 1.5
    k: int = 10
    weighted: bool = True
    t: float = 2.0
    view_reduction: str = "sum"
    momentum: float = 0.1
    num_prototypes: int = 0
    exclude_own_class: bool = True
    adv_uniform: bool = False
    adv_align: bool = False

    @classmethod
    def from_config(cls, cfg):
        b = cfg.DG.BAU
        return cls(bool(b.ALIGN), bool(b.UNIFORM), bool(b.DOMAIN), float(b.LAMBDA), int(b.K),
                   bool(b.WEIGHTED), float(b.T), b.VIEW_REDUCTION, float(b.MOMENTUM),
                   int(b.NUM_PROTOTYPES), bool(b.EXCLUDE_OWN_CLASS), bool(b.ADV_UNIFORM),
                   bool(b.ADV_ALIGN))

    def combine(self, a, b):
        return a + b if self.view_reduction == "sum" else 0.5 * (a + b)


@dataclass(frozen=True)
class _MemorySnapshot:
    """What domain_uniformity_loss reads from a PrototypeMemory."""
    prototypes: torch.Tensor
    domains: torch.Tensor


def neck_dim(cfg):
    """Dimension of the retrieval feature the head returns in eval mode."""
    return cfg.MODEL.HEADS.EMBEDDING_DIM or cfg.MODEL.BACKBONE.FEAT_DIM


@META_ARCH_REGISTRY.register()
class RobustBaseline(Baseline):

    @configurable
    def __init__(self, *, bau=None, num_classes=0, memory_dim=0, proxy_anchor=None,
                 separate_adv_losses=False, **kwargs):
        """NOTE: this interface is experimental (fastreid's @configurable convention)."""
        super().__init__(**kwargs)
        self.separate_adv_losses = separate_adv_losses
        self.proxy_anchor = proxy_anchor
        self.bau = bau
        self._warned_uninitialised = False
        if bau is not None and bau.domain and num_classes > 0:
            self.bau_memory = PrototypeMemory(num_classes, memory_dim, bau.momentum)
        else:
            self.bau_memory = None

    @classmethod
    def from_config(cls, cfg):
        kwargs = super().from_config(cfg)
        if "DG" in cfg and cfg.DG.BAU.ENABLED:
            kwargs.update(bau=BauSettings.from_config(cfg),
                          num_classes=cfg.MODEL.HEADS.NUM_CLASSES, memory_dim=neck_dim(cfg))
        if proxy_anchor_enabled(cfg):
            kwargs.update(proxy_anchor=ProxyAnchor.from_config(cfg))
        if "ADV_TRAIN" in cfg:
            kwargs.update(separate_adv_losses=bool(cfg.ADV_TRAIN.SEPARATE_LOSSES))
        return kwargs

    def forward(self, batched_inputs, return_outputs=False):
        if not self.training:
            return super().forward(batched_inputs)
        strong = batched_inputs.get("images_strong") if self.bau is not None else None
        if self.bau is not None and strong is None:
            raise ValueError("DG.BAU needs batches with 'images_strong' (the DG train loader, "
                             "robustreid.data.dg.build_dg_train_loader)")
        images = self.preprocess_image(batched_inputs)
        num_rows = len(images)
        targets = batched_inputs["targets"]
        if targets.sum() < 0:  # as Baseline: unlabeled batches train the other losses only
            targets.zero_()
        head_targets = targets
        if strong is not None:
            strong = (strong.to(images.device) - self.pixel_mean) / self.pixel_std
            images = torch.cat([images, strong])
            head_targets = torch.cat([targets, targets[:len(strong)]])
        features = self.backbone(images)

        neck = {}
        capture = strong is not None or return_outputs
        handle = self._capture_neck(neck) if capture else None
        try:
            outputs = self.heads(features, head_targets)
        finally:
            if handle is not None:
                handle.remove()
        if capture:
            neck_features = neck.get("out", outputs["features"])
        if strong is not None:
            outputs = {key: value[:num_rows] for key, value in outputs.items()}
        is_adv = batched_inputs.get("is_adversarial")
        loss_rows = batched_inputs.get("loss_rows")
        if loss_rows is not None:  # the other rows are forwarded for their outputs only
            losses = self.losses({key: value[loss_rows] for key, value in outputs.items()},
                                 targets[loss_rows]) if bool(loss_rows.any()) else {}
        elif self.separate_adv_losses and is_adv is not None and 0 < int(is_adv.sum()) < len(is_adv):
            losses = self._clean_plus_adversarial_losses(outputs, targets,
                                                         batched_inputs.get("soft_targets"), is_adv)
        else:
            losses = self.losses(outputs, targets, batched_inputs.get("soft_targets"))
        if strong is not None:
            losses.update(self._bau_losses(neck_features, num_rows, targets, batched_inputs))
        if return_outputs:
            outputs["neck_features"] = neck_features[:num_rows]
            return losses, outputs
        return losses

    def _capture_neck(self, store):
        """Forward hook on the head's BNNeck: the retrieval feature of every row."""
        bottleneck = getattr(self.heads, "bottleneck", None)
        if bottleneck is None:
            return None

        def hook(module, inputs, output):
            store["out"] = output.flatten(1)
        return bottleneck.register_forward_hook(hook)

    def losses(self, outputs, gt_labels, soft_targets=None):
        loss_dict = super().losses(outputs, gt_labels)
        if soft_targets is not None and "loss_cls" in loss_dict:
            loss_dict["loss_cls"] = (soft_cross_entropy(outputs["cls_outputs"], soft_targets)
                                     * self.loss_kwargs["ce"]["scale"])
        if self.proxy_anchor is not None:
            loss_dict["loss_proxy_anchor"] = self.proxy_anchor(outputs["features"], gt_labels)
        return loss_dict

    def _clean_plus_adversarial_losses(self, outputs, targets, soft_targets, is_adv):
        """DDDefense eq. 10 term by term: each loss on the clean rows plus the same loss on the
        adversarial rows (ADV_TRAIN.SEPARATE_LOSSES)."""
        total = {}
        for rows in (~is_adv, is_adv):
            part = {key: value[rows] for key, value in outputs.items()}
            soft = None if soft_targets is None else soft_targets[rows]
            for name, value in self.losses(part, targets[rows], soft).items():
                total[name] = total[name] + value if name in total else value
        return total

    # ---------------------------------------------------------------- BAU
    def memory_ready(self):
        """True once the prototype memory holds class centroids (every class has a domain)."""
        return self.bau_memory is not None and bool((self.bau_memory.domains >= 0).all())

    def _bau_losses(self, neck_features, num_rows, targets, batched_inputs):
        """BAU's terms on rows [original (S) | adversarial (num_rows - S) | strong (S)]."""
        bau = self.bau
        f = F.normalize(neck_features.float(), dim=1)
        num_strong = len(f) - num_rows
        weak, adversarial, strong = f[:num_strong], f[num_strong:num_rows], f[num_rows:]
        pids = targets[:num_strong]
        out = {}
        if bau.align:
            out["loss_bau_align"] = bau.lam * alignment_loss(strong, weak, pids, bau.k,
                                                             bau.weighted)
        if bau.uniform:
            out["loss_bau_uniform"] = bau.combine(uniformity_loss(weak, bau.t),
                                                  uniformity_loss(strong, bau.t))
        if len(adversarial):
            if bau.adv_uniform:
                out["loss_bau_adv_uniform"] = uniformity_loss(adversarial, bau.t)
            if bau.adv_align:
                out["loss_bau_adv_align"] = bau.lam * alignment_loss(adversarial, weak, pids,
                                                                     bau.k, bau.weighted)
        if self.bau_memory is not None:
            if self.memory_ready():
                domains = batched_inputs.get("domainids")
                if domains is None or len(domains) != num_strong:
                    raise ValueError("DG.BAU.DOMAIN needs 'domainids' for the original-view rows "
                                     "(the DG train loader)")
                k = bau.num_prototypes or num_strong
                # the loss's backward needs the prototypes as they are now; the update below
                # writes them in place, so the loss reads a snapshot (one N x d copy per step)
                snapshot = _MemorySnapshot(self.bau_memory.prototypes.clone(),
                                           self.bau_memory.domains)
                per_view = [domain_uniformity_loss(view, pids, domains, snapshot, k, bau.t,
                                                   bau.exclude_own_class)
                            for view in (weak, strong)]
                out["loss_bau_domain"] = bau.combine(*per_view)
                self.bau_memory.update(weak, pids)
            elif not self._warned_uninitialised:
                logger.warning("DG.BAU.DOMAIN: the prototype memory is not initialised (the "
                               "PrototypeMemoryInit hook did not run): no domain term until it is")
                self._warned_uninitialised = True
        return out

"""RobustBaseline: fastreid's Baseline for robust training steps.

Two additions, both inert for a plain batch (same losses as Baseline, bit for bit):

* ``batched_inputs["soft_targets"]`` (B, K) label rows, when present, replace the hard identities in
  the classification loss (FNES's softened adversarial labels, DDDefense eq. 4-5); clean rows are
  phi(y, 1 - MODEL.LOSSES.CE.EPSILON), which is fastreid's label-smoothed cross-entropy.
* ``forward(batch, return_outputs=True)`` also returns the head outputs, so a training step can read
  the features (for a discriminator) without a second forward pass.
"""
from fastreid.modeling.meta_arch.baseline import Baseline
from fastreid.modeling.meta_arch.build import META_ARCH_REGISTRY

from ..losses.soft_labels import soft_cross_entropy


@META_ARCH_REGISTRY.register()
class RobustBaseline(Baseline):

    def forward(self, batched_inputs, return_outputs=False):
        if not self.training:
            return super().forward(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images)
        targets = batched_inputs["targets"]
        if targets.sum() < 0:  # as Baseline: unlabeled batches train the other losses only
            targets.zero_()
        outputs = self.heads(features, targets)
        losses = self.losses(outputs, targets, batched_inputs.get("soft_targets"))
        return (losses, outputs) if return_outputs else losses

    def losses(self, outputs, gt_labels, soft_targets=None):
        loss_dict = super().losses(outputs, gt_labels)
        if soft_targets is not None and "loss_cls" in loss_dict:
            loss_dict["loss_cls"] = (soft_cross_entropy(outputs["cls_outputs"], soft_targets)
                                     * self.loss_kwargs["ce"]["scale"])
        return loss_dict

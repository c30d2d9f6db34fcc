"""Proxy-Anchor's training schedule (the authors' code/train.py, tjddus9597/Proxy-Anchor-CVPR2020):
the proxies learn at MODEL.LOSSES.PA.LR_MULTIPLIER x the network's rate, and for the first
WARMUP_EPOCHS epochs the backbone is frozen, so only the new layers (heads, proxies) train. Both
apply to every single model of the trained model: the model itself, or each member of an EAT
ensemble (``single_models``), each with its own backbone and proxies.

The warm-up switches ``requires_grad`` off on the backbone's parameters, as the authors do. They get
no gradient, and torch's optimizers skip parameters without one: no update, no weight decay, no
moment or step count (Adam starts its bias correction when the backbone first trains); their
weight gradients are not computed either (gradients still reach the input, for the attacks). Which
epochs freeze depends on the epoch alone, so a resumed run freezes exactly when the uninterrupted
one did. BatchNorm layers stay in training mode (running statistics follow the data), as in the
authors' runs with --bn-freeze 0; their --bn-freeze 1 (BN in eval mode for the whole run) is a
separate choice, not this warm-up.

fastreid's own mechanism (MODEL.FREEZE_LAYERS + SOLVER.FREEZE_ITERS) is not reused: its optimizer
wrapper drops the frozen layers' gradients for its first FREEZE_ITERS step() calls, counted in a
closure that no checkpoint holds, so every resumed run would freeze the backbone again for
FREEZE_ITERS steps; it also computes the backbone's whole backward meanwhile.
"""
import logging

from fastreid.engine.hooks import HookBase

from ..modeling.losses.proxy_anchor import proxy_anchor_enabled
from ..modeling.meta_arch.ensemble import single_models

logger = logging.getLogger(__name__)


def warmup_epochs(cfg):
    """Epochs with the backbone frozen (0 without the Proxy-Anchor loss)."""
    return cfg.MODEL.LOSSES.PA.WARMUP_EPOCHS if proxy_anchor_enabled(cfg) else 0


def set_proxy_lr(cfg, optimizer, model):
    """Every proxies' parameter group (one per single model with the loss) at SOLVER.BASE_LR x
    LR_MULTIPLIER. Call it before the LR schedulers are built: they scale every group from the rate
    it has then."""
    for proxy_anchor in (m.proxy_anchor for m in single_models(model)
                         if getattr(m, "proxy_anchor", None) is not None):
        groups = [g for g in optimizer.param_groups
                  if any(p is proxy_anchor.proxies for p in g["params"])]
        # fastreid's get_default_optimizer_params gives every parameter a group of its own
        assert len(groups) == 1 and len(groups[0]["params"]) == 1, "proxies share a parameter group"
        groups[0]["lr"] = cfg.SOLVER.BASE_LR * cfg.MODEL.LOSSES.PA.LR_MULTIPLIER


class BackboneWarmup(HookBase):
    """Freezes the trainable parameters of every single model's backbone in epochs [0, epochs),
    releases them after."""

    def __init__(self, epochs):
        self.epochs = epochs
        self._frozen = []

    def before_epoch(self):
        warming = self.trainer.epoch < self.epochs
        if warming and not self._frozen:
            self._frozen = [p for m in single_models(self.trainer.model)
                            for p in m.backbone.parameters() if p.requires_grad]
            for p in self._frozen:
                p.requires_grad_(False)
                p.grad = None
            logger.info("Proxy-Anchor warm-up: backbone(s) frozen until epoch %d", self.epochs)
        elif not warming and self._frozen:
            self._release()
            logger.info("Proxy-Anchor warm-up over: the backbone(s) train")

    def after_train(self):  # also after a run stopped early: leave the model as it was built
        self._release()

    def _release(self):
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []


def build_proxy_anchor_hooks(trainer):
    """The warm-up hook, or nothing (loss not named, or WARMUP_EPOCHS 0)."""
    epochs = warmup_epochs(trainer.cfg)
    return [BackboneWarmup(epochs)] if epochs > 0 else []

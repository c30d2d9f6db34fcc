"""The feature discriminator of adversarially-enhanced learning (DDDefense eq. 6-8) as a trainable
part of the training step, with its own optimizer and scheduler.

Order within a step (Algorithm 1, lines 5-6 before the model update): D is updated on the detached
features of the forward pass the model update already made (no second forward), then the encoder's
L_E is computed with the updated D. D's optimizer is the model's kind (SOLVER.OPT) at SOLVER.BASE_LR
with weight decay 5e-4, and its learning rate decays by 0.5 at the model's SOLVER.STEPS epochs
(DDDefense supplementary: "decay factor 0.5, weight decay 0.0005, other settings as the model").

Multi-process runs: D is not under DDP. It starts as rank 0's copy and its gradients are averaged
over the processes before each step, so every process holds the same D (and optimizer state).
"""
from torch.func import functional_call

from ..modeling.losses.feature_adversary import (FeatureDiscriminator, discriminator_loss,
                                                 encoder_confusion_loss)
from .distributed import broadcast_from_rank0, mean_across_ranks
from .part_optimizer import build_part_optimizer


class FeatureAdversary:
    """D, its optimizer and scheduler; ``update`` trains D, ``encoder_loss`` is L_E for the model."""

    def __init__(self, discriminator, optimizer, scheduler, weight):
        self.discriminator = discriminator
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.weight = weight

    @classmethod
    def from_config(cls, cfg, device):
        d_cfg = cfg.ADV_TRAIN.DISCRIMINATOR
        discriminator = FeatureDiscriminator(cfg.MODEL.BACKBONE.FEAT_DIM,
                                             tuple(d_cfg.HIDDEN_DIMS)).to(device)
        broadcast_from_rank0(discriminator)
        optimizer, scheduler = build_part_optimizer(cfg, discriminator.parameters(), d_cfg.BASE_LR,
                                                    d_cfg.WEIGHT_DECAY, d_cfg.GAMMA)
        return cls(discriminator, optimizer, scheduler, d_cfg.LOSS_WEIGHT)

    def checkpointables(self):
        return {"discriminator": self.discriminator, "discriminator_optimizer": self.optimizer,
                "discriminator_scheduler": self.scheduler}

    def update(self, features, is_adversarial):
        """One step of D on L_D (eq. 6) over detached features; returns L_D's value."""
        self.discriminator.train()
        loss = discriminator_loss(self.discriminator(features.detach().float()), is_adversarial)
        self.optimizer.zero_grad()
        loss.backward()
        mean_across_ranks([p.grad for p in self.discriminator.parameters()])  # D is not in DDP
        self.optimizer.step()
        return loss.detach()

    def encoder_loss(self, features, is_adversarial):
        """weight * L_E (eq. 7) as a function of the features only: D's parameters enter as
        constants, so the model's backward never touches D."""
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        logits = functional_call(self.discriminator, frozen, (features.float(),))
        return self.weight * encoder_confusion_loss(logits, is_adversarial)

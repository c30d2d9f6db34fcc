"""Training hooks RobustReID adds to fastreid's defaults."""
import torch
from fastreid.engine.hooks import HookBase

from .distributed import mean_across_ranks


def average_buffers_across_ranks(model):
    """Average floating-point buffers (BatchNorm running statistics) over all processes.

    DDP is built with broadcast_buffers=False, so each rank's BN statistics drift apart; averaging
    them before evaluation and checkpointing gives every rank the same model, as on one process.
    """
    mean_across_ranks([b for b in model.buffers() if torch.is_floating_point(b)])


class SyncBufferStats(HookBase):
    """Before the epoch-end evaluation and checkpoint, make every rank hold identical buffers."""

    def after_epoch(self):
        average_buffers_across_ranks(self.trainer.model)


class StepSchedulerEachEpoch(HookBase):
    """Steps an epoch-based LR scheduler of a trainable part outside the model (e.g. the feature
    discriminator's) at each epoch end, as fastreid's LRScheduler hook does for the model's."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def after_epoch(self):
        self.scheduler.step()

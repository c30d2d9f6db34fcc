"""Training hooks RobustReID adds to fastreid's defaults."""
import torch
import torch.distributed as dist
from fastreid.engine.hooks import HookBase
from fastreid.utils import comm


def average_buffers_across_ranks(model):
    """Average floating-point buffers (BatchNorm running statistics) over all processes.

    DDP is built with broadcast_buffers=False, so each rank's BN statistics drift apart; averaging
    them before evaluation and checkpointing gives every rank the same model, as on one process.
    """
    world_size = comm.get_world_size()
    if world_size == 1:
        return
    for buffer in model.buffers():
        if torch.is_floating_point(buffer):
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(world_size)


class SyncBufferStats(HookBase):
    """Before the epoch-end evaluation and checkpoint, make every rank hold identical buffers."""

    def after_epoch(self):
        average_buffers_across_ranks(self.trainer.model)

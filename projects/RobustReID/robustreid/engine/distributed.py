"""Keeping trainable state identical on every process where DDP does not do it: the parts outside
the model (the feature discriminator D, ADIN's nuisance classifier f_N) and state the model updates
without gradients (BAU's prototype memory)."""
import torch
import torch.distributed as dist
from fastreid.utils import comm


def mean_across_ranks(tensors):
    """In-place all-reduce mean of each tensor (a no-op on one process)."""
    world_size = comm.get_world_size()
    if world_size == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size)


@torch.no_grad()
def broadcast_from_rank0(module):
    """Every parameter and buffer of ``module`` := rank 0's (a no-op on one process): a part each
    process builds from its own random stream (seed SEED + rank) starts identical everywhere, as
    DDP does for the model."""
    if comm.get_world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.detach(), src=0)


def average_buffers_across_ranks(model):
    """Average floating-point buffers (BatchNorm running statistics) over all processes.

    DDP is built with broadcast_buffers=False, so each rank's BN statistics drift apart; averaging
    them before evaluation and checkpointing gives every rank the same model, as on one process.
    """
    mean_across_ranks([b for b in model.buffers() if torch.is_floating_point(b)])

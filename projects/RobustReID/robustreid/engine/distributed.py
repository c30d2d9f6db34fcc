"""Averaging tensors over processes, for state that DDP does not synchronise itself."""
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

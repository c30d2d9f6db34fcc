"""Multi-process helpers usable from every layer: the module under DistributedDataParallel (for
code that must bypass DDP's wrapper: attack forwards, functional meta steps, reading a model's extra
parts), the rows of a batch from every process (for state that must see the whole batch) and an
evaluator's per-batch records on the main process."""
import itertools

import torch
import torch.distributed as dist
from fastreid.utils import comm
from torch.nn.parallel import DistributedDataParallel


def unwrap(model):
    """The module inside DistributedDataParallel (the model itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_gather_rows(*tensors):
    """Every process's rows of each tensor, concatenated in rank order (the tensors themselves on
    one process). All tensors of a call have the same number of rows on a process; that number may
    differ between processes. Every process must call it, in the same order."""
    size = comm.get_world_size()
    if size == 1:
        return tensors
    count = torch.tensor([len(tensors[0])], device=tensors[0].device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    gathered = []
    for tensor in tensors:
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))  # all_gather needs one shape
        padded[:len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, counts)]))
    return tuple(gathered)


def gather_on_main(records):
    """Every process's list of ``records`` concatenated in rank order on the main process, None on
    the others (an evaluator's per-batch predictions); the list itself with one process."""
    if comm.get_world_size() == 1:
        return records
    comm.synchronize()
    gathered = comm.gather(records, dst=0)
    return list(itertools.chain(*gathered)) if comm.is_main_process() else None

"""Robust evaluation on several processes: the attacked split's batches are shared out in contiguous
blocks, each process attacks its block, and every process gathers all of them back in order.

The result equals one process's: the clean features are extracted whole on every process, a batch
holds the same images wherever it is attacked (the split is cut at TEST.IMS_PER_BATCH boundaries),
and its random stream depends on the seed and its position alone (``RobustEvaluator``). Every
process must run the same cells in the same order (the gathers are collective).
"""
import torch
from fastreid.utils import comm

from .robust import RobustEvaluator


def batch_block(num_batches, rank, world_size):
    """The contiguous batches [first, stop) of process ``rank``: sizes differ by at most one."""
    return num_batches * rank // world_size, num_batches * (rank + 1) // world_size


class DistributedRobustEvaluator(RobustEvaluator):
    """:class:`RobustEvaluator` whose attacks are split over the processes of a launch()ed run."""

    def _batch_share(self, num_batches):
        return batch_block(num_batches, comm.get_rank(), comm.get_world_size())

    def _gathered(self, feats, max_linf, max_used, in_range):
        shares = comm.all_gather((feats, max_linf, max_used, in_range))  # in rank order
        return (torch.cat([f for share in shares for f in share[0]]),
                max(share[1] for share in shares), max(share[2] for share in shares),
                all(share[3] for share in shares))

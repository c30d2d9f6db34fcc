"""The training batches as one stream that a resumed run continues exactly.

fastreid's train loader draws indices from an infinite sampler that seeds numpy's *global* state
once, and its transforms draw from whatever generators the process that loads an image holds (the
main process, or one of several loader workers in turn); the iterator is created once per run. So
the batch at position n depends on every draw made before it, in every process: a restarted run
cannot rebuild it short of replaying the whole run.

Here batch n depends on (data seed, rank, n) alone:

* the sampler (whichever of fastreid's DATALOADER.SAMPLER_TRAIN names) draws from its own numpy
  state (``PrivateNumpyState``), so its index stream is a function of its seed. To start at batch n
  the stream draws the first n batches' indices again and drops them: no image is read (fastreid's
  NaiveIdentitySampler on a Market-1501-sized list replays 10 epochs in 0.5 s on a busy 2-core
  machine);
* each item's random transforms (flip, crop, erasing, BAU's strong view) draw from generators seeded
  from (data seed, rank, position of the item in the stream), whichever process loads it.

Re-seeding the sampler per epoch would also be exact at epoch boundaries, but the stream is not cut
at epochs (ADIN's f_N pre-training takes batches from it between epochs), and replaying indices is
cheap, so the stream stays one per run, as fastreid's, and can continue at any batch.
"""
import itertools
import logging

import numpy as np
import torch
from fastreid.utils import comm
from torch.utils.data import Dataset, Sampler

from ..rng_state import PrivateNumpyState, seed_cpu_generators, seeded_cpu_generators

logger = logging.getLogger(__name__)

__all__ = ["ReplayableSampler", "SeededItems", "TrainBatchStream", "build_train_stream"]


class ReplayableSampler(Sampler):
    """fastreid's infinite training sampler as a stream that starts at any position (``start``, in
    indices), each index paired with the seed of its item's random transforms."""

    def __init__(self, sampler, chunk):
        self.sampler = sampler
        self.chunk = int(chunk)  # indices drawn per swap of numpy's state: one batch
        self.rank = comm.get_rank()
        self.start = 0

    @property
    def seed(self):
        """The data seed: fastreid's sampler seed (shared by all ranks)."""
        return self.sampler._seed

    @seed.setter
    def seed(self, value):
        self.sampler._seed = int(value)

    def item_seed(self, position):
        return int(np.random.SeedSequence([self.seed, self.rank, position]).generate_state(1)[0])

    def __iter__(self):
        numpy_state = PrivateNumpyState()
        indices = iter(self.sampler)  # seeds numpy from the sampler's seed on its first draw
        with numpy_state:
            for _ in itertools.islice(indices, self.start):
                pass
        position = self.start
        while True:
            with numpy_state:
                chunk = list(itertools.islice(indices, self.chunk))
            for index in chunk:
                yield int(index), self.item_seed(position)
                position += 1


class SeededItems(Dataset):
    """``dataset`` asked for ``(index, seed)`` keys: an item's random transforms draw from CPU
    generators seeded with its seed, and the loading process's own streams are left as they were."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitems__(self, keys):  # torch's fetcher asks for a batch at once: one save/restore
        with seeded_cpu_generators():
            items = []
            for index, seed in keys:
                seed_cpu_generators(seed)
                items.append(self.dataset[index])
        return items

    def __getitem__(self, key):
        return self.__getitems__([key])[0]


class TrainBatchStream:
    """The train loader's batches as one stream per run (iterating it again continues it).

    ``state_dict()`` is where it stands (batches handed out, data seed); ``load_state_dict`` moves a
    stream that has not started yet there. The loader's iterator is created on the first batch, so
    a resumed run never starts loader workers at the wrong position. ``dataset`` is the training
    set, as on fastreid's loader.
    """

    def __init__(self, loader, sampler, dataset):
        self.loader = loader
        self.sampler = sampler
        self.dataset = dataset
        self.batch_size = loader.batch_sampler.batch_size
        self.batches = 0
        self._iter = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iter is None:
            self.sampler.start = self.batches * self.batch_size
            # Creating a loader iterator draws its workers' base seed from torch's generator: keep
            # that draw out of the training stream, which must not depend on when this happens.
            with torch.random.fork_rng(devices=[]):
                self._iter = iter(self.loader)
        batch = next(self._iter)
        self.batches += 1
        return batch

    def state_dict(self):
        return {"batches": self.batches, "seed": self.sampler.seed}

    def load_state_dict(self, state):
        if self._iter is not None:
            raise RuntimeError("the training batch stream has started: it cannot move")
        self.batches = int(state["batches"])
        self.sampler.seed = int(state["seed"])


def build_train_stream(cfg, train_set=None):
    """fastreid's train loader for ``cfg`` (its sampler, batch size and workers; its training set of
    DATASETS.NAMES unless ``train_set`` is given) as a :class:`TrainBatchStream`."""
    # fastreid's own from-config step (private, but fastreid 1.4.0 is frozen) picks the sampler, so
    # every DATALOADER.SAMPLER_TRAIN keeps working.
    from fastreid.data.build import _train_loader_from_config, build_reid_train_loader

    parts = _train_loader_from_config(cfg, train_set=train_set, combineall=cfg.DATASETS.COMBINEALL)
    if parts["num_workers"] == 0 and torch.cuda.is_available():
        logger.warning("DATALOADER.NUM_WORKERS 0 on CUDA: fastreid's loader (DataLoaderX) prepares "
                       "batches in a thread that shares torch's random generator with the training "
                       "step, so runs do not reproduce exactly; use NUM_WORKERS >= 1")
    sampler = ReplayableSampler(parts["sampler"], cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())
    loader = build_reid_train_loader(train_set=SeededItems(parts["train_set"]), sampler=sampler,
                                     total_batch_size=parts["total_batch_size"],
                                     num_workers=parts["num_workers"])
    return TrainBatchStream(loader, sampler, parts["train_set"])

"""Nearest-neighbour indexes behind the evaluator and tools/search.py: features in, top-k out.

``TEST.FAISS.INDEX`` names the index as faiss's ``index_factory`` reads it:

* ``"Flat"``: exact search, the evaluator's streamed path (:class:`.retrieval.ExactRetriever`'s
  distances, fastreid's conventions), here streamed over gallery blocks too, so a gallery on disk
  is scanned once without being loaded (:class:`ExactIndex`);
* anything else, e.g. ``"IVF4096,PQ64"``, ``"IVF1024,Flat"``, ``"HNSW32"``: a faiss index trained on
  a seeded sample of ``TEST.FAISS.TRAIN_SIZE`` gallery rows and filled block by block
  (:class:`FaissIndex`), searched with ``TEST.FAISS.NPROBE`` (IVF) / ``TEST.FAISS.EF_SEARCH``
  (HNSW); ``TEST.FAISS.SHORTLIST`` > 0 re-ranks that many approximate neighbours per query with
  exact distances read back from the gallery (RAM or the memory-mapped file).

Both return ``(distances, indices)`` of shape ``(n, k)``, nearest first, distances in the exact
path's convention (squared L2, or ``1 - cos``); an index that finds fewer than k neighbours pads
with index -1 and distance +inf. Approximate indexes work in squared L2 on the prepared features
(L2-normalised for cosine, where ``|q - g|^2 / 2 = 1 - cos``).

GPU: with ``TEST.FAISS.USE_GPU`` and faiss-gpu seeing GPUs, an IVF index is trained on CPU and then
split over every visible GPU with ``faiss.IndexShards`` (one shard per GPU, rows spread evenly).
Without faiss-gpu or a GPU the same config runs on CPU and says so once in the log.
"""
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError
from .feature_store import open_features
from .retrieval import (ExactRetriever, _import_faiss, candidate_distances, check_metric,
                        faiss_gpu_available, prepare_features)

logger = logging.getLogger(__name__)

EXACT = "Flat"
# Gallery rows per block when adding to an index or scanning exactly: 64 MiB of 512-d float32.
BLOCK_ROWS = 32768
# Floor of the automatic training sample: PQ's 256-centroid codebooks want >= 39 x 256 points.
MIN_AUTO_TRAIN = 20000
# Points per IVF list in the automatic training sample (faiss warns below 39 and keeps <= 256).
AUTO_TRAIN_PER_LIST = 64


@dataclass(frozen=True)
class IndexOptions:
    """TEST.FAISS's index keys and TEST.METRIC, as the indexes use them."""
    spec: str = EXACT
    metric: str = "cosine"
    train_size: int = 0
    nprobe: int = 16
    ef_search: int = 64
    shortlist: int = 0
    use_gpu: bool = False
    backend: str = "auto"
    query_chunk: int = 1024
    seed: int = 0

    @classmethod
    def from_config(cls, cfg):
        f = cfg.TEST.FAISS
        return cls(spec=str(f.INDEX), metric=cfg.TEST.METRIC, train_size=int(f.TRAIN_SIZE),
                   nprobe=int(f.NPROBE), ef_search=int(f.EF_SEARCH), shortlist=int(f.SHORTLIST),
                   use_gpu=bool(f.USE_GPU), backend=f.BACKEND, query_chunk=int(f.QUERY_CHUNK),
                   seed=int(f.APPROX_SEED))

    @property
    def exact(self) -> bool:
        return self.spec.strip() == EXACT


def check_index_config(cfg):
    """TEST.FAISS's index keys, before anything is built (a ConfigError naming the key)."""
    f = cfg.TEST.FAISS
    if not isinstance(f.INDEX, str) or not f.INDEX.strip():
        raise ConfigError(f"TEST.FAISS.INDEX must be a faiss index_factory string such as "
                          f"'IVF4096,PQ64' or 'Flat' (exact), got {f.INDEX!r}")
    for key, minimum in (("TRAIN_SIZE", 0), ("NPROBE", 1), ("EF_SEARCH", 1), ("SHORTLIST", 0),
                         ("TOPK", 1), ("APPROX_QUERIES", 0)):
        value = f[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"TEST.FAISS.{key} must be an integer >= {minimum}, got {value!r}")
    if not f.RECALL_KS or any(not isinstance(k, int) or k < 1 or k > f.TOPK
                              for k in f.RECALL_KS):
        raise ConfigError(f"TEST.FAISS.RECALL_KS must be integers in [1, TEST.FAISS.TOPK="
                          f"{f.TOPK}], got {list(f.RECALL_KS)}")
    if f.INDEX.strip() != EXACT and cfg.TEST.RERANK.ENABLED:
        raise ConfigError(f"TEST.RERANK needs the full query x gallery distances; it cannot run "
                          f"with the approximate TEST.FAISS.INDEX {f.INDEX!r} (use 'Flat')")


def build_index(gallery, options: IndexOptions):
    """The index ``options.spec`` names over ``gallery`` (array/tensor, ``.npy`` path or feature
    store directory), trained and filled; ``index.build_seconds`` says how long that took."""
    check_metric(options.metric)
    features = open_features(gallery)
    start = time.perf_counter()
    index = ExactIndex(features, options) if options.exact else FaissIndex(features, options)
    index.build_seconds = time.perf_counter() - start
    return index


def _merge_topk(best_d, best_i, dist, idx, k):
    """The k smallest of two ``(n, *)`` candidate sets (torch), nearest first."""
    if best_d is not None:
        dist, idx = torch.cat([best_d, dist], dim=1), torch.cat([best_i, idx], dim=1)
    k = min(k, dist.shape[1])
    top_d, pos = torch.topk(dist, k, dim=1, largest=False, sorted=True)
    return top_d, torch.gather(idx, 1, pos)


def _pad(dist, idx, k):
    """Pad ``(n, k')`` results to k columns with (+inf, -1) when the gallery has fewer rows."""
    n, have = dist.shape
    if have >= k:
        return dist, idx
    return (np.concatenate([dist, np.full((n, k - have), np.inf, np.float32)], axis=1),
            np.concatenate([idx, np.full((n, k - have), -1, np.int64)], axis=1))


class ExactIndex:
    """Exact top-k: every gallery block is read once and scored against every query chunk with
    :meth:`ExactRetriever.distances` (the evaluator's exact path); a running top-k is merged."""

    exact = True

    def __init__(self, features, options: IndexOptions, block_rows: int = BLOCK_ROWS):
        self.features = features
        self.options = options
        self.block_rows = block_rows

    @property
    def ntotal(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def search(self, queries, k: int):
        o = self.options
        q = prepare_features(queries, o.metric)
        n = q.shape[0]
        best = [(None, None)] * -(-n // o.query_chunk)
        for start, block in self.features.blocks(self.block_rows):
            retriever = ExactRetriever(block, metric=o.metric, use_gpu=o.use_gpu, backend=o.backend)
            offsets = torch.arange(start, start + len(block), dtype=torch.int64,
                                   device=retriever.device)
            # One score buffer per block, reused by its query chunks (as iter_distances does).
            buffer = torch.empty((min(n, o.query_chunk), len(block)), device=retriever.device) \
                if retriever.backend == "torch" else None
            for c, q0 in enumerate(range(0, n, o.query_chunk)):
                dist = retriever.distances(q[q0:q0 + o.query_chunk], out=buffer)
                dist = dist.to(retriever.device)
                kk = min(k, dist.shape[1])
                top_d, pos = torch.topk(dist, kk, dim=1, largest=False, sorted=True)
                best[c] = _merge_topk(*best[c], top_d, offsets[pos], k)
        dist = torch.cat([d for d, _ in best]).cpu().numpy()
        idx = torch.cat([i for _, i in best]).cpu().numpy()
        return _pad(dist, idx, k)


def _search_parameter_names(cpu_index):
    """The search-time parameters faiss knows for this index ("nprobe", "efSearch", ...)."""
    space = _import_faiss().ParameterSpace()
    space.initialize(cpu_index)
    ranges = space.parameter_ranges
    return {ranges.at(i).name for i in range(ranges.size())}


class FaissIndex:
    """A faiss ``index_factory`` index over prepared features (see the module docstring)."""

    exact = False

    def __init__(self, features, options: IndexOptions):
        faiss = _import_faiss()
        self.features = features
        self.options = options
        rows, dim = features.shape
        try:
            index = faiss.index_factory(dim, options.spec, faiss.METRIC_L2)
        except RuntimeError as e:
            raise ConfigError(f"TEST.FAISS.INDEX {options.spec!r}: faiss cannot build it for "
                              f"{dim}-d features: {_faiss_message(e)}") from None
        self.train_seconds = 0.0
        _skip_polysemous_training(index)
        if not index.is_trained:
            self.train_seconds = self._train(index, rows)
        names = _search_parameter_names(index)
        self.gpu = False
        if options.use_gpu:
            index = self._to_gpus(index)
        self.index = index
        self._set_search_parameters(names)
        for start, block in features.blocks(BLOCK_ROWS):
            x = self._prepare(block)
            if self.gpu:  # explicit ids: IndexShards spreads each block over the GPUs
                index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
            else:
                index.add(x)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def _prepare(self, x):
        return np.ascontiguousarray(prepare_features(x, self.options.metric).numpy())

    def train_rows(self, index, rows):
        """Size of the training sample: TEST.FAISS.TRAIN_SIZE, or (0) AUTO_TRAIN_PER_LIST points
        per IVF list, at least MIN_AUTO_TRAIN; never more than the gallery."""
        if self.options.train_size:
            return min(self.options.train_size, rows)
        ivf = _import_faiss().try_extract_index_ivf(index)
        lists = ivf.nlist if ivf is not None else 0
        return min(rows, max(AUTO_TRAIN_PER_LIST * lists, MIN_AUTO_TRAIN))

    def _train(self, index, rows):
        size = self.train_rows(index, rows)
        rng = np.random.default_rng(self.options.seed)
        sample = np.sort(rng.choice(rows, size=size, replace=False))
        x = self._prepare(self.features.take(sample))
        start = time.perf_counter()
        try:
            index.train(x)
        except RuntimeError as e:
            raise ConfigError(f"TEST.FAISS.INDEX {self.options.spec!r} cannot be trained on {size} "
                              f"rows (gallery {rows}, TEST.FAISS.TRAIN_SIZE "
                              f"{self.options.train_size}): {_faiss_message(e)}") from None
        return time.perf_counter() - start

    def _to_gpus(self, cpu_index):
        """The trained index as ``faiss.IndexShards`` over every visible GPU, or ``cpu_index``
        (with one log line saying why) when that is not possible."""
        faiss = _import_faiss()
        if not faiss_gpu_available():
            logger.info("TEST.FAISS.USE_GPU: faiss-gpu or a GPU is missing; %r runs on CPU",
                        self.options.spec)
            return cpu_index
        if faiss.try_extract_index_ivf(cpu_index) is None:
            logger.info("TEST.FAISS.USE_GPU: faiss has no GPU version of %r; it runs on CPU",
                        self.options.spec)
            return cpu_index
        # The copies use these resources: they live as long as this object (faiss's SWIG objects
        # take no extra attributes).
        copies, self._gpu_resources = _gpu_copies(cpu_index)
        shards = faiss.IndexShards(cpu_index.d, True, False)  # threaded, ids given at add
        for copy in copies:
            shards.add_shard(copy)
        self.gpu = True
        logger.info("%r sharded over %d GPU(s)", self.options.spec, len(copies))
        return shards

    def _set_search_parameters(self, names):
        faiss = _import_faiss()
        settings = []
        if "nprobe" in names:
            settings.append(f"nprobe={self.options.nprobe}")
        if "efSearch" in names:
            settings.append(f"efSearch={self.options.ef_search}")
        if settings:
            space = faiss.GpuParameterSpace() if self.gpu else faiss.ParameterSpace()
            space.set_index_parameters(self.index, ",".join(settings))

    def search(self, queries, k: int):
        o = self.options
        q = self._prepare(queries)
        want = max(k, o.shortlist)
        dist, idx = self.index.search(q, want)
        dist = dist.astype(np.float32, copy=False)
        dist[idx < 0] = np.inf
        if o.shortlist:
            dist, idx = self._rerank(q, idx)
        elif o.metric == "cosine":
            dist = dist / 2  # |q - g|^2 / 2 = 1 - cos on unit vectors
        return _pad(dist[:, :k], idx[:, :k], k)

    @torch.no_grad()
    def _rerank(self, q, idx, chunk: int = 256):
        """Exact distances of each query to its shortlist, re-sorted (missing entries last)."""
        out_d = np.empty(idx.shape, np.float32)
        out_i = np.empty_like(idx)
        for s in range(0, len(q), chunk):
            cand = idx[s:s + chunk]
            rows = self._prepare(self.features.take(np.maximum(cand, 0)).reshape(-1, q.shape[1]))
            rows = torch.from_numpy(rows).view(*cand.shape, q.shape[1])
            d = candidate_distances(torch.from_numpy(q[s:s + chunk]), rows, self.options.metric)
            d[torch.from_numpy(cand < 0)] = float("inf")
            d, order = torch.sort(d, dim=1, stable=True)
            out_d[s:s + chunk] = d.numpy()
            out_i[s:s + chunk] = np.take_along_axis(cand, order.numpy(), axis=1)
        return out_d, out_i


def _gpu_copies(cpu_index):
    """``(copies, resources)``: the trained ``cpu_index`` copied onto every visible GPU."""
    faiss = _import_faiss()
    options = faiss.GpuClonerOptions()
    # GPU IVF-PQ keeps float32 lookup tables only up to 48 sub-quantizers; float16 above.
    options.useFloat16 = True
    resources = [faiss.StandardGpuResources() for _ in range(faiss.get_num_gpus())]
    return [faiss.index_cpu_to_gpu(res, gpu, cpu_index, options)
            for gpu, res in enumerate(resources)], resources


def _skip_polysemous_training(index):
    """index_factory turns on polysemous training for 8-bit PQ (codes ordered for Hamming
    filtering, which plain search never uses); it made training a 20k x 64 IVF-PQ 100 s instead
    of 0.2 s here (measured)."""
    faiss = _import_faiss()
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False


def _faiss_message(error):
    """faiss's exception text without its C++ file/line preamble."""
    text = str(error).strip().splitlines()[0]
    # "Error in <function> at <file>:<line>: [Error: 'cond' failed: ]why"
    for marker in ("failed: ", "Error: ", ": "):
        if marker in text:
            return text.rsplit(marker, 1)[1].strip()
    return text

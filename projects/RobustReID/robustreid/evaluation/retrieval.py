"""Exact (brute-force) retrieval: query x gallery distances, streamed over query chunks.

Distances follow fastreid's ``build_dist`` conventions so that every number matches its evaluator:

* ``"euclidean"``: SQUARED L2, ``|q|^2 + |g|^2 - 2 q.g`` (no sqrt, no clamping at 0);
* ``"cosine"``:    ``1 - cos(q, g)`` on L2-normalised features (``F.normalize``, eps 1e-12).

Back-ends (``backend=``):

* ``"faiss-gpu"``: faiss' GPU brute force (``pairwise_distance_gpu``, ``GpuIndexFlat*``); chosen by
  ``"auto"`` when ``use_gpu`` is set, faiss was built with GPU support and a GPU is visible.
* ``"torch"``: dense scoring with torch (CUDA when ``use_gpu`` and available, else CPU).  This is the
  CPU default because faiss' only full-row API on CPU (``faiss.pairwise_distances``) is a plain
  numpy/OpenBLAS product, about 2x slower than torch's MKL GEMM here, and torch performs the very
  same arithmetic as ``build_dist``.
* ``"faiss"``: faiss-cpu for everything (kept for comparison and for environments without MKL).

k-nearest-neighbour searches (:meth:`ExactRetriever.search`, used by re-ranking) always go through a
faiss flat index (GPU when available and requested, else CPU), which never materialises a full row.
"""
import logging
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

METRICS = ("euclidean", "cosine")
BACKENDS = ("auto", "torch", "faiss", "faiss-gpu")


def _import_faiss():
    # Lazy: importing faiss pulls in OpenMP/BLAS; callers that only use torch scoring never pay.
    import faiss

    return faiss


def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    try:
        faiss = _import_faiss()
    except ImportError:
        return False
    if not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return faiss.get_num_gpus() > 0
    except Exception:  # faiss-gpu built for a driver that is not there
        return False


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"Unsupported retrieval metric {metric!r}; expected one of {METRICS}")
    return metric


def to_float_tensor(x) -> torch.Tensor:
    """A contiguous float32 CPU tensor view/copy of a tensor or array (no grad)."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    else:
        t = torch.as_tensor(x).detach().to("cpu", torch.float32)
    return t.contiguous()


def prepare_features(x, metric: str) -> torch.Tensor:
    """Features as the metric sees them: L2-normalised for cosine (exactly as ``build_dist``)."""
    t = to_float_tensor(x)
    if check_metric(metric) == "cosine":
        t = F.normalize(t, p=2, dim=1)
    return t.contiguous()


def resolve_backend(backend: str = "auto", use_gpu: bool = False) -> Tuple[str, torch.device]:
    """Pick the concrete back-end and the device scores are produced on."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown retrieval backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if use_gpu and faiss_gpu_available():
            backend = "faiss-gpu"
        else:
            backend = "torch"
    if backend == "faiss-gpu" and not faiss_gpu_available():
        logger.warning("faiss-gpu requested but unavailable; falling back to faiss-cpu")
        backend = "faiss"
    cuda = backend == "torch" and use_gpu and torch.cuda.is_available()
    return backend, torch.device("cuda" if cuda else "cpu")


class ExactRetriever:
    """Exact distances from queries to a fixed gallery, one query chunk at a time.

    The gallery is prepared once (normalised for cosine, squared norms cached for euclidean);
    :meth:`iter_distances` then yields ``(start, stop, dist)`` blocks of ``chunk_size`` query rows,
    so peak memory is ``chunk_size x num_gallery`` floats instead of the full matrix.
    """

    def __init__(self, gallery, metric: str = "cosine", use_gpu: bool = False, backend: str = "auto"):
        self.metric = check_metric(metric)
        self.backend, self.device = resolve_backend(backend, use_gpu)
        self.gallery = prepare_features(gallery, metric)
        self._gallery_dev = self.gallery.to(self.device) if self.backend == "torch" else None
        self._gallery_np = None  # numpy view for faiss, made on first use
        self._gallery_sqnorm = None
        self._gpu_res = None

    # --- helpers ---------------------------------------------------------------------------------
    @property
    def num_gallery(self) -> int:
        return self.gallery.shape[0]

    def _np_gallery(self) -> np.ndarray:
        if self._gallery_np is None:
            self._gallery_np = self.gallery.numpy()
        return self._gallery_np

    def _faiss_gpu_resources(self):
        if self._gpu_res is None:
            self._gpu_res = _import_faiss().StandardGpuResources()
        return self._gpu_res

    def _faiss_metric(self):
        faiss = _import_faiss()
        return faiss.METRIC_L2 if self.metric == "euclidean" else faiss.METRIC_INNER_PRODUCT

    # --- dense scoring ---------------------------------------------------------------------------
    @torch.no_grad()
    def distances(self, query, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Distances of (already prepared) query rows to the whole gallery, shape ``(n, G)``.

        ``query`` must come from :func:`prepare_features` with the same metric (or a slice of it).
        ``out`` (torch back-end only) is a buffer of at least ``n`` rows to write into; writing into
        a reused buffer avoids page-faulting a fresh ``n x G`` block for every chunk, which costs
        about as much as a quarter of the GEMM itself.  The result may be modified by the caller.
        """
        if self.backend == "torch":
            q = query.to(self.device)
            g = self._gallery_dev
            n = q.shape[0]
            if out is None:
                out = torch.empty((n, self.num_gallery), dtype=torch.float32, device=self.device)
            out = out[:n]
            if self.metric == "euclidean":
                if self._gallery_sqnorm is None:
                    self._gallery_sqnorm = g.pow(2).sum(dim=1)
                # Same expression and GEMM call as fastreid's compute_euclidean_distance.
                torch.add(q.pow(2).sum(dim=1, keepdim=True), self._gallery_sqnorm.unsqueeze(0), out=out)
                return out.addmm_(q, g.t(), beta=1, alpha=-2)
            torch.mm(q, g.t(), out=out)
            if out.device.type == "cpu":
                # numpy's in-place 1 - x is several times faster than torch's CPU kernel; same value.
                np.subtract(np.float32(1.0), out.numpy(), out=out.numpy())
                return out
            return out.neg_().add_(1.0)

        q = np.ascontiguousarray(query.numpy(), dtype=np.float32)
        faiss = _import_faiss()
        if self.backend == "faiss-gpu":
            res = faiss.pairwise_distance_gpu(self._faiss_gpu_resources(), q, self._np_gallery(),
                                              metric=self._faiss_metric())
        else:
            res = faiss.pairwise_distances(q, self._np_gallery(), metric=self._faiss_metric())
        dist = torch.from_numpy(np.ascontiguousarray(res, dtype=np.float32))
        if self.metric == "cosine":
            np.subtract(np.float32(1.0), dist.numpy(), out=dist.numpy())
        return dist

    def iter_distances(self, query, chunk_size: int = 1024) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """Yield ``(start, stop, dist[start:stop])`` over the queries in chunks of ``chunk_size``.

        The yielded block lives in a buffer that the NEXT iteration overwrites: consume (or copy)
        it before advancing.
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        q = prepare_features(query, self.metric)
        buffer = None
        if self.backend == "torch":
            rows = min(chunk_size, q.shape[0])
            buffer = torch.empty((rows, self.num_gallery), dtype=torch.float32, device=self.device)
        for start in range(0, q.shape[0], chunk_size):
            stop = min(start + chunk_size, q.shape[0])
            yield start, stop, self.distances(q[start:stop], out=buffer)

    def full_distances(self, query, chunk_size: int = 1024) -> np.ndarray:
        """The whole ``(num_query, num_gallery)`` float32 matrix (materialised: O(q x g) memory)."""
        q = prepare_features(query, self.metric)
        out = np.empty((q.shape[0], self.num_gallery), dtype=np.float32)
        for start, stop, dist in self.iter_distances(q, chunk_size):
            out[start:stop] = dist.cpu().numpy()
        return out

    # --- k-NN search -----------------------------------------------------------------------------
    def search(self, query, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` gallery neighbours of each query with a faiss flat index.

        Returns ``(dist, index)`` numpy arrays of shape ``(n, k)``, nearest first, distances in this
        retriever's convention (squared L2, or ``1 - cos``).
        """
        faiss = _import_faiss()
        k = int(min(k, self.num_gallery))
        q = np.ascontiguousarray(prepare_features(query, self.metric).numpy(), dtype=np.float32)
        dim = self.gallery.shape[1]
        index = faiss.IndexFlatL2(dim) if self.metric == "euclidean" else faiss.IndexFlatIP(dim)
        if self.backend == "faiss-gpu" or (self.device.type == "cuda" and faiss_gpu_available()):
            index = faiss.index_cpu_to_gpu(self._faiss_gpu_resources(), 0, index)
        index.add(self._np_gallery())
        dist, idx = index.search(q, k)
        if self.metric == "cosine":
            dist = 1.0 - dist
        return dist, idx


def knn(features, k: int, metric: str = "euclidean", use_gpu: bool = False,
        queries: Optional[object] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of ``queries`` (default: ``features`` themselves) among ``features`` via faiss."""
    retriever = ExactRetriever(features, metric=metric, use_gpu=use_gpu)
    return retriever.search(features if queries is None else queries, k)


def candidate_distances(query: torch.Tensor, candidates: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances of each prepared query row ``(n, d)`` to its own prepared candidate rows
    ``(n, c, d)``, shape ``(n, c)``, in this module's convention (the re-ranking of an approximate
    index's shortlist, which must order candidates exactly as the exact path would)."""
    dots = torch.bmm(candidates, query.unsqueeze(2)).squeeze(2)
    if check_metric(metric) == "cosine":
        return 1.0 - dots
    return query.pow(2).sum(dim=1, keepdim=True) + candidates.pow(2).sum(dim=2) - 2.0 * dots

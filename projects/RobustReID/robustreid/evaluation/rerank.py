"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) that runs on CPU (faiss-cpu) or GPU (faiss-gpu).

Same formulation and parameters as fastreid's ``TEST.RERANK`` path
(``build_dist(..., metric="jaccard")`` -> ``compute_jaccard_distance(features, k1, k2)``), which only
runs with faiss-gpu and CUDA tensors and holds several dense N x N matrices (N = queries + gallery):

1. ``R`` = the ``k1`` exact nearest neighbours of every sample among all N (squared L2 on the given
   features, the sample itself included; fastreid searches ``k1`` and then slices ``[:k1 + 1]``, so
   ``k1`` neighbours are used, and we do the same);
2. k-reciprocal set ``K(i) = {j in R_k1(i) : i in R_k1(j)}``; every ``c in K(i)`` whose half set
   ``K_half(c)`` (``round(k1 / 2) + 1`` neighbours, numpy rounding) shares more than 2/3 of its
   members with ``K(i)`` adds ``K_half(c)`` to the expanded set ``E(i)``;
3. ``V[i, E(i)] = softmax(-squared_L2(x_i, x_E(i)))``; then, if ``k2 != 1``, local query expansion
   ``V[i] = mean(V[R_k2(i)])``;
4. ``jaccard(i, j) = 1 - s / (2 - s)`` with ``s = sum_k min(V[i, k], V[j, k])``, clipped at 0.

The evaluator then uses ``jaccard * (1 - lambda) + original_dist * lambda``.

Here ``V`` is a scipy sparse matrix (a few dozen non-zeros per row) and the min-sum is evaluated by an
inverted index over ``V``'s columns, chunk by chunk of queries, so memory is O(N k1^2) plus the
``num_query x num_gallery`` output, which re-ranking needs anyway (it is what gets ranked).
"""
import logging

import numpy as np
import scipy.sparse as sp
import torch

from .retrieval import ExactRetriever, to_float_tensor

logger = logging.getLogger(__name__)

__all__ = ["k_reciprocal_jaccard", "rerank_distance"]


def _reciprocal_members(initial_rank: np.ndarray, width: int, row_chunk: int = 8192) -> np.ndarray:
    """``(N, width)`` neighbour ids that are mutual within the first ``width`` neighbours, else -1."""
    forward = initial_rank[:, :width]
    out = np.full(forward.shape, -1, dtype=np.int64)
    for start in range(0, len(forward), row_chunk):
        rows = np.arange(start, min(start + row_chunk, len(forward)))
        backward = forward[forward[rows]]  # (c, width, width): neighbours of each neighbour
        mutual = (backward == rows[:, None, None]).any(axis=2)
        out[rows] = np.where(mutual, forward[rows], -1)
    return out


def _expanded_sets(initial_rank: np.ndarray, k1: int, row_chunk: int = 2048):
    """Rows/cols of the expanded k-reciprocal sets E(i), deduplicated and sorted by (row, col)."""
    num = len(initial_rank)
    available = initial_rank.shape[1]
    k_full = _reciprocal_members(initial_rank, min(k1 + 1, available))
    k_half = _reciprocal_members(initial_rank, min(int(np.around(k1 / 2.0)) + 1, available))
    half_len = (k_half >= 0).sum(axis=1)
    half = np.where(k_half >= 0, k_half, -2)  # -2: never equal to an id or to K's -1 padding

    keys = []
    for start in range(0, num, row_chunk):
        rows = np.arange(start, min(start + row_chunk, num))
        kc = k_full[rows]                                  # (c, w1)  K(i)
        hc = np.where((kc >= 0)[:, :, None], half[np.maximum(kc, 0)], -2)  # (c, w1, wh)
        shared = (hc[:, :, :, None] == kc[:, None, None, :]).any(axis=3).sum(axis=2)
        hlen = np.where(kc >= 0, half_len[np.maximum(kc, 0)], 0)
        accept = (kc >= 0) & (shared > 2.0 / 3 * hlen)
        added = np.where(accept[:, :, None], hc, -1).reshape(len(rows), -1)
        members = np.concatenate([kc, added], axis=1)
        r, c = np.nonzero(members >= 0)
        keys.append(rows[r].astype(np.int64) * num + members[r, c])
    keys = np.unique(np.concatenate(keys))
    return keys // num, keys % num


def _row_softmax_weights(features: torch.Tensor, rows: np.ndarray, cols: np.ndarray,
                         pair_chunk: int = 1 << 16) -> np.ndarray:
    """``softmax_j(-|x_i - x_j|^2)`` over each row's pairs (pairs sorted by row), float32."""
    sqnorm = features.pow(2).sum(dim=1)
    dist = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), pair_chunk):
        r = torch.from_numpy(rows[start:start + pair_chunk])
        c = torch.from_numpy(cols[start:start + pair_chunk])
        dot = (features[r] * features[c]).sum(dim=1)
        # Same expansion as fastreid (|x|^2 + |y|^2 - 2 x.y), not (x - y)^2, to match its numbers.
        dist[start:start + pair_chunk] = (sqnorm[r] + sqnorm[c] - 2 * dot).numpy()
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # first pair of each non-empty row
    logits = -dist
    row_max = np.maximum.reduceat(logits, starts)
    counts = np.diff(np.r_[starts, len(rows)])
    expo = np.exp(logits - np.repeat(row_max, counts))
    return (expo / np.repeat(np.add.reduceat(expo, starts), counts)).astype(np.float32)


def _minimum_overlap(v_query: sp.csr_matrix, v_gallery_csc: sp.csc_matrix,
                     pair_budget: int = 1 << 24) -> np.ndarray:
    """``s[i, j] = sum_k min(Vq[i, k], Vg[j, k])`` via an inverted index over V's columns.

    Only columns where both rows are non-zero contribute (V >= 0), so every (query entry, gallery
    entry) pair sharing a column is enumerated, in query chunks of at most ``pair_budget`` pairs.
    """
    num_q, num_g = v_query.shape[0], v_gallery_csc.shape[0]
    col_start = v_gallery_csc.indptr[:-1]
    col_count = np.diff(v_gallery_csc.indptr)
    # Pairs each query row will generate, to cut the query rows into bounded chunks.
    pairs_per_query = np.asarray(v_query.astype(bool).astype(np.int64) @ col_count).ravel()
    out = np.empty((num_q, num_g), dtype=np.float32)
    start = 0
    while start < num_q:
        cum = np.cumsum(pairs_per_query[start:])
        stop = start + max(1, int(np.searchsorted(cum, pair_budget, side="right")))
        block = v_query[start:stop].tocoo()
        cnt = col_count[block.col]
        total = int(cnt.sum())
        q_local = np.repeat(block.row.astype(np.int64), cnt)
        q_val = np.repeat(block.data, cnt)
        # Position of each pair's gallery entry inside the CSC arrays ("ragged arange").
        offsets = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt) + np.repeat(
            col_start[block.col], cnt)
        g_rows = v_gallery_csc.indices[offsets]
        mins = np.minimum(q_val, v_gallery_csc.data[offsets])
        acc = np.bincount(q_local * num_g + g_rows, weights=mins, minlength=(stop - start) * num_g)
        out[start:stop] = acc.reshape(stop - start, num_g)
        start = stop
    return out


@torch.no_grad()
def k_reciprocal_jaccard(query_feats, gallery_feats, k1: int = 20, k2: int = 6,
                         use_gpu: bool = False) -> np.ndarray:
    """Jaccard distance of k-reciprocal encodings, ``(num_query, num_gallery)`` float32.

    Features are used as given (normalise them first for the cosine metric, as fastreid does).
    Equals ``fastreid.utils.compute_dist.compute_jaccard_distance(cat(q, g), k1, k2)[:q, q:]``.
    """
    query = to_float_tensor(query_feats)
    gallery = to_float_tensor(gallery_feats)
    num_q = query.shape[0]
    features = torch.cat([query, gallery], dim=0).contiguous()
    num = features.shape[0]

    retriever = ExactRetriever(features, metric="euclidean", use_gpu=use_gpu)
    _, initial_rank = retriever.search(features, k1)  # (N, k1), self first

    rows, cols = _expanded_sets(initial_rank, k1)
    weights = _row_softmax_weights(features, rows, cols)
    v = sp.csr_matrix((weights, (rows, cols)), shape=(num, num), dtype=np.float32)

    if k2 != 1:
        # Local query expansion: average the encodings of the k2 nearest neighbours.
        width = min(k2, initial_rank.shape[1])
        qe_rows = np.repeat(np.arange(num), width)
        qe = sp.csr_matrix((np.ones(num * width, np.float32), (qe_rows, initial_rank[:, :width].ravel())),
                           shape=(num, num))
        v = (qe @ v).tocsr()
        v.data /= np.float32(width)

    overlap = _minimum_overlap(v[:num_q], v[num_q:].tocsc())
    jaccard = 1.0 - overlap / (2.0 - overlap)
    np.maximum(jaccard, 0.0, out=jaccard)
    return jaccard.astype(np.float32, copy=False)


def rerank_distance(query_feats, gallery_feats, dist: np.ndarray, k1: int = 20, k2: int = 6,
                    lambda_value: float = 0.3, use_gpu: bool = False) -> np.ndarray:
    """fastreid's re-ranked distance ``jaccard * (1 - lambda) + dist * lambda`` (materialises q x g)."""
    jaccard = k_reciprocal_jaccard(query_feats, gallery_feats, k1=k1, k2=k2, use_gpu=use_gpu)
    return jaccard * (1 - lambda_value) + np.asarray(dist) * lambda_value

"""Exact CMC / mAP / mINP with fastreid's Market-1501 protocol, streamed over query chunks.

Protocol (fastreid ``eval_market1501``): for each query, gallery items with the same pid AND the same
camid are ignored ("junk"); the remaining same-pid items are the positives; queries without a
positive are skipped; at least one query must be valid.  All three metrics only need the rank of
every positive among the kept gallery items:

* rank of the k-th best positive ``r_k = k + #{negatives closer than it}``;
* ``AP = mean_k k / r_k``, ``INP = P / r_P``, and the CMC curve is a step at ``r_1``.

So instead of argsorting each gallery row (what fastreid does), per chunk of queries we

1. set the query's same-pid gallery columns to +inf (they are never "negatives in front");
2. keep only the entries closer than the query's farthest positive ("candidates": a small fraction
   of the row for any reasonable model);
3. bucket every candidate between the query's sorted positive distances with ONE flat
   ``searchsorted`` (rows are folded into order-preserving int64 keys), and histogram the buckets
   (``bincount``) to get, for every positive, how many negatives precede it.

When candidates are dense (more than ``DENSE_FRACTION`` of the chunk: weak or adversarially attacked
features, where the last positive sits deep in the list), step 3 switches to a SIMD value sort of the
chunk's rows plus a batched search of the positive distances, which is ~10x cheaper than bucketing
every entry there (values only, no argsort/gather).  Both paths give identical results.

Ties between a positive and a negative are detected exactly (odd buckets of an interleaved
``[p_k, next_float(p_k))`` sequence); the few rows that have one are re-done with ``np.argsort`` on
the row, i.e. fastreid's own ordering, so ties are broken as fastreid breaks them for the same
distance values.  Everything else is vectorised over the chunk (no Python loop over queries).
"""
import logging
from dataclasses import dataclass

import numpy as np
import torch

from .retrieval import ExactRetriever

logger = logging.getLogger(__name__)

_INF = float("inf")
# Above this fraction of candidate entries in a chunk, rows are value-sorted instead of bucketed.
DENSE_FRACTION = 0.05


@dataclass
class _SamePidIndex:
    """Gallery items grouped by pid, to find every query's same-pid items without a q x g mask."""

    g_pids: np.ndarray
    g_camids: np.ndarray
    order: np.ndarray   # gallery indices sorted by pid (stable)
    pids: np.ndarray    # unique gallery pids (sorted)
    starts: np.ndarray  # first position of each pid in ``order``
    counts: np.ndarray  # number of gallery items per pid

    @classmethod
    def build(cls, g_pids, g_camids) -> "_SamePidIndex":
        g_pids = np.asarray(g_pids).astype(np.int64, copy=False).ravel()
        g_camids = np.asarray(g_camids).astype(np.int64, copy=False).ravel()
        order = np.argsort(g_pids, kind="stable")
        pids, starts, counts = np.unique(g_pids[order], return_index=True, return_counts=True)
        return cls(g_pids, g_camids, order, pids, starts, counts)

    def same_pid_items(self, q_pids: np.ndarray, q_camids: np.ndarray):
        """Padded ``(n, M)`` gallery indices of each query's same-pid items and their masks.

        Returns ``(index, present, positive)``: ``present`` marks real (non-padding) entries,
        ``positive`` the present ones from another camera.  Padding repeats a real same-pid item of
        the row (or gallery item 0 for rows without one, which are invalid queries anyway), so the
        index can be used for in-place scatters without touching other columns.
        """
        n = len(q_pids)
        if len(self.pids) == 0:
            slot, found = np.zeros(n, np.int64), np.zeros(n, bool)
        else:
            slot = np.minimum(np.searchsorted(self.pids, q_pids), len(self.pids) - 1)
            found = self.pids[slot] == q_pids
        count = np.where(found, self.counts[slot] if len(self.pids) else 0, 0)
        width = max(int(count.max()) if n else 0, 1)
        col = np.arange(width)
        present = col[None, :] < count[:, None]
        # Padding points at the row's first item (column 0) so it scatters onto an already-masked column.
        pos_in_order = self.starts[slot][:, None] + np.where(present, col[None, :], 0)
        index = np.where(found[:, None], self.order[np.minimum(pos_in_order, len(self.order) - 1)], 0)
        positive = present & (self.g_camids[index] != q_camids[:, None])
        return index, present, positive


def _sortable_keys(x: np.ndarray) -> np.ndarray:
    """Map float32 values to int64 keys in [0, 2^32) with the same order (and the same ties).

    Negative floats have their magnitude bits flipped so that integer order equals float order;
    ``+ 0.0`` turns -0.0 into +0.0 so both zeros share a key, as they compare equal.
    """
    bits = (np.asarray(x, dtype=np.float32) + np.float32(0.0)).view(np.int32).astype(np.int64)
    return np.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)


def _count_sparse(dist: np.ndarray, candidates: np.ndarray, pos_sorted: np.ndarray):
    """#{negatives < p_k} per row and tie flags, touching only the candidate entries.

    Every candidate is bucketed between its row's sorted positive distances with ONE flat
    ``searchsorted`` ((row, value) pairs folded into monotone int64 keys), then histogrammed.
    """
    n, num_g = dist.shape
    width = pos_sorted.shape[1]
    # Interleaved thresholds s = [p_1, e_1, p_2, e_2, ...] with e_k = min(nextafter(p_k), p_{k+1}):
    # bucket b = #{s <= d} is odd exactly when d == some p_k, and d < p_k  <=>  b <= 2k - 2.
    nxt = np.concatenate([pos_sorted[:, 1:], np.full((n, 1), _INF, np.float32)], axis=1)
    upper = np.minimum(np.nextafter(pos_sorted, np.float32(_INF)), nxt)
    thresholds = np.stack([pos_sorted, upper], axis=2).reshape(n, 2 * width)
    seq = 2 * width

    flat = np.flatnonzero(candidates)  # row-major: grouped by row
    rows = flat // num_g
    row_base = np.arange(n, dtype=np.int64) << 32
    thr_keys = (_sortable_keys(thresholds) + row_base[:, None]).reshape(-1)
    cand_keys = _sortable_keys(dist.reshape(-1)[flat]) + row_base[rows]
    bucket = np.searchsorted(thr_keys, cand_keys, side="right") - rows * seq
    hist = np.bincount(rows * (seq + 1) + bucket, minlength=n * (seq + 1)).reshape(n, seq + 1)

    tie_rows = hist[:, 1::2].sum(axis=1) > 0
    negatives_before = np.cumsum(hist, axis=1)[:, 0::2][:, :width]  # column k-1: #{neg < p_k}
    return negatives_before, tie_rows


def _count_dense(dist: np.ndarray, pos_sorted: np.ndarray, num_pos: np.ndarray):
    """Same result as :func:`_count_sparse` for chunks where most entries are candidates.

    When most of each row lies in front of the last positive (weak or attacked models), bucketing
    every entry costs ~60 ns each, whereas numpy's SIMD (AVX-512) value sort of the rows followed
    by a batched search of the few positive distances is ~10x cheaper.  Values only: no argsort.
    """
    rows_sorted = torch.from_numpy(np.sort(dist, axis=1))  # same-pid columns (+inf) sort last
    thresholds = torch.from_numpy(np.ascontiguousarray(pos_sorted))
    before = torch.searchsorted(rows_sorted, thresholds, right=False).numpy()   # #{neg <  p_k}
    upto = torch.searchsorted(rows_sorted, thresholds, right=True).numpy()      # #{neg <= p_k}
    real = np.arange(pos_sorted.shape[1])[None, :] < num_pos[:, None]
    tie_rows = ((upto > before) & real).any(axis=1)
    return before, tie_rows


def _positive_ranks(dist: np.ndarray, same_index: np.ndarray, positive: np.ndarray,
                    dense_fraction: float = DENSE_FRACTION):
    """Ranks (1-based, among kept gallery items) of each query's positives, best first.

    ``dist``: float32 ``(n, G)`` rows, modified in place; ``same_index``/``positive`` from
    :meth:`_SamePidIndex.same_pid_items`.  Returns ``(ranks (n, Pm), num_pos (n,), tie_rows (n,),
    same_dist (n, M))``; ``ranks[i, k]`` is meaningful for ``k < num_pos[i]``.  Rows flagged in
    ``tie_rows`` have a negative at exactly the distance of a positive.

    numpy rather than torch on purpose: these are single-pass, memory-bound element-wise ops where
    numpy's SIMD loops are several times faster than torch's CPU kernels.
    """
    n = dist.shape[0]
    same_dist = np.take_along_axis(dist, same_index, axis=1)
    num_pos = positive.sum(axis=1)
    width = max(int(num_pos.max()), 1)
    pos_sorted = np.sort(np.where(positive, same_dist, np.float32(_INF)), axis=1)[:, :width]

    # Same-pid columns (positives and junk) can never be a negative in front of a positive.
    np.put_along_axis(dist, same_index, np.float32(_INF), axis=1)

    # Candidates: entries not farther than the query's farthest positive (none for invalid rows).
    far = pos_sorted[np.arange(n), np.maximum(num_pos - 1, 0)]
    far[num_pos == 0] = -_INF
    candidates = dist <= far[:, None]
    if np.count_nonzero(candidates) > dense_fraction * candidates.size:
        negatives_before, tie_rows = _count_dense(dist, pos_sorted, num_pos)
    else:
        negatives_before, tie_rows = _count_sparse(dist, candidates, pos_sorted)
    ranks = negatives_before + np.arange(1, width + 1)
    return ranks, num_pos, tie_rows, same_dist


def _ranks_by_argsort(row: np.ndarray, g_pids: np.ndarray, g_camids: np.ndarray, q_pid, q_camid):
    """Ranks of the positives exactly as fastreid's eval_market1501 orders the row (for ties)."""
    order = np.argsort(row, axis=-1)
    keep = ~((g_pids[order] == q_pid) & (g_camids[order] == q_camid))
    matches = g_pids[order][keep] == q_pid
    return np.flatnonzero(matches) + 1


class RankAccumulator:
    """Collects per-query positive ranks chunk by chunk and turns them into fastreid's outputs."""

    def __init__(self, q_pids, q_camids, g_pids, g_camids, max_rank: int = 50,
                 dense_fraction: float = DENSE_FRACTION):
        self.q_pids = np.asarray(q_pids).astype(np.int64, copy=False).ravel()
        self.q_camids = np.asarray(q_camids).astype(np.int64, copy=False).ravel()
        self.index = _SamePidIndex.build(g_pids, g_camids)
        num_g = len(self.index.g_pids)
        if num_g == 0:
            raise ValueError("The gallery is empty")
        if num_g < max_rank:
            # Same clamp (and note) as fastreid.
            max_rank = num_g
            print("Note: number of gallery samples is quite small, got {}".format(num_g))
        self.max_rank = max_rank
        self.dense_fraction = dense_fraction
        # Per chunk, for its valid queries in query order: first-positive rank, AP, INP.
        self._first, self._ap, self._inp = [], [], []

    def add_chunk(self, start: int, dist) -> int:
        """Score queries ``start : start + len(dist)`` from their distance rows.

        ``dist`` (numpy or torch, any device) is converted to a float32 numpy array that is MODIFIED
        in place (pass a copy if you need it).  Returns the number of rows that had exact ties.
        """
        if isinstance(dist, torch.Tensor):
            dist = dist.detach().cpu().numpy()
        dist = np.asarray(dist, dtype=np.float32)
        stop = start + dist.shape[0]
        q_pids, q_camids = self.q_pids[start:stop], self.q_camids[start:stop]
        same_index, _, positive = self.index.same_pid_items(q_pids, q_camids)

        ranks, num_pos, tie_rows, same_dist = _positive_ranks(dist, same_index, positive,
                                                              self.dense_fraction)
        ranks = ranks.astype(np.float64)
        valid = num_pos > 0
        tie_rows &= valid

        # Vectorised metrics for the whole chunk: AP = mean_k k / r_k, INP = P / r_P, first hit r_1.
        k = np.arange(1, ranks.shape[1] + 1)
        in_row = k[None, :] <= num_pos[:, None]
        safe_pos = np.maximum(num_pos, 1)
        ap = np.where(in_row, k[None, :] / ranks, 0.0).sum(axis=1) / safe_pos
        inp = safe_pos / ranks[np.arange(len(ranks)), safe_pos - 1]
        first = ranks[:, 0].astype(np.int64)

        for i in np.flatnonzero(tie_rows):  # rare: only rows with exact distance ties
            row = dist[i].copy()
            row[same_index[i]] = same_dist[i]  # undo the +inf masking of the same-pid columns
            pos_ranks = _ranks_by_argsort(row, self.index.g_pids, self.index.g_camids,
                                          q_pids[i], q_camids[i]).astype(np.float64)
            p = len(pos_ranks)
            ap[i] = np.sum(np.arange(1, p + 1) / pos_ranks) / p
            inp[i] = p / pos_ranks[-1]
            first[i] = int(pos_ranks[0])

        self._first.append(first[valid])
        self._ap.append(ap[valid])
        self._inp.append(inp[valid])
        return int(tie_rows.sum())

    def result(self):
        """``(cmc[:max_rank] float32, all_AP, all_INP)`` like fastreid's ``evaluate_rank``."""
        first = np.concatenate(self._first) if self._first else np.zeros(0, np.int64)
        return _cmc(first, self.max_rank), np.concatenate(self._ap), np.concatenate(self._inp)


def _cmc(first, max_rank):
    """CMC[:max_rank] (float32) from the valid queries' first-positive ranks (1-based)."""
    num_valid = len(first)
    assert num_valid > 0, "Error: all query identities do not appear in gallery"
    hits = np.bincount(np.minimum(first, max_rank + 1) - 1, minlength=max_rank + 1)
    # float32 division of exact counts, as fastreid's float32 cmc sum / num_valid_q.
    return np.cumsum(hits[:max_rank]).astype(np.float32) / np.float32(num_valid)


def evaluate_rank_from_features(query_feats, gallery_feats, q_pids, g_pids, q_camids, g_camids,
                                metric: str = "cosine", max_rank: int = 50, chunk_size: int = 1024,
                                use_gpu: bool = False, backend: str = "auto",
                                dense_fraction: float = DENSE_FRACTION):
    """Exact ``(cmc, all_AP, all_INP)`` from features, never holding the full q x g matrix.

    Same results as ``fastreid.evaluation.rank.evaluate_rank(build_dist(q, g, metric), ...)`` with
    ``use_metric_cuhk03=False``; peak memory is ``chunk_size x num_gallery`` distances.
    """
    retriever = ExactRetriever(gallery_feats, metric=metric, use_gpu=use_gpu, backend=backend)
    acc = RankAccumulator(q_pids, q_camids, g_pids, g_camids, max_rank, dense_fraction)
    ties = 0
    for start, _, dist in retriever.iter_distances(query_feats, chunk_size):
        ties += acc.add_chunk(start, dist)
    if ties:
        logger.info("%d queries had distance ties with a positive; ranked with fastreid's ordering", ties)
    return acc.result()


def evaluate_rank_from_distances(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                                 chunk_size: int = 1024, dense_fraction: float = DENSE_FRACTION):
    """Exact ``(cmc, all_AP, all_INP)`` of a given q x g distance matrix (numpy or torch).

    Drop-in for fastreid's ``evaluate_rank(..., use_metric_cuhk03=False)``.  Distances are compared
    in float32, as fastreid's Cython ranker does.
    """
    if isinstance(distmat, torch.Tensor):
        distmat = distmat.detach().cpu().numpy()
    acc = RankAccumulator(q_pids, q_camids, g_pids, g_camids, max_rank, dense_fraction)
    for start in range(0, distmat.shape[0], chunk_size):
        block = np.array(distmat[start:start + chunk_size], dtype=np.float32)  # own copy: modified
        acc.add_chunk(start, block)
    return acc.result()


def valid_query_mask(q_pids, q_camids, g_pids, g_camids) -> np.ndarray:
    """Boolean mask of the queries the Market-1501 protocol scores (a same-pid gallery item from
    another camera exists).

    ``all_AP`` / ``all_INP`` returned by :func:`evaluate_rank_from_features` and
    :func:`evaluate_rank_from_distances` hold exactly these queries, in query order, so
    ``np.asarray(q_pids)[valid_query_mask(...)]`` labels them (e.g. for per-identity mAP).
    """
    q_pids = np.asarray(q_pids).astype(np.int64, copy=False).ravel()
    q_camids = np.asarray(q_camids).astype(np.int64, copy=False).ravel()
    _, _, positive = _SamePidIndex.build(g_pids, g_camids).same_pid_items(q_pids, q_camids)
    return positive.any(axis=1)


def evaluate_rank_from_topk(topk_index, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50):
    """``(cmc, all_AP, all_INP)`` of ranked lists cut at K (an approximate index's top-K).

    Same protocol as :func:`evaluate_rank_from_features` (junk dropped, positives and valid queries
    counted over the WHOLE gallery), on the list ``topk_index`` (n, K) of gallery indices, nearest
    first, -1 for no result. A positive missing from a query's list is not retrieved: it adds 0 to
    AP (AP@K over all positives, a lower bound of the full AP) and makes INP 0; CMC is exact up to
    the list's length. With K = the gallery size and the exact order, this IS the exact evaluation.
    """
    q_pids = np.asarray(q_pids).astype(np.int64, copy=False).ravel()
    q_camids = np.asarray(q_camids).astype(np.int64, copy=False).ravel()
    index = _SamePidIndex.build(g_pids, g_camids)
    num_g = len(index.g_pids)
    if num_g < max_rank:  # same clamp as fastreid / RankAccumulator
        max_rank = num_g
    _, _, positive = index.same_pid_items(q_pids, q_camids)
    num_pos = positive.sum(axis=1)
    valid = num_pos > 0

    listed = np.asarray(topk_index, dtype=np.int64)
    present = listed >= 0
    item = np.where(present, listed, 0)
    same_pid = present & (index.g_pids[item] == q_pids[:, None])
    kept = present & ~(same_pid & (index.g_camids[item] == q_camids[:, None]))
    rank = np.cumsum(kept, axis=1)  # 1-based rank among the kept entries
    hit = same_pid & kept
    hits_so_far = np.cumsum(hit, axis=1)
    safe_pos = np.maximum(num_pos, 1)
    ap = np.where(hit, hits_so_far / np.maximum(rank, 1), 0.0).sum(axis=1) / safe_pos
    found = hits_so_far[:, -1] if listed.shape[1] else np.zeros(len(listed), np.int64)
    last = np.where(hit, rank, 0).max(axis=1, initial=0)
    inp = np.where(found == num_pos, safe_pos / np.maximum(last, 1), 0.0)
    first = np.where(hit.any(axis=1), np.where(hit, rank, np.iinfo(np.int64).max).min(
        axis=1, initial=np.iinfo(np.int64).max), max_rank + 1)
    return _cmc(first[valid], max_rank), ap[valid], inp[valid]

"""What an approximate index costs in accuracy, measured against exact search: never hidden.

* :func:`recall_at_k`: for each query, the fraction of the exact top-k that the approximate top-k
  found (``|A_k & E_k| / k``), averaged; at k = 1: how often the nearest neighbour is right;
* :func:`approximation_report`: that recall on a seeded sample of queries (exact search costs a
  full scan per query, so a sample keeps it affordable at gallery scale);
* :func:`evaluate_approximate`: the evaluator's path for an approximate ``TEST.FAISS.INDEX``: Rank-k
  and mAP from the index's top-K lists, plus the recall report and the exact mAP (the features are
  in memory, so exact evaluation is possible) with the difference.
"""
import dataclasses
import logging

import numpy as np

from .indexes import EXACT, IndexOptions, build_index
from .ranking import evaluate_rank_from_features, evaluate_rank_from_topk

logger = logging.getLogger(__name__)


def recall_at_k(approx_index, exact_index, ks):
    """``{k: mean over queries of |approx[:, :k] & exact[:, :k]| / k}`` (-1 entries never match).

    k is capped by the lists' length (a gallery smaller than k)."""
    approx_index = np.asarray(approx_index)
    exact_index = np.asarray(exact_index)
    out = {}
    for k in ks:
        kk = min(k, exact_index.shape[1])
        a, e = approx_index[:, :kk], exact_index[:, :kk]
        match = (a[:, :, None] == e[:, None, :]) & (a[:, :, None] >= 0)
        out[k] = float(match.any(axis=2).sum(axis=1).mean() / kk)
    return out


def sample_queries(num_queries, size, seed):
    """Sorted seeded sample of ``size`` query rows (all of them when size is 0 or too large)."""
    if size <= 0 or size >= num_queries:
        return np.arange(num_queries)
    return np.sort(np.random.default_rng(seed).choice(num_queries, size=size, replace=False))


def approximation_report(index, gallery, queries, ks, sample_size, approx_index=None):
    """``{"recall@k": ...}`` of ``index`` against exact search over ``gallery`` (the same rows
    that were indexed: array, ``.npy`` or store) on ``sample_size`` seeded queries; also
    ``"sample"``, the number of queries used. ``approx_index``: the index's top lists of ALL
    queries when already computed (the sample's rows are reused)."""
    options = index.options
    rows = sample_queries(len(queries), sample_size, options.seed)
    exact = build_index(gallery, dataclasses.replace(options, spec=EXACT))
    k = max(ks)
    sample = queries[rows]
    _, exact_top = exact.search(sample, k)
    approx_top = approx_index[rows] if approx_index is not None else index.search(sample, k)[1]
    report = {f"recall@{kk}": value
              for kk, value in recall_at_k(approx_top, exact_top, ks).items()}
    report["sample"] = len(rows)
    return report


def evaluate_approximate(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids,
                         options: IndexOptions, topk, ks, sample_size, max_rank=50):
    """``(cmc, all_AP, all_INP, report)`` with the approximate index ``options.spec``; ``report``
    holds recall@k (sample), the exact mAP and ``mAP_diff`` = approximate - exact (fractions)."""
    index = build_index(g_feats, options)
    _, top = index.search(q_feats, topk)
    cmc, all_ap, all_inp = evaluate_rank_from_topk(top, q_pids, g_pids, q_camids, g_camids,
                                                   max_rank)
    report = approximation_report(index, g_feats, q_feats, ks, sample_size, approx_index=top)
    _, exact_ap, _ = evaluate_rank_from_features(
        q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, metric=options.metric,
        max_rank=max_rank, chunk_size=options.query_chunk, use_gpu=options.use_gpu,
        backend=options.backend)
    report["mAP_exact"] = float(np.mean(exact_ap))
    report["mAP_diff"] = float(np.mean(all_ap)) - report["mAP_exact"]
    report["build_seconds"] = index.build_seconds
    logger.info("%s: recall vs exact on %d queries: %s; mAP %.4f vs exact %.4f", options.spec,
                report["sample"], {k: round(v, 4) for k, v in report.items()
                                   if k.startswith("recall")},
                float(np.mean(all_ap)), report["mAP_exact"])
    return cmc, all_ap, all_inp, report

"""Exactness of RobustReID's evaluation against fastreid (rank, evaluator) and a reference re-ranker."""
import robustreid  # noqa: F401  (first: compat patches make fastreid importable)

import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastreid.config import get_cfg
from fastreid.evaluation import ReidEvaluator
from fastreid.evaluation.query_expansion import aqe
from fastreid.evaluation.rank import evaluate_rank
from fastreid.utils.compute_dist import build_dist, compute_jaccard_distance

from robustreid import add_robustreid_config
from robustreid.evaluation import (
    ExactRetriever,
    FaissReidEvaluator,
    build_reid_evaluator,
    evaluate_rank_from_distances,
    evaluate_rank_from_features,
    k_reciprocal_jaccard,
)

TOL = 1e-6


@pytest.fixture(autouse=True)
def _quiet_fastreid_warnings():
    # fastreid warns about its missing Cython ranker and its deprecated addmm_ overload.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def make_split(num_query=150, num_gallery=700, dim=24, seed=0):
    """Continuous random features with every protocol corner case present.

    Clustered by pid (so ranks are not trivial), 4 cameras; query pids 0..59 but only 0..49 in the
    gallery (queries without positives), pid 49 only in camera 0 of the gallery and its queries in
    camera 0 too (only junk: skipped), plus many same-pid-same-cam junk entries for other pids.
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((60, dim)).astype(np.float32)
    q_pids = rng.integers(0, 60, num_query)
    g_pids = rng.integers(0, 50, num_gallery)
    q_cams = rng.integers(0, 4, num_query)
    g_cams = rng.integers(0, 4, num_gallery)
    g_cams[g_pids == 49] = 0
    q_cams[q_pids == 49] = 0
    q_pids[:3] = 49  # make sure the junk-only case exists
    q_cams[:3] = 0
    qf = centers[q_pids] + 1.3 * rng.standard_normal((num_query, dim)).astype(np.float32)
    gf = centers[g_pids] + 1.3 * rng.standard_normal((num_gallery, dim)).astype(np.float32)
    return torch.from_numpy(qf), torch.from_numpy(gf), q_pids, g_pids, q_cams, g_cams


def assert_rank_outputs_equal(got, ref, tol=TOL):
    cmc, all_ap, all_inp = got
    ref_cmc, ref_ap, ref_inp = ref
    assert cmc.shape == np.asarray(ref_cmc).shape
    assert len(all_ap) == len(ref_ap) and len(all_inp) == len(ref_inp)
    np.testing.assert_allclose(cmc, ref_cmc, rtol=0, atol=tol)
    np.testing.assert_allclose(all_ap, ref_ap, rtol=0, atol=tol)
    np.testing.assert_allclose(all_inp, ref_inp, rtol=0, atol=tol)


# --- ranking ---------------------------------------------------------------------------------------
def test_split_has_the_corner_cases():
    _, _, q_pids, g_pids, q_cams, g_cams = make_split()
    absent = ~np.isin(q_pids, g_pids)
    junk_only = np.array([not np.any((g_pids == p) & (g_cams != c)) and np.any(g_pids == p)
                          for p, c in zip(q_pids, q_cams)])
    assert absent.sum() > 0 and junk_only.sum() > 0


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("chunk_size", [7, 64, 1000])
@pytest.mark.parametrize("dense_fraction", [0.0, 0.05, 2.0])  # always sort / default / never sort
def test_rank_from_features_equals_fastreid(metric, chunk_size, dense_fraction):
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_split()
    ref = evaluate_rank(build_dist(qf, gf, metric), q_pids, g_pids, q_cams, g_cams, use_cython=False)
    got = evaluate_rank_from_features(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric,
                                      chunk_size=chunk_size, dense_fraction=dense_fraction)
    assert len(got[1]) < len(q_pids)  # some queries really were skipped
    assert_rank_outputs_equal(got, ref)


@pytest.mark.parametrize("dense_fraction", [0.0, 2.0])
def test_ties_are_broken_like_fastreid(dense_fraction):
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_split(seed=1)
    dist = np.round(build_dist(qf, gf, "cosine"), 1)  # massive exact ties
    ref = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, use_cython=False)
    got = evaluate_rank_from_distances(dist, q_pids, g_pids, q_cams, g_cams, chunk_size=33,
                                       dense_fraction=dense_fraction)
    assert_rank_outputs_equal(got, ref)


def test_hand_computed_example():
    # Gallery: g0 pid1 cam0, g1 pid1 cam1, g2 pid2 cam0, g3 pid3 cam1, g4 pid1 cam2.
    # q0 (pid1, cam0): order g0 .1, g3 .2, g2 .3, g1 .5, g4 .9; g0 is junk (same pid+cam) ->
    #   kept g3 g2 g1 g4 = [0 0 1 1]: positives at ranks 3, 4 -> AP = (1/3 + 2/4) / 2 = 5/12,
    #   INP = 2/4, first hit at rank 3.
    # q1 (pid2, cam1): order g3 .1, g2 .2, ...; g2 (cam0) is its only positive -> rank 2:
    #   AP = 1/2, INP = 1/2.  CMC over 2 queries (max_rank clamped to 5): [0, .5, 1, 1, 1].
    dist = np.array([[0.1, 0.5, 0.3, 0.2, 0.9],
                     [0.4, 0.3, 0.2, 0.1, 0.6]], dtype=np.float32)
    q_pids, q_cams = np.array([1, 2]), np.array([0, 1])
    g_pids, g_cams = np.array([1, 1, 2, 3, 1]), np.array([0, 1, 0, 1, 2])
    cmc, all_ap, all_inp = evaluate_rank_from_distances(dist, q_pids, g_pids, q_cams, g_cams)
    np.testing.assert_allclose(cmc, [0.0, 0.5, 1.0, 1.0, 1.0], atol=1e-7)
    np.testing.assert_allclose(all_ap, [5 / 12, 1 / 2], atol=1e-12)
    np.testing.assert_allclose(all_inp, [1 / 2, 1 / 2], atol=1e-12)
    assert np.mean(all_ap) == pytest.approx(11 / 24)
    # ... and fastreid agrees.  (With max_rank 5 fastreid itself crashes: q0 keeps only 4 items and
    # its per-query CMC rows become ragged; ours keeps the step at 1 beyond the kept items.)
    assert_rank_outputs_equal(
        evaluate_rank_from_distances(dist, q_pids, g_pids, q_cams, g_cams, max_rank=4),
        evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=4, use_cython=False))


def test_no_valid_query_raises():
    dist = np.random.default_rng(0).random((2, 4)).astype(np.float32)
    with pytest.raises(AssertionError, match="all query identities"):
        evaluate_rank_from_distances(dist, np.array([7, 8]), np.array([1, 2, 7, 8]),
                                     np.array([0, 1]), np.array([0, 0, 0, 1]))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_retriever_distances_match_build_dist(metric, backend):
    qf, gf, *_ = make_split(num_query=40, num_gallery=90)
    ref = build_dist(qf, gf, metric)
    got = ExactRetriever(gf, metric=metric, backend=backend).full_distances(qf, chunk_size=16)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    if backend == "torch":  # same arithmetic as build_dist
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_retriever_search_is_exact_knn():
    qf, gf, *_ = make_split(num_query=30, num_gallery=200)
    dist, idx = ExactRetriever(gf, metric="cosine").search(qf, 5)
    ref = build_dist(qf, gf, "cosine")
    np.testing.assert_array_equal(idx, np.argsort(ref, axis=1)[:, :5])
    np.testing.assert_allclose(dist, np.sort(ref, axis=1)[:, :5], atol=1e-5)


# --- re-ranking ------------------------------------------------------------------------------------
def reference_jaccard(features: np.ndarray, num_query: int, k1: int, k2: int) -> np.ndarray:
    """Straightforward float64 transcription of k-reciprocal re-ranking, as fastreid formulates it.

    fastreid searches the k1 nearest neighbours (self included) and then slices ``[:k1 + 1]``, so
    the reciprocal sets use k1 neighbours; the half sets use round(k1 / 2) + 1 of them.
    """
    x = features.astype(np.float64)
    n = len(x)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    rank = np.argsort(dist, axis=1, kind="stable")[:, :k1]

    def reciprocal(i, width):
        return [j for j in rank[i, :width] if i in rank[j, :width]]

    half_width = min(int(np.around(k1 / 2)) + 1, k1)
    v = np.zeros((n, n))
    for i in range(n):
        k_set = reciprocal(i, k1)
        expanded = set(k_set)
        for c in k_set:
            h_set = reciprocal(c, half_width)
            if len(set(h_set) & set(k_set)) > 2 / 3 * len(h_set):
                expanded |= set(h_set)
        members = sorted(expanded)
        weights = np.exp(-dist[i, members])
        v[i, members] = weights / weights.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.zeros((num_query, n - num_query))
    for i in range(num_query):
        for j in range(num_query, n):
            s = np.minimum(v[i], v[j]).sum()
            jaccard[i, j - num_query] = max(1 - s / (2 - s), 0.0)
    return jaccard


def clustered_features(n=60, dim=16, clusters=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    x = centers[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))
    return F.normalize(torch.from_numpy(x.astype(np.float32)), dim=1)


@pytest.mark.parametrize("k1,k2", [(20, 6), (7, 3), (5, 1)])
def test_rerank_matches_numpy_reference(k1, k2):
    feats = clustered_features()
    num_query = 15
    got = k_reciprocal_jaccard(feats[:num_query], feats[num_query:], k1=k1, k2=k2)
    ref = reference_jaccard(feats.numpy(), num_query, k1, k2)
    assert got.shape == (num_query, 45) and got.dtype == np.float32
    assert (ref < 1).mean() > 0.05  # the encodings really overlap
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_rerank_matches_fastreid_cpu_search_path():
    # fastreid's compute_jaccard_distance runs on CPU with search_option=3 (its build_dist hard-codes
    # the GPU option 0); it must agree with ours.
    feats = clustered_features(n=80, dim=12, seed=3)
    ref = compute_jaccard_distance(feats, k1=10, k2=4, search_option=3)[:20, 20:]
    got = k_reciprocal_jaccard(feats[:20], feats[20:], k1=10, k2=4)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_fastreid_aqe_runs_on_cpu():
    qf, gf, *_ = make_split(num_query=20, num_gallery=50)
    new_q, new_g = aqe(qf, gf, qe_times=1, qe_k=1, alpha=3.0)
    # With qe_k=1 each feature's only neighbour is itself, weighted by cos(x, x)^3 = 1.
    np.testing.assert_allclose(new_q.numpy(), qf.numpy(), rtol=1e-5, atol=1e-5)
    new_q, new_g = aqe(qf, gf, qe_times=2, qe_k=5, alpha=3.0)
    assert new_q.shape == qf.shape and new_g.shape == gf.shape
    assert torch.isfinite(new_q).all() and not torch.allclose(new_q, qf)


# --- evaluator -------------------------------------------------------------------------------------
def make_cfg(metric="cosine", aqe_enabled=False, rerank=False, chunk=37, backend="auto"):
    cfg = get_cfg()
    add_robustreid_config(cfg)
    cfg.TEST.METRIC = metric
    cfg.TEST.AQE.ENABLED = aqe_enabled
    cfg.TEST.AQE.QE_K = 3
    cfg.TEST.RERANK.ENABLED = rerank
    cfg.TEST.RERANK.K1 = 8
    cfg.TEST.RERANK.K2 = 3
    cfg.TEST.FAISS.QUERY_CHUNK = chunk
    cfg.TEST.FAISS.USE_GPU = False
    cfg.TEST.FAISS.BACKEND = backend
    return cfg


def feed(evaluator, qf, gf, q_pids, g_pids, q_cams, g_cams, batch=64):
    feats = torch.cat([qf, gf])
    pids = torch.from_numpy(np.concatenate([q_pids, g_pids]))
    cams = torch.from_numpy(np.concatenate([q_cams, g_cams]))
    evaluator.reset()
    for s in range(0, len(feats), batch):
        evaluator.process({"targets": pids[s:s + batch], "camids": cams[s:s + batch]}, feats[s:s + batch])
    return evaluator.evaluate()


def assert_results_equal(got, ref):
    assert list(got) == ["Rank-1", "Rank-5", "Rank-10", "mAP", "mINP", "metric"]
    for key in got:
        assert got[key] == pytest.approx(ref[key], abs=100 * TOL), key


@pytest.mark.parametrize("metric,aqe_enabled,backend", [
    ("cosine", False, "auto"), ("euclidean", False, "auto"), ("cosine", True, "auto"),
    ("cosine", False, "faiss"), ("euclidean", False, "faiss")])
def test_faiss_evaluator_equals_fastreid_evaluator(metric, aqe_enabled, backend):
    data = make_split(num_query=120, num_gallery=500, seed=2)
    cfg = make_cfg(metric, aqe_enabled, backend=backend)
    got = feed(FaissReidEvaluator(cfg, num_query=120), *data)
    ref = feed(ReidEvaluator(cfg, num_query=120), *data)
    assert_results_equal(got, ref)
    assert 0 < got["mAP"] < 100


def test_faiss_evaluator_rerank_on_cpu():
    # fastreid's ReidEvaluator cannot re-rank without faiss-gpu, so the reference is assembled from
    # fastreid's own pieces: build_dist + compute_jaccard_distance(CPU search) + evaluate_rank.
    qf, gf, q_pids, g_pids, q_cams, g_cams = data = make_split(num_query=60, num_gallery=240, seed=4)
    cfg = make_cfg("cosine", rerank=True)
    got = feed(FaissReidEvaluator(cfg, num_query=60), *data)

    dist = build_dist(qf, gf, "cosine")
    feats = F.normalize(torch.cat([qf, gf]), dim=1)
    jaccard = compute_jaccard_distance(feats, k1=8, k2=3, search_option=3)[:60, 60:]
    lam = cfg.TEST.RERANK.LAMBDA
    cmc, all_ap, all_inp = evaluate_rank(jaccard * (1 - lam) + dist * lam, q_pids, g_pids, q_cams,
                                         g_cams, use_cython=False)
    ref = {"Rank-1": cmc[0] * 100, "Rank-5": cmc[4] * 100, "Rank-10": cmc[9] * 100,
           "mAP": np.mean(all_ap) * 100, "mINP": np.mean(all_inp) * 100,
           "metric": (np.mean(all_ap) + cmc[0]) / 2 * 100}
    assert_results_equal(got, ref)


def test_faiss_evaluator_with_a_gallery_smaller_than_rank_10():
    # 1-d features, gallery (pid, cam) = (1, 2) at 0.9, (0, 1) at 1, (2, 3) at 2, (0, 2) at 3.
    # Query pid 0 cam 0 at 0 ranks pids [1, 0, 2, 0]: hits at ranks 2 and 4, AP (1/2 + 2/4) / 2.
    # Query pid 1 cam 1 at 10 ranks pids [0, 2, 0, 1]: hit at rank 4, AP 1/4.
    # CMC = [0, 0.5, 0.5, 1]: Rank-5 and Rank-10 are its last entry (fastreid's evaluator would
    # index past the end of a 4-entry CMC).
    qf, gf = torch.tensor([[0.0], [10.0]]), torch.tensor([[0.9], [1.0], [2.0], [3.0]])
    got = feed(FaissReidEvaluator(make_cfg("euclidean"), num_query=2), qf, gf, np.array([0, 1]),
               np.array([1, 0, 2, 0]), np.array([0, 1]), np.array([2, 1, 3, 2]))
    assert got["Rank-1"] == pytest.approx(0.0)
    assert got["Rank-5"] == got["Rank-10"] == pytest.approx(100.0)
    assert got["mAP"] == pytest.approx((0.5 + 0.25) / 2 * 100)


def test_faiss_evaluator_warns_and_skips_roc(caplog):
    cfg = make_cfg()
    cfg.TEST.ROC.ENABLED = True
    with caplog.at_level(logging.WARNING):
        got = feed(FaissReidEvaluator(cfg, num_query=150), *make_split())
    assert "TEST.ROC" in caplog.text
    assert not any(k.startswith("TPR") for k in got)


def test_build_reid_evaluator_selects_by_config():
    cfg = make_cfg()
    assert type(build_reid_evaluator(cfg, 10)) is FaissReidEvaluator
    cfg.TEST.EVALUATOR = "ReidEvaluator"
    assert type(build_reid_evaluator(cfg, 10)) is ReidEvaluator
    cfg.TEST.EVALUATOR = "DenseEvaluatorTypo"
    with pytest.raises(ValueError, match=r"TEST\.EVALUATOR.*DenseEvaluatorTypo"):
        build_reid_evaluator(cfg, 10)

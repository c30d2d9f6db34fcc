"""Retrieval indexes (robustreid.evaluation.indexes), the feature store, top-K ranking and the
approximation report: exact equals fastreid, recall@k equals a hand computation, the store
resumes, an approximate evaluator reports what it costs."""
import robustreid  # noqa: F401  (first: compat patches make fastreid importable)

import json
import logging

import numpy as np
import pytest
import torch
from fastreid.utils.compute_dist import build_dist
from test_evaluation import make_split

from robustreid.config import ConfigError, load_config
from robustreid.evaluation import ExactRetriever, FaissReidEvaluator, evaluate_rank_from_features
from robustreid.evaluation.approximation import approximation_report, recall_at_k
from robustreid.evaluation.feature_store import (FeatureStore, open_features, read_rows,
                                                 take_rows)
from robustreid.evaluation.indexes import (ExactIndex, IndexOptions, build_index,
                                           check_index_config)
from robustreid.evaluation.ranking import evaluate_rank_from_topk
from robustreid.evaluation.retrieval import faiss_gpu_available

pytestmark = pytest.mark.usefixtures("one_thread")


def features(rows, dim=16, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


# --- recall@k ----------------------------------------------------------------------------------
def test_recall_at_k_equals_a_hand_computation():
    exact = np.array([[4, 7, 1], [2, 3, 9]])
    approx = np.array([[4, 1, 5], [3, 2, -1]])
    # query 0: @1 {4} vs {4} -> 1; @3 {4,1,5} & {4,7,1} = 2 -> 2/3
    # query 1: @1 {3} vs {2} -> 0; @3 {3,2} & {2,3,9} = 2 -> 2/3 (-1 never matches)
    got = recall_at_k(approx, exact, (1, 3))
    assert got[1] == pytest.approx(0.5)
    assert got[3] == pytest.approx(2 / 3)
    assert recall_at_k(np.full((1, 2), -1), np.full((1, 2), -1), (2,))[2] == 0.0


# --- exact index ---------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_index_equals_fastreid_ranking_and_the_existing_exact_path(metric, tmp_path):
    gallery, queries = features(300), features(40, seed=1)
    ref = build_dist(torch.from_numpy(queries), torch.from_numpy(gallery), metric)
    ref_idx = np.argsort(ref, axis=1, kind="stable")[:, :10]
    ref_dist = np.take_along_axis(ref, ref_idx, axis=1)
    np.save(tmp_path / "g.npy", gallery)
    options = IndexOptions(metric=metric, query_chunk=16)
    # gallery in RAM (one block) and on disk in blocks of 64 rows (merged top-k)
    for index in (build_index(gallery, options),
                  ExactIndex(open_features(str(tmp_path / "g.npy")), options, block_rows=64)):
        dist, idx = index.search(queries, 10)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_allclose(dist, ref_dist, rtol=1e-5, atol=1e-5)
    faiss_dist, faiss_idx = ExactRetriever(gallery, metric=metric).search(queries, 10)
    np.testing.assert_array_equal(idx, faiss_idx)


def test_exact_index_pads_a_gallery_smaller_than_k():
    dist, idx = build_index(features(3), IndexOptions()).search(features(2, seed=1), 5)
    assert idx.shape == (2, 5) and (idx[:, 3:] == -1).all() and np.isinf(dist[:, 3:]).all()
    assert sorted(idx[0, :3]) == [0, 1, 2]


# --- faiss indexes -------------------------------------------------------------------------------
def test_ivf_flat_probing_every_list_is_exact():
    gallery, queries = features(2000), features(50, seed=1)
    exact_dist, exact_idx = build_index(gallery, IndexOptions(metric="cosine")).search(queries, 5)
    index = build_index(gallery, IndexOptions(spec="IVF8,Flat", metric="cosine", nprobe=8))
    assert not index.exact and index.ntotal == 2000
    dist, idx = index.search(queries, 5)
    np.testing.assert_array_equal(idx, exact_idx)
    np.testing.assert_allclose(dist, exact_dist, atol=1e-5)  # 1 - cos, from |q - g|^2 / 2
    few = build_index(gallery, IndexOptions(spec="IVF8,Flat", metric="cosine", nprobe=1))
    assert recall_at_k(few.search(queries, 5)[1], exact_idx, (5,))[5] < 1.0  # nprobe is applied


def test_pq_shortlist_reranked_with_exact_distances():
    gallery, queries = features(3000, dim=32), features(40, dim=32, seed=1)
    exact_dist, exact_idx = build_index(gallery, IndexOptions(metric="euclidean")).search(queries, 5)
    options = IndexOptions(spec="PQ4x4", metric="euclidean", shortlist=0)
    raw = build_index(gallery, options)
    reranked = build_index(gallery, IndexOptions(spec="PQ4x4", metric="euclidean", shortlist=300))
    raw_recall = recall_at_k(raw.search(queries, 5)[1], exact_idx, (1,))[1]
    dist, idx = reranked.search(queries, 5)
    assert recall_at_k(idx, exact_idx, (1,))[1] > raw_recall
    # re-ranked distances are the exact ones of the returned rows
    ref = build_dist(torch.from_numpy(queries), torch.from_numpy(gallery), "euclidean")
    np.testing.assert_allclose(dist, np.take_along_axis(ref, idx, axis=1), rtol=1e-4, atol=1e-3)
    assert (np.diff(dist, axis=1) >= 0).all()


def test_hnsw_ef_search_is_applied():
    gallery, queries = features(3000), features(50, seed=1)
    _, exact_idx = build_index(gallery, IndexOptions()).search(queries, 10)
    recall = {ef: recall_at_k(build_index(gallery, IndexOptions(spec="HNSW4", ef_search=ef))
                              .search(queries, 10)[1], exact_idx, (10,))[10] for ef in (10, 200)}
    assert recall[10] < recall[200]


def test_bad_index_specs_are_config_errors():
    gallery = features(100)
    with pytest.raises(ConfigError, match="TEST.FAISS.INDEX 'IVF8,PQ5'.*multiple"):
        build_index(gallery, IndexOptions(spec="IVF8,PQ5"))
    with pytest.raises(ConfigError, match="TEST.FAISS.INDEX 'IVF512,Flat' cannot be trained on "
                                          "100 rows"):
        build_index(gallery, IndexOptions(spec="IVF512,Flat"))
    cfg = load_config("", ["TEST.FAISS.INDEX", "IVF8,Flat", "TEST.RERANK.ENABLED", "True"])
    with pytest.raises(ConfigError, match="TEST.RERANK"):
        check_index_config(cfg)
    with pytest.raises(ConfigError, match="TEST.FAISS.RECALL_KS"):
        check_index_config(load_config("", ["TEST.FAISS.RECALL_KS", "(1, 500)"]))


def test_gpu_request_without_faiss_gpu_runs_on_cpu_and_says_so(caplog):
    if faiss_gpu_available():
        pytest.skip("this machine has faiss-gpu and a GPU: see the sharding test")
    gallery, queries = features(500), features(10, seed=1)
    with caplog.at_level(logging.INFO, logger="robustreid.evaluation.indexes"):
        gpu = build_index(gallery, IndexOptions(spec="IVF4,Flat", nprobe=4, use_gpu=True))
    assert "faiss-gpu or a GPU is missing" in caplog.text and not gpu.gpu
    cpu = build_index(gallery, IndexOptions(spec="IVF4,Flat", nprobe=4))
    np.testing.assert_array_equal(gpu.search(queries, 5)[1], cpu.search(queries, 5)[1])


def test_gpu_sharding_spreads_rows_and_merges_results(monkeypatch):
    """The GPU path's IndexShards logic with CPU copies standing in for the GPU ones (3 "GPUs")."""
    import faiss

    from robustreid.evaluation import indexes

    monkeypatch.setattr(indexes, "faiss_gpu_available", lambda: True)
    monkeypatch.setattr(indexes, "_gpu_copies",
                        lambda cpu: ([faiss.clone_index(cpu) for _ in range(3)], []))
    monkeypatch.setattr(faiss, "GpuParameterSpace", faiss.ParameterSpace, raising=False)
    monkeypatch.setattr(indexes, "BLOCK_ROWS", 700)  # several adds, each spread over the shards
    gallery, queries = features(2000), features(20, seed=1)
    index = build_index(gallery, IndexOptions(spec="IVF8,Flat", nprobe=8, use_gpu=True))
    assert index.gpu and isinstance(index.index, faiss.IndexShards) and index.index.count() == 3
    assert index.ntotal == 2000
    assert all(faiss.extract_index_ivf(index.index.at(i)).nprobe == 8 for i in range(3))
    dist, idx = index.search(queries, 5)
    exact_dist, exact_idx = build_index(gallery, IndexOptions()).search(queries, 5)
    np.testing.assert_array_equal(idx, exact_idx)  # global row ids, not per-shard ones
    np.testing.assert_allclose(dist, exact_dist, atol=1e-5)


@pytest.mark.skipif(not faiss_gpu_available(), reason="needs faiss-gpu and a visible GPU")
def test_gpu_index_is_sharded_over_every_gpu_and_matches_cpu():
    import faiss

    gallery, queries = features(4000), features(20, seed=1)
    gpu = build_index(gallery, IndexOptions(spec="IVF16,Flat", nprobe=16, use_gpu=True))
    assert gpu.gpu and isinstance(gpu.index, faiss.IndexShards)
    assert gpu.index.count() == faiss.get_num_gpus() and gpu.ntotal == 4000
    _, exact_idx = build_index(gallery, IndexOptions()).search(queries, 5)
    np.testing.assert_array_equal(gpu.search(queries, 5)[1], exact_idx)


# --- feature store -------------------------------------------------------------------------------
def test_store_resumes_after_an_interruption(tmp_path):
    data = features(10)
    calls = []

    def compute(start, stop):
        calls.append((start, stop))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the extraction is stopped while computing chunk 2
        return data[start:stop]

    store = FeatureStore.open_or_create(tmp_path / "s", rows=10, dim=16, chunk_rows=3,
                                        inputs={"model": "a"})
    with pytest.raises(KeyboardInterrupt):
        store.fill(compute)
    assert store.missing_chunks() == [2, 3]
    with pytest.raises(ConfigError, match="incomplete: 2/4 chunks"):
        open_features(str(tmp_path / "s"))
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["chunks_done"] == [0, 1]

    calls.clear()
    resumed = FeatureStore.open_or_create(tmp_path / "s", rows=10, dim=16, chunk_rows=3,
                                          inputs={"model": "a"})
    assert resumed.fill(lambda a, b: calls.append((a, b)) or data[a:b]) == 2
    assert calls == [(6, 9), (9, 10)]  # only the missing chunks are computed
    np.testing.assert_array_equal(np.load(resumed.path), data)
    np.testing.assert_array_equal(np.load(resumed.path, mmap_mode="r")[4], data[4])
    with pytest.raises(ConfigError, match="written for other inputs"):
        FeatureStore.open_or_create(tmp_path / "s", rows=10, dim=16, chunk_rows=3,
                                    inputs={"model": "b"})


def test_store_reads_blocks_and_rows_without_loading_the_file(tmp_path):
    data = features(100)
    np.save(tmp_path / "f.npy", data)
    np.testing.assert_array_equal(read_rows(tmp_path / "f.npy", 30, 45), data[30:45])
    idx = np.array([[5, 99], [5, 0]])
    np.testing.assert_array_equal(take_rows(tmp_path / "f.npy", idx), data[idx])
    blocks = list(open_features(str(tmp_path / "f.npy")).blocks(40))
    assert [s for s, _ in blocks] == [0, 40, 80]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), data)
    np.save(tmp_path / "i.npy", np.zeros((3, 2), np.int64))
    with pytest.raises(ConfigError, match="2-d float32"):
        open_features(str(tmp_path / "i.npy"))


# --- ranking from top-K lists, evaluator --------------------------------------------------------
def test_topk_ranking_with_full_exact_lists_equals_the_exact_evaluation():
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_split()
    ref = evaluate_rank_from_features(qf, gf, q_pids, g_pids, q_cams, g_cams, metric="cosine")
    _, full = build_index(gf, IndexOptions(metric="cosine")).search(qf, len(gf))
    got = evaluate_rank_from_topk(full, q_pids, g_pids, q_cams, g_cams)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_topk_ranking_hand_computed():
    # gallery: 0 pid 1 cam 0 (junk for the query), 1 pid 1 cam 1, 2 pid 2, 3 pid 1 cam 2, 4 pid 3
    g_pids, g_cams = np.array([1, 1, 2, 1, 3]), np.array([0, 1, 0, 2, 0])
    lists = np.array([[0, 2, 1, 4]])  # positive 3 is not in the list
    cmc, ap, inp = evaluate_rank_from_topk(lists, [1], g_pids, [0], g_cams, max_rank=5)
    # kept list: 2 (rank 1), 1 (rank 2, hit), 4; positives: 1 and 3 -> AP = (1/2) / 2
    assert ap[0] == pytest.approx(0.25)
    assert inp[0] == 0.0  # not every positive retrieved
    np.testing.assert_allclose(cmc, [0, 1, 1, 1, 1])


def evaluator_results(spec, *opts, data=None):
    qf, gf, q_pids, g_pids, q_cams, g_cams = data or make_split()
    cfg = load_config("", ["TEST.FAISS.INDEX", spec, *opts])
    evaluator = FaissReidEvaluator(cfg, len(qf))
    evaluator.process({"targets": torch.as_tensor(q_pids), "camids": torch.as_tensor(q_cams)}, qf)
    evaluator.process({"targets": torch.as_tensor(g_pids), "camids": torch.as_tensor(g_cams)}, gf)
    return evaluator.evaluate()


def test_evaluator_reports_the_approximation():
    exact = evaluator_results("Flat")
    assert not any(k.startswith("approx/") for k in exact)
    # every list probed and the whole gallery ranked: the approximate path must give the exact numbers
    same = evaluator_results("IVF4,Flat", "TEST.FAISS.NPROBE", "4", "TEST.FAISS.TOPK", "700")
    for key in ("Rank-1", "Rank-5", "mAP", "mINP"):
        assert same[key] == pytest.approx(exact[key], rel=1e-6)
    assert same["approx/recall@1"] == 100.0 and same["approx/recall@10"] == 100.0
    assert same["approx/mAP_exact"] == pytest.approx(exact["mAP"])
    assert same["approx/mAP_diff"] == pytest.approx(0.0, abs=1e-9)

    rough = evaluator_results("IVF16,Flat", "TEST.FAISS.NPROBE", "1", "TEST.FAISS.APPROX_QUERIES",
                              "50")
    assert rough["approx/recall@1"] < 100.0
    assert rough["approx/mAP_diff"] == pytest.approx(rough["mAP"] - exact["mAP"])


def test_approximation_report_samples_queries_with_a_seed():
    gallery, queries = features(1000), features(200, seed=1)
    index = build_index(gallery, IndexOptions(spec="IVF16,Flat", nprobe=2, seed=3))
    a = approximation_report(index, gallery, queries, (1, 10), 40)
    b = approximation_report(index, gallery, queries, (1, 10), 40)
    assert a == b and a["sample"] == 40
    # by hand on the same 40 rows
    rows = np.sort(np.random.default_rng(3).choice(200, size=40, replace=False))
    _, exact_idx = build_index(gallery, IndexOptions()).search(queries[rows], 10)
    _, approx_idx = index.search(queries[rows], 10)
    assert a["recall@1"] == pytest.approx(float(np.mean(approx_idx[:, 0] == exact_idx[:, 0])))

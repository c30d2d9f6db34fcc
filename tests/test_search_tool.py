"""tools/search.py (features in, top-k out) and tools/bench_scale.py (a tiny run)."""
import robustreid  # noqa: F401  (first: compat patches make fastreid importable)

import json
import re

import numpy as np
import pytest
import torch
from conftest import load_tool
from fastreid.utils.compute_dist import build_dist

from robustreid.evaluation.feature_store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((3000, 32)).astype(np.float32)
    queries = rng.standard_normal((40, 32)).astype(np.float32)
    np.save(tmp_path / "g.npy", gallery)
    np.save(tmp_path / "q.npy", queries)
    return tmp_path, gallery, queries


def run_search(tmp_path, *args):
    return load_tool("search").main(["--gallery", str(tmp_path / "g.npy"), "--queries",
                                     str(tmp_path / "q.npy"), "--output", str(tmp_path / "out"),
                                     *args])


def test_exact_search_writes_fastreids_top_k(arrays):
    tmp_path, gallery, queries = arrays
    assert run_search(tmp_path, "--topk", "7", "TEST.METRIC", "euclidean") == 0
    idx = np.load(tmp_path / "out" / "topk_indices.npy")
    dist = np.load(tmp_path / "out" / "topk_distances.npy")
    ref = build_dist(torch.from_numpy(queries), torch.from_numpy(gallery), "euclidean")
    np.testing.assert_array_equal(idx, np.argsort(ref, axis=1)[:, :7])
    np.testing.assert_allclose(dist, np.sort(ref, axis=1)[:, :7], rtol=1e-4, atol=1e-3)
    report = json.loads((tmp_path / "out" / "search.json").read_text())
    assert report["index"] == "Flat" and "approximation" not in report


def test_approximate_search_reports_recall_against_exact(arrays, capsys):
    tmp_path, gallery, queries = arrays
    assert run_search(tmp_path, "--topk", "10", "TEST.FAISS.INDEX", "IVF16,Flat",
                      "TEST.FAISS.NPROBE", "2", "TEST.FAISS.APPROX_QUERIES", "0") == 0
    report = json.loads((tmp_path / "out" / "search.json").read_text())
    approx = np.load(tmp_path / "out" / "topk_indices.npy")
    exact = np.argsort(build_dist(torch.from_numpy(queries), torch.from_numpy(gallery), "cosine"),
                       axis=1)[:, :10]
    by_hand = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert report["approximation"]["recall@10"] == pytest.approx(by_hand)
    assert report["approximation"]["sample"] == 40
    assert "recall vs exact on 40 queries" in capsys.readouterr().out


def test_search_reads_a_feature_store(arrays):
    tmp_path, gallery, queries = arrays
    store = FeatureStore.open_or_create(tmp_path / "store", 3000, 32, chunk_rows=1000)
    store.fill(lambda a, b: gallery[a:b])
    assert load_tool("search").main(["--gallery", str(tmp_path / "store"), "--queries",
                                     str(tmp_path / "q.npy"), "--output", str(tmp_path / "o2"),
                                     "--topk", "3"]) == 0
    assert run_search(tmp_path, "--topk", "3") == 0
    np.testing.assert_array_equal(np.load(tmp_path / "o2" / "topk_indices.npy"),
                                  np.load(tmp_path / "out" / "topk_indices.npy"))


@pytest.mark.parametrize("case, message", [
    ("dim", "--queries .*16-d features, the gallery's are 32-d"),
    ("spec", "TEST.FAISS.INDEX 'IVF8,PQ5': faiss cannot build it"),
    ("store", "feature store .* is incomplete: 0/3 chunks"),
    ("key", "TEST.FAISS.NPROBE must be an integer >= 1"),
])
def test_search_user_errors_are_one_line(arrays, capsys, case, message):
    tmp_path, _, _ = arrays
    if case == "dim":
        np.save(tmp_path / "q.npy", np.zeros((2, 16), np.float32))
        code = run_search(tmp_path)
    elif case == "spec":
        code = run_search(tmp_path, "TEST.FAISS.INDEX", "IVF8,PQ5")
    elif case == "store":
        FeatureStore.open_or_create(tmp_path / "store", 3000, 32, chunk_rows=1000)
        code = load_tool("search").main(["--gallery", str(tmp_path / "store"), "--queries",
                                         str(tmp_path / "q.npy"), "--output", str(tmp_path / "o")])
    else:
        code = run_search(tmp_path, "TEST.FAISS.NPROBE", "0")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.match(f"error: {message}", err), err


def test_bench_scale_tiny_run(tmp_path, capsys, monkeypatch):
    bench = load_tool("bench_scale")
    seen = {}
    real_recall = bench.recall_at_k

    def spy(approx, exact, ks):
        seen["approx"], seen["exact"] = approx, exact
        return real_recall(approx, exact, ks)

    monkeypatch.setattr(bench, "recall_at_k", spy)
    assert bench.main(["--gallery", "3000", "--queries", "60", "--dim", "64", "--pq-m", "16",
                       "--workdir", str(tmp_path), "--threads", "1"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    number = r"[0-9]+(\.[0-9]+)?"
    assert re.fullmatch(rf"ivfpq_speedup={number} ivfpq_recall_at_1={number} "
                        rf"peak_rss_gb={number} index_build_s={number}", last), last

    # recall is measured against exact search: brute force over the stored gallery
    gallery = np.load(tmp_path / "gallery" / "features.npy")
    data = bench.SyntheticReID(64, 8, -(-3000 // 8), 0)
    queries = data.queries(60)
    brute = np.argsort(build_dist(torch.from_numpy(queries), torch.from_numpy(gallery), "cosine"),
                       axis=1)[:, :10]
    np.testing.assert_array_equal(seen["exact"], brute)
    recall_1 = float(np.mean(seen["approx"][:, 0] == brute[:, 0]))
    assert f"ivfpq_recall_at_1={recall_1:.4f}" in last

"""DML clustering evaluation (EAT eq. 11-13): NMI, pairwise F1 and Recall@k pinned to hand
computations, sklearn and pytorch-metric-learning; ensemble voting; ClusteringEvaluator."""
import math
from collections import OrderedDict
from itertools import combinations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustreid.evaluation.clustering import (clustering_report, kmeans_labels, nmi, pairwise_f1,
                                              recall_at_k, vote_clusterings, voted_recall_at_k)

pytestmark = pytest.mark.usefixtures("one_thread")

# Classes {0,1,2 | 3,4,5}, clusters {0,1 | 2,3 | 4,5}; contingency rows (classes) x columns:
#   class 0: [2, 1, 0]   class 1: [0, 1, 2]
LABELS = np.array([0, 0, 0, 1, 1, 1])
CLUSTERS = np.array([0, 0, 1, 1, 2, 2])


def test_nmi_of_the_hand_example_uses_the_arithmetic_normalisation():
    # H(Omega) = ln 2 (two classes of 3/6); H(C) = ln 3 (three clusters of 2/6).
    # I = 2 * (2/6) ln((2/6) / (3/6 * 2/6)) + 2 * (1/6) ln((1/6) / (3/6 * 2/6)) = (2/3) ln 2 + 0.
    # NMI = 2 I / (H(Omega) + H(C)) = (4/3) ln 2 / ln 6 = 0.51580...
    # (geometric I / sqrt(ln2 ln3) = 0.5295, max I / ln 3 = 0.4206: another normalisation fails.)
    assert nmi(LABELS, CLUSTERS) == pytest.approx(4 / 3 * math.log(2) / math.log(6), abs=1e-12)
    assert nmi(LABELS, CLUSTERS) == pytest.approx(0.515804, abs=1e-6)
    assert nmi(LABELS, CLUSTERS + 10) == nmi(LABELS, CLUSTERS)  # ids are names only
    assert nmi(LABELS, LABELS) == 1.0
    assert nmi(LABELS, np.zeros(6)) == 0.0  # one cluster says nothing about the class


def test_nmi_matches_sklearn_arithmetic():
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(0)
    for classes, clusters in ((5, 5), (3, 8), (40, 30)):
        a, b = rng.integers(0, classes, 300), rng.integers(0, clusters, 300)
        b[:150] = a[:150]  # half agrees: a mid-range NMI
        assert nmi(a, b) == pytest.approx(
            normalized_mutual_info_score(a, b, average_method="arithmetic"), abs=1e-12)


def test_pairwise_f1_of_the_hand_example():
    # 15 pairs. Same class: 3 + 3 = 6 = TP + FN. Same cluster: 1 + 1 + 1 = 3 = TP + FP.
    # Same class and cluster: (0,1) and (4,5): TP = 2, so FN = 4, FP = 1.
    # F1 = 2 TP / (2 TP + FN + FP) = 4 / 9 (precision 2/3, recall 1/3).
    assert pairwise_f1(LABELS, CLUSTERS) == pytest.approx(4 / 9, abs=1e-15)
    assert pairwise_f1(LABELS, LABELS + 7) == 1.0
    assert pairwise_f1(LABELS, np.zeros(6)) == pytest.approx(2 * 6 / (6 + 15))


def test_pairwise_f1_equals_counting_every_pair():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 6, 80), rng.integers(0, 9, 80)
    same_class = np.array([a[i] == a[j] for i, j in combinations(range(80), 2)])
    same_cluster = np.array([b[i] == b[j] for i, j in combinations(range(80), 2)])
    tp, fp = (same_class & same_cluster).sum(), (~same_class & same_cluster).sum()
    fn = (same_class & ~same_cluster).sum()
    assert pairwise_f1(a, b) == pytest.approx(2 * tp / (2 * tp + fn + fp), abs=1e-15)


def line(*coords):
    """Points on the x axis of the plane (for hand-computable squared L2 neighbours)."""
    return np.array([[c, 0.0] for c in coords], dtype=np.float32)


def test_recall_at_k_of_the_hand_example_excludes_the_query_itself():
    # Points 0, 1, 3, 7, 8 with classes A B A B B (normalize=False: squared L2).
    # Neighbours (self excluded): p0 -> p1 B, p2 A | p1 -> p0 A, p2 A, p3 B | p2 -> p1 B, p0 A
    # p3 -> p4 B | p4 -> p3 B.  First hit at rank 2, 3, 2, 1, 1:
    # R@1 = 2/5, R@2 = 4/5, R@4 = 5/5.  (Counting the query itself would give R@1 = 1.)
    x, labels = line(0, 1, 3, 7, 8), np.array([0, 1, 0, 1, 1])
    assert recall_at_k(x, labels, ks=(1, 2, 4), normalize=False) == {1: 0.4, 2: 0.8, 4: 1.0}


def test_recall_at_k_drops_the_query_even_behind_an_exact_duplicate():
    # p0 and p1 coincide; faiss lists tied neighbours by index, so p1's list is [p0, p1, p2]:
    # dropping the first column instead of p1 itself would make p1 its own first neighbour.
    # p0 (A) -> p1 B, p2 B; p1 (B) -> p0 A, p2 B; p2 (B) -> p0 A, p1 B: R@1 = 0, R@2 = 2/3.
    x, labels = line(0, 0, 5), np.array([0, 1, 1])
    recalls = recall_at_k(x, labels, ks=(1, 2), normalize=False)
    assert recalls == {1: 0.0, 2: pytest.approx(2 / 3)}
    # Three duplicates: p2's 2 nearest are p0, p1 (itself is not among them): k = 1 keeps p0 (A).
    assert recall_at_k(line(0, 0, 0), np.array([0, 0, 1]), ks=(1,), normalize=False) == {
        1: pytest.approx(2 / 3)}


def test_recall_at_1_and_nmi_match_pytorch_metric_learning():
    """AccuracyCalculator's precision_at_1 (same source: self excluded) is Recall@1; its NMI runs
    faiss k-means with 20 iterations and faiss' default seed 1234, as kmeans_labels(seed=1234)."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(12), 10)
    centres = rng.normal(size=(12, 16))
    x = F.normalize(torch.from_numpy(centres[labels] + rng.normal(size=(120, 16))).float())
    calculator = AccuracyCalculator(include=("NMI", "precision_at_1"), device=torch.device("cpu"))
    theirs = calculator.get_accuracy(x, torch.from_numpy(labels))
    r1 = recall_at_k(x, labels, ks=(1,))[1]
    assert 0.3 < r1 < 0.95  # not a trivial case
    assert r1 == pytest.approx(theirs["precision_at_1"], abs=1e-12)
    assert nmi(labels, kmeans_labels(x, 12, seed=1234)) == pytest.approx(theirs["NMI"], abs=1e-12)


def blobs(num, per, dim=16, spread=0.01, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num, dim))
    labels = np.repeat(np.arange(num), per)
    return (centres[labels] + spread * rng.normal(size=(num * per, dim))).astype(np.float32), labels


def test_kmeans_recovers_two_separated_blobs_for_every_seed():
    x, labels = blobs(2, 15)
    for seed in range(5):
        clusters = kmeans_labels(x, 2, seed=seed)
        assert nmi(labels, clusters) == 1.0 and pairwise_f1(labels, clusters) == 1.0


def test_kmeans_is_seeded_and_clusters_the_normalised_rows():
    # Two directions 30 degrees apart, each at radii 1 and 100 (two rows each, +-0.01 rad): the
    # normalised rows split by direction, the raw ones by radius.
    angles, radii = np.repeat([0.0, math.pi / 6], 4), np.tile([1, 1, 100, 100], 2)
    angles = angles + np.tile([-0.01, 0.01], 4)
    x = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1).astype(np.float32)
    direction, radius = np.repeat([0, 1], 4), np.tile([0, 0, 1, 1], 2)
    for seed in range(5):
        assert nmi(direction, kmeans_labels(x, 2, seed=seed)) == 1.0
    assert nmi(radius, kmeans_labels(x, 2, seed=0, normalize=False)) == 1.0
    x, _ = blobs(10, 20, spread=0.5)
    np.testing.assert_array_equal(kmeans_labels(x, 10, seed=3), kmeans_labels(x, 10, seed=3))
    assert not np.array_equal(kmeans_labels(x, 10, seed=3), kmeans_labels(x, 10, seed=4))
    with pytest.raises(ValueError, match="k=11 for 10 samples"):
        kmeans_labels(x[:10], 11, seed=0)


def test_vote_clusterings_aligns_permuted_ids_and_takes_the_majority():
    truth = np.array([0, 0, 1, 1, 2, 2, 2])
    first = truth.copy()
    first[0] = 2                                           # the first member errs on sample 0
    second = np.array([5, 5, 3, 3, 9, 9, 9])               # truth under 0->5, 1->3, 2->9
    third = np.array([1, 1, 2, 2, 0, 0, 2])                # truth under 0->1, 1->2, 2->0; errs on 6
    np.testing.assert_array_equal(vote_clusterings([first, second, third]), truth)
    np.testing.assert_array_equal(vote_clusterings([first]), first)


def test_vote_clusterings_ties_go_to_the_first_member():
    # Sample 0: the three members say three different (aligned) clusters -> the first's.
    first, second, third = [np.array(c) for c in ([0, 0, 1, 1, 2, 2],
                                                   [1, 0, 1, 1, 2, 2],
                                                   [2, 0, 1, 1, 2, 2])]
    np.testing.assert_array_equal(vote_clusterings([first, second, third]), first)
    np.testing.assert_array_equal(vote_clusterings([second, first, third])[0], 1)


def test_vote_clusterings_never_merges_unmatched_clusters_into_the_references():
    # The others split the reference's cluster 1 in two (6 | 7); one half is matched to 1, the
    # other is left unmatched: its samples' votes are 1 (first), and an id of each member's own,
    # not the reference's 0, so the tie keeps the first member's 1.
    voted = vote_clusterings([np.array([0, 0, 1, 1]), np.array([4, 4, 6, 7]),
                              np.array([4, 4, 6, 7])])
    np.testing.assert_array_equal(voted, [0, 0, 1, 1])


def test_voted_recall_breaks_ties_by_the_closest_neighbour():
    # Classes A A B. Member 1 on the line at 0, 5, 1; member 2 at 0, 2, 10 (squared L2).
    # Rank 1: p0: m1 -> p2 B @1,  m2 -> p1 A @4   tie -> B (closer): miss
    #         p1: m1 -> p2 B @16, m2 -> p0 A @4   tie -> A (closer): hit
    #         p2: m1 -> p0 A @1,  m2 -> p1 A @64  -> A: miss                   R@1 = 1/3
    # Rank 2: p0: m1 -> p1 A @25, m2 -> p2 B @100 tie -> A: hit; p2: A, A: miss R@2 = 2/3
    # (ties to the first member would give R@1 = 0.)
    labels = np.array([0, 0, 1])
    m1, m2 = line(0, 5, 1), line(0, 2, 10)
    assert voted_recall_at_k([m1, m2], labels, ks=(1, 2), normalize=False) == {
        1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}
    # Member 2 at 0, 0.5, 10: its rank-1 neighbours are closer (0.25) and win both ties: R@1 2/3.
    assert voted_recall_at_k([m1, line(0, 0.5, 10)], labels, ks=(1,), normalize=False) == {
        1: pytest.approx(2 / 3)}
    # A third member like member 2 outvotes member 1 on p0: B, A, A -> A (hit): R@1 = 2/3.
    assert voted_recall_at_k([m1, m2, m2], labels, ks=(1,), normalize=False) == {
        1: pytest.approx(2 / 3)}


def test_voted_recall_of_one_member_is_recall_at_k():
    x, labels = blobs(6, 8, spread=1.0)
    assert voted_recall_at_k([x], labels, ks=(1, 2, 4)) == recall_at_k(x, labels, ks=(1, 2, 4))


def test_clustering_report_normalises_each_member_block():
    x, labels = blobs(6, 8, spread=1.0)
    y, _ = blobs(6, 8, spread=1.0, seed=1)
    ensemble = np.concatenate([x, 100 * y], axis=1)  # member 2's scale must not dominate
    unit_x, unit_y = F.normalize(torch.from_numpy(x)), F.normalize(torch.from_numpy(y))
    mean = clustering_report(ensemble, labels, ks=(1, 2), members=2, inference="mean")
    assert mean == clustering_report((unit_x + unit_y) / 2, labels, ks=(1, 2))
    concat = clustering_report(ensemble, labels, ks=(1, 2), members=2, inference="concat")
    assert concat == clustering_report(torch.cat([unit_x, unit_y], 1), labels, ks=(1, 2))
    assert list(mean) == ["NMI", "F1", "R@1", "R@2"] and 0 < mean["NMI"] < 100
    with pytest.raises(ValueError, match="do not split into 3 equal member embeddings"):
        clustering_report(ensemble, labels, members=3)


def test_clustering_report_of_identical_members_is_the_single_models():
    x, labels = blobs(6, 8, spread=1.0)
    single = clustering_report(x, labels, ks=(1, 4), seed=5)
    for inference in ("mean", "concat", "vote"):
        assert clustering_report(np.tile(x, 3), labels, ks=(1, 4), seed=5, members=3,
                                 inference=inference) == single


# --- the registered evaluator ---------------------------------------------------------------------
def clustering_cfg(*opts):
    from robustreid.config import load_config

    return load_config("", ["TEST.EVALUATOR", "ClusteringEvaluator", *opts])


def test_clustering_evaluator_pools_the_test_stream_once_per_image():
    from robustreid.evaluation import build_reid_evaluator
    from robustreid.evaluation.clustering_evaluator import ClusteringEvaluator

    x, labels = blobs(5, 6, spread=2.0)
    paths = [f"img{i}.jpg" for i in range(30)]
    # Query = the first 10 images, gallery = all 30 (the first 10 listed twice).
    order = list(range(10)) + list(range(30))
    cfg = clustering_cfg("TEST.CLUSTERING.RECALL_KS", "(1, 2)", "TEST.CLUSTERING.INFERENCE", "mean")
    evaluator = build_reid_evaluator(cfg, num_query=10)
    assert type(evaluator) is ClusteringEvaluator
    evaluator.reset()
    for start in range(0, len(order), 16):
        batch = order[start:start + 16]
        evaluator.process({"targets": torch.from_numpy(labels[batch]),
                           "img_paths": [paths[i] for i in batch]}, torch.from_numpy(x[batch]))
    results = evaluator.evaluate()
    expected = clustering_report(x, labels, ks=(1, 2), seed=0, inference="mean")
    assert isinstance(results, OrderedDict)
    assert results == OrderedDict(**expected, metric=expected["R@1"])
    # Counted twice, the duplicated images would be their own twins' nearest neighbours.
    twice = clustering_report(x[order], labels[order], ks=(1, 2), inference="mean")
    assert twice["R@1"] > results["R@1"] + 10


@pytest.mark.parametrize("key, value, message", [
    ("INFERENCE", "median", "TEST.CLUSTERING.INFERENCE must be one of .*got 'median'"),
    ("RECALL_KS", "(1, 0)", r"TEST.CLUSTERING.RECALL_KS must be positive integers, got \(1, 0\)"),
    ("KMEANS_NITER", "0", "TEST.CLUSTERING.KMEANS_NITER must be a positive integer, got 0"),
    ("MEMBERS", "0", "TEST.CLUSTERING.MEMBERS must be a positive integer, got 0"),
    ("SEED", "-1", "TEST.CLUSTERING.SEED must be an integer >= 0, got -1"),
])
def test_bad_clustering_values_are_config_errors(key, value, message):
    from robustreid.config import ConfigError
    from robustreid.evaluation import build_reid_evaluator

    with pytest.raises(ConfigError, match=message):
        build_reid_evaluator(clustering_cfg(f"TEST.CLUSTERING.{key}", value), num_query=0)


def test_train_net_stops_on_a_bad_clustering_value_before_training(tmp_path, datasets_root, capsys):
    from test_preflight import CONFIG, TINY_OPTS, error_lines, load_tool

    out = tmp_path / "out"
    argv = ["--config-file", CONFIG, *TINY_OPTS, "OUTPUT_DIR", str(out),
            "TEST.EVALUATOR", "ClusteringEvaluator", "TEST.CLUSTERING.INFERENCE", "median"]
    assert load_tool("train_net").cli(argv) == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: TEST.CLUSTERING.INFERENCE must be one of ['mean', 'concat', 'vote'], got 'median'"]
    assert not out.exists()

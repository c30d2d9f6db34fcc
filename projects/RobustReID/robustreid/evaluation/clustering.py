"""Clustering metrics of deep metric learning (EAT, eq. 11-13), single models and ensembles.

* :func:`kmeans_labels`: faiss k-means (exact assignments, seeded), k = number of test classes;
* :func:`nmi` (eq. 13) and :func:`pairwise_f1` (eq. 12) of a clustering against the class labels,
  both from the sparse contingency table (never an n x n or classes x clusters array);
* :func:`recall_at_k` (eq. 11): the DML Recall@k, a sample is a hit when one of its k nearest
  neighbours (itself excluded) shares its class;
* ensemble inference by voting (the paper's "Model inference"): :func:`vote_clusterings` and
  :func:`voted_recall_at_k`;
* :func:`clustering_report`: NMI, F1 and R@k in percent, for one model or an ensemble whose member
  embeddings are concatenated.

Features are L2-normalised before clustering and retrieval (the DML convention: squared Euclidean
distance on the unit sphere ranks as cosine), unless ``normalize=False``.
"""
from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .retrieval import _import_faiss, faiss_gpu_available, knn, to_float_tensor

INFERENCES = ("mean", "concat", "vote")
# faiss' own default is 25; 20 is the DML papers' (and pytorch-metric-learning's) setting.
KMEANS_NITER = 20


def kmeans_labels(features, k: int, seed: int, niter: int = KMEANS_NITER, normalize: bool = True,
                  use_gpu: bool = False) -> np.ndarray:
    """Cluster index (0..k-1) of every row of ``features`` by faiss k-means, shape ``(n,)``.

    ``normalize`` L2-normalises the rows first.  Every row trains (no subsampling, no warning about
    few points per centroid: DML test classes hold tens of images) and the final assignment is an
    exact nearest-centroid search.  ``use_gpu`` runs faiss-gpu when it is installed and sees a GPU.
    """
    x = to_float_tensor(features)
    if normalize:
        x = F.normalize(x, p=2, dim=1)
    x = np.ascontiguousarray(x.numpy())
    n, dim = x.shape
    if not 0 < k <= n:
        raise ValueError(f"k-means needs 0 < k <= number of samples, got k={k} for {n} samples")
    faiss = _import_faiss()
    kmeans = faiss.Kmeans(dim, int(k), niter=int(niter), seed=int(seed), verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=n,
                          gpu=bool(use_gpu and faiss_gpu_available()))
    kmeans.train(x)
    _, assignment = kmeans.index.search(x, 1)
    return assignment[:, 0].astype(np.int64)


def _contingency(labels, clusters):
    """The non-empty cells of the class x cluster contingency table, as int64 arrays:
    (cell counts, each cell's class size, each cell's cluster size, class sizes, cluster sizes)."""
    labels, clusters = np.asarray(labels).ravel(), np.asarray(clusters).ravel()
    if labels.shape != clusters.shape or labels.size == 0:
        raise ValueError(f"labels and clusters must be non-empty and of one length, got "
                         f"{labels.size} and {clusters.size}")
    _, class_idx, class_sizes = np.unique(labels, return_inverse=True, return_counts=True)
    _, cluster_idx, cluster_sizes = np.unique(clusters, return_inverse=True, return_counts=True)
    num_clusters = len(cluster_sizes)
    keys, cells = np.unique(class_idx.astype(np.int64) * num_clusters + cluster_idx,
                            return_counts=True)
    return (cells, class_sizes[keys // num_clusters], cluster_sizes[keys % num_clusters],
            class_sizes, cluster_sizes)


def _entropy(sizes, n):
    p = sizes / n
    return float(-(p * np.log(p)).sum())


def nmi(labels, clusters) -> float:
    """Normalised mutual information (eq. 13): ``2 I(Omega; C) / (H(Omega) + H(C))`` in [0, 1].

    The arithmetic normalisation (sklearn's ``average_method="arithmetic"``).  Two constant
    partitions are identical: 1.0.
    """
    cells, cell_class, cell_cluster, class_sizes, cluster_sizes = _contingency(labels, clusters)
    n = int(cells.sum())
    denominator = _entropy(class_sizes, n) + _entropy(cluster_sizes, n)
    if denominator == 0.0:
        return 1.0
    # I = sum over non-empty cells of p_ij log(p_ij / (p_i p_j)) = n_ij/n log(n n_ij / (n_i n_j)).
    outer = cell_class.astype(np.float64) * cell_cluster
    mutual_info = float((cells / n * np.log(cells * n / outer)).sum())
    return max(0.0, 2.0 * mutual_info / denominator)


def _pairs(sizes):
    sizes = np.asarray(sizes, dtype=np.int64)
    return int((sizes * (sizes - 1) // 2).sum())


def pairwise_f1(labels, clusters) -> float:
    """Pairwise F1 (eq. 12): ``2 TP / (2 TP + FN + FP)`` over the ``n (n-1) / 2`` sample pairs.

    TP: same class and same cluster; FP: same cluster, other class; FN: same class, other cluster.
    With ``comb(m, 2)`` summed over cells (TP), clusters (TP + FP) and classes (TP + FN), nothing of
    size n^2 is built.  Without any same-class or same-cluster pair both partitions are all
    singletons, i.e. identical: 1.0.
    """
    cells, _, _, class_sizes, cluster_sizes = _contingency(labels, clusters)
    tp = _pairs(cells)
    denominator = _pairs(class_sizes) + _pairs(cluster_sizes)  # (TP + FN) + (TP + FP)
    return 1.0 if denominator == 0 else 2.0 * tp / denominator


def _neighbour_lists(features, k: int, normalize: bool, use_gpu: bool):
    """(distances, indices) of each row's ``k`` nearest other rows, nearest first, shape (n, k).

    Searches k + 1 neighbours and drops the row itself wherever it appears (an exact duplicate may
    outrank it); rows whose self fell out of the k + 1 drop their last neighbour instead.
    """
    x = to_float_tensor(features)
    n = x.shape[0]
    if not 0 < k < n:
        raise ValueError(f"Recall@k needs 0 < k < number of samples, got k={k} for {n} samples")
    # Exact faiss flat search; faiss scores it in blocks of queries x database rows, so memory
    # stays at the (n, k + 1) result.
    dist, idx = knn(x, k + 1, metric="cosine" if normalize else "euclidean", use_gpu=use_gpu)
    is_self = idx == np.arange(n)[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(idx, order, axis=1)


def _recall_from_predictions(predicted, labels, ks) -> Dict[int, float]:
    """{k: fraction of rows whose first k predicted labels contain their own label}."""
    first_hit = np.cumsum(predicted == labels[:, None], axis=1) > 0
    return {k: float(first_hit[:, k - 1].mean()) for k in ks}


def _check_ks(ks):
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"Recall@k needs positive ks, got {list(ks)}")
    return ks


def recall_at_k(features, labels, ks: Sequence[int] = (1, 2, 4, 8), normalize: bool = True,
                use_gpu: bool = False) -> Dict[int, float]:
    """Recall@k (eq. 11) in [0, 1] for each k in ``ks``, every sample a query against all others.

    A sample counts as a hit at k when one of its k nearest neighbours (itself excluded) has its
    label; TP / (TP + FN) is the fraction of hits.  Neighbours come from an exact faiss flat index
    (cosine on L2-normalised rows, or squared L2 with ``normalize=False``).
    """
    ks = _check_ks(ks)
    labels = np.asarray(labels).ravel()
    _, idx = _neighbour_lists(features, max(ks), normalize, use_gpu)
    return _recall_from_predictions(labels[idx], labels, ks)


def _majority(votes, tie_order):
    """Per row, the most frequent entry of ``votes`` (n, M); ties go to the tied entry whose column
    comes first in ``tie_order`` (n, M) (column indices, best first)."""
    # counts[i, m]: how many columns of row i hold the label of column m
    counts = (votes[:, :, None] == votes[:, None, :]).sum(axis=2)
    ranked = np.take_along_axis(counts, tie_order, axis=1)
    winner = np.take_along_axis(tie_order, ranked.argmax(axis=1)[:, None], axis=1)
    return np.take_along_axis(votes, winner, axis=1)[:, 0]


def vote_clusterings(clusterings: Sequence) -> np.ndarray:
    """One clustering from several members' clusterings of the same samples, by majority vote.

    Cluster ids are arbitrary per member, so each member's clusters are first matched one-to-one to
    the first member's by the Hungarian method (maximum agreement on the contingency matrix;
    scipy's ``linear_sum_assignment``, O(k^3) for k clusters).  A member cluster left unmatched
    (members with different cluster counts) votes for an id no other cluster has.  Then each
    sample takes the label most members give it; a tie goes to the earliest member among the
    tied, so the first member's label whenever it is tied.  Returns the first member's ids, (n,).
    """
    members = [np.asarray(c).ravel() for c in clusterings]
    if not members or any(m.shape != members[0].shape for m in members):
        raise ValueError("vote_clusterings needs one or more clusterings of the same samples")
    reference_ids, reference = np.unique(members[0], return_inverse=True)
    aligned = [members[0].astype(np.int64)]
    fresh_id = int(reference_ids.max()) + 1
    for member in members[1:]:
        member_ids, member_idx = np.unique(member, return_inverse=True)
        agreement = np.zeros((len(reference_ids), len(member_ids)), dtype=np.int64)
        np.add.at(agreement, (reference, member_idx), 1)
        rows, cols = linear_sum_assignment(agreement, maximize=True)
        mapping = np.arange(fresh_id, fresh_id + len(member_ids), dtype=np.int64)
        mapping[cols] = reference_ids[rows]
        aligned.append(mapping[member_idx])
        fresh_id += len(member_ids)
    votes = np.stack(aligned, axis=1)
    in_member_order = np.broadcast_to(np.arange(votes.shape[1]), votes.shape)
    return _majority(votes, in_member_order)


def voted_recall_at_k(member_features: Sequence, labels, ks: Sequence[int] = (1, 2, 4, 8),
                      normalize: bool = True, use_gpu: bool = False) -> Dict[int, float]:
    """Recall@k of an ensemble by voting on neighbour labels, in [0, 1] for each k in ``ks``.

    The paper votes on "the predicted label of each model" without fixing the rule for a ranked
    list; ours: each member ranks the other samples by its own embedding; the ensemble's rank-r
    prediction is the label most members have at their rank r (ties: the tied label of the member
    whose rank-r neighbour is closest; distances are comparable across members because each
    member's features are L2-normalised); a sample is a hit at k when one of the first k ensemble
    predictions is its label.  With one member this is :func:`recall_at_k`.
    """
    ks = _check_ks(ks)
    labels = np.asarray(labels).ravel()
    lists = [_neighbour_lists(f, max(ks), normalize, use_gpu) for f in member_features]
    if not lists:
        raise ValueError("voted_recall_at_k needs one or more members")
    dist = np.stack([d for d, _ in lists], axis=2)            # (n, k, M)
    votes = np.stack([labels[i] for _, i in lists], axis=2)   # (n, k, M)
    n, k, members = votes.shape
    by_distance = np.argsort(dist.reshape(n * k, members), axis=1, kind="stable")
    predicted = _majority(votes.reshape(n * k, members), by_distance).reshape(n, k)
    return _recall_from_predictions(predicted, labels, ks)


def split_members(features, members: int):
    """The ``members`` equal column blocks of ``features`` (n, members * d), each L2-normalised."""
    x = to_float_tensor(features)
    if members < 1 or x.shape[1] % members:
        raise ValueError(f"features of dimension {x.shape[1]} do not split into {members} equal "
                         f"member embeddings")
    return [F.normalize(block, p=2, dim=1) for block in torch.chunk(x, members, dim=1)]


def clustering_report(features, labels, ks: Sequence[int] = (1, 2, 4, 8), seed: int = 0,
                      members: int = 1, inference: str = "mean", niter: int = KMEANS_NITER,
                      use_gpu: bool = False) -> Dict[str, float]:
    """``{"NMI", "F1", "R@k" for k in ks}`` in percent, k-means with k = number of classes.

    ``features`` (n, members * d) holds one d-dimensional embedding per ensemble member side by
    side (``members=1``: a single model); each is L2-normalised here.  ``inference`` combines them:

    * ``"mean"``: the mean of the normalised member embeddings (differentiable: what an attack
      on the ensemble sees);
    * ``"concat"``: the normalised embeddings concatenated;
    * ``"vote"`` (the paper's): k-means per member, merged by :func:`vote_clusterings` for NMI/F1,
      and :func:`voted_recall_at_k` for R@k.
    """
    if inference not in INFERENCES:
        raise ValueError(f"unknown ensemble inference {inference!r}; expected one of {INFERENCES}")
    ks = _check_ks(ks)
    labels = np.asarray(labels).ravel()
    blocks = split_members(features, members)
    num_classes = len(np.unique(labels))
    if inference == "vote":
        clusters = vote_clusterings([kmeans_labels(b, num_classes, seed, niter, use_gpu=use_gpu)
                                     for b in blocks])
        recalls = voted_recall_at_k(blocks, labels, ks, use_gpu=use_gpu)
    else:
        combined = torch.stack(blocks).mean(dim=0) if inference == "mean" else torch.cat(blocks, 1)
        clusters = kmeans_labels(combined, num_classes, seed, niter, use_gpu=use_gpu)
        recalls = recall_at_k(combined, labels, ks, use_gpu=use_gpu)
    report = {"NMI": 100.0 * nmi(labels, clusters), "F1": 100.0 * pairwise_f1(labels, clusters)}
    report.update({f"R@{k}": 100.0 * r for k, r in recalls.items()})
    return report

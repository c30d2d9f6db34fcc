"""Evaluation: streamed exact retrieval, exact CMC/mAP/mINP, CPU re-ranking, faiss-backed evaluator.

* :class:`FaissReidEvaluator` / :func:`build_reid_evaluator` (selects by ``cfg.TEST.EVALUATOR``);
* :func:`evaluate_rank_from_features` / :func:`evaluate_rank_from_distances`: drop-ins for fastreid's
  ``evaluate_rank`` (Market-1501 protocol) that never sort or hold a full distance matrix;
* :func:`k_reciprocal_jaccard` / :func:`rerank_distance`: k-reciprocal re-ranking on CPU or GPU;
* :class:`ExactRetriever` / :func:`knn`: exact distances and k-NN (torch / faiss-cpu / faiss-gpu);
* :func:`build_index` / :class:`IndexOptions`: top-k search behind ``TEST.FAISS.INDEX``, exact or
  faiss approximate (IVF, PQ, HNSW; GPU shards), with :mod:`.approximation`'s recall report;
  :class:`FeatureStore`: resumable on-disk features for galleries larger than RAM;
* :func:`clustering_report` / :class:`ClusteringEvaluator`: deep-metric-learning NMI, pairwise F1 and
  Recall@k (EAT eq. 11-13), with ensemble voting.
"""
from .clustering import (clustering_report, kmeans_labels, nmi, pairwise_f1, recall_at_k,
                         vote_clusterings, voted_recall_at_k)
from .clustering_evaluator import ClusteringEvaluator, check_clustering_config
from .faiss_evaluator import FaissReidEvaluator, build_reid_evaluator
from .feature_store import FeatureStore
from .indexes import IndexOptions, build_index
from .ranking import evaluate_rank_from_distances, evaluate_rank_from_features, evaluate_rank_from_topk
from .rerank import k_reciprocal_jaccard, rerank_distance
from .retrieval import ExactRetriever, faiss_gpu_available, knn

__all__ = [
    "ClusteringEvaluator",
    "ExactRetriever",
    "FaissReidEvaluator",
    "FeatureStore",
    "IndexOptions",
    "build_index",
    "build_reid_evaluator",
    "check_clustering_config",
    "clustering_report",
    "evaluate_rank_from_distances",
    "evaluate_rank_from_features",
    "evaluate_rank_from_topk",
    "faiss_gpu_available",
    "k_reciprocal_jaccard",
    "kmeans_labels",
    "knn",
    "nmi",
    "pairwise_f1",
    "recall_at_k",
    "rerank_distance",
    "vote_clusterings",
    "voted_recall_at_k",
]

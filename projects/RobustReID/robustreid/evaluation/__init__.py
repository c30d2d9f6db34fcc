"""Evaluation: streamed exact retrieval, exact CMC/mAP/mINP, CPU re-ranking, faiss-backed evaluator.

* :class:`FaissReidEvaluator` / :func:`build_reid_evaluator` (selects by ``cfg.TEST.EVALUATOR``);
* :func:`evaluate_rank_from_features` / :func:`evaluate_rank_from_distances`: drop-ins for fastreid's
  ``evaluate_rank`` (Market-1501 protocol) that never sort or hold a full distance matrix;
* :func:`k_reciprocal_jaccard` / :func:`rerank_distance`: k-reciprocal re-ranking on CPU or GPU;
* :class:`ExactRetriever` / :func:`knn`: exact distances and k-NN (torch / faiss-cpu / faiss-gpu).
"""
from .faiss_evaluator import FaissReidEvaluator, build_reid_evaluator
from .ranking import evaluate_rank_from_distances, evaluate_rank_from_features
from .rerank import k_reciprocal_jaccard, rerank_distance
from .retrieval import ExactRetriever, faiss_gpu_available, knn

__all__ = [
    "ExactRetriever",
    "FaissReidEvaluator",
    "build_reid_evaluator",
    "evaluate_rank_from_distances",
    "evaluate_rank_from_features",
    "faiss_gpu_available",
    "k_reciprocal_jaccard",
    "knn",
    "rerank_distance",
]

"""``ClusteringEvaluator``: fastreid's DatasetEvaluator contract with the DML clustering metrics.

``TEST.EVALUATOR ClusteringEvaluator`` scores a test set as deep-metric-learning papers do (EAT,
eq. 11-13): NMI and pairwise F1 of a k-means clustering (k = number of test classes) and Recall@k,
from :func:`robustreid.evaluation.clustering.clustering_report` with ``cfg.TEST.CLUSTERING``.

DML test sets have no query/gallery split: every test image is clustered and is a query against
all the others, so the query and gallery parts of fastreid's test stream are pooled (an image listed
in both counts once, by its path).  Retrieval is cosine on L2-normalised features whatever
TEST.METRIC says (the DML convention).

An EAT ensemble (MODEL.META_ARCHITECTURE EnsembleReID) is scored by its own inference:
:func:`clustering_inference` takes the member count and the inference from EAT.MEMBERS and
EAT.INFERENCE, so an EAT config needs no TEST.CLUSTERING keys; a TEST.CLUSTERING.MEMBERS or
INFERENCE set to another value than its default and the model's is a ConfigError naming both keys.
"""
import copy
import itertools
import numbers
from collections import OrderedDict

import numpy as np
import torch
from fastreid.evaluation.evaluator import DatasetEvaluator

from ..config import ConfigError, _positive_int
from ..parallel import gather_on_main
from .clustering import INFERENCES, clustering_report
from .faiss_evaluator import _faiss_options

# TEST.CLUSTERING.MEMBERS / INFERENCE defaults: with an ensemble they mean "the model's".
DEFAULT_MEMBERS, DEFAULT_INFERENCE = 1, "vote"


def clustering_inference(cfg):
    """(members, inference) the clustering metrics combine the model's output with.

    EnsembleReID outputs its N unit member embeddings side by side for EAT.INFERENCE vote and
    concat, their mean for "mean" (modeling/meta_arch/ensemble.py): (EAT.MEMBERS or 1,
    EAT.INFERENCE).  Any other model: (TEST.CLUSTERING.MEMBERS, TEST.CLUSTERING.INFERENCE).
    """
    clustering = cfg.TEST.CLUSTERING
    if cfg.MODEL.META_ARCHITECTURE != "EnsembleReID":
        return clustering.MEMBERS, clustering.INFERENCE
    inference = cfg.EAT.INFERENCE
    return (1 if inference == "mean" else cfg.EAT.MEMBERS), inference


def _check_ensemble_agreement(cfg):
    """An explicit TEST.CLUSTERING.MEMBERS / INFERENCE must be the ensemble's own."""
    if cfg.MODEL.META_ARCHITECTURE != "EnsembleReID":
        return
    clustering, eat = cfg.TEST.CLUSTERING, cfg.EAT
    members, inference = clustering_inference(cfg)
    if clustering.MEMBERS not in (DEFAULT_MEMBERS, members):
        raise ConfigError(f"TEST.CLUSTERING.MEMBERS {clustering.MEMBERS} contradicts the "
                          f"ensemble's EAT.MEMBERS {eat.MEMBERS} with EAT.INFERENCE {eat.INFERENCE} "
                          f"(it outputs {members} embedding(s)): leave TEST.CLUSTERING.MEMBERS at "
                          f"{DEFAULT_MEMBERS} or set {members}")
    if clustering.INFERENCE not in (DEFAULT_INFERENCE, inference):
        raise ConfigError(f"TEST.CLUSTERING.INFERENCE {clustering.INFERENCE} contradicts the "
                          f"ensemble's EAT.INFERENCE {inference}: the evaluation uses the "
                          f"model's inference; leave TEST.CLUSTERING.INFERENCE at "
                          f"{DEFAULT_INFERENCE} or set {inference}")


def check_clustering_config(cfg):
    """ConfigError naming the first bad ``TEST.CLUSTERING`` key and its value."""
    clustering = cfg.TEST.CLUSTERING
    ks = clustering.RECALL_KS
    if not isinstance(ks, (list, tuple)) or not ks or not all(_positive_int(k) for k in ks):
        raise ConfigError(f"TEST.CLUSTERING.RECALL_KS must be positive integers, got {ks!r}")
    for key in ("KMEANS_NITER", "MEMBERS"):
        if not _positive_int(clustering[key]):
            raise ConfigError(f"TEST.CLUSTERING.{key} must be a positive integer, "
                              f"got {clustering[key]!r}")
    seed = clustering.SEED
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"TEST.CLUSTERING.SEED must be an integer >= 0, got {seed!r}")
    if clustering.INFERENCE not in INFERENCES:
        raise ConfigError(f"TEST.CLUSTERING.INFERENCE must be one of {list(INFERENCES)}, "
                          f"got {clustering.INFERENCE!r}")
    _check_ensemble_agreement(cfg)


def score_clustering(cfg, features, labels):
    """:func:`clustering_report` of ``features`` with ``cfg``'s TEST.CLUSTERING settings and the
    model's inference (:func:`clustering_inference`)."""
    clustering = cfg.TEST.CLUSTERING
    members, inference = clustering_inference(cfg)
    _, use_gpu, _ = _faiss_options(cfg)
    return clustering_report(features, labels, ks=clustering.RECALL_KS, seed=clustering.SEED,
                             members=members, inference=inference,
                             niter=clustering.KMEANS_NITER, use_gpu=use_gpu)


class ClusteringEvaluator(DatasetEvaluator):
    """NMI, F1 and Recall@k (percent) of the whole test set; ``metric`` (the key fastreid's
    best-model checkpointing reads) is Recall@ the smallest k, R@1 by default."""

    def __init__(self, cfg, num_query=None, output_dir=None):
        check_clustering_config(cfg)
        self.cfg = cfg
        self._output_dir = output_dir
        self._predictions = []

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        self._predictions.append({
            "feats": outputs.to("cpu", torch.float32),
            "pids": inputs["targets"].to("cpu"),
            "paths": list(inputs.get("img_paths", ())),
        })

    def evaluate(self):
        predictions = gather_on_main(self._predictions)
        if predictions is None:  # non-main rank in distributed evaluation
            return {}
        features = torch.cat([p["feats"] for p in predictions], dim=0)
        pids = torch.cat([p["pids"] for p in predictions], dim=0).numpy()
        paths = list(itertools.chain.from_iterable(p["paths"] for p in predictions))
        if len(paths) == len(pids):  # pool query and gallery: each image once
            _, first = np.unique(np.asarray(paths), return_index=True)
            keep = np.sort(first)
            features, pids = features[torch.from_numpy(keep)], pids[keep]

        results = OrderedDict(score_clustering(self.cfg, features, pids))
        results["metric"] = results[f"R@{min(self.cfg.TEST.CLUSTERING.RECALL_KS)}"]
        self._results = results
        return copy.deepcopy(results)

"""``FaissReidEvaluator``: fastreid's ReidEvaluator contract, streamed exact ranking, no Cython.

Drop-in for ``fastreid.evaluation.ReidEvaluator`` (same constructor, ``process``/``evaluate``/``reset``,
same result keys and scaling).  Differences:

* ranking streams over ``TEST.FAISS.QUERY_CHUNK`` queries at a time (:mod:`.ranking`), so the full
  query x gallery distance matrix is never materialised, and nothing is compiled;
* ``TEST.RERANK`` runs on CPU (:mod:`.rerank`, faiss-cpu) as well as GPU; re-ranking needs the full
  ``num_query x num_gallery`` distances, so with it enabled that matrix IS materialised;
* ``TEST.AQE`` reuses fastreid's ``aqe`` unchanged (it works on CPU, but builds an N x N similarity);
* ``TEST.ROC`` is not supported: a warning is logged and the TPR@FPR keys are left out;
* an approximate ``TEST.FAISS.INDEX`` (e.g. ``"IVF4096,PQ64"``, :mod:`.indexes`) ranks each query's
  top ``TEST.FAISS.TOPK`` only, and the results then also carry what the approximation cost
  (:mod:`.approximation`): ``approx/recall@k`` against exact search on a seeded sample of queries,
  ``approx/mAP_exact`` and ``approx/mAP_diff`` (approximate - exact), in percent.
"""
import copy
import logging
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from fastreid.evaluation.evaluator import DatasetEvaluator
from fastreid.evaluation.query_expansion import aqe

from ..parallel import gather_on_main
from .approximation import evaluate_approximate
from .indexes import IndexOptions, check_index_config
from .ranking import evaluate_rank_from_distances, evaluate_rank_from_features
from .rerank import rerank_distance
from .retrieval import ExactRetriever

logger = logging.getLogger(__name__)

EVALUATORS = ("FaissReidEvaluator", "ReidEvaluator", "ClusteringEvaluator")


def _faiss_options(cfg):
    """(query_chunk, use_gpu, backend) from cfg.TEST.FAISS, or the declared defaults if absent."""
    faiss_cfg = cfg.TEST.get("FAISS", None)
    if faiss_cfg is None:  # a plain fastreid config without add_robustreid_config
        return 1024, True, "auto"
    return int(faiss_cfg.QUERY_CHUNK), bool(faiss_cfg.USE_GPU), faiss_cfg.BACKEND


class FaissReidEvaluator(DatasetEvaluator):
    """Re-ID evaluator (Rank-1/5/10, mAP, mINP) with streamed exact retrieval."""

    def __init__(self, cfg, num_query, output_dir=None):
        self.cfg = cfg
        self._num_query = num_query
        self._output_dir = output_dir
        self._cpu_device = torch.device("cpu")
        self._predictions = []

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        self._predictions.append({
            "feats": outputs.to(self._cpu_device, torch.float32),
            "pids": inputs["targets"].to(self._cpu_device),
            "camids": inputs["camids"].to(self._cpu_device),
        })

    def evaluate(self):
        predictions = gather_on_main(self._predictions)
        if predictions is None:  # non-main rank in distributed evaluation
            return {}

        features = torch.cat([p["feats"] for p in predictions], dim=0)
        pids = torch.cat([p["pids"] for p in predictions], dim=0).numpy()
        camids = torch.cat([p["camids"] for p in predictions], dim=0).numpy()
        # Query first, then gallery (fastreid's test-set order).
        q_feats, g_feats = features[:self._num_query], features[self._num_query:]
        q_pids, g_pids = pids[:self._num_query], pids[self._num_query:]
        q_camids, g_camids = camids[:self._num_query], camids[self._num_query:]

        test = self.cfg.TEST
        metric = test.METRIC
        chunk, use_gpu, backend = _faiss_options(self.cfg)
        options = None
        if test.get("FAISS", None) is not None:
            check_index_config(self.cfg)
            options = IndexOptions.from_config(self.cfg)
        approx = None

        if test.AQE.ENABLED:
            logger.info("Test with AQE setting")
            q_feats, g_feats = aqe(q_feats, g_feats, test.AQE.QE_TIME, test.AQE.QE_K, test.AQE.ALPHA)

        if test.RERANK.ENABLED:
            logger.info("Test with rerank setting (materialises the %d x %d distance matrix)",
                        len(q_pids), len(g_pids))
            retriever = ExactRetriever(g_feats, metric=metric, use_gpu=use_gpu, backend=backend)
            dist = retriever.full_distances(q_feats, chunk)
            if metric == "cosine":
                q_feats, g_feats = F.normalize(q_feats, dim=1), F.normalize(g_feats, dim=1)
            dist = rerank_distance(q_feats, g_feats, dist, k1=test.RERANK.K1, k2=test.RERANK.K2,
                                   lambda_value=test.RERANK.LAMBDA, use_gpu=use_gpu)
            cmc, all_ap, all_inp = evaluate_rank_from_distances(dist, q_pids, g_pids, q_camids,
                                                                g_camids, chunk_size=chunk)
        elif options is not None and not options.exact:
            cmc, all_ap, all_inp, approx = evaluate_approximate(
                q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, options,
                topk=test.FAISS.TOPK, ks=test.FAISS.RECALL_KS,
                sample_size=test.FAISS.APPROX_QUERIES)
        else:
            cmc, all_ap, all_inp = evaluate_rank_from_features(
                q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, metric=metric,
                chunk_size=chunk, use_gpu=use_gpu, backend=backend)

        m_ap, m_inp = np.mean(all_ap), np.mean(all_inp)
        results = OrderedDict()
        for r in (1, 5, 10):  # a gallery shorter than r: the CMC is flat past its last entry
            results["Rank-{}".format(r)] = cmc[min(r, len(cmc)) - 1] * 100
        results["mAP"] = m_ap * 100
        results["mINP"] = m_inp * 100
        results["metric"] = (m_ap + cmc[0]) / 2 * 100
        if approx is not None:  # what the approximate index costs, next to what it gave
            for k in test.FAISS.RECALL_KS:
                results[f"approx/recall@{k}"] = approx[f"recall@{k}"] * 100
            results["approx/mAP_exact"] = approx["mAP_exact"] * 100
            results["approx/mAP_diff"] = approx["mAP_diff"] * 100

        if test.ROC.ENABLED:
            logger.warning("TEST.ROC is not supported by FaissReidEvaluator; TPR@FPR is skipped "
                           "(set TEST.EVALUATOR=ReidEvaluator to get it)")
        self._results = results
        return copy.deepcopy(results)


def build_reid_evaluator(cfg, num_query, output_dir=None):
    """The evaluator named by ``cfg.TEST.EVALUATOR`` (default ``FaissReidEvaluator``)."""
    name = cfg.TEST.get("EVALUATOR", "FaissReidEvaluator")
    if name == "FaissReidEvaluator":
        return FaissReidEvaluator(cfg, num_query, output_dir)
    if name == "ReidEvaluator":
        from fastreid.evaluation import ReidEvaluator

        return ReidEvaluator(cfg, num_query, output_dir)
    if name == "ClusteringEvaluator":
        from .clustering_evaluator import ClusteringEvaluator

        return ClusteringEvaluator(cfg, num_query, output_dir)
    raise ValueError(f"Unknown TEST.EVALUATOR {name!r}; expected one of {list(EVALUATORS)}")

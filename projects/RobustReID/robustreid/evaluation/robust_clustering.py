"""Robust evaluation in EAT's clustering threat model (Ke et al., "Towards Adversarially Robust Deep
Metric Learning", Tables 1-4): every test sample is attacked, then the attacked set is clustered and
retrieved as a whole, so no clean template is left to the model.

* Samples: the whole test set, query and gallery pooled with each image once (by path), in the order
  :class:`ClusteringEvaluator` sees them, so the clean row is its numbers; ``max_samples`` keeps a
  seeded subset of whole classes (:func:`select_queries`: every kept sample keeps its same-class
  neighbours, and k-means' k is the number of kept classes).
* Attack (a :class:`PGDCell`): L-inf PGD on the self-metric objective L(F(x_adv), F(x)) from a
  uniform random point of the eps-ball, i.e. the registered SMA, the objective of EAT's training
  attack (eq. 10); the paper tests at eps 8/255 with 10 iterations. Batches of TEST.IMS_PER_BATCH,
  each checked against its budget (:class:`BudgetViolation`).
* Attack target: the model's eval output, differentiably. An EnsembleReID with EAT.INFERENCE vote
  has none (voting is not differentiable): it is attacked through the mean of its unit member
  embeddings, the whole ensemble's differentiable surrogate, never one member or nothing (that
  would be gradient masking); results say ``"attack_target": "surrogate: mean embedding"``.
* Scoring: the model's real inference on the attacked images (a voting ensemble votes), by
  :func:`score_clustering`: NMI, F1 and Recall@k in percent.
* :func:`ers`: an ERS-style summary of each attacked row (see there).
"""
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..attacks import ReidFeatureExtractor, build_attack
from ..config import ConfigError
from ..data.test_loader import plain_test_loader
from ..data.validation import build_dataset
from ..modeling.meta_arch.ensemble import EnsembleEmbedding, EnsembleReID
from ..parallel import unwrap
from .clustering_evaluator import clustering_inference, score_clustering
from .attack_grid import format_eps
from .report_files import write_report_files
from .robust import BudgetViolation, select_queries

logger = logging.getLogger(__name__)

ATTACK = "SMA"  # the registered attack whose objective is L(F(x_adv), F(x)), from a random start
SURROGATE = "surrogate: mean embedding"
MODEL_OUTPUT = "model output"


@dataclass(frozen=True)
class PGDCell:
    """One attacked row: PGD with budget ``eps``, ``steps`` iterations and ``step_size`` (1/255
    units)."""

    eps: float
    steps: int
    step_size: float

    @property
    def key(self):
        return f"PGD_{format_eps(self.eps)}_{self.steps}"

    @property
    def label(self):
        """The paper's row name "PGD-10", with the budget: "PGD-10 8/255"."""
        return f"PGD-{self.steps} {format_eps(self.eps)}/255"


def ers(clean, attacked, metrics):
    """ERS-style robustness summary of one attacked row, in percent: the mean over ``metrics``
    (NMI, F1, R@k) of 100 * attacked / clean, i.e. how much of each clean score the attack leaves,
    averaged. Not clipped (an attack that raises a metric scores it above 100); metrics whose clean
    value is 0 are left out; None when none is left.

    robrank's ERS (Zhou et al.) averages normalised metrics over its own suite of ranking attacks;
    this one normalises by the clean score and averages over PGD's clustering metrics only, so the
    two are comparable in spirit, not in value.
    """
    ratios = [attacked[m] / clean[m] for m in metrics if clean[m] != 0]
    return 100.0 * float(np.mean(ratios)) if ratios else None


def pooled_items(query, gallery):
    """Query then gallery items, an image listed in both once (its first listing), as
    :class:`ClusteringEvaluator` pools fastreid's test stream."""
    seen, items = set(), []
    for item in [*query, *gallery]:
        if item[0] not in seen:
            seen.add(item[0])
            items.append(item)
    return items


def clustering_samples(dataset_name, max_samples, seed):
    """The evaluated set of ``dataset_name``: its pooled test items, or a seeded subset of
    ``max_samples`` made of whole classes (0: all)."""
    data = build_dataset(dataset_name)
    return select_queries(pooled_items(data.query, data.gallery), max_samples, seed)


def check_sample_counts(cfg, max_samples, seed, option="--max-queries"):
    """ConfigError when a test set (or its subset, ``option``) is too small for the largest k of
    TEST.CLUSTERING.RECALL_KS (Recall@k needs more than k samples)."""
    k = max(cfg.TEST.CLUSTERING.RECALL_KS)
    for name in cfg.DATASETS.TESTS:
        count = len(clustering_samples(name, max_samples, seed))
        if count <= k:
            subset = f" ({option} {max_samples})" if max_samples else ""
            raise ConfigError(f"{name}: {count} test samples{subset} are too few for Recall@{k} "
                              f"(TEST.CLUSTERING.RECALL_KS): it needs more than {k}")


def attack_extractor(model):
    """(extractor the attack differentiates, its name in reports) for ``model``: the model's eval
    output, or the mean member embedding of a voting EnsembleReID."""
    if isinstance(model, EnsembleReID) and model.inference == "vote":
        return ReidFeatureExtractor(EnsembleEmbedding(model.members, "mean")), SURROGATE
    return ReidFeatureExtractor(model), MODEL_OUTPUT


class ClusteringRobustEvaluator:
    """Clean and PGD-attacked clustering metrics of one model on one test dataset.

    ``evaluate_clean()`` embeds the clean set once; ``evaluate_cell(cell)`` attacks every sample
    and scores the attacked set on its own; ``run(cells)`` does both: one dataset's entry of a
    report. ``distance`` is the attack objective's (euclidean or cosine).
    """

    def __init__(self, cfg, model, dataset_name, *, distance="euclidean", max_samples=0, seed=0,
                 progress=True):
        self.cfg = cfg
        self.model = unwrap(model)  # robust evaluation runs on one process
        self.dataset_name = dataset_name
        self.distance = distance
        self.seed = int(seed)
        self.progress = progress
        self.members, self.inference = clustering_inference(cfg)
        self.metrics = ["NMI", "F1", *(f"R@{k}" for k in cfg.TEST.CLUSTERING.RECALL_KS)]
        # Scores come from the model itself (not a BN-folded copy): ClusteringEvaluator's features.
        self.embedder = ReidFeatureExtractor(self.model, fold_bn=False)
        self.attack_extractor, self.attack_target = attack_extractor(self.model)
        self.device = next(self.model.parameters()).device
        self.items = clustering_samples(dataset_name, max_samples, self.seed)
        self.labels = np.array([item[1] for item in self.items], dtype=np.int64)
        self.clean = None
        self.clean_seconds = None

    def _loader(self):
        return plain_test_loader(self.cfg, self.items)

    def _x01(self, batch):
        # fastreid's test transforms give [0, 255] floats; attacks work in [0, 1] (x / 255 * 255
        # is exact for the integer pixel values, so the model sees the loader's very images).
        return batch["images"].to(self.device, torch.float32) / 255.0

    @torch.no_grad()
    def _embed(self, x01):
        return self.embedder(x01).float().cpu()

    def _score(self, features):
        return score_clustering(self.cfg, features, self.labels)

    def evaluate_clean(self):
        """Clean metrics (the set is embedded once)."""
        if self.clean is None:
            start = time.perf_counter()
            with self.embedder.frozen_eval():
                features = torch.cat([self._embed(self._x01(batch)) for batch in self._loader()])
            self.clean_seconds = time.perf_counter() - start
            self.clean = self._score(features)
        return self.clean

    def build_attack(self, cell):
        return build_attack(ATTACK, self.attack_extractor, eps=cell.eps, steps=cell.steps,
                            step_size=cell.step_size, distance=self.distance)

    def _attacked_features(self, attack, cell):
        """The model's features of every attacked sample and the largest L-inf change, with each
        batch checked against the budget and the [0, 1] pixel range."""
        bound = cell.eps + 255e-6  # 1e-6 in [0, 1] units
        feats, max_linf = [], 0.0
        batches = tqdm(self._loader(), desc=f"{self.dataset_name} {cell.label}", unit="batch",
                       disable=not self.progress, dynamic_ncols=True)
        for batch in batches:
            x01 = self._x01(batch)
            adv = attack.perturb(x01, batch["targets"].to(self.device)).detach()
            linf = float((adv - x01).abs().max()) * 255.0
            in_range = bool(adv.min() >= 0) and bool(adv.max() <= 1)
            if linf > bound or not in_range:
                raise BudgetViolation(f"{cell.label}: max |adv - x| = {linf:.4f}/255 of "
                                      f"{format_eps(cell.eps)}/255, pixels in [0, 1]: {in_range}")
            max_linf = max(max_linf, linf)
            feats.append(self._embed(adv))
        return torch.cat(feats), max_linf

    def evaluate_cell(self, cell):
        """Metrics of the whole set attacked by ``cell``'s PGD, with its ERS-style summary."""
        self.evaluate_clean()
        attack = self.build_attack(cell)
        start = time.perf_counter()
        torch.manual_seed(self.seed)  # the random starts reproduce
        with self.embedder.frozen_eval(), self.attack_extractor.frozen_eval():
            features, max_linf = self._attacked_features(attack, cell)
        attack_seconds = time.perf_counter() - start
        metrics = self._score(features)
        result = {
            "key": cell.key, "label": cell.label, "attack": attack.name, "eps": cell.eps,
            "steps": cell.steps, "step_size_255": attack.step_size, "distance": attack.distance,
            "rand_init": attack.rand_init, "attack_target": self.attack_target,
            "max_linf_255": max_linf, "within_budget": True,  # a violation raises
            "seconds": {"attack": attack_seconds,
                        "score": time.perf_counter() - start - attack_seconds},
            **metrics, "ERS": ers(self.clean, metrics, self.metrics),
        }
        recall = self.metrics[2]  # Recall at the first k
        logger.info("%s %s (%s): NMI %.2f %s %.2f (clean %.2f / %.2f), %.1f s", self.dataset_name,
                    cell.label, self.attack_target, metrics["NMI"], recall, metrics[recall],
                    self.clean["NMI"], self.clean[recall], attack_seconds)
        return result

    def run(self, cells):
        """Clean metrics and every cell: one dataset's entry of a clustering robustness report."""
        clean = self.evaluate_clean()
        cells = [self.evaluate_cell(cell) for cell in cells]
        return {
            "dataset": self.dataset_name, "protocol": "clustering",
            "num_samples": len(self.items), "num_classes": len(np.unique(self.labels)),
            "members": self.members, "inference": self.inference,
            "attack_target": self.attack_target, "metrics": list(self.metrics),
            "clean": clean, "clean_seconds": self.clean_seconds, "cells": cells,
        }


# --------------------------------------------------------------------------- reports

def _value(result, metric):
    value = result.get(metric)
    return "" if value is None else f"{value:.2f}"


def clustering_markdown(report):
    """The paper's layout (rows Clean and PGD per model x dataset; NMI, F1, R@k columns) with the
    ERS-style column, then the attack details."""
    datasets = report["datasets"]
    settings = report["settings"]
    model = settings.get("model", "model")
    metrics = datasets[0]["metrics"] if datasets else []
    targets = sorted({d["attack_target"] for d in datasets})
    lines = [f"NMI, F1 and Recall@k (%) of k-means (k = classes) on the whole test set, every "
             f"sample attacked: L-inf PGD on L(F(x_adv), F(x)) from a random start ({ATTACK}), "
             f"attack distance {settings.get('distance')}; attack target: {', '.join(targets)}.",
             "",
             "| Model | Dataset | Setting | " + " | ".join(metrics) + " | ERS* |",
             "|---|---|---|" + "---|" * (len(metrics) + 1)]
    for d in datasets:
        rows = [("Clean", d["clean"])] + [
            (c["label"] + (f" ({c['attack_target']})" if c["attack_target"] == SURROGATE else ""),
             c) for c in d["cells"]]
        for setting, r in rows:
            lines.append(f"| {model} | {d['dataset']} | {setting} | "
                         + " | ".join(_value(r, m) for m in metrics) + f" | {_value(r, 'ERS')} |")
    lines += ["", "*ERS-style summary (ours): the mean over NMI, F1 and R@k of 100 x attacked / "
              "clean; robrank's ERS averages its own suite of ranking attacks, so compare in spirit "
              "only.", ""]
    for d in datasets:
        for c in d["cells"]:
            lines.append(f"ERS-style {d['dataset']} {c['label']}: {_value(c, 'ERS')}")
    lines += ["", "| Dataset | Setting | samples | classes | members | inference | step (/255) | "
              "max L-inf (/255) | attack s |", "|---|---|---|---|---|---|---|---|---|"]
    for d in datasets:
        for c in d["cells"]:
            lines.append(f"| {d['dataset']} | {c['label']} | {d['num_samples']} | "
                         f"{d['num_classes']} | {d['members']} | {d['inference']} | "
                         f"{c['step_size_255']:.4g} | {c['max_linf_255']:.3f} | "
                         f"{c['seconds']['attack']:.1f} |")
    return "\n".join(lines) + "\n"


def write_clustering_report(report, output_dir):
    """results.json and results.md in ``output_dir``; returns their paths."""
    return write_report_files(report, output_dir, clustering_markdown)

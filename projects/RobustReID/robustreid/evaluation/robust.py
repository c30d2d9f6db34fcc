"""Adversarial robustness evaluation of a ReID model: white-box metric attacks, per-identity mAP.

Protocol (Bouniot et al. 2020, used by DDDefense and DAS): the QUERY images are attacked, the gallery
is extracted from clean images, and the adversarial query features are ranked against the clean
gallery with the usual Market-1501 rules.  Guide sets follow each attack's reference
(:mod:`.guide_choice`): the query set for FNA, the clean gallery for the metric I-FGSM family (Bai et
al. 2020's AMA) and WMA.  ``attack_gallery`` switches to the AMA protocol (Bai et al. 2020): the
gallery is attacked and the queries stay clean (and guide the I-FGSM family).  Budgets are L-inf,
in 1/255 units of [0,1] images; a cell "FNA 8/255-16" is FNA with eps 8/255 and 16 iterations.
Tables report "mAP/Rank-1" as the papers do.

Clean features are extracted once (through the same :class:`ReidFeatureExtractor`, so any input
defense applies to clean images too); each attack cell then re-reads the attacked split, perturbs it
batch by batch, checks every batch against its budget and scores it.  Besides Rank-k/mAP/mINP every
result carries the per-identity mAP (mean AP over each identity's valid queries) with its mean and
standard deviation over identities (population std), DDDefense's fairness measure (its Fig. 8).

Not applied here: TEST.FLIP, TEST.AQE and TEST.RERANK (plain retrieval with TEST.METRIC).

The cells and their checks are in :mod:`.attack_grid`, the sanity checks in :mod:`.robust_sanity`,
the report files in :mod:`.robust_report`.
"""
import logging
import time

import numpy as np
import torch
from tqdm import tqdm

from ..attacks import EOTAttack, GuideSet, ReidFeatureExtractor, build_attack
from ..attacks.eot import expected_output
from ..data.test_loader import plain_test_loader
from ..data.validation import build_dataset
from .attack_grid import (METRICS, ROBUST_CONFIG_NAMES, AttackCell, attack_grid, format_eps,
                          parse_attack_options)
from .faiss_evaluator import _faiss_options
from .guide_choice import check_guides, guide_split_name
from .ranking import evaluate_rank_from_features, valid_query_mask

logger = logging.getLogger(__name__)

# Attack options of the evaluation that differ from the attack classes' defaults (those of the
# training attack); attack_options override them. FNA as Bouniot et al.'s evaluation code runs it:
# from x (not DDDefense eq. 3's random start) with the query's own clean feature among its push
# guides. Their code also pads each guide list up to the largest identity's query count with more
# copies of that feature, so on Market the own term weighs 1 + max - n; here it counts once (the
# same on SynthReID, two queries per identity). Measured on a 6-epoch SynthReID BoT R18 (clean mAP
# 56.5): mAP 19.96 vs 21.56 (random start, own row left out) at 1/255-16, 4.38 vs 5.61 at 2/255-4,
# 0.84 vs 0.85 at 8/255-16 (below chance, 2.2).
EVALUATION_OPTIONS = {"FNA": {"rand_init": False, "include_self": True}}


class BudgetViolation(AssertionError):
    """An attack returned an image outside its L-inf ball or outside [0, 1]."""

def chance_level(q_pids, g_pids, q_camids, g_camids, draws=5, seed=0):
    """mAP / Rank-1 (%) of random features on this query/gallery split: what 'no skill' scores."""
    rng = np.random.default_rng(seed)
    maps, rank1s = [], []
    for _ in range(draws):
        cmc, all_ap, _ = evaluate_rank_from_features(
            rng.standard_normal((len(q_pids), 64)).astype(np.float32),
            rng.standard_normal((len(g_pids), 64)).astype(np.float32),
            q_pids, g_pids, q_camids, g_camids, metric="euclidean")
        maps.append(np.mean(all_ap) * 100)
        rank1s.append(cmc[0] * 100)
    return float(np.mean(maps)), float(np.mean(rank1s))


def per_identity_map(all_ap, valid_pids):
    """Mean AP (%) per identity over its valid queries, with mean/std (ddof 0) over identities."""
    all_ap, valid_pids = np.asarray(all_ap, np.float64), np.asarray(valid_pids)
    pids, inverse = np.unique(valid_pids, return_inverse=True)
    values = np.bincount(inverse, weights=all_ap) / np.bincount(inverse) * 100
    return {"mean": float(values.mean()), "std": float(values.std()), "num_ids": len(pids),
            "values": {str(int(p)): float(v) for p, v in zip(pids, values)}}


class UniformNoise:
    """Baseline "attack": i.i.d. uniform noise in [-eps, eps] (same budget, no gradient)."""

    name = "NOISE"
    steps = 0
    distance = None

    def __init__(self, eps):
        self.eps = float(eps)

    def perturb(self, x01, pids, guides=None, sample_index=None):
        noise = (torch.rand_like(x01) * 2 - 1) * (self.eps / 255.0)
        return (x01 + noise).clamp(0, 1)


class Split:
    """One side of the retrieval: dataset items (path, pid, camid, ...), ids and clean features."""

    def __init__(self, name, items):
        self.name = name
        self.items = list(items)
        self.pids = np.array([item[1] for item in self.items], dtype=np.int64)
        self.camids = np.array([item[2] for item in self.items], dtype=np.int64)
        self.features = None  # clean features, set by RobustEvaluator.evaluate_clean()


def select_queries(items, max_queries, seed):
    """All queries, or a seeded subset of ``max_queries`` kept in dataset order.

    Whole identities in a seeded random order (the last one possibly cut): the attacks guided by
    the query set (FNA, and any attack with ``guides="query"``) need each attacked query's other
    same-ID queries as guides, which a uniform sample of queries mostly lacks. Random rather than
    the first N identities, because datasets list queries sorted by identity.
    """
    if not max_queries or max_queries >= len(items):
        return list(items)
    pids = np.array([item[1] for item in items])
    ids = np.unique(pids)
    rank = dict(zip(np.random.default_rng(seed).permutation(ids).tolist(), range(len(ids))))
    order = sorted(range(len(items)), key=lambda i: (rank[pids[i].item()], i))
    return [items[i] for i in sorted(order[:max_queries])]


class RobustEvaluator:
    """Clean and attacked retrieval metrics of one model on one test dataset.

    ``evaluate_clean()`` extracts the clean query/gallery features (once); ``evaluate_cell(cell)``
    attacks the query set (or the gallery with ``attack_gallery``) and scores it against the clean
    other side; ``run(cells)`` does both for a whole grid and adds the chance level.

    ``surrogate`` (a ReidFeatureExtractor of another model, see
    ``robustreid.engine.build_surrogate_extractor``) makes every attack a transfer (black-box)
    attack: crafted on the surrogate, with the surrogate's clean features as the guide set, and
    evaluated on this model. ``attack_options`` maps attack names to keyword options of that attack
    (:func:`parse_attack_options`). ``guides`` ("", "gallery" or "query") picks the guide split of
    the I-FGSM family and WMA (:mod:`.guide_choice`; "": their references').
    """

    def __init__(self, cfg, model, dataset_name, *, distance="euclidean", max_queries=0,
                 attack_gallery=False, eot_samples=1, defense=None, seed=0, strict_budget=True,
                 progress=True, surrogate=None, step_size=None, attack_options=None, guides=""):
        self.cfg = cfg
        self.guides = check_guides(guides, "guides")
        self.step_size = step_size or None  # 1/255 units; None: each attack's own default
        self.attack_options = attack_options or {}
        self.extractor = ReidFeatureExtractor(model, defense=defense)
        self.model = self.extractor.model  # DDP unwrapped: robust evaluation runs on one process
        self.dataset_name = dataset_name
        self.distance = distance
        self.attack_gallery = attack_gallery
        self.eot_samples = int(eot_samples)
        self.seed = int(seed)
        self.strict_budget = strict_budget
        self.progress = progress
        self.metric = cfg.TEST.METRIC
        self.device = next(self.model.parameters()).device
        if defense is not None:
            defense.to(self.device)
        self.surrogate = surrogate
        self.attack_extractor = surrogate if surrogate is not None else self.extractor
        self._guide_features = {}  # split name -> the attack model's clean features of it
        skipped = [k for k in ("FLIP", "AQE", "RERANK") if cfg.TEST[k].ENABLED]
        if skipped:
            logger.warning("TEST.%s not applied by the robust evaluation (plain %s retrieval)",
                           "/".join(skipped), self.metric)

        data = build_dataset(dataset_name)
        self.query = Split("query", select_queries(data.query, max_queries, self.seed))
        self.gallery = Split("gallery", data.gallery)
        self._valid = valid_query_mask(self.query.pids, self.query.camids, self.gallery.pids,
                                       self.gallery.camids)
        if not self._valid.any():
            raise ValueError(f"{dataset_name}: no query has a positive in the gallery")
        self.clean = None
        self.clean_seconds = None

    @property
    def attacked(self):
        return self.gallery if self.attack_gallery else self.query

    def _loader(self, split):
        # single-process: the robust evaluation runs on the main process only
        return plain_test_loader(self.cfg, split.items)

    def _x01(self, batch):
        # fastreid's test transforms give [0, 255] floats; attacks and extractor work in [0, 1].
        return batch["images"].to(self.device, torch.float32) / 255.0

    @torch.no_grad()
    def _clean_features(self, split, extractor=None):
        extractor = extractor or self.extractor
        feats = [self._retrieval_features(extractor, self._x01(batch))
                 for batch in self._loader(split)]
        return torch.cat(feats)

    def _retrieval_features(self, extractor, x01):
        """Features used for ranking: the mean of TEST.NOISE_DRAWS forwards (stochastic models)."""
        return expected_output(extractor, x01, self.cfg.TEST.NOISE_DRAWS).float().cpu()

    def guide_split(self, attack):
        """The split whose clean features guide ``attack`` (:func:`guide_split_name`)."""
        name = guide_split_name(attack, self.guides, self.attacked.name)
        return self.query if name == self.query.name else self.gallery

    def guide_features(self, split):
        """Clean features of ``split`` in the attack model's space (a guide set A)."""
        if split.name not in self._guide_features:
            if self.surrogate is None:
                self._guide_features[split.name] = split.features
            else:
                with self.surrogate.frozen_eval():
                    self._guide_features[split.name] = self._clean_features(split, self.surrogate)
        return self._guide_features[split.name]

    def guide_set(self, attack):
        """(GuideSet of ``attack``, whether it holds the attacked split: its rows are then the
        attacked samples' own, left out of their same-ID guides)."""
        split = self.guide_split(attack)
        guides = GuideSet(self.guide_features(split).to(self.device),
                          torch.as_tensor(split.pids).to(self.device))
        return guides, split is self.attacked

    def _score(self, q_feats, g_feats):
        chunk, use_gpu, backend = _faiss_options(self.cfg)
        cmc, all_ap, all_inp = evaluate_rank_from_features(
            q_feats, g_feats, self.query.pids, self.gallery.pids, self.query.camids,
            self.gallery.camids, metric=self.metric, chunk_size=chunk, use_gpu=use_gpu,
            backend=backend)
        metrics = {f"Rank-{r}": float(cmc[min(r, len(cmc)) - 1] * 100) for r in (1, 5, 10)}
        metrics["mAP"] = float(np.mean(all_ap) * 100)
        metrics["mINP"] = float(np.mean(all_inp) * 100)
        metrics["per_identity_mAP"] = per_identity_map(all_ap, self.query.pids[self._valid])
        return metrics

    def evaluate_clean(self):
        """Clean metrics; extracts (and keeps) the clean query and gallery features on first call."""
        if self.clean is None:
            start = time.perf_counter()
            with self.extractor.frozen_eval():
                self._seed()
                self.query.features = self._clean_features(self.query)
                self.gallery.features = self._clean_features(self.gallery)
            self.clean_seconds = time.perf_counter() - start
            self.clean = self._score(self.query.features, self.gallery.features)
        return self.clean

    def _seed(self):
        # Same seed before every pass: random starts and randomized defenses reproduce exactly.
        torch.manual_seed(self.seed)

    def build_cell_attack(self, cell, **attack_kwargs):
        attack_kwargs = {**EVALUATION_OPTIONS.get(cell.attack, {}),
                         **self.attack_options.get(cell.attack, {}), **attack_kwargs}
        attack_kwargs.setdefault("step_size", self.step_size)
        attack = build_attack(cell.attack, self.attack_extractor, eps=cell.eps, steps=cell.steps,
                              distance=self.distance, **attack_kwargs)
        if self.eot_samples > 1:
            attack = EOTAttack(attack, self.eot_samples)
        return attack

    def evaluate_cell(self, cell, **attack_kwargs):
        """Metrics of one attack cell (``attack_kwargs`` go to ``build_attack``, over the attack's
        ``attack_options``)."""
        return self.evaluate_attack(self.build_cell_attack(cell, **attack_kwargs), cell)

    def _adversarial_features(self, attack, cell):
        """Features of the attacked split under ``attack``, the largest L-inf change and the largest
        budget use (the attack's ``budget_used``, in its eps units; L-inf in 1/255 without one)."""
        split = self.attacked
        guides, own_rows = self.guide_set(attack)
        bound = cell.eps + 255e-6  # 1e-6 in [0, 1] units for L-inf budgets
        feats, max_linf, max_used, in_range = [], 0.0, 0.0, True
        size = self.cfg.TEST.IMS_PER_BATCH
        first, stop = self._batch_share(-(-len(split.items) // size))
        share = Split(split.name, split.items[first * size:stop * size])
        batches = tqdm(self._loader(share), desc=f"{self.dataset_name} {cell.label}", unit="batch",
                       leave=True, disable=not self.progress, dynamic_ncols=True)
        for index, batch in enumerate(batches, start=first):
            # A batch's random stream depends on its position alone: any process can attack it.
            torch.manual_seed(self.seed + index)
            offset = index * size
            x01 = self._x01(batch)
            rows = torch.arange(offset, offset + len(x01), device=self.device) if own_rows else None
            adv = self._perturb(attack, x01, batch, guides, rows).detach()
            linf = float((adv - x01).abs().max())
            used = attack.budget_used(x01, adv) if hasattr(attack, "budget_used") else linf * 255
            valid = bool(adv.min() >= 0) and bool(adv.max() <= 1)
            if self.strict_budget and (used > bound or not valid):
                raise BudgetViolation(f"{cell.label}: max |adv - x| = {linf * 255:.4f}/255, budget "
                                      f"used {used:.6g} of {format_eps(cell.eps)}, pixels in [0, 1]: "
                                      f"{valid}")
            max_linf, max_used, in_range = max(max_linf, linf), max(max_used, used), in_range and valid
            with torch.no_grad():
                feats.append(self._retrieval_features(self.extractor, adv))
        return self._gathered(feats, max_linf, max_used, in_range)

    def _perturb(self, attack, x01, batch, guides, rows):
        """``attack`` run on one batch of the attacked split (``rows``: its indices in the guide
        set when the guides hold the attacked split)."""
        return attack.perturb(x01, batch["targets"].to(self.device), guides=guides,
                              sample_index=rows)

    def _batch_share(self, num_batches):
        """The batches [first, stop) of the attacked split this process attacks: all of them (a
        distributed evaluation's share: evaluation/distributed_attack.py)."""
        return 0, num_batches

    def _gathered(self, feats, max_linf, max_used, in_range):
        """The attacked split's features and budget figures from this process's batches (here: all
        of them)."""
        return torch.cat(feats), max_linf, max_used, in_range

    def evaluate_attack(self, attack, cell):
        """Metrics with the attacked split perturbed by any object with ``perturb(x01, pids, ...)``."""
        self.evaluate_clean()
        guide_split = self.guide_split(attack)
        self.guide_features(guide_split)
        start = time.perf_counter()
        with self.extractor.frozen_eval(), self.attack_extractor.frozen_eval():
            self._seed()
            adv_feats, max_linf, max_used, in_range = self._adversarial_features(attack, cell)
        attack_seconds = time.perf_counter() - start
        if self.attack_gallery:
            metrics = self._score(self.query.features, adv_feats)
        else:
            metrics = self._score(adv_feats, self.gallery.features)
        result = {
            "key": cell.key, "label": cell.label, "attack": cell.attack, "eps": cell.eps,
            "steps": cell.steps, "step_size_255": getattr(attack, "step_size", None),
            "distance": getattr(attack, "distance", self.distance),
            "eot_samples": getattr(attack, "eot_samples", 1), "transfer": self.surrogate is not None,
            "guides": guide_split.name if getattr(getattr(attack, "loss", None), "needs_guides",
                                                  False) else None,
            "noise_draws": self.cfg.TEST.NOISE_DRAWS,
            "max_linf_255": max_linf * 255, "max_budget_used": max_used, "pixels_in_range": in_range,
            "within_budget": in_range and max_used <= cell.eps + 255e-6,
            "seconds": {"attack": attack_seconds,
                        "score": time.perf_counter() - start - attack_seconds},
            **metrics,
        }
        logger.info("%s %s: mAP %.2f Rank-1 %.2f (clean %.2f / %.2f), %.1f s", self.dataset_name,
                    cell.label, result["mAP"], result["Rank-1"], self.clean["mAP"],
                    self.clean["Rank-1"], attack_seconds)
        return result

    def evaluate_noise(self, eps):
        """The control of an attack at L-inf ``eps`` (1/255): uniform noise of that budget on the
        same images. A weak attack (query-based, universal, transferred) is only shown by falling
        below it, not below clean."""
        cell = AttackCell("NOISE", float(eps), 1)
        return {**self.evaluate_attack(UniformNoise(eps), cell),
                "label": f"uniform noise {format_eps(eps)}/255"}

    def run(self, cells, noise_eps=()):
        """Clean metrics, chance level, every cell and the uniform-noise control of each budget in
        ``noise_eps``: one dataset's entry of a robust report."""
        clean = self.evaluate_clean()
        results = [self.evaluate_cell(cell) for cell in cells]
        noise = [self.evaluate_noise(e) for e in noise_eps]
        chance_map, chance_r1 = chance_level(self.query.pids, self.gallery.pids, self.query.camids,
                                             self.gallery.camids, seed=self.seed)
        return {
            "dataset": self.dataset_name, "num_query": len(self.query.items),
            "num_gallery": len(self.gallery.items), "num_valid_query": int(self._valid.sum()),
            "attacked": self.attacked.name, "metric": self.metric,
            "chance": {"mAP": chance_map, "Rank-1": chance_r1},
            "clean": clean, "clean_seconds": self.clean_seconds, "cells": results,
            **({"noise_baselines": noise} if noise else {}),
        }


def robust_test(cfg, model, progress=False):
    """``cfg.TEST.ROBUST`` evaluation of every test dataset, as flat floats per dataset.

    Keys look like ``FNA_8_16/mAP`` (and ``FNA_8_16/mAP_id_mean``/``_std``), as fastreid's EvalHook
    logs them.
    """
    robust = cfg.TEST.ROBUST
    cells = attack_grid(robust.ATTACKS, robust.EPS, robust.STEPS)
    seed = max(cfg.ROBUSTREID.SEED, 0)
    options = parse_attack_options(robust.ATTACK_OPTIONS, list(robust.ATTACKS), ROBUST_CONFIG_NAMES)
    flat = {}
    for name in cfg.DATASETS.TESTS:
        evaluator = RobustEvaluator(cfg, model, name, distance=robust.DISTANCE,
                                    max_queries=robust.MAX_QUERIES, step_size=robust.STEP_SIZE,
                                    attack_gallery=robust.ATTACK_GALLERY, guides=robust.GUIDES,
                                    eot_samples=robust.EOT_SAMPLES, seed=seed, progress=progress,
                                    attack_options=options)
        flat[name] = flat_metrics(evaluator.run(cells))
    return flat


def flat_metrics(result):
    """``{"FNA_8_16/mAP": 1.2, ...}`` for every cell of one dataset's result."""
    flat = {}
    for cell in result["cells"]:
        for metric in METRICS:
            flat[f"{cell['key']}/{metric}"] = cell[metric]
        flat[f"{cell['key']}/mAP_id_mean"] = cell["per_identity_mAP"]["mean"]
        flat[f"{cell['key']}/mAP_id_std"] = cell["per_identity_mAP"]["std"]
    return flat

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
"""
import ast
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from types import SimpleNamespace

import numpy as np
import torch
from fastreid.data.build import fast_batch_collator
from fastreid.data.common import CommDataset
from fastreid.data.transforms import build_transforms
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..attacks import (ATTACK_REGISTRY, DISTANCES, AttackConfigError, EOTAttack, GuideSet,
                       ReidFeatureExtractor, build_attack, eps_unit, registered_attacks)
from ..attacks.eot import expected_output
from ..attacks.validation import check_choice, positive_int
from ..config import ConfigError
from ..data.validation import build_dataset
from .faiss_evaluator import _faiss_options
from .guide_choice import check_guides, guide_split_name
from .ranking import evaluate_rank_from_features, valid_query_mask

logger = logging.getLogger(__name__)

METRICS = ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP")
ROBUST_CONFIG_NAMES = {key: f"TEST.ROBUST.{key.upper()}" for key in
                       ("attacks", "eps", "steps", "distance")} | {
                           "eot": "TEST.ROBUST.EOT_SAMPLES",
                           "options": "TEST.ROBUST.ATTACK_OPTIONS", "guides": "TEST.ROBUST.GUIDES"}
# Keywords every cell sets itself (attack_grid, RobustEvaluator): not per-attack options.
CELL_KEYWORDS = ("eps", "steps", "distance")
# Attack options of the evaluation that differ from the attack classes' defaults (those of the
# training attack); attack_options override them. FNA as Bouniot et al.'s evaluation code runs it:
# from x (not DDDefense eq. 3's random start) with the query's own clean feature among its push
# guides. Their code also pads each guide list up to the largest identity's query count with more
# copies of that feature, so on Market the own term weighs 1 + max - n; here it counts once (the
# same on SynthReID, two queries per identity). Measured on a 6-epoch SynthReID BoT R18 (clean mAP
# 56.5): mAP 19.96 vs 21.56 (random start, own row left out) at 1/255-16, 4.38 vs 5.61 at 2/255-4,
# 0.84 vs 0.85 at 8/255-16 (below chance, 2.2).
EVALUATION_OPTIONS = {"FNA": {"rand_init": False, "include_self": True}}
# Slack on "mAP does not increase with eps or steps" (mAP points): attacks are local searches.
MONOTONE_TOLERANCE = 0.5
# The "very large budget" of the sanity check, and how close to chance it must bring the model:
# at most this fraction of the model's above-chance mAP may survive.
LARGE_EPS = 64.0
NEAR_CHANCE_FRACTION = 0.1


class BudgetViolation(AssertionError):
    """An attack returned an image outside its L-inf ball or outside [0, 1]."""


@dataclass(frozen=True)
class AttackCell:
    """One column of a robustness table: an attack at one budget (1/255 units) and iteration count."""

    attack: str
    eps: float
    steps: int

    @property
    def key(self):
        """Flat-metric prefix, e.g. ``FNA_8_16`` (``FNA_8/mAP`` would clash with the "/" nesting)."""
        return f"{self.attack}_{format_eps(self.eps)}_{self.steps}"

    @property
    def label(self):
        """The papers' column header, e.g. ``FNA 8/255-16`` (``WMA 0.1-16``: budgets in the
        attack's own units)."""
        return f"{self.attack} {format_eps(self.eps)}{eps_unit(self.attack)}-{self.steps}"


def format_eps(eps):
    """8.0 -> "8", 8.5 -> "8.5" (budgets are printed in 1/255 units)."""
    return f"{float(eps):g}"


def attack_grid(attacks, eps_values, steps_values):
    """Every attack x eps x steps cell, attack-major (the papers' column order)."""
    return [AttackCell(a, float(e), int(s)) for a in attacks for e in eps_values for s in steps_values]


def check_attack_settings(attacks, eps_values, steps_values, distance, eot_samples, names):
    """Raise :class:`ConfigError` for the first bad setting, naming its option (``names[setting]``,
    e.g. ``{"eps": "--eps"}`` or ``{"eps": "TEST.ROBUST.EPS"}``), before any work starts."""
    known = registered_attacks()
    unknown = [a for a in attacks if a not in known]
    if not attacks or unknown:
        raise ConfigError(f"{names['attacks']}: unknown attack(s) {unknown or list(attacks)}; "
                          f"registered: {', '.join(known)}")
    def check_each(setting, check, values):
        if not values:
            raise ConfigError(f"{names[setting]} is empty")
        try:
            for value in values:
                check(value)
        except AttackConfigError as e:
            raise ConfigError(f"{names[setting]}: {e}") from None

    for attack in attacks:  # each attack checks budgets in its own units (WMA: transport cost)
        check_each("eps", ATTACK_REGISTRY.get(attack).check_eps, eps_values)
    check_each("steps", lambda s: positive_int(s, "steps"), steps_values)
    check_each("distance", lambda d: check_choice(d, DISTANCES, "distance"), [distance])
    check_each("eot", lambda n: positive_int(n, "EOT samples"), [eot_samples])


def _option_value(text):
    """A Python literal ("30", "1e3", "True", "(1, 2)") as its value, anything else as is."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_attack_options(entries, attacks, names):
    """``["WMA:loss=fna", "WMA:sinkhorn_iters=30"]`` -> ``{"WMA": {"loss": "fna", "sinkhorn_iters":
    30}}``: keyword options of individual attacks, for :func:`build_attack`. Values are Python
    literals (int, float, bool, tuple), else strings. Each attack is built once with its options, so
    an unknown keyword or a bad value fails here, before any work. Raises ConfigError naming the
    option (``names["options"]``, as in :func:`check_attack_settings`) and the entry or attack at
    fault: a malformed entry, an attack not in ``attacks``, a keyword the grid sets (eps, steps,
    distance), an unknown keyword or a bad value."""
    name = names["options"]
    options = {}
    for entry in entries:
        attack, colon, setting = entry.partition(":")
        key, equals, value = setting.partition("=")
        attack, key = attack.strip(), key.strip()
        if not (colon and equals and key.isidentifier()):
            raise ConfigError(f"{name}: {entry!r} is not NAME:key=value")
        if attack not in attacks:
            raise ConfigError(f"{name}: {entry!r}: attack {attack!r} is not evaluated (attacks: "
                              f"{', '.join(attacks)})")
        if key in CELL_KEYWORDS:
            raise ConfigError(f"{name}: {entry!r}: {key} is set for every attack by {names[key]}")
        options.setdefault(attack, {})[key] = _option_value(value.strip())
    model = SimpleNamespace(num_classes=1)  # constructors read no more of it (PGD: the class count)
    for attack, kwargs in options.items():
        try:
            build_attack(attack, model, eps=0, steps=1, **kwargs)
        except AttackConfigError as e:
            raise ConfigError(f"{name}: {attack}: {e}") from None
    return options


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
    ``robustreid.attacks.build_surrogate_extractor``) makes every attack a transfer (black-box)
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
        # A plain single-process loader: fastreid's test loader shards by rank, and the robust
        # evaluation runs on the main process only.
        dataset = CommDataset(split.items, build_transforms(self.cfg, is_train=False), relabel=False)
        return DataLoader(dataset, batch_size=self.cfg.TEST.IMS_PER_BATCH, shuffle=False,
                          num_workers=self.cfg.DATALOADER.NUM_WORKERS, collate_fn=fast_batch_collator)

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
            adv = attack.perturb(x01, batch["targets"].to(self.device), guides=guides,
                                 sample_index=rows).detach()
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

    def run(self, cells):
        """Clean metrics, chance level and every cell: one dataset's entry of a robust report."""
        clean = self.evaluate_clean()
        results = [self.evaluate_cell(cell) for cell in cells]
        chance_map, chance_r1 = chance_level(self.query.pids, self.gallery.pids, self.query.camids,
                                             self.gallery.camids, seed=self.seed)
        return {
            "dataset": self.dataset_name, "num_query": len(self.query.items),
            "num_gallery": len(self.gallery.items), "num_valid_query": int(self._valid.sum()),
            "attacked": self.attacked.name, "metric": self.metric,
            "chance": {"mAP": chance_map, "Rank-1": chance_r1},
            "clean": clean, "clean_seconds": self.clean_seconds, "cells": results,
        }


def check_robust_config(cfg):
    """:func:`check_attack_settings` on ``cfg.TEST.ROBUST`` (run before training starts)."""
    robust = cfg.TEST.ROBUST
    check_attack_settings(list(robust.ATTACKS), list(robust.EPS), list(robust.STEPS),
                          robust.DISTANCE, robust.EOT_SAMPLES, ROBUST_CONFIG_NAMES)
    if robust.MAX_QUERIES < 0 or robust.PERIOD < 0:
        raise ConfigError("TEST.ROBUST.MAX_QUERIES and TEST.ROBUST.PERIOD must be >= 0")
    check_guides(robust.GUIDES, ROBUST_CONFIG_NAMES["guides"])
    parse_attack_options(robust.ATTACK_OPTIONS, list(robust.ATTACKS), ROBUST_CONFIG_NAMES)


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


# --------------------------------------------------------------------------- sanity checks

@dataclass
class SanityCheck:
    name: str
    passed: bool
    detail: str

    def line(self):
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.detail}"


def _same_numbers(a, b):
    return (all(a[m] == b[m] for m in METRICS)
            and a["per_identity_mAP"]["values"] == b["per_identity_mAP"]["values"])


def _non_increasing(points, tolerance):
    """Violations ``(x_prev, x, mAP_prev, mAP)`` of "mAP does not increase along x"."""
    return [(x0, x1, m0, m1) for (x0, m0), (x1, m1) in zip(points, points[1:]) if m1 > m0 + tolerance]


def sanity_checks(evaluator, result, tolerance=MONOTONE_TOLERANCE, large_eps=LARGE_EPS):
    """Checks that the attacks and the evaluation behave; extra cells are run as needed.

    Returns ``(checks, extra_cells)``. ``result`` is ``evaluator.run(cells)`` (the grid).
    """
    clean, grid = result["clean"], result["cells"]
    attacks = list(dict.fromkeys(c["attack"] for c in grid))
    eps_values = sorted({c["eps"] for c in grid if c["eps"] > 0})
    max_steps = max(c["steps"] for c in grid)
    extra, checks = [], []

    def run(cell, purpose, **attack_kwargs):
        cell_result = dict(evaluator.evaluate_cell(cell, **attack_kwargs), purpose=purpose)
        extra.append(cell_result)
        return cell_result

    zero = [run(AttackCell(a, 0.0, 1), "eps 0") for a in attacks]
    bad = [c["label"] for c in zero if not _same_numbers(c, clean)]
    checks.append(SanityCheck("eps 0 reproduces clean", not bad,
                              f"differs: {bad}" if bad else f"{len(zero)} attacks, identical metrics"))

    if len({c["steps"] for c in grid}) == 1 and max_steps >= 2 and eps_values:
        for a in attacks:
            run(AttackCell(a, eps_values[-1], max_steps // 2), "steps monotonicity")
    cells = grid + extra
    violations = []
    for a in attacks:
        for s in sorted({c["steps"] for c in cells if c["attack"] == a}):
            points = [(0.0, clean["mAP"])] + sorted(
                (c["eps"], c["mAP"]) for c in cells if c["attack"] == a and c["steps"] == s
                and c["eps"] > 0)
            violations += [f"{a}-{s}: eps {x0:g}->{x1:g} mAP {m0:.2f}->{m1:.2f}"
                           for x0, x1, m0, m1 in _non_increasing(points, tolerance)]
        for e in eps_values:
            points = sorted((c["steps"], c["mAP"]) for c in cells if c["attack"] == a
                            and c["eps"] == e)
            violations += [f"{a} {e:g}/255: steps {x0}->{x1} mAP {m0:.2f}->{m1:.2f}"
                           for x0, x1, m0, m1 in _non_increasing(points, tolerance)]
    checks.append(SanityCheck(f"mAP non-increasing in eps and steps (tolerance {tolerance})",
                              not violations, "; ".join(violations) or "no violation"))

    weaker = []
    for e in eps_values:
        noise = evaluator.evaluate_attack(UniformNoise(e), AttackCell("NOISE", e, 1))
        extra.append(dict(noise, purpose="random noise baseline"))
        weaker += [f"{c['label']} {c['mAP']:.2f} >= noise {noise['mAP']:.2f}"
                   for c in grid if c["eps"] == e and c["mAP"] >= noise["mAP"]]
    checks.append(SanityCheck("every attack beats uniform noise of its budget", not weaker,
                              "; ".join(weaker) or f"eps {[format_eps(e) for e in eps_values]}"))

    chance = result["chance"]["mAP"]
    limit = chance + NEAR_CHANCE_FRACTION * max(clean["mAP"] - chance, 0.0)
    # Steps of 2.5 eps / steps (Madry et al.) so that the iterations can reach the whole ball; the
    # attacks' own 1/255 default would cap the change at steps/255.
    large_step = max(1.0, 2.5 * large_eps / max_steps)
    large = [run(AttackCell(a, large_eps, max_steps), "large eps", step_size=large_step)
             for a in attacks]
    far = [f"{c['label']} mAP {c['mAP']:.2f}" for c in large if c["mAP"] > limit]
    checks.append(SanityCheck(
        f"eps {format_eps(large_eps)}/255 drives mAP near chance ({chance:.2f}, limit {limit:.2f})",
        not far, "; ".join(far) or ", ".join(f"{c['attack']} {c['mAP']:.2f}" for c in large)))

    over = [f"{c['label']} {c['max_linf_255']:.4f}/255" for c in grid + extra if not c["within_budget"]]
    checks.append(SanityCheck("every adversarial image within its budget and [0, 1]", not over,
                              "; ".join(over) or f"{len(grid) + len(extra)} cells checked per batch"))

    again = evaluator.evaluate_cell(AttackCell(grid[0]["attack"], grid[0]["eps"], grid[0]["steps"]))
    same = _same_numbers(again, grid[0])
    checks.append(SanityCheck("deterministic (first cell run twice)", same,
                              f"{grid[0]['label']} mAP {grid[0]['mAP']:.4f} vs {again['mAP']:.4f}"))
    return checks, extra


# --------------------------------------------------------------------------- reports

def environment():
    """Versions and device that produced the numbers."""
    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__,
            "fastreid": version("fastreid"), "robustreid": version("robustreid"),
            "faiss": version("faiss-cpu") or version("faiss-gpu"),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "host": platform.node()}


def build_report(settings, datasets, seconds_total):
    """The report :func:`write_report` and :func:`robust_markdown` read: settings (needs "model" and
    "distance"), environment, timing and each dataset's :meth:`RobustEvaluator.run` result."""
    return {"settings": settings, "environment": environment(), "seconds_total": seconds_total,
            "datasets": datasets}


def _pair(result):
    return f"{result['mAP']:.1f}/{result['Rank-1']:.1f}"


def _column(cell):
    """A cell's column header; EOT attacks say so ("FNA 8/255-16 EOT 10")."""
    eot = cell.get("eot_samples", 1)
    return cell["label"] + (f" EOT {eot}" if eot > 1 else "")


def papers_table(reports):
    """The papers' layout: one row per model x dataset, "mAP/Rank-1" cells, one column per cell."""
    rows = [(r["settings"].get("model", "model"), d) for r in reports for d in r["datasets"]]
    labels = list(dict.fromkeys(_column(c) for _, d in rows for c in d["cells"]))
    lines = ["| Model | Dataset | Clean | " + " | ".join(labels) + " |",
             "|---|---|---|" + "---|" * len(labels)]
    for model, d in rows:
        by_label = {_column(c): c for c in d["cells"]}
        cells = [_pair(by_label[label]) if label in by_label else "" for label in labels]
        lines.append(f"| {model} | {d['dataset']} | {_pair(d['clean'])} | " + " | ".join(cells) + " |")
    return lines


def robust_markdown(report):
    """Papers' layout (rows = model x dataset, "mAP/Rank-1" cells) plus a table of every metric."""
    datasets = report["datasets"]
    attacked = datasets[0]["attacked"] if datasets else "query"
    protocol = ("queries attacked, gallery clean" if attacked == "query"
                else "gallery attacked (AMA protocol), queries clean")
    surrogate = report["settings"].get("surrogate_config")
    if surrogate:
        protocol += f"; transfer (black-box) attacks crafted on {os.path.basename(surrogate)}"
    guided = dict.fromkeys(f"{c['attack']} {c['guides']}" for d in datasets for c in d["cells"]
                           if c.get("guides"))
    if guided:
        protocol += "; guide sets: " + ", ".join(guided)
    lines = [f"mAP/Rank-1 (%); {protocol}; attack distance {report['settings'].get('distance')}, "
             f"retrieval metric {datasets[0]['metric'] if datasets else '?'}.", ""]
    lines += papers_table([report])

    lines += ["", "| Dataset | Setting | Rank-1 | Rank-5 | Rank-10 | mAP | mINP | "
              "per-ID mAP mean ± std | max L-inf (/255) | max budget used | attack s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in datasets:
        for name, r in [("Clean", d["clean"])] + [(c["label"], c) for c in d["cells"]]:
            per_id = r["per_identity_mAP"]
            linf = f"{r['max_linf_255']:.3f}" if "max_linf_255" in r else "0"
            # in the attack's own budget unit: L-inf /255, or WMA's transport cost per unit mass
            used = (f"{r['max_budget_used']:.4g}{eps_unit(r['attack'])} of "
                    f"{format_eps(r['eps'])}{eps_unit(r['attack'])}" if "max_budget_used" in r else "")
            seconds = f"{r['seconds']['attack']:.1f}" if "seconds" in r else ""
            lines.append(f"| {d['dataset']} | {name} | " + " | ".join(f"{r[m]:.1f}" for m in METRICS)
                         + f" | {per_id['mean']:.1f} ± {per_id['std']:.1f} | {linf} | {used} | "
                         f"{seconds} |")
        lines.append(f"| {d['dataset']} | chance | {d['chance']['Rank-1']:.1f} | | | "
                     f"{d['chance']['mAP']:.1f} | | | | | |")
    return "\n".join(lines) + "\n"


def _figure_axes(num):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(num, 1), figsize=(6 * max(num, 1), 4.5), squeeze=False)
    return plt, fig, axes[0]


def plot_map_vs_eps(report, path):
    """mAP against the budget per attack (and iteration count); eps 0 is the clean model."""
    plt, fig, axes = _figure_axes(len(report["datasets"]))
    for ax, d in zip(axes, report["datasets"]):
        for attack, steps in dict.fromkeys((c["attack"], c["steps"]) for c in d["cells"]):
            points = sorted((c["eps"], c["mAP"]) for c in d["cells"]
                            if c["attack"] == attack and c["steps"] == steps)
            xs, ys = zip(*([(0.0, d["clean"]["mAP"])] + points))
            ax.plot(xs, ys, marker="o", label=f"{attack} ({steps} steps)")
        ax.axhline(d["chance"]["mAP"], color="grey", linestyle=":", label="chance")
        ax.set(title=d["dataset"], xlabel="eps (/255)", ylabel="mAP (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def largest_budget_cells(cells):
    """Per attack, the cell with the largest eps (most steps among those)."""
    best = {}
    for c in cells:
        if c["attack"] not in best or (c["eps"], c["steps"]) > (best[c["attack"]]["eps"],
                                                                best[c["attack"]]["steps"]):
            best[c["attack"]] = c
    return list(best.values())


def plot_per_identity_map(report, path):
    """Histogram of per-identity mAP, clean and each attack at its largest budget (Fig. 8 style)."""
    plt, fig, axes = _figure_axes(len(report["datasets"]))
    bins = np.linspace(0, 100, 21)
    for ax, d in zip(axes, report["datasets"]):
        for label, r in [("Clean", d["clean"])] + [(c["label"], c) for c in
                                                    largest_budget_cells(d["cells"])]:
            per_id = r["per_identity_mAP"]
            ax.hist(list(per_id["values"].values()), bins=bins, histtype="step", linewidth=1.5,
                    label=f"{label} (mean {per_id['mean']:.1f}, std {per_id['std']:.1f})")
        ax.set(title=f"{d['dataset']}: per-identity mAP", xlabel="mAP (%)",
               ylabel="identities")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report, output_dir):
    """results.json, results.md, mAP_vs_eps.png and per_identity_map.png in ``output_dir``."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, name) for name in
             ("results.json", "results.md", "mAP_vs_eps.png", "per_identity_map.png")}
    with open(paths["results.json"], "w") as f:
        json.dump(report, f, indent=1)
    with open(paths["results.md"], "w") as f:
        f.write(robust_markdown(report))
    plot_map_vs_eps(report, paths["mAP_vs_eps.png"])
    plot_per_identity_map(report, paths["per_identity_map.png"])
    return paths

#!/usr/bin/env python
"""Adversarial robustness of a trained model: metric attacks on the query set, papers' tables.

    python tools/robust_eval.py --config-file CFG MODEL.WEIGHTS model.pth [KEY VALUE ...]
        [--attacks FNA,SMA,IFGSM] [--eps 8,10] [--steps 16] [--step-size S] [--distance euclidean]
        [--attack-gallery] [--guides gallery|query] [--eot N] [--defense NAME [--bpda]]
        [--max-queries N]
        [--attack-option NAME:KEY=VALUE ...]
        [--surrogate-config CFG --surrogate-weights W]
        [--output DIR] [--sanity]
    python tools/robust_eval.py --protocol clustering --config-file CFG MODEL.WEIGHTS model.pth
        [--eps 8] [--steps 10] [--step-size S] [--distance euclidean] [--max-queries N]
        [--output DIR]

Budgets are L-inf in 1/255 units ("8" is 8/255). Each attack x eps x steps cell attacks the queries
and ranks them against the clean gallery (DDDefense / Bouniot protocol); guide sets follow each
attack's reference: the query set for FNA, the clean gallery for the metric I-FGSM family (Bai et
al.'s AMA) and WMA, whose guide split --guides gallery|query may name instead;
--attack-gallery attacks the gallery instead (AMA protocol); --surrogate-* crafts the attacks on
another model and evaluates them on this one (transfer / black-box). Writes results.json, results.md,
mAP_vs_eps.png and per_identity_map.png to DIR (default OUTPUT_DIR/robust_eval) and prints the
"mAP/Rank-1" table. --sanity also runs the evaluation's self-checks (eps 0 = clean, budgets,
monotonicity, attacks beat random noise, a huge budget reaches chance, determinism), prints
PASS/FAIL for each and exits 1 if any fails. Bad input exits 2 with one "error: ..." line.
--attack-option (repeatable) passes a keyword option to one attack, e.g.
--attack-option WMA:loss=fna --attack-option WMA:sinkhorn_iters=30 (values: Python literals, else
strings; an unknown attack or keyword or a bad value exits 2 naming it).

--num-gpus N (per machine; CPU: gloo processes), --num-machines, --machine-rank and --dist-url work as
in tools/train_net.py: the attacked batches are shared out over the processes and gathered back,
with the results of one process (robustreid/evaluation/distributed_attack.py); the process of rank
0 writes the report and its machine prints it. Retrieval protocol only.

--protocol clustering is EAT's threat model (robustreid/evaluation/robust_clustering.py): the whole
test set (query and gallery pooled, each image once) is attacked, every sample, by L-inf PGD on the
self-metric objective L(F(x_adv), F(x)) from a random start (the registered SMA; --attacks SMA is
its only attack), default eps 8/255 and 10 steps (the paper's test attack), --step-size 0 = 2.5 *
eps / steps (Madry et al.; the paper gives none). A voting EnsembleReID is attacked through its mean
member embedding and scored by voting; the report marks such rows "surrogate: mean embedding".
--max-queries N keeps a seeded subset of N samples made of whole classes. Writes results.json and
results.md: rows Clean and PGD-<steps> <eps>/255 with NMI, F1, R@k (TEST.CLUSTERING.RECALL_KS) and
an ERS-style summary (the mean over those metrics of attacked / clean, in percent). The options of
the query/gallery protocol (--attack-gallery, --guides, --eot, --defense, --bpda, --surrogate-*,
--attack-option, --sanity) exit 2 naming the option.

--protocol corruptions is CIL-ReID's common-corruption benchmark on the fly
(robustreid/data/corruptions.py, robustreid/evaluation/corruption_evaluator.py): every
--corruptions (all = CIL-ReID's 20, or NAME,...) at every --severity (1-5, or e.g. 1,3,5)
corrupts the query and gallery images (--corrupt both, CIL-ReID's "corrupted eval"; query or
gallery: one side), seeded by ROBUSTREID.SEED, nothing written to disk; plus CIL-ReID's headline
cell, a corruption and a severity drawn per image. Writes results.json, results.md (CIL-ReID's
clean / corruption table, severity x corruption mAP with the means per severity and corruption,
mCE-style averages) and corruption_heatmap.png. --max-queries works as above; the attack options
exit 2 naming the option.

--protocol query runs query-based black-box attacks on the model's retrieval output only
(robustreid/attacks/query_based.py; no gradient, no feature): --attacks NES (score-based: NES
estimates of a margin read off the query's distances to the gallery, L-inf sign steps) and/or HSJA
(decision-based: HopSkipJump, L-inf, on "no same-ID gallery image in the top 1"), default both, at
each --eps (default 8) with each --query-budget per image (default 1000), enforced; the queries
used per image are reported. Writes results.json, results.md and mAP_vs_eps.png.

Both protocols also score uniform noise of each --eps on the same queries (results.json's
"noise_baselines", a "uniform noise 8/255" row): their attacks are weak, and one only shows itself by
falling below that control, not below clean.

--protocol uap learns one universal L-inf perturbation per --eps (default 8) x --steps (default 100
sign-gradient steps of --step-size, default 1/255, on batches of TEST.IMS_PER_BATCH) on the training
images of DATASETS.NAMES, pushing features away from the clean ones (--distance), and adds it to
every test query (robustreid/attacks/universal.py); --surrogate-config/--surrogate-weights learn it
on another model (transfer). Writes results.json, results.md (with how each perturbation was
learned) and mAP_vs_eps.png.
"""
import argparse
import json
import os
import sys
import time

import robustreid  # noqa: F401  (compat patches + registrations)
from fastreid.utils import comm
from robustreid import rendezvous
from robustreid.checksums import sha256_of
from robustreid.cli import OneLineParser, add_launch_arguments, report_misplaced_flags
from robustreid.attacks import AttackConfigError, build_defense, eps_from_255, eps_unit
from robustreid.config import ConfigError, load_config
from robustreid.engine import (USER_ERRORS, RobustTrainer, build_surrogate_extractor,
                               check_output_dir, check_weights, check_weights_fit, launch, preflight,
                               setup)
from robustreid.engine.eat import default_step_size
from robustreid.data.corruptions import CORRUPTIONS, SEVERITIES
from robustreid.evaluation.clustering_evaluator import check_clustering_config
from robustreid.evaluation.corruption_evaluator import CORRUPTED_SIDES, CorruptionEvaluator
from robustreid.evaluation.corruption_report import write_corruption_report
from robustreid.evaluation.distributed_attack import DistributedRobustEvaluator
from robustreid.evaluation.guide_choice import check_guides
from robustreid.evaluation.universal_evaluator import UAPCell, UAPEvaluator
from robustreid.evaluation.query_attack_evaluator import QueryAttackEvaluator, query_grid
from robustreid.evaluation.protocol_reports import (query_markdown, uap_markdown,
                                                     write_protocol_report)
from robustreid.evaluation.attack_grid import (attack_grid, check_attack_settings,
                                               parse_attack_options)
from robustreid.evaluation.robust_report import build_report, write_report
from robustreid.evaluation.robust_sanity import SanityCheck, sanity_checks
from robustreid.evaluation.robust_clustering import (ATTACK as CLUSTERING_ATTACK,
                                                     ClusteringRobustEvaluator, PGDCell,
                                                     check_sample_counts, write_clustering_report)

OPTION_NAMES = {"attacks": "--attacks", "eps": "--eps", "steps": "--steps",
                "distance": "--distance", "eot": "--eot", "options": "--attack-option",
                "guides": "--guides"}
PROTOCOLS = ("retrieval", "clustering", "corruptions", "query", "uap")
# --attacks/--eps/--steps when not given; clustering: the paper's test attack, PGD-10 at 8/255.
PROTOCOL_DEFAULTS = {"retrieval": {"attacks": "FNA,SMA,IFGSM", "eps": "8,10", "steps": "16"},
                     "clustering": {"attacks": CLUSTERING_ATTACK, "eps": "8", "steps": "10"},
                     "query": {"attacks": "NES,HSJA", "eps": "8", "steps": None},
                     "uap": {"attacks": "UAP", "eps": "8", "steps": "100"}}
# Options of the query/gallery protocol that the clustering protocol has no counterpart for.
RETRIEVAL_ONLY = {"attack_gallery": "--attack-gallery", "guides": "--guides", "eot": "--eot",
                  "defense": "--defense", "bpda": "--bpda",
                  "surrogate_config": "--surrogate-config",
                  "surrogate_weights": "--surrogate-weights", "attack_option": "--attack-option",
                  "sanity": "--sanity"}
ATTACK_SETTINGS = {"attacks": "--attacks", "eps": "--eps", "steps": "--steps",
                   "step_size": "--step-size", "distance": "--distance"}
CORRUPTION_ONLY = {"corruptions": "--corruptions", "severity": "--severity", "corrupt": "--corrupt"}
CORRUPTION_DEFAULTS = {"corruptions": "all", "severity": "1-5", "corrupt": "both"}
QUERY_ONLY = {"query_budget": "--query-budget"}


def build_parser():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="retrieval",
                        help="retrieval: queries (or gallery) attacked against the clean other "
                             "side; clustering: every test sample attacked (EAT)")
    parser.add_argument("--attacks", help="comma-separated attack names (default: FNA,SMA,IFGSM; "
                                          "clustering: SMA)")
    parser.add_argument("--eps", help="comma-separated L-inf budgets in 1/255 units "
                                      "(default: 8,10; clustering: 8)")
    parser.add_argument("--steps", help="comma-separated iteration counts (default: 16; "
                                        "clustering: 10)")
    parser.add_argument("--step-size", default="0",
                        help="attack step in 1/255 units (0 = each attack's own default; "
                             "clustering: 2.5 * eps / steps)")
    parser.add_argument("--distance", default="euclidean", help="attack distance: euclidean, cosine")
    parser.add_argument("--attack-gallery", action="store_true",
                        help="attack the gallery, queries clean (AMA protocol)")
    parser.add_argument("--guides", default="",
                        help="guide split of the I-FGSM family and WMA: gallery or query "
                             "(default: the clean split the attacked one is ranked against)")
    parser.add_argument("--eot", default="1", help="EOT gradient samples per attack step")
    parser.add_argument("--defense", default="", help="input-transformation defense name")
    parser.add_argument("--bpda", action="store_true", help="attack the defense through BPDA")
    parser.add_argument("--surrogate-config", default="", metavar="FILE",
                        help="transfer attack: craft on this config's model (with --surrogate-weights)")
    parser.add_argument("--surrogate-weights", default="", metavar="FILE")
    parser.add_argument("--max-queries", default="0",
                        help="attack a seeded subset (0 = all; clustering: N samples of whole "
                             "classes)")
    parser.add_argument("--attack-option", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="keyword option of one attack, e.g. WMA:loss=fna (repeatable)")
    parser.add_argument("--output", default="", help="default: OUTPUT_DIR/robust_eval")
    parser.add_argument("--sanity", action="store_true", help="run the self-checks too")
    parser.add_argument("--query-budget", default=None,
                        help="query protocol: queries per attacked image, comma-separated "
                             "(default 1000)")
    parser.add_argument("--corruptions", help="corruptions protocol: all (default) or NAME,...")
    parser.add_argument("--severity", help="corruptions protocol: severities, 1-5 (default) or "
                                           "e.g. 1,3,5")
    parser.add_argument("--corrupt", choices=CORRUPTED_SIDES,
                        help="corruptions protocol: the corrupted side(s) (default both)")
    add_launch_arguments(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="MODEL.WEIGHTS path and KEY VALUE pairs")
    return parser


def _numbers(text, option, kind, minimum=None):
    """A comma-separated option as numbers, or ConfigError naming the option."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    try:
        numbers = [kind(v) for v in values]
    except ValueError:
        numbers = []
    if not numbers:
        raise ConfigError(f"{option}: {text!r} is not a comma-separated list of "
                          f"{'integers' if kind is int else 'numbers'}")
    if minimum is not None and min(numbers) < minimum:
        raise ConfigError(f"{option} must be >= {minimum}, got {text!r}")
    return numbers


def _attack_options(ns):
    """--attacks, --eps, --steps as given or the protocol's defaults (strings)."""
    defaults = PROTOCOL_DEFAULTS[ns.protocol]
    return {key: defaults[key] if getattr(ns, key) is None else getattr(ns, key)
            for key in ("attacks", "eps", "steps")}


def refuse_options(ns, options, why):
    """ConfigError naming the first of ``options`` (dest -> flag) given on the command line."""
    parser = build_parser()
    given = [flag for dest, flag in options.items() if getattr(ns, dest) != parser.get_default(dest)]
    if given:
        raise ConfigError(f"{given[0]} {why}")


def parse_clustering_settings(ns):
    """The clustering protocol's settings (ConfigError naming the option at fault)."""
    refuse_options(ns, RETRIEVAL_ONLY, "applies to --protocol retrieval only (the clustering "
                                       "protocol attacks every test sample with PGD)")
    options = _attack_options(ns)
    attacks = [a.strip() for a in options["attacks"].split(",") if a.strip()]
    if attacks != [CLUSTERING_ATTACK]:
        raise ConfigError(f"--attacks {options['attacks']!r}: --protocol clustering runs PGD on "
                          f"the self-metric objective L(F(x_adv), F(x)), attack {CLUSTERING_ATTACK}")
    settings = dict(protocol="clustering", attacks=attacks,
                    eps=_numbers(options["eps"], "--eps", float),
                    steps=_numbers(options["steps"], "--steps", int), distance=ns.distance,
                    max_queries=_numbers(ns.max_queries, "--max-queries", int, minimum=0)[0],
                    step_size=_numbers(ns.step_size, "--step-size", float, minimum=0)[0] or None)
    check_attack_settings(attacks, settings["eps"], settings["steps"], ns.distance, 1, OPTION_NAMES)
    return settings


def parse_severities(text):
    """"1-5", "3" or "1,3,5" -> sorted severities, or ConfigError naming --severity."""
    low, dash, high = text.partition("-")
    try:
        values = (list(range(int(low), int(high) + 1)) if dash
                  else [int(v) for v in text.split(",") if v.strip()])
    except ValueError:
        values = []
    if not values or any(v not in SEVERITIES for v in values):
        raise ConfigError(f"--severity {text!r}: give severities in 1-5 as a range (1-5) or a "
                          "list (1,3,5)")
    return sorted(set(values))


def parse_corruption_names(text):
    """"all" or NAME,... -> corruption names, or ConfigError naming --corruptions."""
    names = list(CORRUPTIONS) if text.strip() == "all" else list(dict.fromkeys(
        n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in CORRUPTIONS]
    if not names or unknown:
        raise ConfigError(f"--corruptions: unknown corruption(s) {unknown or [text]}; known: all, "
                          f"{', '.join(CORRUPTIONS)}")
    return names


def parse_corruption_settings(ns):
    """The corruptions protocol's settings (ConfigError naming the option at fault)."""
    refuse_options(ns, {**RETRIEVAL_ONLY, **ATTACK_SETTINGS},
                   "is an attack option; --protocol corruptions attacks nothing")
    options = {key: CORRUPTION_DEFAULTS[key] if getattr(ns, key) is None else getattr(ns, key)
               for key in CORRUPTION_ONLY}
    return dict(protocol="corruptions", corruptions=parse_corruption_names(options["corruptions"]),
                severities=parse_severities(options["severity"]), corrupt=options["corrupt"],
                max_queries=_numbers(ns.max_queries, "--max-queries", int, minimum=0)[0])


def parse_query_settings(ns):
    """The query-based protocol's settings (ConfigError naming the option at fault)."""
    refuse_options(ns, {**RETRIEVAL_ONLY, "steps": "--steps", "step_size": "--step-size",
                        "distance": "--distance"},
                   "does not apply to --protocol query (the attacker sees the retrieval output "
                   "only; its budgets are --eps and --query-budget)")
    options = _attack_options(ns)
    attacks = [a.strip() for a in options["attacks"].split(",") if a.strip()]
    eps = _numbers(options["eps"], "--eps", float, minimum=0)
    budgets = _numbers(ns.query_budget or "1000", "--query-budget", int, minimum=1)
    for value in eps:
        try:
            eps_from_255(value)
        except AttackConfigError as e:
            raise ConfigError(f"--eps: {e}") from None
    query_grid(attacks, eps, budgets)  # names checked
    return dict(protocol="query", attacks=attacks, eps=eps, query_budgets=budgets,
                max_queries=_numbers(ns.max_queries, "--max-queries", int, minimum=0)[0])


def parse_uap_settings(ns):
    """The universal-perturbation protocol's settings (ConfigError naming the option at fault)."""
    refuse_options(ns, {dest: flag for dest, flag in RETRIEVAL_ONLY.items()
                        if not dest.startswith("surrogate_")},
                   "does not apply to --protocol uap (one perturbation learned on training images "
                   "for every query)")
    options = _attack_options(ns)
    if options["attacks"].strip() != "UAP":
        raise ConfigError(f"--attacks {options['attacks']!r}: --protocol uap learns a universal "
                          "perturbation, attack UAP")
    settings = dict(protocol="uap", attacks=["UAP"], eps=_numbers(options["eps"], "--eps", float),
                    steps=_numbers(options["steps"], "--steps", int), distance=ns.distance,
                    max_queries=_numbers(ns.max_queries, "--max-queries", int, minimum=0)[0],
                    step_size=_numbers(ns.step_size, "--step-size", float, minimum=0)[0] or None,
                    surrogate_config=ns.surrogate_config or None,
                    surrogate_weights=ns.surrogate_weights or None)
    check_attack_settings(["SMA"], settings["eps"], settings["steps"], ns.distance, 1,
                          OPTION_NAMES)  # L-inf budgets, positive steps, a known distance
    if bool(ns.surrogate_config) != bool(ns.surrogate_weights):
        raise ConfigError("a transfer attack needs both --surrogate-config and --surrogate-weights")
    return settings


def parse_settings(ns):
    """Attack settings from the command line, every one validated (ConfigError naming the option)."""
    if ns.protocol == "corruptions":
        return parse_corruption_settings(ns)
    refuse_options(ns, CORRUPTION_ONLY, "applies to --protocol corruptions only")
    if ns.protocol == "query":
        return parse_query_settings(ns)
    refuse_options(ns, QUERY_ONLY, "applies to --protocol query only")
    if ns.protocol == "uap":
        return parse_uap_settings(ns)
    if ns.protocol == "clustering":
        return parse_clustering_settings(ns)
    options = _attack_options(ns)
    settings = dict(
        protocol="retrieval",
        attacks=[a.strip() for a in options["attacks"].split(",") if a.strip()],
        eps=_numbers(options["eps"], "--eps", float),
        steps=_numbers(options["steps"], "--steps", int),
        distance=ns.distance, eot=_numbers(ns.eot, "--eot", int)[0],
        max_queries=_numbers(ns.max_queries, "--max-queries", int, minimum=0)[0],
        step_size=_numbers(ns.step_size, "--step-size", float, minimum=0)[0] or None,
        defense=ns.defense or None, bpda=ns.bpda, attack_gallery=ns.attack_gallery,
        guides=check_guides(ns.guides, OPTION_NAMES["guides"]),
        surrogate_config=ns.surrogate_config or None, surrogate_weights=ns.surrogate_weights or None)
    check_attack_settings(settings["attacks"], settings["eps"], settings["steps"], ns.distance,
                          settings["eot"], OPTION_NAMES)
    settings["attack_options"] = parse_attack_options(ns.attack_option, settings["attacks"],
                                                      OPTION_NAMES)
    if ns.bpda and not ns.defense:
        raise ConfigError("--bpda needs --defense NAME")
    if bool(ns.surrogate_config) != bool(ns.surrogate_weights):
        raise ConfigError("a transfer attack needs both --surrogate-config and --surrogate-weights")
    return settings


def check_inputs(ns):
    """Every check that can fail, before any work (and printing nothing): (settings, cfg, defense)."""
    settings = parse_settings(ns)
    unitless = [a for a in settings.get("attacks", []) if eps_unit(a) != "/255"]
    if ns.sanity and unitless:  # its checks (noise baseline, huge budget) are L-inf constructions
        raise ConfigError(f"--sanity checks L-inf attacks only; run {', '.join(unitless)} without it")
    cfg = load_config(ns.config_file, ns.opts)
    if not cfg.MODEL.WEIGHTS:
        raise ConfigError("no weights to evaluate: pass MODEL.WEIGHTS /path/to/model_final.pth")
    check_output_dir(report_dir(ns, cfg), "--output" if ns.output else "OUTPUT_DIR/robust_eval")
    preflight(cfg, eval_only=True)  # weights file and fit, datasets, images
    if settings["protocol"] == "corruptions":
        check_imagecorruptions()
        return settings, cfg, None
    if settings["protocol"] == "query":
        return settings, cfg, None
    if settings["protocol"] == "uap":
        check_surrogate(settings)
        return settings, cfg, None
    if settings["protocol"] == "clustering":
        check_clustering_config(cfg)  # whatever TEST.EVALUATOR says
        check_sample_counts(cfg, settings["max_queries"], max(cfg.ROBUSTREID.SEED, 0))
        return settings, cfg, None
    check_surrogate(settings)
    defense = build_defense(settings["defense"], bpda=settings["bpda"]) if settings["defense"] else None
    return settings, cfg, defense


def check_surrogate(settings):
    """The surrogate's config, weights file and their fit, when a transfer attack is asked for."""
    if settings["surrogate_config"]:
        surrogate_cfg = load_config(settings["surrogate_config"],
                                    ["MODEL.WEIGHTS", settings["surrogate_weights"]])
        check_weights(surrogate_cfg)
        check_weights_fit(surrogate_cfg)


def check_imagecorruptions():
    """ConfigError unless the imagecorruptions package imports (robustreid.compat adapts it)."""
    try:
        import imagecorruptions  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--protocol corruptions needs the imagecorruptions package ({e}): "
                          "pip install --no-deps imagecorruptions==1.1.2 scikit-image") from None


def report_dir(ns, cfg):
    return ns.output or os.path.join(cfg.OUTPUT_DIR, "robust_eval")


def clustering_cells(settings):
    """The PGD rows, eps-major; --step-size 0 = 2.5 * eps / steps (EAT's training default)."""
    return [PGDCell(eps, steps, settings["step_size"] or default_step_size(eps, steps))
            for eps in settings["eps"] for steps in settings["steps"]]


def run_clustering(settings, cfg, model):
    """Every test dataset attacked by every PGD row: the datasets' entries of the report."""
    seed = max(cfg.ROBUSTREID.SEED, 0)
    return [ClusteringRobustEvaluator(cfg, model, name, distance=settings["distance"],
                                      max_samples=settings["max_queries"], seed=seed)
            .run(clustering_cells(settings)) for name in cfg.DATASETS.TESTS]


def run(ns, settings, checked_cfg, defense):
    """Evaluate every test dataset (this process's share of the attacks); the main process writes
    the report (results.json holds the sanity checks too)."""
    output = report_dir(ns, checked_cfg)
    # fastreid's logger and config dump go to the report's directory; device resolved; seeded.
    cfg = setup(argparse.Namespace(config_file=ns.config_file, eval_only=True,
                                   opts=[*ns.opts, "OUTPUT_DIR", output]))
    model = RobustTrainer.load_for_eval(cfg)
    if settings["protocol"] == "corruptions":
        start = time.perf_counter()
        datasets = [CorruptionEvaluator(cfg, model, name, corrupt=settings["corrupt"],
                                        max_queries=settings["max_queries"],
                                        seed=max(cfg.ROBUSTREID.SEED, 0))
                    .run(settings["corruptions"], settings["severities"])
                    for name in cfg.DATASETS.TESTS]
        report = build_report(report_settings(ns, settings, cfg, output), datasets,
                              time.perf_counter() - start)
        write_corruption_report(report, output)
        return
    if settings["protocol"] == "query":
        start = time.perf_counter()
        cells = query_grid(settings["attacks"], settings["eps"], settings["query_budgets"])
        datasets = [QueryAttackEvaluator(cfg, model, name, max_queries=settings["max_queries"],
                                         seed=max(cfg.ROBUSTREID.SEED, 0))
                    .run(cells, noise_eps=settings["eps"]) for name in cfg.DATASETS.TESTS]
        report = build_report(report_settings(ns, settings, cfg, output), datasets,
                              time.perf_counter() - start)
        write_protocol_report(report, output, query_markdown)
        return
    if settings["protocol"] == "uap":
        surrogate = (build_surrogate_extractor(settings["surrogate_config"],
                                               settings["surrogate_weights"])
                     if settings["surrogate_config"] else None)
        start = time.perf_counter()
        cells = [UAPCell(e, s) for e in settings["eps"] for s in settings["steps"]]
        datasets = [UAPEvaluator(cfg, model, name, max_queries=settings["max_queries"],
                                 seed=max(cfg.ROBUSTREID.SEED, 0), surrogate=surrogate,
                                 step_size=settings["step_size"], distance=settings["distance"])
                    .run(cells, noise_eps=settings["eps"]) for name in cfg.DATASETS.TESTS]
        report = build_report(report_settings(ns, settings, cfg, output), datasets,
                              time.perf_counter() - start)
        write_protocol_report(report, output, uap_markdown)
        return
    if settings["protocol"] == "clustering":
        start = time.perf_counter()
        datasets = run_clustering(settings, cfg, model)
        report = build_report(report_settings(ns, settings, cfg, output), datasets,
                              time.perf_counter() - start)
        if comm.is_main_process():
            write_clustering_report(report, output)
        return
    surrogate = (build_surrogate_extractor(settings["surrogate_config"], settings["surrogate_weights"])
                 if settings["surrogate_config"] else None)
    seed = max(cfg.ROBUSTREID.SEED, 0)
    cells = attack_grid(settings["attacks"], settings["eps"], settings["steps"])
    start = time.perf_counter()
    datasets = []
    for name in cfg.DATASETS.TESTS:
        evaluator = DistributedRobustEvaluator(
            cfg, model, name, distance=settings["distance"], max_queries=settings["max_queries"],
            attack_gallery=settings["attack_gallery"], guides=settings["guides"],
            eot_samples=settings["eot"], defense=defense,
            seed=seed, strict_budget=not ns.sanity, surrogate=surrogate,
            step_size=settings["step_size"], attack_options=settings["attack_options"])
        result = evaluator.run(cells)
        if ns.sanity:
            dataset_checks, extra = sanity_checks(evaluator, result)
            result["sanity"] = {"checks": [vars(c) for c in dataset_checks], "cells": extra}
        datasets.append(result)
    report = build_report(report_settings(ns, settings, cfg, output), datasets,
                          time.perf_counter() - start)
    if comm.is_main_process():
        write_report(report, output)


def report_settings(ns, settings, cfg, output):
    """What results.json records of the run: the settings, the model, weights, data and device."""
    return {**settings, "model": os.path.splitext(os.path.basename(ns.config_file))[0],
            "config_file": os.path.abspath(ns.config_file), "opts": list(ns.opts),
            "weights": os.path.abspath(cfg.MODEL.WEIGHTS),
            "weights_sha256": sha256_of(cfg.MODEL.WEIGHTS), "datasets": list(cfg.DATASETS.TESTS),
            "metric": cfg.TEST.METRIC, "seed": max(cfg.ROBUSTREID.SEED, 0),
            "device": cfg.MODEL.DEVICE, "processes": comm.get_world_size(),
            "output_dir": os.path.abspath(output)}


def print_report(output):
    """The table, path and sanity checks of the report in ``output``; 1 if a check failed, else 0."""
    with open(os.path.join(output, "results.json")) as f:
        report = json.load(f)
    with open(os.path.join(output, "results.md")) as f:
        print("\n" + f.read())
    print(f"report: {report['settings']['output_dir']}")
    checks = [(d["dataset"], SanityCheck(**c)) for d in report["datasets"]
              for c in d.get("sanity", {}).get("checks", [])]
    for name, check in checks:
        print(f"[{name}] {check.line()}")
    return 1 if any(not c.passed for _, c in checks) else 0


def main(argv=None):
    ns = build_parser().parse_args(argv)
    if report_misplaced_flags(ns.opts):
        return 2
    try:
        processes = rendezvous.check_launch(ns.num_gpus, ns.num_machines, ns.machine_rank,
                                            ns.dist_url)
        settings, cfg, defense = check_inputs(ns)
        if processes > 1 and settings["protocol"] != "retrieval":
            raise ConfigError(f"--protocol {settings['protocol']} runs on one process: leave out "
                              "--num-gpus and --num-machines")
        launch(run, ns.num_gpus, num_machines=ns.num_machines, machine_rank=ns.machine_rank,
               dist_url=ns.dist_url, args=(ns, settings, cfg, defense))
    except (*USER_ERRORS, AttackConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rendezvous.launches_rank0(ns.machine_rank):
        return 0  # the machine of rank 0 writes and prints the report
    return print_report(report_dir(ns, cfg))


if __name__ == "__main__":
    sys.exit(main())

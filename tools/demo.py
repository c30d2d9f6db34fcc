#!/usr/bin/env python
"""`make demo`: train the built-in SynthReID model on CPU and print its evaluation table.

Generates SynthReID under $FASTREID_DATASETS (./datasets by default) on first use, trains the small
Bag-of-Tricks ResNet-18 of configs/SynthReID/bagtricks_R18.yml, evaluates it with the faiss evaluator
and prints mAP / Rank-k next to the chance level of the same query/gallery split, then the
robustness table of tools/robust_eval.py (FNA, SMA, Metric I-FGSM at 8/255, 16 iterations).

    python tools/demo.py [--config-file CFG] [--output DIR] [KEY VALUE ...]
"""
import argparse
import os
import sys
import time

import robustreid  # noqa: F401
from fastreid.engine import default_argument_parser
from robustreid.engine import USER_ERRORS, RobustTrainer, build_config, preflight, setup
from robustreid.evaluation.robust import (RobustEvaluator, attack_grid, build_report,
                                          robust_markdown, write_report)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")
# DDDefense's white-box evaluation at its smaller budget; SynthReID has 100 queries.
DEMO_ATTACKS, DEMO_EPS, DEMO_STEPS, DEMO_MAX_QUERIES = ("FNA", "SMA", "IFGSM"), (8,), (16,), 100


def robust_report(cfg, model, config_file):
    """FNA/SMA/IFGSM at 8/255, 16 steps on the first test set's queries (at most DEMO_MAX_QUERIES):
    tools/robust_eval.py's code path, report written to OUTPUT_DIR/robust_eval."""
    start = time.perf_counter()
    evaluator = RobustEvaluator(cfg, model, cfg.DATASETS.TESTS[0], max_queries=DEMO_MAX_QUERIES,
                                seed=max(cfg.ROBUSTREID.SEED, 0))
    result = evaluator.run(attack_grid(DEMO_ATTACKS, DEMO_EPS, DEMO_STEPS))
    settings = {"model": os.path.splitext(os.path.basename(config_file))[0], "attacks": DEMO_ATTACKS,
                "eps": DEMO_EPS, "steps": DEMO_STEPS, "distance": "euclidean",
                "max_queries": DEMO_MAX_QUERIES, "config_file": os.path.abspath(config_file),
                "weights": os.path.join(cfg.OUTPUT_DIR, "model_final.pth")}
    report = build_report(settings, [result], time.perf_counter() - start)
    write_report(report, os.path.join(cfg.OUTPUT_DIR, "robust_eval"))
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--output", default=os.path.join(REPO, "logs", "demo"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    ns = parser.parse_args(argv)
    args = default_argument_parser().parse_args(
        ["--config-file", ns.config_file, "OUTPUT_DIR", ns.output, *ns.opts])
    start = time.time()
    try:
        preflight(build_config(args))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = setup(args)
    trainer = RobustTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    dataset = cfg.DATASETS.TESTS[0]
    train_minutes = (time.time() - start) / 60
    report = robust_report(cfg, trainer.model, ns.config_file)
    chance = report["datasets"][0]["chance"]  # robust.chance_level on the same split
    minutes = (time.time() - start) / 60
    print(f"\nRobustReID demo: {dataset}, {cfg.MODEL.BACKBONE.DEPTH} ResNet, "
          f"{cfg.SOLVER.MAX_EPOCH} epochs on {cfg.MODEL.DEVICE}, {minutes:.1f} min "
          f"({train_minutes:.1f} training, {report['seconds_total'] / 60:.1f} robust evaluation)")
    print("| metric | model | chance |\n|---|---|---|")
    print(f"| mAP | {results['mAP']:.1f} | {chance['mAP']:.1f} |")
    print(f"| Rank-1 | {results['Rank-1']:.1f} | {chance['Rank-1']:.1f} |")
    for key in ("Rank-5", "Rank-10", "mINP"):
        print(f"| {key} | {results[key]:.1f} | |")
    print("\nWhite-box attacks on the queries (gallery clean):\n")
    print(robust_markdown(report))
    print(f"weights: {os.path.join(cfg.OUTPUT_DIR, 'model_final.pth')}")
    print(f"robust report: {os.path.join(cfg.OUTPUT_DIR, 'robust_eval')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

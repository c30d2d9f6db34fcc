#!/usr/bin/env python
"""`make demo`: train the built-in SynthReID model on CPU and print its evaluation table.

Generates SynthReID under $FASTREID_DATASETS (./datasets by default) on first use, trains the small
Bag-of-Tricks ResNet-18 of configs/SynthReID/bagtricks_R18.yml, evaluates it with the faiss evaluator
and prints mAP / Rank-k next to the chance level of the same query/gallery split.

    python tools/demo.py [--config-file CFG] [--output DIR] [KEY VALUE ...]
"""
import argparse
import os
import sys
import time

import numpy as np

import robustreid  # noqa: F401
from fastreid.engine import default_argument_parser
from robustreid.data.validation import build_dataset
from robustreid.engine import USER_ERRORS, RobustTrainer, build_config, preflight, setup
from robustreid.evaluation import evaluate_rank_from_features

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")


def chance_level(dataset_name, draws=5, seed=0):
    """mAP / Rank-1 of random features on the same query/gallery split (what 'no skill' scores)."""
    data = build_dataset(dataset_name)
    q_pids, q_cams = (np.array([x[i] for x in data.query]) for i in (1, 2))
    g_pids, g_cams = (np.array([x[i] for x in data.gallery]) for i in (1, 2))
    rng = np.random.default_rng(seed)
    maps, rank1s = [], []
    for _ in range(draws):
        cmc, all_ap, _ = evaluate_rank_from_features(
            rng.standard_normal((len(q_pids), 64)).astype(np.float32),
            rng.standard_normal((len(g_pids), 64)).astype(np.float32),
            q_pids, g_pids, q_cams, g_cams, metric="euclidean")
        maps.append(np.mean(all_ap) * 100)
        rank1s.append(cmc[0] * 100)
    return float(np.mean(maps)), float(np.mean(rank1s))


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
    chance_map, chance_r1 = chance_level(dataset)
    minutes = (time.time() - start) / 60
    print(f"\nRobustReID demo: {dataset}, {cfg.MODEL.BACKBONE.DEPTH} ResNet, "
          f"{cfg.SOLVER.MAX_EPOCH} epochs on {cfg.MODEL.DEVICE}, {minutes:.1f} min")
    print("| metric | model | chance |\n|---|---|---|")
    print(f"| mAP | {results['mAP']:.1f} | {chance_map:.1f} |")
    print(f"| Rank-1 | {results['Rank-1']:.1f} | {chance_r1:.1f} |")
    for key in ("Rank-5", "Rank-10", "mINP"):
        print(f"| {key} | {results[key]:.1f} | |")
    print(f"weights: {os.path.join(cfg.OUTPUT_DIR, 'model_final.pth')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

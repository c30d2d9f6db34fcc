#!/usr/bin/env python
"""Train once on the source datasets, then evaluate on every target in one run (DG protocols).

    python tools/dg_eval.py --config-file configs/DG/BAU_Protocol1_R50-ibn.yml
    python tools/dg_eval.py --config-file configs/DG/ADIN_MSMT17_to_Market_Duke.yml
    python tools/dg_eval.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth
    python tools/dg_eval.py --config-file CFG --splits 10 --layout bau [KEY VALUE ...]

Sources are DATASETS.NAMES, targets DATASETS.TESTS. Targets with random query / gallery splits
(PRID_DG, GRID_DG, VIPeR_DG, iLIDS_DG: Protocol-1's small sets) are evaluated on ``--splits``
splits (0 .. n-1, default 10) and averaged; features are extracted once per image. The table is
printed in the papers' layout: ``bau`` (BAU Tables 3-4: mAP / Rank-1 per target and the average)
or ``adin`` (ADIN Tables 2-3: top1 / top5 / top10 / mAP per target); ``auto`` picks ``adin`` when
DG.ADIN.ENABLED. The model of the last epoch is evaluated (the trainer's own final evaluation is
reused for targets without splits). One process (use tools/train_net.py for multi-process
training, then --eval-only here).
"""
import argparse
import logging
import os
import sys

import numpy as np
import torch

import robustreid  # noqa: F401  (compat patches, registrations)
import robustreid.data.dg_datasets  # noqa: F401  (DG target datasets)
from robustreid.cli import OneLineParser, int_at_least
from robustreid.data.test_loader import plain_test_loader
from robustreid.data.validation import build_dataset, datasets_root
from robustreid.evaluation import build_reid_evaluator

logger = logging.getLogger("robustreid.dg_eval")

METRICS = ("mAP", "Rank-1", "Rank-5", "Rank-10")


@torch.no_grad()
def _features(cfg, model, paths, cache):
    """Eval-mode features of ``paths`` (cached by path across splits)."""
    todo = [p for p in dict.fromkeys(paths) if p not in cache]
    if todo:
        loader = plain_test_loader(cfg, [(p, 0, 0) for p in todo])
        device = next(model.parameters()).device
        model.eval()
        for batch in loader:
            feats = model({"images": batch["images"].to(device)}).float().cpu()
            cache.update(zip(batch["img_paths"], feats))
    return torch.stack([cache[p] for p in paths])


def evaluate_dataset(cfg, model, data, cache):
    """fastreid's metrics (x100) of one dataset object's query / gallery split."""
    items = list(data.query) + list(data.gallery)
    features = _features(cfg, model, [item[0] for item in items], cache)
    evaluator = build_reid_evaluator(cfg, len(data.query))
    evaluator.reset()
    evaluator.process({"targets": torch.tensor([int(i[1]) for i in items]),
                       "camids": torch.tensor([int(i[2]) for i in items])}, features)
    return evaluator.evaluate()


def evaluate_targets(cfg, model, names, num_splits=10, known=None):
    """{target: {mAP, Rank-1, Rank-5, Rank-10, splits}}; split datasets averaged over splits.

    ``known``: {target: results} already computed for this model (the trainer's final
    evaluation), reused for targets without splits."""
    from fastreid.data.datasets import DATASET_REGISTRY

    results = {}
    for name in names:
        cls = DATASET_REGISTRY.get(name)
        cache = {}
        if getattr(cls, "num_splits", 1) > 1:
            runs = [evaluate_dataset(cfg, model, cls(root=datasets_root(), split_id=s), cache)
                    for s in range(num_splits)]
        elif known and all(m in known.get(name, {}) for m in METRICS):
            runs = [known[name]]
        else:
            runs = [evaluate_dataset(cfg, model, build_dataset(name), cache)]
        results[name] = {m: float(np.mean([r[m] for r in runs])) for m in METRICS}
        results[name]["splits"] = len(runs)
        logger.info("%s: %s", name, results[name])
    return results


def format_table(results, layout, method):
    """The papers' table layout as a pipe table (one row: ``method``)."""
    from tabulate import tabulate

    names = list(results)
    if layout == "bau":
        headers = ["Method"] + [f"{n} {m}" for n in names + ["Average"] for m in ("mAP", "R1")]
        row = [method]
        for n in names:
            row += [results[n]["mAP"], results[n]["Rank-1"]]
        row += [np.mean([results[n]["mAP"] for n in names]),
                np.mean([results[n]["Rank-1"] for n in names])]
    elif layout == "adin":
        headers = ["Method"] + [f"{n} {m}" for n in names for m in ("top1", "top5", "top10",
                                                                     "mAP")]
        row = [method]
        for n in names:
            row += [results[n][m] for m in ("Rank-1", "Rank-5", "Rank-10", "mAP")]
    else:
        raise ValueError(f"layout must be bau or adin, got {layout!r}")
    splits = {n: results[n]["splits"] for n in names if results[n]["splits"] > 1}
    note = f"\n(averaged over query/gallery splits: {splits})" if splits else ""
    return tabulate([row], headers=headers, tablefmt="pipe", floatfmt=".1f") + note


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS only")
    parser.add_argument("--resume", action="store_true", help="resume training from OUTPUT_DIR")
    parser.add_argument("--splits", type=int_at_least(1), default=10,
                        help="random query/gallery splits of the small target sets")
    parser.add_argument("--layout", choices=("auto", "bau", "adin"), default="auto")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def main(argv=None):
    from robustreid.engine import USER_ERRORS, RobustTrainer, build_config, preflight, setup

    args = parse_args(argv)
    args.num_gpus, args.machine_rank = 1, 0
    try:
        preflight(build_config(args), eval_only=args.eval_only)  # before setup writes OUTPUT_DIR
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = setup(args)
    known = None
    if args.eval_only:
        model = RobustTrainer.load_for_eval(cfg)
    else:
        trainer = RobustTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        model = trainer.model
        # the trainer evaluated every target at the end (split 0 of the split ones): reuse it
        final = getattr(trainer, "_last_eval_results", None) or {}
        known = {cfg.DATASETS.TESTS[0]: final} if len(cfg.DATASETS.TESTS) == 1 else final
    results = evaluate_targets(cfg, model, cfg.DATASETS.TESTS, args.splits, known)
    layout = args.layout
    if layout == "auto":
        layout = "adin" if "DG" in cfg and cfg.DG.ADIN.ENABLED else "bau"
    method = "+".join(cfg.DATASETS.NAMES) + " -> " + os.path.basename(args.config_file)
    print(format_table(results, layout, method))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Unsupervised domain adaptation with IPES-GAN (thesis ch. 3): train on the labelled source and the
unlabelled target, evaluate on the target, print the thesis's Table 3.1 layout beside its numbers.

    python tools/uda_eval.py --config-file configs/IPES/Duke_to_Market.yml \\
        MODEL.WEIGHTS logs/dukemtmc/bagtricks_R50-ibn/model_final.pth
    python tools/uda_eval.py --config-file CFG --eval-only MODEL.WEIGHTS OUT/model_final.pth \\
        [--direct-weights SOURCE_MODEL.pth] [--identity-pairs 256]

Source: DATASETS.NAMES; target: IPES.TARGET (training images, unlabelled) and DATASETS.TESTS
(query / gallery, evaluated with the project's evaluator). Rows of the table (CMC-1/5/10, mAP per
target): "Direct transfer", the source-trained model on the target (the thesis's "Direct Testing":
the training run's MODEL.WEIGHTS, or --direct-weights), "Direct transfer + AdaBN" (that model with
its BatchNorm statistics re-estimated on IPES.TARGET's unlabelled training images: the cheapest
UDA baseline), then this run's IPES-GAN identity encoder, then the thesis's rows for the same
source and target (configs/IPES/paper_results.json). --identity-pairs N also measures whether
generated views keep the source identity: the run's frozen teacher (the source model) retrieves,
for N views I_S->G, the nearest real source image (robustreid.evaluation.ipes_identity), against
chance. One process. Bad input exits 2 with one "error: ..." line.
"""
import argparse
import copy
import json
import logging
import os
import sys

import robustreid  # noqa: F401  (compat patches, registrations)
import dg_eval  # tools/dg_eval.py: the per-target evaluation (tools/ is on sys.path)
from robustreid.cli import OneLineParser, int_at_least

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_RESULTS = os.path.join(REPO, "configs", "IPES", "paper_results.json")
logger = logging.getLogger("robustreid.uda_eval")
COLUMNS = (("CMC-1", "Rank-1"), ("CMC-5", "Rank-5"), ("CMC-10", "Rank-10"), ("mAP", "mAP"))


def backbone_label(cfg):
    backbone = cfg.MODEL.BACKBONE
    if backbone.NAME != "build_resnet_backbone":
        return backbone.NAME
    return f"{'IBN-' if backbone.WITH_IBN else ''}ResNet-{backbone.DEPTH.rstrip('x')}"


def paper_rows(source, targets, path=PAPER_RESULTS):
    """The thesis's rows for ``source`` -> each of ``targets``: [(method, reference, {target:
    values})], one row per method and backbone."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    merged = {}
    for row in rows:
        if row["source"] == source and row["target"] in targets:
            method = f"{row['method']} ({row['backbone']})" if row["backbone"] else row["method"]
            key = (method, f"thesis Table {row['table']}")
            merged.setdefault(key, {})[row["target"]] = row["values"]
    return [(method, reference, values) for (method, reference), values in merged.items()]


def format_table(source, targets, rows):
    """Table 3.1's layout as a pipe table: Methods | Reference | per target CMC-1, -5, -10, mAP."""
    from tabulate import tabulate

    headers = ["Methods", "Reference"] + [f"{source}->{t} {c}" for t in targets for c, _ in COLUMNS]
    table = []
    for method, reference, values in rows:
        cells = [values.get(t, {}).get(metric) for t in targets for _, metric in COLUMNS]
        table.append([method, reference] + ["-" if v is None else f"{v:.1f}" for v in cells])
    return tabulate(table, headers=headers, tablefmt="pipe", disable_numparse=True)


def direct_transfer_config(cfg, weights):
    """``cfg``'s identity encoder as a plain fastreid model with the source model's ``weights``."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.META_ARCHITECTURE = "Baseline"
    cfg.IPES.ENABLED = False
    cfg.MODEL.WEIGHTS = weights
    return cfg


def adapted_batchnorm_model(cfg, source_model):
    """A copy of ``source_model`` with its BatchNorm statistics re-estimated on IPES.TARGET's
    unlabelled training images (AdaBN, robustreid.modeling.batchnorm_adaptation), at the test
    transform."""
    from robustreid.data.test_loader import plain_test_loader
    from robustreid.data.validation import build_dataset
    from robustreid.modeling.batchnorm_adaptation import adapt_batchnorm_statistics

    model = copy.deepcopy(source_model)
    target_images = [(item[0], 0, 0) for item in build_dataset(cfg.IPES.TARGET).train]
    loader = plain_test_loader(cfg, target_images)
    device = next(model.parameters()).device
    seen = adapt_batchnorm_statistics(model, (b["images"].to(device) for b in loader))
    logger.info("AdaBN: BatchNorm statistics re-estimated on %d %s training images", seen,
                cfg.IPES.TARGET)
    return model


def identity_line(cfg, model, pairs):
    from robustreid.data.ipes import ipes_train_items, posed_images
    from robustreid.evaluation.ipes_identity import identity_preservation

    source, target = (posed_images(cfg, items, flip=False) for items in ipes_train_items(cfg))
    result = identity_preservation(model, model.teacher_features, source, target, pairs)
    return (f"Identity preservation: the frozen source model retrieves the generated view's source "
            f"identity for {result['rank1']:.1f}% of {result['pairs']} views I_S->G (chance "
            f"{result['chance']:.1f}%)")


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS only")
    parser.add_argument("--resume", action="store_true", help="resume training from OUTPUT_DIR")
    parser.add_argument("--direct-weights", default="", metavar="PATH",
                        help="the source-trained model for the direct-transfer row (default: the "
                             "training run's MODEL.WEIGHTS)")
    parser.add_argument("--identity-pairs", type=int_at_least(0), default=0, metavar="N",
                        help="also measure identity preservation on N generated views")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def main(argv=None):
    from robustreid.config import ConfigError
    from robustreid.engine import (USER_ERRORS, RobustTrainer, WeightsNotFoundError, build_config,
                                   build_trainer, preflight, setup)

    args = parse_args(argv)
    args.num_gpus, args.machine_rank = 1, 0
    try:
        cfg = build_config(args)
        if not cfg.IPES.ENABLED:
            raise ConfigError(f"{args.config_file}: not an IPES config (IPES.ENABLED False)")
        if args.direct_weights and not os.path.isfile(args.direct_weights):
            raise WeightsNotFoundError(f"--direct-weights file not found: {args.direct_weights}")
        preflight(cfg, eval_only=args.eval_only)  # before setup writes OUTPUT_DIR
        cfg = setup(args)
        known = None
        if args.eval_only:
            model = RobustTrainer.load_for_eval(cfg)
            direct = args.direct_weights
        else:
            trainer = build_trainer(cfg)
            trainer.resume_or_load(resume=args.resume)
            trainer.train()
            model, direct = trainer.model, args.direct_weights or cfg.MODEL.WEIGHTS
            final = getattr(trainer, "_last_eval_results", None) or {}
            known = {cfg.DATASETS.TESTS[0]: final} if len(cfg.DATASETS.TESTS) == 1 else final
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    targets = list(cfg.DATASETS.TESTS)
    rows = []
    if direct:
        source_model = RobustTrainer.load_for_eval(direct_transfer_config(cfg, direct))
        rows.append(("Direct transfer", "source model",
                     dg_eval.evaluate_targets(cfg, source_model, targets, 1)))
        rows.append(("Direct transfer + AdaBN", "target BN statistics",
                     dg_eval.evaluate_targets(cfg, adapted_batchnorm_model(cfg, source_model),
                                              targets, 1)))
    rows.append((f"IPES-GAN ({backbone_label(cfg)})", "this run",
                 dg_eval.evaluate_targets(cfg, model, targets, 1, known)))
    source = "+".join(cfg.DATASETS.NAMES)
    rows += paper_rows(source, targets)
    print(format_table(source, targets, rows))
    if args.identity_pairs:
        print(identity_line(cfg, model, args.identity_pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

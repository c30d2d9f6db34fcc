#!/usr/bin/env python
"""Certified L2 robustness of a trained model by randomized smoothing (Cohen et al. 2019; thesis
chapter 6).

    python tools/certify.py --config-file CFG [--sigmas 0.12,0.25,0.5]
        [--decision retrieval|classifier] [--n0 100] [--n 1000] [--alpha 0.001] [--batch 200]
        [--max-queries N] [--output DIR] MODEL.WEIGHTS model.pth [KEY VALUE ...]

Noise levels (--sigmas) and radii are L2 in [0, 1] pixel units. Options that are not given come
from the config's CERTIFY keys (robustreid/config.py). Cohen et al. use n 100,000; the default n
1,000 fits a CPU and certifies at most sigma * PhiInv(alpha ** (1 / n)) = 2.46 sigma.

--decision retrieval (default) certifies the top-1 gallery identity of each query of the first
DATASETS.TESTS dataset. The gallery stays clean. Distances use TEST.METRIC, and the query's junk
(same pid and camera) is left out, as for Rank-1. Queries without a positive in the gallery are
skipped. --max-queries N keeps a seeded subset of whole identities (as tools/robust_eval.py).
--decision classifier certifies the identity classifier on the training images of DATASETS.NAMES.
Those images were seen in training, so the number measures how robust the fit is, not how it
generalises. --max-queries N keeps a seeded uniform subset of N images.

Writes certified.json (per-image radii), certified.md (certified Rank-1 or accuracy against radius,
one row per sigma, with the abstention rate) and certified_curve.png to DIR (default
OUTPUT_DIR/certify). The last line is, for the FIRST sigma given:
    certified_rank1@0.25=<%> certified_rank1@0.5=<%> abstain=<%> seconds_per_query=<s>
(certified_accuracy@... with --decision classifier). Bad input exits 2 with one "error: ..." line.
"""
import argparse
import logging
import os
import sys
import time

import numpy as np

import robustreid  # noqa: F401  (compat patches + registrations)
from fastreid.data.common import CommDataset
from fastreid.data.transforms import build_transforms
from robustreid.attacks import AttackConfigError, ReidFeatureExtractor
from robustreid.checksums import sha256_of
from robustreid.cli import OneLineParser, int_at_least, report_misplaced_flags
from robustreid.config import ConfigError, load_config
from robustreid.data.validation import check_datasets
from robustreid.engine import (USER_ERRORS, RobustTrainer, check_output_dir, preflight, setup)
from robustreid.engine.checkpoint import check_checkpoint_fits, read_checkpoint
from robustreid.engine.defaults import training_items
from robustreid.engine.denoiser_training import load_denoiser
from robustreid.evaluation.certified_report import build_report, certified_markdown, headline, \
    write_report
from robustreid.evaluation.faiss_evaluator import _faiss_options
from robustreid.evaluation.ranking import valid_query_mask
from robustreid.evaluation.robust import RobustEvaluator
from robustreid.evaluation.smoothing import (DECISIONS, CertifySettings, RetrievalDecision,
                                             certify_images, classifier_decision)

logger = logging.getLogger("robustreid.certify")

OPTION_NAMES = {"decision": "--decision", "sigmas": "--sigmas", "n0": "--n0", "n": "--n",
                "alpha": "--alpha", "batch": "--batch"}


def build_parser():
    parser = OneLineParser(description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--sigmas", help="comma-separated noise levels in [0, 1] pixel units "
                                         "(default: CERTIFY.SIGMAS)")
    parser.add_argument("--decision", choices=DECISIONS, help="default: CERTIFY.DECISION")
    parser.add_argument("--n0", type=int_at_least(1), help="selection samples (CERTIFY.N0)")
    parser.add_argument("--n", type=int_at_least(1), help="estimation samples (CERTIFY.N)")
    parser.add_argument("--alpha", type=float, help="failure probability (CERTIFY.ALPHA)")
    parser.add_argument("--batch", type=int_at_least(1),
                        help="noisy copies per forward pass (CERTIFY.BATCH)")
    parser.add_argument("--max-queries", type=int_at_least(0), default=0,
                        help="certify a seeded subset (0 = all)")
    parser.add_argument("--denoiser", default="", metavar="PATH",
                        help="denoised smoothing: the tools/train_denoiser.py checkpoint put in front "
                             "of the model (its DENOISER.* keys go in the opts, as for its training)")
    parser.add_argument("--output", default="", help="default: OUTPUT_DIR/certify")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="MODEL.WEIGHTS path and KEY VALUE pairs")
    return parser


def parse_sigmas(text):
    """--sigmas as a tuple of numbers (None when not given), or ConfigError naming the option."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--sigmas: {text!r} is not a comma-separated list of numbers") from None


def report_dir(ns, cfg):
    return ns.output or os.path.join(cfg.OUTPUT_DIR, "certify")


def classifier_opts(cfg):
    """The KEY VALUE pairs that give the model its training classifier: MODEL.HEADS.NUM_CLASSES as
    training sets it (the number of identities of DATASETS.NAMES) when the config leaves it 0."""
    num_classes = CommDataset(training_items(cfg), relabel=True).num_classes
    configured = cfg.MODEL.HEADS.NUM_CLASSES
    if configured not in (0, num_classes):
        raise ConfigError(f"MODEL.HEADS.NUM_CLASSES is {configured}, but DATASETS.NAMES "
                          f"{list(cfg.DATASETS.NAMES)} have {num_classes} identities: the "
                          "classifier decision needs the training classifier")
    return ["MODEL.HEADS.NUM_CLASSES", str(num_classes)]


def check_inputs(ns):
    """Every check that can fail, before any work: (settings, KEY VALUE opts of the model's
    config, report directory)."""
    cfg = load_config(ns.config_file, ns.opts)
    settings = CertifySettings.from_config(
        cfg, OPTION_NAMES, decision=ns.decision, sigmas=parse_sigmas(ns.sigmas), n0=ns.n0, n=ns.n,
        alpha=ns.alpha, batch=ns.batch)
    if not cfg.MODEL.WEIGHTS:
        raise ConfigError("no weights to certify: pass MODEL.WEIGHTS /path/to/model_final.pth")
    if ns.denoiser:  # the file and its fit to the DENOISER keys (on the CPU: no device resolved yet)
        load_denoiser(load_config(ns.config_file, [*ns.opts, "MODEL.DEVICE", "cpu"]), ns.denoiser)
    output = report_dir(ns, cfg)
    check_output_dir(output, "--output" if ns.output else "OUTPUT_DIR/certify")
    preflight(cfg, eval_only=True)  # weights file and fit, test datasets, images
    opts = list(ns.opts)
    if settings.decision == "classifier":
        check_datasets(cfg.DATASETS.NAMES, (), verify=cfg.DATALOADER.VERIFY_IMAGES)
        opts += classifier_opts(cfg)
        cfg = load_config(ns.config_file, opts)
        label = f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}"
        # every tensor, the classifier's too (preflight skips what inference leaves unused)
        check_checkpoint_fits(cfg, read_checkpoint(cfg.MODEL.WEIGHTS, label,
                                                   cfg.ROBUSTREID.WEIGHTS_ONLY), label, strict=True)
    return settings, opts, output


def scaled_loader(cfg, items):
    """Image i of ``items`` as [0, 1] (C, H, W): fastreid's test transforms give [0, 255]."""
    dataset = CommDataset(items, build_transforms(cfg, is_train=False), relabel=False)
    return lambda index: dataset[index]["images"] / 255.0


def retrieval_task(cfg, model, max_queries, seed, denoiser):
    """(items, labels, base decision of item i, extractor) of the top-1 retrieval decision; a
    denoiser sits in front of the model for the gallery too (the deployed pipeline)."""
    name = cfg.DATASETS.TESTS[0]
    if len(cfg.DATASETS.TESTS) > 1:
        logger.warning("certifying %s only, the first of DATASETS.TESTS", name)
    evaluator = RobustEvaluator(cfg, model, name, max_queries=max_queries, seed=seed,
                                defense=denoiser, progress=False)
    evaluator.evaluate_clean()  # the clean gallery features
    query, gallery = evaluator.query, evaluator.gallery
    valid = valid_query_mask(query.pids, query.camids, gallery.pids, gallery.camids)
    items = [item for item, keep in zip(query.items, valid) if keep]
    _, use_gpu, backend = _faiss_options(cfg)
    decision = RetrievalDecision(evaluator.extractor, gallery.features, gallery.pids,
                                 gallery.camids, cfg.TEST.METRIC, use_gpu=use_gpu, backend=backend)
    decide = [decision.for_query(pid, camid) for _, pid, camid, *_ in items]
    return items, [pid for _, pid, *_ in items], decide.__getitem__, evaluator.extractor


def classifier_task(cfg, model, max_queries, seed, denoiser):
    """(items, labels, base decision of item i, extractor) of the identity classifier decision."""
    items = training_items(cfg)
    pid_index = CommDataset(items, relabel=True).pid_dict  # the training loader's class indices
    if max_queries and max_queries < len(items):
        chosen = np.sort(np.random.default_rng(seed).choice(len(items), max_queries, replace=False))
        items = [items[i] for i in chosen]
    extractor = ReidFeatureExtractor(model, defense=denoiser)
    if extractor.num_classes != len(pid_index):  # AttackConfigError if it has no classifier
        raise ConfigError(f"the model classifies {extractor.num_classes} identities, "
                          f"DATASETS.NAMES have {len(pid_index)}")
    decide = classifier_decision(extractor.logits)
    return items, [pid_index[pid] for _, pid, *_ in items], lambda index: decide, extractor


def run(ns, settings, opts, output):
    """Certify, write the report to ``output``; returns it."""
    # fastreid's logger and config dump go to the report's directory; device resolved; seeded.
    cfg = setup(argparse.Namespace(config_file=ns.config_file, eval_only=True,
                                   opts=[*opts, "OUTPUT_DIR", output]))
    model = RobustTrainer.load_for_eval(cfg)
    seed = max(cfg.ROBUSTREID.SEED, 0)
    task = retrieval_task if settings.decision == "retrieval" else classifier_task
    start = time.perf_counter()
    denoiser = load_denoiser(cfg, ns.denoiser) if ns.denoiser else None
    items, labels, decide_for, extractor = task(cfg, model, ns.max_queries, seed, denoiser)
    if not items:
        raise ConfigError("nothing to certify: no query has a positive in the gallery")
    with extractor.frozen_eval():  # one eval-mode (BN-folded) model for the whole run
        results = certify_images(scaled_loader(cfg, items), labels, decide_for, settings, seed=seed,
                                 device=next(model.parameters()).device)
    report_settings = {
        **vars(settings), "sigmas": list(settings.sigmas), "max_queries": ns.max_queries,
        "model": os.path.splitext(os.path.basename(ns.config_file))[0],
        "config_file": os.path.abspath(ns.config_file), "opts": list(ns.opts),
        "weights": os.path.abspath(cfg.MODEL.WEIGHTS),
        "weights_sha256": sha256_of(cfg.MODEL.WEIGHTS),
        "denoiser": os.path.abspath(ns.denoiser) if ns.denoiser else None,
        "denoiser_sha256": sha256_of(ns.denoiser) if ns.denoiser else None,
        "dataset": (cfg.DATASETS.TESTS[0] if settings.decision == "retrieval"
                    else "+".join(cfg.DATASETS.NAMES)),
        "metric": cfg.TEST.METRIC, "seed": seed, "device": cfg.MODEL.DEVICE,
        "output_dir": os.path.abspath(output)}
    images = [{"path": path, "pid": pid, "camid": camid} for path, pid, camid, *_ in items]
    report = build_report(report_settings, images, results, time.perf_counter() - start)
    write_report(report, output)
    return report


def main(argv=None):
    ns = build_parser().parse_args(argv)
    if report_misplaced_flags(ns.opts):
        return 2
    try:
        settings, opts, output = check_inputs(ns)
        report = run(ns, settings, opts, output)
    except (*USER_ERRORS, AttackConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n" + certified_markdown(report))
    print(f"report: {report['settings']['output_dir']}")
    print(headline(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

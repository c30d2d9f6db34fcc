#!/usr/bin/env python
"""Train a denoiser in front of a frozen ReID model (denoised smoothing, thesis chapter 6).

    python tools/train_denoiser.py --config-file CFG MODEL.WEIGHTS model.pth [DENOISER.KEY VALUE ...]
        [--output DIR] [--resume]

The model (CFG + MODEL.WEIGHTS) stays frozen; the denoiser trains on its training images
(DATASETS.NAMES) with Gaussian noise of DENOISER.SIGMA ([0, 1] pixel units). DENOISER.MODE:
first_order (white-box gradients), rge (ZO-RUDS: the model is queried only, q + 2 queries per
sample per step), cge_ae / rge_ae (ZO-AE-RUDS: autoencoder pre-trained first, then the gradient is
estimated in its latent; 2 LATENT_DIM + 2 queries per sample per step with CGE). DENOISER.MSE_PRETRAIN_ITERS > 0 warm-starts
the denoiser on ||D(x + eta) - x||^2 first (Salman et al.; no query). Every DENOISER key
is in robustreid/config.py. Checkpoints go to DIR (default OUTPUT_DIR/denoiser), the last as
denoiser_final.pth; --resume continues from DIR's last checkpoint exactly. The last line gives the
checkpoint, iterations, queries and time. Bad input exits 2 with one "error: ..." line.
"""
import argparse
import os
import sys

import robustreid  # noqa: F401  (compat patches + registrations)
from robustreid.attacks import AttackConfigError
from robustreid.cli import OneLineParser, report_misplaced_flags
from robustreid.config import ConfigError, load_config
from robustreid.data.validation import check_datasets
from robustreid.engine import (USER_ERRORS, RobustTrainer, check_output_dir, check_weights,
                               check_weights_fit, setup)
from robustreid.engine.checkpoint import read_checkpoint
from robustreid.engine.denoiser_training import DenoiserTrainer, check_denoiser_config


def build_parser():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", default="", help="default: OUTPUT_DIR/denoiser")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the output directory's last checkpoint")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="MODEL.WEIGHTS path and KEY VALUE pairs")
    return parser


def classifier_rows(cfg):
    """The identity classes of MODEL.WEIGHTS' classifier (0 if it has none)."""
    state = read_checkpoint(cfg.MODEL.WEIGHTS, f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}",
                            cfg.ROBUSTREID.WEIGHTS_ONLY)["model"]
    weight = state.get("heads.weight")
    return 0 if weight is None else int(weight.shape[0])


def check_inputs(ns):
    """Every input check that can fail, before anything is built: (output directory, the KEY VALUE
    options, completed with MODEL.HEADS.NUM_CLASSES when the logits need it)."""
    cfg = load_config(ns.config_file, ns.opts)
    if not cfg.MODEL.WEIGHTS:
        raise ConfigError("no model to train a denoiser for: pass MODEL.WEIGHTS /path/to/model.pth")
    check_denoiser_config(cfg)
    check_weights(cfg, eval_only=True)
    opts = list(ns.opts)
    # A training config leaves NUM_CLASSES 0 (the trainer sizes the classifier from the data): size
    # it as the weights' classifier, else the identity logits would be empty
    if cfg.DENOISER.OUTPUT == "logits" and cfg.MODEL.HEADS.NUM_CLASSES == 0:
        classes = classifier_rows(cfg)
        if not classes:
            raise ConfigError(f"DENOISER.OUTPUT logits needs an identity classifier, and MODEL.WEIGHTS "
                              f"{cfg.MODEL.WEIGHTS} has none (no heads.weight): use DENOISER.OUTPUT "
                              f"features")
        opts += ["MODEL.HEADS.NUM_CLASSES", str(classes)]
        cfg = load_config(ns.config_file, opts)
    output = ns.output or os.path.join(cfg.OUTPUT_DIR, "denoiser")
    check_output_dir(output, "--output" if ns.output else "OUTPUT_DIR/denoiser")
    check_weights_fit(cfg)
    check_datasets(cfg.DATASETS.NAMES, (), verify=cfg.DATALOADER.VERIFY_IMAGES)
    return output, opts


def summary_line(summary, output):
    hours = summary["seconds"] / 3600
    return (f"denoiser: {os.path.join(output, 'denoiser_final.pth')}  mode {summary['mode']}, "
            f"{summary['iterations']} iterations, {summary['queries']} queries "
            f"({summary['queries_per_sample_per_step']} per sample per step), "
            f"{summary['seconds']:.1f} s ({hours:.2f} h) for the {summary['iterations_run']} "
            f"iterations of this run")


def main(argv=None):
    ns = build_parser().parse_args(argv)
    if report_misplaced_flags(ns.opts):
        return 2
    try:
        output, opts = check_inputs(ns)
        # fastreid's logger and config dump go to the denoiser's directory; device resolved; seeded
        cfg = setup(argparse.Namespace(config_file=ns.config_file, eval_only=True,
                                       opts=[*opts, "OUTPUT_DIR", output]))
        trainer = DenoiserTrainer(cfg, RobustTrainer.load_for_eval(cfg), output)
        trainer.resume_or_start(ns.resume)
    except (*USER_ERRORS, AttackConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = trainer.train()
    except KeyboardInterrupt:
        print(f"interrupted: rerun with --resume to continue from the last checkpoint in {output} "
              f"(one every DENOISER.CHECKPOINT_PERIOD iterations)", file=sys.stderr)
        return 130
    print(summary_line(summary, output))
    return 0


if __name__ == "__main__":
    sys.exit(main())

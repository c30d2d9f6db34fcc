#!/usr/bin/env python
"""AMD (Bai et al. 2020, offline adversarial training): craft one adversarial copy of every training
image with an already-trained model, once, and write clean + adversarial images as a balanced set.

    python tools/make_adversarial_set.py --config-file logs/.../origin/config.yaml \\
        --weights logs/.../origin/model_final.pth --output DIR
        [--attack IFGSM] [--eps 5] [--steps 8] [--step-size 0] [--batch-size 64] [--no-progress]
        [KEY VALUE ...]

The training split of DATASETS.NAMES (one dataset) is attacked in batches of whole identities (each
image's same-ID and other-ID guides are in its batch, as in online Metric AT) with --attack (a
registered L-inf attack; default IFGSM, Bai et al.'s metric I-FGSM), budget --eps/255, --steps
iterations, --step-size/255 (0 = the attack's default). Images are attacked as fastreid's test
transform gives them at INPUT.SIZE_TRAIN (no augmentation) and saved at that size as PNG, within
eps/255 of the resized clean image (see robustreid/data/adversarial_set.py). DIR gets
bounding_box_train/ (real images hard-linked + the copies) and manifest.json; train on it with
DATASETS.BALANCED.ENABLED True DATASETS.BALANCED.PATH DIR (configs/DDDefense/methods/amd.yml).

Resumable: rerun the same command after an interruption; a finished set is left untouched. The last
line reports the counts and the crafting throughput. Bad input exits 2 with one "error: ..." line.
"""
import argparse
import os
import sys

import robustreid  # noqa: F401  (compat patches + registrations)
from robustreid.attacks import AttackConfigError, ReidFeatureExtractor, build_attack, eps_unit
from robustreid.checksums import sha256_of
from robustreid.cli import OneLineParser, run_tool
from robustreid.config import ConfigError, load_config
from robustreid.data.adversarial_set import AdversarialSetWriter, clean_transform
from robustreid.engine.offline_crafting import make_crafter
from robustreid.data.balancing import BALANCED_NAME, BalancedSetError
from robustreid.data.validation import build_dataset
from robustreid.engine import (USER_ERRORS, RobustTrainer, check_weights, check_weights_fit,
                               resolve_device)

DISTANCE = "euclidean"  # the papers' attack distance (AMA's loss normalises features: either is one)


def build_parser():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the trained model's config")
    parser.add_argument("--weights", required=True, metavar="FILE", help="its checkpoint")
    parser.add_argument("--output", required=True, metavar="DIR", help="the adversarial set's directory")
    parser.add_argument("--attack", default="IFGSM", help="registered L-inf attack (default IFGSM)")
    parser.add_argument("--eps", type=float, default=5.0, help="L-inf budget in 1/255 units (default 5)")
    parser.add_argument("--steps", type=int, default=8, help="attack iterations (default 8)")
    parser.add_argument("--step-size", type=float, default=0.0,
                        help="step in 1/255 units (0 = the attack's default)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per attacked batch (whole identities, at least two)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def build_cfg(args):
    cfg = load_config(args.config_file, [*args.opts, "MODEL.WEIGHTS", args.weights])
    resolve_device(cfg)
    cfg.freeze()
    names = tuple(cfg.DATASETS.NAMES)
    if len(names) != 1 or names[0] == BALANCED_NAME:
        raise ConfigError(f"{args.config_file}: DATASETS.NAMES must be one source dataset, got {names}")
    check_weights(cfg)
    check_weights_fit(cfg)
    return cfg


def check_attack_args(args):
    if eps_unit(args.attack) != "/255":
        raise ConfigError(f"--attack {args.attack}: AMD copies need an L-inf attack (eps in 1/255)")
    if args.eps < 0 or args.steps < 1 or args.step_size < 0 or args.batch_size < 2:
        raise ConfigError(f"need --eps >= 0, --steps >= 1, --step-size >= 0, --batch-size >= 2; got "
                          f"{args.eps:g}, {args.steps}, {args.step_size:g}, {args.batch_size}")


def run(args, log=print):
    check_attack_args(args)
    cfg = build_cfg(args)
    name = cfg.DATASETS.NAMES[0]
    items = build_dataset(name).train
    model = RobustTrainer.load_for_eval(cfg)
    # built once to validate the settings and record the step size the attack resolves
    attack = build_attack(args.attack, ReidFeatureExtractor(model), eps=args.eps, steps=args.steps,
                          step_size=args.step_size or None, distance=DISTANCE)
    plan = {"attack": args.attack, "eps": float(args.eps), "steps": int(args.steps),
            "step_size": attack.step_size, "distance": DISTANCE, "batch_size": int(args.batch_size),
            "seed": max(int(cfg.ROBUSTREID.SEED), 0), "image_size": [int(v) for v in cfg.INPUT.SIZE_TRAIN]}
    checkpoint = {"path": os.path.abspath(args.weights), "sha256": sha256_of(args.weights)}
    source = {"datasets": [name], "num_images": len(items),
              "num_ids": len({pid for _, pid, _ in items}), "config_file": os.path.abspath(args.config_file)}
    writer = AdversarialSetWriter(args.output, items, plan, checkpoint, source)
    pending = writer.prepare()
    todo = sum(1 for b in pending for i in b if i not in writer.done)
    log(f"[amd] {name}: {len(items)} training images in {len(writer.batches)} batch(es) of whole "
        f"identities; {attack!r} on {cfg.MODEL.DEVICE}; {todo} to craft, {len(writer.done)} already in "
        f"{args.output}")
    craft = make_crafter(model, args.attack, args.eps, args.steps, args.step_size, DISTANCE,
                         cfg.MODEL.DEVICE)
    result = writer.run(craft, clean_transform(cfg), pending, progress=not args.no_progress)
    linf = max((e["linf"] for e in writer.done.values()), default=0)
    rate = result["crafted"] / result["seconds"] if result["crafted"] else 0.0
    per_image = 1.0 / rate if rate else 0.0
    log(f"[amd] wrote {args.output}: {len(writer.manifest['real'])} real + {len(writer.done)} adversarial "
        f"images (max L-inf {linf}/255, eps {args.eps:g}/255); crafted {result['crafted']} this run in "
        f"{result['seconds']:.1f} s ({per_image:.3f} s/image, {rate:.2f} images/s)")
    return 0


def main(argv=None):
    return run_tool(build_parser(), run,  # an OSError names its path
                    (*USER_ERRORS, AttackConfigError, BalancedSetError, OSError), argv)


if __name__ == "__main__":
    sys.exit(main())

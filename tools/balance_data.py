#!/usr/bin/env python
"""DDDefense phase 1: balance a ReID training set with an identity- and camera-conditional diffusion
model (EDM, Karras et al. 2022) as in the paper's eq. 1 (fill small identities to delta1 images) and
eq. 2 (add other cameras to identities dominated by one camera).

    python tools/balance_data.py --config-file configs/Market1501/balance_diffusion.yml
        [--train-steps N] [--output DIR] [--restart] [--max-new-images N] [--no-progress]
        [--opts] [KEY VALUE ...]

Trains the diffusion model on DATASETS.NAMES' training split (or continues its last checkpoint, or
loads BALANCE.TRAIN.CHECKPOINT), then writes to DIR (default DATASETS.BALANCED.PATH, else
OUTPUT_DIR/balanced):

    bounding_box_train/        real images (hard links) + synthetic ones, Market-1501 file names
    manifest.json              every image with its labels; per synthetic image: identity, camera,
                               rule (eq1/eq2), seed, sha256 of the model checkpoint
    diffusion/last.pt          resumable training state (model, EMA, optimizer, RNG)
    real_vs_generated.png      real (green) vs generated (orange) images per identity (paper Fig. 5)
    stats/balance_stats.json   images per identity and camera shares, before/after (paper Fig. 1)
    stats/balance_stats.png

Resumable: killed at any point, the same command continues training from diffusion/last.pt and
generation from manifest.json, never duplicating or losing an image. --max-new-images N stops
cleanly after N new images (rerun to continue). Train on the result with
DATASETS.BALANCED.ENABLED True DATASETS.BALANCED.PATH DIR. The last line reports the generation
throughput (images/s) and the balanced set's min images per identity and max camera share.
Bad input exits 2 with one "error: ..." line.
"""
import argparse
import os
import sys

import robustreid  # noqa: F401  (compat patches + registrations)
from robustreid.cli import OneLineParser, int_at_least
from robustreid.config import ConfigError, _config_errors, load_config
from robustreid.data.balancing import BalancedSetError, add_balancing_config, plan_balancing
from robustreid.data.balancing.generate import BalancedSetWriter, balanced_items, make_grid
from robustreid.data.balancing.stats import balance_statistics, write_statistics
from robustreid.data.validation import DatasetError, build_dataset


def build_parser():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--train-steps", type=int_at_least(0), default=None,
                        help="diffusion training steps in total (overrides BALANCE.TRAIN.STEPS)")
    parser.add_argument("--output", default="", metavar="DIR",
                        help="balanced set directory (default DATASETS.BALANCED.PATH or OUTPUT_DIR/balanced)")
    parser.add_argument("--restart", action="store_true",
                        help="discard the synthetic images and manifest already in DIR")
    parser.add_argument("--max-new-images", type=int_at_least(0), default=None, metavar="N",
                        help="stop cleanly after N new images (rerun to continue)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--opts" in argv:  # accept fastreid's "--opts KEY VALUE ..." spelling too
        argv.remove("--opts")
    return build_parser().parse_args(argv)


def build_cfg(args):
    """RobustReID's config + the balancing keys + the yml + KEY VALUE overrides; device resolved."""
    from robustreid.engine import resolve_device

    if not os.path.isfile(args.config_file):
        raise ConfigError(f"config file not found: {args.config_file}")
    cfg = load_config()
    add_balancing_config(cfg)  # a no-op once robustreid.config declares the keys itself
    with _config_errors(args.config_file):
        cfg.merge_from_file(args.config_file)
    opts = list(args.opts or [])
    if len(opts) % 2:
        raise ConfigError(f"command-line options must be KEY VALUE pairs, got an odd list: {opts}")
    with _config_errors("command-line option"):
        cfg.merge_from_list(opts)
    if args.train_steps is not None:
        cfg.BALANCE.TRAIN.STEPS = args.train_steps
    resolve_device(cfg)
    check_balance_config(cfg)
    cfg.freeze()
    return cfg


def check_balance_config(cfg):
    b = cfg.BALANCE
    if not 0 < b.DELTA2 <= 1:
        raise ConfigError(f"BALANCE.DELTA2 is a camera share in (0, 1], got {b.DELTA2}")
    if b.DELTA1 < 0 or b.DELTA1 != int(b.DELTA1):
        raise ConfigError(f"BALANCE.DELTA1 is a number of images (0 = the mean), got {b.DELTA1}")
    if b.SAMPLE.SAMPLER not in ("heun", "euler", "dpmsolver"):
        raise ConfigError(f"BALANCE.SAMPLE.SAMPLER must be heun, euler or dpmsolver, got {b.SAMPLE.SAMPLER!r}")
    if b.SAMPLE.STEPS < 1 or b.SAMPLE.BATCH_SIZE < 1 or b.TRAIN.BATCH_SIZE < 1:
        raise ConfigError("BALANCE.SAMPLE.STEPS, BALANCE.SAMPLE.BATCH_SIZE and BALANCE.TRAIN.BATCH_SIZE "
                          "must be >= 1")
    if b.MODEL.CONDITIONING not in ("sum", "joint"):
        raise ConfigError(f"BALANCE.MODEL.CONDITIONING must be 'sum' or 'joint', got {b.MODEL.CONDITIONING!r}")
    if len(b.IMAGE_SIZE) != 2:
        raise ConfigError(f"BALANCE.IMAGE_SIZE is [height, width], got {b.IMAGE_SIZE}")


def source_items(cfg):
    names = tuple(cfg.DATASETS.NAMES)
    if len(names) != 1 or names[0] == "Balanced":
        raise ConfigError(f"tools/balance_data.py balances one source dataset; DATASETS.NAMES is {names}")
    return names, build_dataset(names[0]).train


def load_model(cfg, items, output, progress, log=print):
    """The trained diffusion model and its checkpoint {path, sha256, step} (trains if needed)."""
    from robustreid.checksums import sha256_of
    from robustreid.data.balancing.diffusion import EDMDiffusion, labels_from_items, load_images

    b = cfg.BALANCE
    pids, cams = labels_from_items(items)
    device = cfg.MODEL.DEVICE
    train_info = {"steps": 0, "seconds": 0.0}
    if b.TRAIN.CHECKPOINT:
        path = b.TRAIN.CHECKPOINT
        if not os.path.isfile(path):
            raise ConfigError(f"BALANCE.TRAIN.CHECKPOINT not found: {path}")
        model = EDMDiffusion.from_checkpoint(path, b, device=device)
        if model.pids != pids or model.cams != cams:
            raise ConfigError(f"BALANCE.TRAIN.CHECKPOINT {path} was trained on other identities/cameras "
                              f"than {cfg.DATASETS.NAMES[0]}")
        log(f"[balance] loaded {path} (step {model.step}); not training")
    else:
        path = os.path.join(output, "diffusion", "last.pt")
        model = EDMDiffusion(b, pids, cams, device=device)
        if os.path.isfile(path):
            try:
                model.load_state_dict(EDMDiffusion.read_checkpoint(path))
            except ValueError as e:
                raise ConfigError(f"{path}: {e}; use another --output or delete it") from None
            log(f"[balance] resumed the diffusion model from {path} at step {model.step}")
        steps = int(b.TRAIN.STEPS)
        if model.step < steps:
            log(f"[balance] training the diffusion model: {len(items)} images, {len(pids)} ids, "
                f"{len(cams)} cameras, {b.IMAGE_SIZE[0]}x{b.IMAGE_SIZE[1]}, steps {model.step} -> {steps}, "
                f"device {device}")
            images = load_images([i[0] for i in items], b.IMAGE_SIZE, int(b.CHANNELS))
            labels = model.labels([i[1] for i in items], [i[2] for i in items])
            train_info = model.train(images, labels, steps, checkpoint_path=path, progress=progress, log=log)
        elif not os.path.isfile(path):  # 0 steps asked: still a checkpoint to hash and record
            model.save(path)
    checkpoint = {"path": os.path.abspath(path), "sha256": sha256_of(path), "step": model.step}
    return model, checkpoint, train_info


def run(args, log=print):
    cfg = build_cfg(args)
    b = cfg.BALANCE
    names, items = source_items(cfg)
    output = args.output or cfg.DATASETS.BALANCED.PATH or os.path.join(cfg.OUTPUT_DIR, "balanced")
    os.makedirs(output, exist_ok=True)
    plan = plan_balancing(items, b.DELTA1, b.DELTA2)
    log(f"[balance] {names[0]}: {len(items)} images, {len(plan.counts_before)} ids, mean "
        f"{plan.mean_images_per_id:.2f} images/id; plan: delta1 {plan.delta1}, delta2 {plan.delta2:g}, "
        f"{plan.num_synthetic} synthetic images (eq. 1: {plan.to_json()['num_synthetic_eq1']}, "
        f"eq. 2: {plan.to_json()['num_synthetic_eq2']}), {len(plan.unfixable)} identities not fixable")
    for pid, why in list(plan.unfixable.items())[:20]:
        log(f"[balance]   not fixable: {pid}: {why}")
    if len(plan.unfixable) > 20:
        log(f"[balance]   ... and {len(plan.unfixable) - 20} more (stats/balance_stats.json)")

    model, checkpoint, train_info = load_model(cfg, items, output, not args.no_progress, log)
    sampler = {"name": b.SAMPLE.SAMPLER, "steps": int(b.SAMPLE.STEPS),
               "guidance_scale": float(b.SAMPLE.GUIDANCE_SCALE), "ema": True}
    writer = BalancedSetWriter(output, items, plan, int(b.SEED), checkpoint, sampler,
                               {"datasets": list(names), "num_images": len(items),
                                "num_ids": len(plan.counts_before)}, b.IMAGE_SIZE)
    pending = writer.prepare(restart=args.restart)
    log(f"[balance] generating {len(pending)} of {len(writer.jobs)} synthetic images "
        f"({len(writer.jobs) - len(pending)} already in {output})")

    def sample_fn(jobs):
        return model.sample([j.pid for j in jobs], [j.camid for j in jobs], [j.seed for j in jobs],
                            steps=sampler["steps"], sampler=sampler["name"],
                            guidance=sampler["guidance_scale"]).numpy()

    result = writer.run(sample_fn, int(b.SAMPLE.BATCH_SIZE), max_new=args.max_new_images,
                        progress=not args.no_progress)
    # images/s over the wall clock of generation (sampling + writing), training excluded
    rate = result["generated"] / result["seconds"] if result["generated"] else 0.0
    if not result["complete"]:
        log(f"[balance] stopped after {result['generated']} new images (--max-new-images): "
            f"{result['done']}/{result['planned']} synthetic images in {output}; {rate:.2f} images/s; "
            "rerun to continue")
        return 0

    manifest = writer.manifest
    real, syn = balanced_items(output, manifest)
    stats = balance_statistics(items, real + syn, plan, syn)
    stats["generation"] = {"images": result["generated"], "seconds": result["seconds"], "images_per_s": rate,
                           "sampling_seconds": result["sample_seconds"], "sampler": sampler,
                           "device": str(cfg.MODEL.DEVICE)}
    stats["training"] = {"steps_this_run": train_info["steps"], "seconds_this_run": train_info["seconds"],
                         "checkpoint": checkpoint}
    stats_dir = os.path.join(output, "stats")
    os.makedirs(stats_dir, exist_ok=True)
    write_statistics(stats, os.path.join(stats_dir, "balance_stats.json"),
                     os.path.join(stats_dir, "balance_stats.png"))
    make_grid(output, manifest, os.path.join(output, "real_vs_generated.png"),
              int(b.SAMPLE.GRID_IDS), int(b.SAMPLE.GRID_IMAGES), b.IMAGE_SIZE)
    after = stats["after"]
    log(f"[balance] wrote {output}: manifest.json, real_vs_generated.png, stats/balance_stats.{{json,png}}")
    generation = "generation: nothing left to generate"
    if result["generated"]:
        generation = "generation {:.2f} images/s ({} images in {:.1f} s)".format(
            rate, result["generated"], result["seconds"])
    log("[balance] {} | balanced set: {} ids, {} images ({} synthetic), min images/id {} (delta1 {}), "
        "max camera share {:.3f} (delta2 {:g}), {} identities not fixable".format(
            generation, after["num_ids"], after["num_images"], len(syn), int(after["images_per_id"]["min"]),
            plan.delta1, after["max_camera_share"]["max"], plan.delta2, len(plan.unfixable)))
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (ConfigError, DatasetError, BalancedSetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

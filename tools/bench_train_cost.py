#!/usr/bin/env python
"""Seconds per training iteration of vanilla training, Metric AT and full DDDefense on the same model
and batch (DDDefense supplementary Table 7 reports 20.7 / 328.5 / 545.5 s per epoch on Market-1501:
Metric AT 15.9x vanilla, DDDefense 1.66x Metric AT).

Each variant is a RobustTrainer built from the same config (default: the demo's ResNet-18 on
SynthReID at 128x64, batch 64 = 16 ids x 4) plus the variant's switches; its real training step
(``run_step``: phases, objective, backward, optimizer step) runs on one fixed batch from the training
loader, so data loading is not timed. Rounds are interleaved across the variants and each variant's
time is the median over rounds after a warm-up step (robust to a shared machine).

* vanilla:   fastreid's step (CE + triplet);
* metric_at: FNA examples of the batch (5/255, ADV_TRAIN.STEPS iterations, default 8) replace it
             (eq. 5);
* dddefense: clean + FNES examples, feature discriminator and self-meta learning (second order
             unless --first-order).

The last line is always ``metric_at_vs_vanilla=<x> dddefense_vs_metric_at=<x>``.
"""
import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")

VARIANTS = {
    "vanilla": [],
    "metric_at": ["ADV_TRAIN.ENABLED", "True"],
    "dddefense": ["MODEL.META_ARCHITECTURE", "RobustBaseline", "ADV_TRAIN.ENABLED", "True",
                  "ADV_TRAIN.INCLUDE_CLEAN", "True", "ADV_TRAIN.FNES.ENABLED", "True", "ADV_TRAIN.DISCRIMINATOR.ENABLED", "True",
                  "META_LEARNING.ENABLED", "True"],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--steps", type=int, default=8, help="attack iterations (ADV_TRAIN.STEPS)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--first-order", action="store_true", help="META_LEARNING.FIRST_ORDER")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE overrides")
    return parser.parse_args(argv)


def build_steps(config_file, variants, opts=()):
    """{name: the training step (PhasedTrainer) of a RobustTrainer of ``config_file`` + ``opts`` +
    the variant's switches}, every step fed one fixed batch, the first variant's first training
    batch; returns (steps, batch, the last variant's config). Shared with tools/bench_eat.py."""
    import tempfile

    from robustreid.config import load_config
    from robustreid.engine import RobustTrainer, resolve_device

    steps, batch, cfg = {}, None, None
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant_opts in variants.items():
            cfg = resolve_device(load_config(config_file, [
                "MODEL.BACKBONE.PRETRAIN", "False", "OUTPUT_DIR", os.path.join(tmp, name),
                "DATALOADER.NUM_WORKERS", "0", *variant_opts, *opts]))
            torch.manual_seed(0)
            trainer = RobustTrainer(cfg)
            if batch is None:
                batch = next(iter(trainer.data_loader))
            step = trainer._trainer
            step._data_loader_iter = fixed_batches(batch)
            steps[name] = step
    return steps, batch, cfg


def fixed_batches(batch):
    """The same batch forever; fastreid normalises images in place, so each step gets a copy."""
    while True:
        yield {**batch, "images": batch["images"].clone()}


def median_step_times(steps, repeats):
    """{name: median seconds of one ``run_step``} over ``repeats`` rounds interleaved across the
    steps (robust to a shared machine), after one warm-up step each; prints each round."""
    from fastreid.utils.events import EventStorage

    device = next(next(iter(steps.values())).model.parameters()).device

    def run(step):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step.run_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {name: [] for name in steps}
    with EventStorage(0):
        for step in steps.values():  # warm-up
            run(step)
        for round_ in range(repeats):
            for name, step in steps.items():
                times[name].append(run(step))
            print(f"round {round_ + 1}/{repeats}: "
                  + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None):
    args = parse_args(argv)
    import robustreid  # noqa: F401  (compat patches before fastreid/advertorch are used)

    steps, batch, cfg = build_steps(args.config_file, VARIANTS, [
        "ADV_TRAIN.STEPS", str(args.steps), "META_LEARNING.FIRST_ORDER", str(args.first_order),
        *args.opts])
    median = median_step_times(steps, args.repeats)
    device = next(steps["vanilla"].model.parameters()).device
    height, width = cfg.INPUT.SIZE_TRAIN
    print(f"model: {cfg.MODEL.BACKBONE.NAME} depth {cfg.MODEL.BACKBONE.DEPTH} on {device} "
          f"({torch.get_num_threads()} threads), batch {len(batch['images'])}x3x{height}x{width}, "
          f"attack FNA {cfg.ADV_TRAIN.EPS:g}/255 x {args.steps} steps, meta "
          f"{'first' if args.first_order else 'second'} order")
    for name, value in median.items():
        print(f"{name:>10}: {value:7.3f} s/iter")
    print(f"metric_at_vs_vanilla={median['metric_at'] / median['vanilla']:.2f} "
          f"dddefense_vs_metric_at={median['dddefense'] / median['metric_at']:.2f}")


if __name__ == "__main__":
    sys.exit(main())

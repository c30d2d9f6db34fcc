#!/usr/bin/env python
"""Seconds per training step of EAT (N members, self-transferring attack) relative to single-model
adversarial training with the same attack (issue 14: at most 1.15 * N).

Both steps are RobustTrainers of the same config (default: the demo's ResNet-18 on SynthReID,
bagtricks_R18.yml) and batch, measured as tools/bench_train_cost.py does (its helpers): the real
``run_step`` (phases, objective, backward, optimizer step) on one fixed training batch, rounds
interleaved, the median over rounds after a warm-up step.

* eat:       EnsembleReID + EAT.ENABLED: one PGD per image on the summed gradient of the N members
             (eq. 10), each member's clean and adversarial losses on its data split (Algorithm 1);
* single_at: RobustBaseline + DML_DEFENSE.METHOD at: the same PGD (SMA, EPS/255, STEPS iterations,
             step 2.5 * EPS / STEPS, random start) on one model, trained on clean + adversarial rows.

An EAT step runs N members through the passes of the single model's attack and training (each
member trains on (N - 1) / N of the rows with the data split): about N times the work, hence the
target's N; the 0.15 * N is for the members' own overheads.
The last line is always ``eat_step_vs_single_at=<x>``, the line before it the target.
"""
import argparse
import os
import sys

import torch

from bench_train_cost import build_steps, median_step_times

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")
TARGET_PER_MEMBER = 1.15


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--members", type=int, default=3, help="EAT.MEMBERS (N)")
    parser.add_argument("--eps", type=float, default=16.0, help="training PGD budget, 1/255 units")
    parser.add_argument("--steps", type=int, default=10, help="training PGD iterations")
    parser.add_argument("--batch", type=int, default=0, help="SOLVER.IMS_PER_BATCH (0: config)")
    parser.add_argument("--size", type=int, nargs=2, default=None, help="H W (default: config)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE overrides")
    return parser.parse_args(argv)


def variants(args):
    eps, steps = str(float(args.eps)), str(args.steps)
    return {
        "eat": ["MODEL.META_ARCHITECTURE", "EnsembleReID", "EAT.ENABLED", "True",
                "EAT.MEMBERS", str(args.members), "EAT.SELF_TRANSFER", "True", "EAT.EPS", eps,
                "EAT.STEPS", steps],
        "single_at": ["MODEL.META_ARCHITECTURE", "RobustBaseline", "DML_DEFENSE.METHOD", "at",
                      "DML_DEFENSE.INCLUDE_CLEAN", "True", "DML_DEFENSE.EPS", eps,
                      "DML_DEFENSE.STEPS", steps],
    }


def main(argv=None):
    args = parse_args(argv)
    import robustreid  # noqa: F401  (compat patches before fastreid/advertorch are used)

    opts = []
    if args.batch:
        opts += ["SOLVER.IMS_PER_BATCH", str(args.batch)]
    if args.size:
        opts += ["INPUT.SIZE_TRAIN", str(list(args.size)), "INPUT.SIZE_TEST", str(list(args.size))]
    steps, batch, cfg = build_steps(args.config_file, variants(args), opts + list(args.opts))
    median = median_step_times(steps, args.repeats)
    device = next(steps["eat"].model.parameters()).device
    height, width = cfg.INPUT.SIZE_TRAIN
    print(f"model: {cfg.MODEL.BACKBONE.NAME} depth {cfg.MODEL.BACKBONE.DEPTH} on {device} "
          f"({torch.get_num_threads()} threads), batch {len(batch['images'])}x3x{height}x{width}, "
          f"attack SMA {args.eps:g}/255 x {args.steps} steps, N = {args.members} members")
    for name, value in median.items():
        print(f"{name:>10}: {value:7.3f} s/iter")
    target = TARGET_PER_MEMBER * args.members
    print(f"target: eat_step_vs_single_at <= {TARGET_PER_MEMBER} * N = {target:.2f}")
    print(f"eat_step_vs_single_at={median['eat'] / median['single_at']:.2f}")


if __name__ == "__main__":
    sys.exit(main())

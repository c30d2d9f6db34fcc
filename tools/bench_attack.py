#!/usr/bin/env python
"""Benchmark one 16-step FNA attack against clean forwards of the same batch.

On one model (the demo config configs/SynthReID/bagtricks_R18.yml, random weights unless --weights)
and one batch (default 32 queries of 8 identities at the config's test size, 128x64), times, as the
minimum over --repeats interleaved rounds after a warm-up (the least disturbed run on a shared
machine):

* forward:          a clean feature forward without gradients;
* forward+backward: a forward plus an input-gradient backward, as one attack step does;
* FNA:              ``perturb`` of the 16-step FNA at eps 8/255 with the query set as guides.

Inside each FNA run, timers on the module the attack really runs (the extractor's ``eval_model()``,
its BN-folded copy: forward hooks for its forward, autograd hooks on its output and input for its
backward) measure the time of the attack's own gradient steps, so the overhead is measured under the
same machine load as the attack: ``overhead_share = (FNA - time in the steps' model
forward/backward) / FNA`` (median over the rounds), the share spent elsewhere (guide statistics,
random start, projections, Python). The separately timed estimate
``FNA - steps * forward+backward`` is printed too.
The last line is always ``fna16_cost_vs_forward=<x> overhead_share=<x>``. If the timers did not see
exactly one timed forward per attack step, the tool prints one ``error:`` line and exits 1 instead:
a share computed from an instrument that measured nothing would read 1.0.
"""
import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--weights", default="", help="trained weights (default: random)")
    parser.add_argument("--batch", type=int, default=32, help="queries in the batch")
    parser.add_argument("--ids", type=int, default=8, help="identities among them")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--eps", type=float, default=8, help="budget in 1/255 units")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE overrides")
    return parser.parse_args(argv)


def build_model(args):
    from fastreid.modeling import build_model as build_fastreid_model

    from robustreid.config import load_config
    from robustreid.engine import RobustTrainer, resolve_device

    opts = ["MODEL.BACKBONE.PRETRAIN", "False", *args.opts]
    if args.weights:
        opts += ["MODEL.WEIGHTS", args.weights]
    cfg = resolve_device(load_config(args.config_file, opts))
    if args.weights:
        return RobustTrainer.load_for_eval(cfg), cfg
    if cfg.MODEL.HEADS.NUM_CLASSES <= 0:  # set from the training set by fastreid; unused here
        cfg.MODEL.HEADS.NUM_CLASSES = args.ids
    torch.manual_seed(0)
    return build_fastreid_model(cfg).eval(), cfg


class MeasurementError(RuntimeError):
    """The step timers did not measure the attack's steps."""


class StepTimer:
    """Timers on ``module``: ``seconds`` accumulates its gradient-enabled forwards and their
    backwards (from the gradient reaching its output to the gradient reaching its input images);
    ``forwards`` counts those forwards."""

    def __init__(self, module, device):
        self.device = device
        self.reset()
        self._start = 0.0
        module.register_forward_pre_hook(self._forward_started)
        module.register_forward_hook(self._forward_ended)

    def reset(self):
        self.seconds = 0.0
        self.forwards = 0

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _forward_started(self, module, args):
        images = args[0]["images"]
        if images.requires_grad:
            images.register_hook(self._backward_ended)
            self._start = self._now()

    def _forward_ended(self, module, args, features):
        if features.requires_grad:
            self.seconds += self._now() - self._start
            self.forwards += 1
            features.register_hook(self._backward_started)

    def _backward_started(self, grad):
        self._start = self._now()

    def _backward_ended(self, grad):
        self.seconds += self._now() - self._start


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(args):
    """Per-run times of the three runs, and per FNA run the time its steps spent in the model."""
    from robustreid.attacks import GuideSet, ReidFeatureExtractor, build_attack

    model, cfg = build_model(args)
    device = next(model.parameters()).device
    extractor = ReidFeatureExtractor(model)
    with extractor.frozen_eval():
        step_timer = StepTimer(extractor.eval_model(), device)  # the same module in every block
    height, width = cfg.INPUT.SIZE_TEST
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, height, width, generator=generator).to(device)
    pids = (torch.arange(args.batch) % args.ids).to(device)
    with torch.no_grad():
        guides = GuideSet(extractor(x), pids)
    sample_index = torch.arange(args.batch, device=device)
    attack = build_attack("FNA", extractor, eps=args.eps, steps=args.steps)

    def forward():
        with torch.no_grad():
            extractor(x)

    def forward_backward():
        with extractor.frozen_eval():
            point = x.clone().requires_grad_(True)
            extractor(point).pow(2).sum().backward()

    def fna():
        attack.perturb(x, pids, guides, sample_index)

    runs = {"forward": forward, "forward+backward": forward_backward, "FNA": fna}
    times = {name: [] for name in runs}
    step_seconds = []
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            step_timer.reset()
            times[name].append(timed(fn, device))
        expected = attack.steps * attack.eot_samples
        if step_timer.forwards != expected or step_timer.seconds <= 0:
            raise MeasurementError(
                f"the model timers saw {step_timer.forwards} gradient forwards "
                f"({step_timer.seconds * 1000:.1f} ms) in one FNA run of {expected} steps: they are "
                f"not on the module the attack runs; no share can be computed")
        step_seconds.append(step_timer.seconds)
    return {"cfg": cfg, "device": device, "attack": attack, "times": times,
            "step_seconds": step_seconds}


def main(argv=None):
    args = parse_args(argv)
    import robustreid  # noqa: F401  (compat patches before fastreid/advertorch are used)

    try:
        result = measure(args)
    except MeasurementError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg, device, attack, times = result["cfg"], result["device"], result["attack"], result["times"]
    step_shares = [s / t for s, t in zip(result["step_seconds"], times["FNA"])]
    best = {name: min(values) for name, values in times.items()}
    height, width = cfg.INPUT.SIZE_TEST
    print(f"model: {cfg.MODEL.BACKBONE.NAME} depth {cfg.MODEL.BACKBONE.DEPTH} on {device} "
          f"({torch.get_num_threads()} threads), batch {args.batch}x3x{height}x{width}, "
          f"{args.ids} ids; {attack}")
    for name, value in best.items():
        print(f"{name:>17}: {value * 1000:9.1f} ms  (runs: "
              f"{', '.join(f'{t * 1000:.1f}' for t in times[name])})")
    print(f"model forward/backward inside FNA's {attack.steps} steps: "
          f"{statistics.median(result['step_seconds']) * 1000:.1f} ms median (runs: "
          f"{', '.join(f'{s * 1000:.1f}' for s in result['step_seconds'])})")
    separate = 1 - attack.steps * best["forward+backward"] / best["FNA"]
    print(f"share of FNA outside its steps' forward/backward: measured inside each run "
          f"{', '.join(f'{1 - s:.4f}' for s in step_shares)}; from the separate timings "
          f"{separate:.4f}")
    print(f"fna16_cost_vs_forward={best['FNA'] / best['forward']:.2f} "
          f"overhead_share={1 - statistics.median(step_shares):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

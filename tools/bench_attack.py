#!/usr/bin/env python
"""Benchmark one 16-step FNA attack against clean forwards of the same batch.

On one model (the demo config configs/SynthReID/bagtricks_R18.yml, random weights unless --weights)
and one batch (default 32 queries of 8 identities at the config's test size, 128x64), times, as the
minimum over --repeats interleaved rounds after a warm-up (the least disturbed run on a shared
machine):

* forward:          a clean feature forward without gradients;
* forward+backward: a forward plus an input-gradient backward, as one attack step does;
* FNA:              ``perturb`` of the 16-step FNA at eps 8/255 with the query set as guides.

Inside each FNA run, timers around the model (its forward, and autograd hooks on its output and input
for its backward) measure the time of the attack's own gradient steps, so the overhead is measured
under the same machine load as the attack: ``overhead_share = (FNA - time in the steps' model
forward/backward) / FNA`` (median over the rounds), the share spent elsewhere (guide statistics,
random start, projections, Python). The separately timed estimate
``FNA - steps * forward+backward`` is printed too.
The last line is always ``fna16_cost_vs_forward=<x> overhead_share=<x>``.
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


class TimedModel(torch.nn.Module):
    """``model`` with timers: ``step_time`` accumulates its gradient-enabled forwards and their
    backwards (from the gradient reaching its output to the gradient reaching its input)."""

    def __init__(self, model, device):
        super().__init__()
        self.model = model
        self.device = device
        self.step_time = 0.0
        self._backward_start = 0.0

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _backward_started(self, grad):
        self._backward_start = self._now()

    def _backward_ended(self, grad):
        self.step_time += self._now() - self._backward_start

    def forward(self, batched_inputs):
        images = batched_inputs["images"]
        start = self._now()
        if images.requires_grad:
            images.register_hook(self._backward_ended)
        features = self.model(batched_inputs)
        if features.requires_grad:
            self.step_time += self._now() - start
            features.register_hook(self._backward_started)
        return features


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    import robustreid  # noqa: F401  (compat patches before fastreid/advertorch are used)
    from robustreid.attacks import GuideSet, ReidFeatureExtractor, build_attack

    model, cfg = build_model(args)
    device = next(model.parameters()).device
    timed_model = TimedModel(model, device)
    extractor = ReidFeatureExtractor(timed_model)
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
    step_shares = []
    for name, fn in runs.items():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            timed_model.step_time = 0.0
            times[name].append(timed(fn, device))
        step_shares.append(timed_model.step_time / times["FNA"][-1])
    best = {name: min(values) for name, values in times.items()}

    print(f"model: {cfg.MODEL.BACKBONE.NAME} depth {cfg.MODEL.BACKBONE.DEPTH} on {device} "
          f"({torch.get_num_threads()} threads), batch {args.batch}x3x{height}x{width}, "
          f"{args.ids} ids; {attack}")
    for name, value in best.items():
        print(f"{name:>17}: {value * 1000:9.1f} ms  (runs: "
              f"{', '.join(f'{t * 1000:.1f}' for t in times[name])})")
    separate = 1 - attack.steps * best["forward+backward"] / best["FNA"]
    print(f"share of FNA outside its steps' forward/backward: measured inside each run "
          f"{', '.join(f'{1 - s:.4f}' for s in step_shares)}; from the separate timings "
          f"{separate:.4f}")
    print(f"fna16_cost_vs_forward={best['FNA'] / best['forward']:.2f} "
          f"overhead_share={1 - statistics.median(step_shares):.4f}")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Cost of a BAU training step relative to a plain one (issue 6: at most 2.2x; BAU forwards two
views of every image).

Both models are built from the same config (default: the demo's ResNet-18 at 128x64, batch 64 =
16 ids x 4, sources SynthReID_D0 + SynthReID_D1) and differ only in DG.BAU.ENABLED. Each step is
the real update (forward, losses, backward, optimizer step) on one fixed batch of the DG loader:
the plain model sees its original view, the BAU model both views plus BAU's terms (alignment with
k-reciprocal weights, uniformity, domain uniformity against an initialised prototype memory, and
the memory update). Data loading is not in the step (with DATALOADER.NUM_WORKERS it overlaps the
step); its per-batch cost with and without the strong view is printed separately. Rounds alternate
between the two models; each time is the median over rounds after warm-up.

The last line is always ``bau_vs_plain=<x>``.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--datasets", nargs="+", default=["SynthReID_D0", "SynthReID_D1"])
    parser.add_argument("--batch", type=int, default=64, help="images per view (ids x 4)")
    parser.add_argument("--size", type=int, nargs=2, default=None, help="H W (default: config)")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE overrides")
    return parser.parse_args(argv)


def load_cfg(args, output_dir, bau):
    from fastreid.config import get_cfg

    from robustreid.config import add_robustreid_config
    from robustreid.engine import resolve_device
    from robustreid.modeling.dg_config import add_dg_config

    cfg = add_dg_config(add_robustreid_config(get_cfg()))  # idempotent once add_dg_config is wired
    cfg.merge_from_file(args.config_file)
    names = "(" + "".join(f"'{n}'," for n in args.datasets) + ")"
    opts = ["MODEL.BACKBONE.PRETRAIN", "False", "MODEL.META_ARCHITECTURE", "RobustBaseline",
            "DATASETS.NAMES", names, "SOLVER.IMS_PER_BATCH", str(args.batch),
            "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", output_dir, "DG.BAU.ENABLED", str(bau)]
    if args.size:
        opts += ["INPUT.SIZE_TRAIN", str(list(args.size)), "INPUT.SIZE_TEST", str(list(args.size))]
    cfg.merge_from_list(opts + list(args.opts))
    return resolve_device(cfg)


def build(cfg, num_classes, device):
    from fastreid.modeling.meta_arch import build_model
    from fastreid.solver import build_optimizer

    cfg = cfg.clone()
    cfg.MODEL.HEADS.NUM_CLASSES = num_classes
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer, _ = build_optimizer(cfg, model, contiguous=False)
    return model, optimizer


def step(model, optimizer, batch):
    data = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    losses = model(data)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()


def timed(fn, sync):
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    import robustreid  # noqa: F401
    from fastreid.utils.events import EventStorage

    from robustreid.data.dg import build_dg_train_loader

    out = tempfile.mkdtemp(prefix="bench_dg_")
    cfg_bau = load_cfg(args, out, True)
    cfg_plain = load_cfg(args, out, False)
    device = torch.device(cfg_bau.MODEL.DEVICE)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    loader = build_dg_train_loader(cfg_bau)
    data_iter = iter(loader)
    load_two = statistics.median(timed(lambda: next(data_iter), sync) for _ in range(3))
    loader.dataset.strong_transform, strong = None, loader.dataset.strong_transform
    load_one = statistics.median(timed(lambda: next(data_iter), sync) for _ in range(3))
    loader.dataset.strong_transform = strong
    batch = next(data_iter)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    plain_batch = {k: v for k, v in batch.items() if k != "images_strong"}

    num_classes = loader.dataset.num_classes
    bau_model, bau_opt = build(cfg_bau, num_classes, device)
    plain_model, plain_opt = build(cfg_plain, num_classes, device)
    pids, _, domains = loader.dataset.labels()
    dim = bau_model.bau_memory.dim
    bau_model.bau_memory.initialize(torch.nn.functional.normalize(
        torch.randn(len(pids), dim, device=device), dim=1), pids, domains)

    times = {"plain": [], "bau": []}
    with EventStorage():
        for r in range(args.warmup + args.steps):
            t_plain = timed(lambda: step(plain_model, plain_opt, plain_batch), sync)
            t_bau = timed(lambda: step(bau_model, bau_opt, batch), sync)
            if r >= args.warmup:
                times["plain"].append(t_plain)
                times["bau"].append(t_bau)
    plain, bau = statistics.median(times["plain"]), statistics.median(times["bau"])
    print(f"device={device} batch={args.batch}/view size={list(cfg_bau.INPUT.SIZE_TRAIN)} "
          f"depth={cfg_bau.MODEL.BACKBONE.DEPTH} threads={torch.get_num_threads()}")
    print(f"data per batch: one view {load_one * 1000:.0f} ms, two views {load_two * 1000:.0f} ms "
          f"(loader workers overlap it with the step)")
    print(f"plain_step_ms={plain * 1000:.1f} bau_step_ms={bau * 1000:.1f}")
    print(f"bau_vs_plain={bau / plain:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

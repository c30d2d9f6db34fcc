#!/usr/bin/env python
"""Export a RobustReID / fastreid model to ONNX and check it against torch with onnxruntime.

    python tools/export_onnx.py --config-file CFG --output model.onnx MODEL.WEIGHTS model.pth
        [--opset 18] [--tolerance 1e-4] [--check-images 8] [--check-dataset] [KEY VALUE ...]

The graph maps images (N, 3, H, W), float pixel values in [0, 255] at INPUT.SIZE_TEST (fastreid's
test transforms: resize, no division by 255), to the retrieval features the evaluator ranks
(N, D); the batch size is dynamic. Any registered architecture exports: Baseline, RobustBaseline,
EnsembleReID, APNet, dual-branch and BN-Inception backbones, MLP heads, MP-SNN noise modules with
MODEL.NOISE.TEST_TIME False (a model that draws noise at test time is refused: onnxruntime would
draw other noise). The export always runs on CPU, whatever MODEL.DEVICE says.

Checks, each failing the command (exit 1) with an "error:" line:
* onnx.checker on the written file;
* parity: max |torch - onnxruntime| over --check-images seeded random images must stay below
  --tolerance;
* --check-dataset: Rank-1 and mAP on DATASETS.TESTS with onnxruntime's features must equal
  torch's.

fastreid model-zoo configs: pre-1.0 pooling/classifier names (gempoolP, fastavgpool,
circleSoftmax, ...) are renamed to fastreid 1.4's; weights that do not fit the config tensor for
tensor are refused instead of exported partly random. Bad input exits 2 with one "error:" line.
"""
import argparse
import os
import sys

import numpy as np
import torch
from torch import nn

import robustreid  # noqa: F401  (compat patches + registrations)
from robustreid.cli import OneLineParser, int_at_least, run_tool
from robustreid.engine import USER_ERRORS, RobustTrainer, check_output_dir
from robustreid.inference import (FeatureExtractor, OnnxFeatureExtractor, export_onnx,
                                  load_deploy_config)

METRICS = ("Rank-1", "mAP")


def build_parser():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, metavar="FILE.onnx")
    parser.add_argument("--opset", type=int_at_least(18), default=18)
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted |torch - onnxruntime| feature difference")
    parser.add_argument("--check-images", type=int_at_least(1), default=8)
    parser.add_argument("--check-dataset", action="store_true",
                        help="also compare Rank-1/mAP on DATASETS.TESTS")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="MODEL.WEIGHTS path and KEY VALUE pairs")
    return parser


class ExtractorAsModel(nn.Module):
    """A feature extractor in the place of a model: batches in, features out (for the evaluator)."""

    def __init__(self, extractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, batched_inputs):
        return torch.from_numpy(self.extractor(batched_inputs["images"]))


def parity(torch_extractor, onnx_extractor, cfg, count, seed=0):
    """Max |difference| of the two extractors' features on ``count`` seeded random images."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, *cfg.INPUT.SIZE_TEST, generator=generator) * 255
    return float(np.abs(torch_extractor(images) - onnx_extractor(images)).max())


def dataset_scores(cfg, extractor):
    """{dataset: {Rank-1, mAP}} of an extractor's features on DATASETS.TESTS."""
    results = RobustTrainer.test(cfg, ExtractorAsModel(extractor), robust=False)
    if len(cfg.DATASETS.TESTS) == 1:  # fastreid un-nests a single dataset's results
        results = {cfg.DATASETS.TESTS[0]: results}
    return {name: {m: float(r[m]) for m in METRICS} for name, r in results.items()}


def run(args):
    cfg = load_deploy_config(args.config_file, [*args.opts, "MODEL.DEVICE", "cpu"])
    check_output_dir(os.path.dirname(os.path.abspath(args.output)), "--output")
    extractor = FeatureExtractor(cfg)
    export_onnx(extractor, args.output, args.opset)
    print(f"exported {cfg.MODEL.META_ARCHITECTURE} / {cfg.MODEL.BACKBONE.NAME} to {args.output} "
          f"(opset {args.opset}, input images (N, 3, {cfg.INPUT.SIZE_TEST[0]}, "
          f"{cfg.INPUT.SIZE_TEST[1]}) in [0, 255])")
    onnx_extractor = OnnxFeatureExtractor(args.output, cfg)
    diff = parity(extractor, onnx_extractor, cfg, args.check_images)
    print(f"parity: max |torch - onnxruntime| = {diff:.3g} on {args.check_images} images "
          f"(tolerance {args.tolerance:g})")
    if not diff < args.tolerance:
        print(f"error: onnxruntime's features differ from torch's by {diff:.3g} >= "
              f"{args.tolerance:g}", file=sys.stderr)
        return 1
    if args.check_dataset:
        ours, theirs = dataset_scores(cfg, extractor), dataset_scores(cfg, onnx_extractor)
        for name in ours:
            print(f"{name}: torch {ours[name]}, onnxruntime {theirs[name]}")
        if ours != theirs:
            print("error: Rank-1/mAP with onnxruntime's features differ from torch's",
                  file=sys.stderr)
            return 1
    return 0


def main(argv=None):
    return run_tool(build_parser(), run, USER_ERRORS, argv)


if __name__ == "__main__":
    sys.exit(main())

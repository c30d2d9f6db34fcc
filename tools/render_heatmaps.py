#!/usr/bin/env python
"""Render 18-channel Gaussian keypoint heatmaps (IPES-GAN's pose input) from keypoint files.

    python tools/render_heatmaps.py --keypoints DIR_OR_FILE --output OUT [--sigma 6]
        [--size H W] [--min-visibility 2] [--preview]
    python tools/render_heatmaps.py --synthreid $FASTREID_DATASETS/SynthReID_D0 --output OUT

Inputs: keypoint files (``.json`` / ``.npy``, the layout of robustreid/data/keypoints.py; a
directory is searched recursively), or a generated SynthReID dataset (the joints its meta.json
holds). For each input, OUT/<its relative path>.npy holds a float16 (18, H, W) array: channel k is
exp(-d^2 / (2 sigma^2)) around joint k (COCO-18 / OpenPose order), zeros where the joint's
visibility is below --min-visibility. H x W is --size, else the size of the image the joints refer
to (a JSON file's width / height, a SynthReID dataset's image size); joints are scaled to it.
--preview also writes OUT/<path>.png: the maximum over the channels, as a grey image. Bad input
exits 2 with one "error: ..." line; the last line counts the heatmaps written.
"""
import argparse
import json
import os
import os.path as osp
import sys

import numpy as np
from PIL import Image

import robustreid  # noqa: F401  (compat patches + registrations)
from robustreid.cli import OneLineParser
from robustreid.data.keypoints import (KEYPOINT_SUFFIXES, VISIBLE, check_keypoints,
                                       keypoint_heatmaps, read_keypoint_file, resize_keypoints)
from robustreid.data.validation import DatasetError


def build_parser():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--keypoints", metavar="PATH", help="a keypoint file or a directory of them")
    source.add_argument("--synthreid", metavar="DIR", help="a generated SynthReID dataset")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--sigma", type=float, default=6.0, help="Gaussian std in output pixels")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="heatmap size (default: the size the joints refer to)")
    parser.add_argument("--min-visibility", type=int, choices=(1, 2), default=VISIBLE,
                        help="draw joints with v >= this (2: visible only, 1: occluded too)")
    parser.add_argument("--preview", action="store_true", help="also write a PNG per heatmap")
    return parser


def keypoint_files(path):
    """(relative name, file) of every keypoint file at ``path``."""
    if osp.isfile(path):
        return [(osp.basename(path), path)]
    if not osp.isdir(path):
        raise DatasetError(f"--keypoints {path}: no such file or directory")
    found = []
    for folder, _, names in os.walk(path):
        for name in sorted(names):
            if name.endswith(KEYPOINT_SUFFIXES):
                found.append((osp.relpath(osp.join(folder, name), path), osp.join(folder, name)))
    if not found:
        raise DatasetError(f"--keypoints {path}: no .json / .npy keypoint files in it")
    return sorted(found)


def file_inputs(path, size):
    """(relative name, points, (height, width) the points refer to) per keypoint file."""
    for rel, file in keypoint_files(path):
        points, frame = read_keypoint_file(file)
        if frame is None and size is None:
            raise DatasetError(f"{file}: no width / height in the file: give --size H W")
        yield rel, points, frame or tuple(size)


def synthreid_inputs(dataset_dir):
    """(relative image path, points, image size) of every image of a generated SynthReID set."""
    try:
        with open(osp.join(dataset_dir, "manifest.json")) as f:
            spec = json.load(f)["spec"]
        with open(osp.join(dataset_dir, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(f"--synthreid {dataset_dir}: not a generated SynthReID dataset ({e})") \
            from None
    frame = (int(spec["height"]), int(spec["width"]))
    for rel, info in sorted(meta.items()):
        if "keypoints" not in info:
            raise DatasetError(f"{dataset_dir}/meta.json has no keypoints for {rel}: open the "
                               f"dataset once with this code (it adds them)")
        yield rel, check_keypoints(info["keypoints"], f"{dataset_dir}/meta.json {rel}"), frame


def write_heatmap(output, rel, points, frame, ns):
    size = tuple(ns.size) if ns.size else frame
    points = resize_keypoints(points, frame, size) if size != frame else points
    maps = keypoint_heatmaps(points, size[0], size[1], ns.sigma, ns.min_visibility)
    stem = osp.join(output, osp.splitext(rel)[0])
    os.makedirs(osp.dirname(stem), exist_ok=True)
    np.save(stem + ".npy", maps.astype(np.float16))
    if ns.preview:
        Image.fromarray((maps.max(axis=0) * 255 + 0.5).astype(np.uint8)).save(stem + ".png")


def main(argv=None):
    ns = build_parser().parse_args(argv)
    try:
        if ns.sigma <= 0 or (ns.size and min(ns.size) <= 0):
            raise DatasetError("--sigma and --size must be positive")
        inputs = (synthreid_inputs(ns.synthreid) if ns.synthreid else
                  file_inputs(ns.keypoints, ns.size))
        count = 0
        for rel, points, frame in inputs:
            write_heatmap(ns.output, rel, points, frame, ns)
            count += 1
    except (DatasetError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} heatmap(s) (18 channels, sigma {ns.sigma:g}) under {ns.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

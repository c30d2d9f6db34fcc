#!/usr/bin/env python
"""Extract a gallery's features once into a resumable on-disk feature store.

    python tools/extract_features.py --config-file CFG --images DIR|LIST.txt --store DIR
        [--chunk 4096] [--batch-size N] [--device cpu|cuda] MODEL.WEIGHTS model.pth [KEY VALUE ...]

--images is a directory (every .jpg/.jpeg/.png/.bmp below it, sorted) or a text file with one image
path per line. The store (robustreid.evaluation.feature_store) holds DIR/features.npy, a (N, D)
float32 .npy that np.load(..., mmap_mode="r") maps, DIR/manifest.json (chunks written, digests of
the weights, config and image list) and DIR/images.txt (row i = line i). An interrupted run
(Ctrl-C, a crash, a lost machine) resumes with the same command and computes the missing chunks
only; a store is never reused for other weights, config or images. Then search it with
tools/search.py --gallery DIR. Bad input exits 2 with one "error:" line.
"""
import argparse
import os
import sys

import robustreid  # noqa: F401  (compat patches + registrations)
from robustreid.cli import OneLineParser, int_at_least, run_tool
from robustreid.config import ConfigError
from robustreid.engine import USER_ERRORS
from robustreid.inference import FeatureExtractor, load_deploy_config

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def build_parser():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--images", required=True, help="image directory or list file")
    parser.add_argument("--store", required=True, metavar="DIR")
    parser.add_argument("--chunk", type=int_at_least(1), default=4096,
                        help="images per chunk (the unit of resumption)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=0,
                        help="images per forward (default TEST.IMS_PER_BATCH)")
    parser.add_argument("--device", default="", help="cpu or cuda (default MODEL.DEVICE)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="MODEL.WEIGHTS path and KEY VALUE pairs")
    return parser


def image_paths(source):
    """Sorted image files below a directory, or the lines of a list file."""
    if os.path.isdir(source):
        return sorted(os.path.join(root, name) for root, _, names in os.walk(source)
                      for name in names if name.lower().endswith(IMAGE_SUFFIXES))
    if not os.path.isfile(source):
        raise ConfigError(f"--images {source}: no such directory or list file")
    with open(source) as f:
        return [line.strip() for line in f if line.strip()]


def extract(args):
    paths = image_paths(args.images)
    if not paths:
        raise ConfigError(f"--images {args.images}: no images found")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"--images: {len(missing)} listed image(s) not found, e.g. {missing[0]}")
    cfg = load_deploy_config(args.config_file, args.opts)
    extractor = FeatureExtractor(cfg, device=args.device or None, batch_size=args.batch_size or None)
    store = extractor.extract_to_store(paths, args.store, chunk_images=args.chunk)
    with open(os.path.join(args.store, "images.txt"), "w") as f:
        f.write("\n".join(paths) + "\n")
    print(f"{store.rows} x {store.dim} features in {store.path} ({store.num_chunks} chunks)")


def main(argv=None):
    return run_tool(build_parser(), extract, USER_ERRORS, argv)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Top-k gallery neighbours of query features: features in, top-k out.

    python tools/search.py --gallery GALLERY --queries QUERIES.npy --output DIR [--topk K]
        [--config-file CFG] [KEY VALUE ...]

GALLERY is a (rows, dim) float32 .npy or a feature store directory (tools/extract_features.py),
read block by block, never loaded whole; QUERIES is a (n, dim) float32 .npy. The index and the
distance come from the config keys the evaluator uses (robustreid.evaluation.indexes):
TEST.METRIC (cosine / euclidean), TEST.FAISS.INDEX ("Flat" = exact; "IVF4096,PQ64",
"IVF1024,Flat", "HNSW32", any faiss index_factory string), TEST.FAISS.TRAIN_SIZE, NPROBE,
EF_SEARCH, SHORTLIST (exact re-ranking of that many candidates), USE_GPU (faiss.IndexShards over
every visible GPU; CPU, with a log line, when there is no faiss-gpu or GPU). --topk defaults to
TEST.FAISS.TOPK.

Writes DIR/topk_indices.npy (int64, -1 = no result), DIR/topk_distances.npy (float32: squared L2,
or 1 - cos) and DIR/search.json (settings, timings and, for an approximate index, recall@k
against exact search on a seeded sample of TEST.FAISS.APPROX_QUERIES queries, at the ks of
TEST.FAISS.RECALL_KS). Bad input exits 2 with one "error:" line.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

import robustreid  # noqa: F401  (compat patches before fastreid's config is used)
from robustreid.cli import OneLineParser, int_at_least, run_tool
from robustreid.config import ConfigError, load_config
from robustreid.engine import USER_ERRORS, check_output_dir
from robustreid.evaluation.approximation import approximation_report
from robustreid.evaluation.feature_store import open_features
from robustreid.evaluation.indexes import IndexOptions, build_index, check_index_config


def build_parser():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", required=True, help=".npy or feature store directory")
    parser.add_argument("--queries", required=True, help="(n, dim) float32 .npy")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--topk", type=int_at_least(1), default=0,
                        help="neighbours per query (default TEST.FAISS.TOPK)")
    parser.add_argument("--config-file", default="", metavar="FILE",
                        help="config whose TEST.METRIC / TEST.FAISS keys to use (default: defaults)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs, e.g. "
                                                               "TEST.FAISS.INDEX IVF1024,Flat")
    return parser


def load_queries(path, dim):
    """The query matrix (in RAM), checked against the gallery's dimension."""
    queries = open_features(path)
    if queries.shape[1] != dim:
        raise ConfigError(f"--queries {path}: {queries.shape[1]}-d features, the gallery's are "
                          f"{dim}-d")
    return np.concatenate([block for _, block in queries.blocks(65536)])


def search(args):
    cfg = load_config(args.config_file, args.opts)
    check_index_config(cfg)
    check_output_dir(args.output, "--output")
    options = IndexOptions.from_config(cfg)
    k = args.topk or cfg.TEST.FAISS.TOPK
    gallery = open_features(args.gallery)
    queries = load_queries(args.queries, gallery.shape[1])

    index = build_index(args.gallery, options)
    start = time.perf_counter()
    dist, idx = index.search(queries, k)
    search_s = time.perf_counter() - start
    report = {"index": options.spec, "metric": options.metric, "gallery": gallery.shape[0],
              "queries": len(queries), "k": k, "build_seconds": index.build_seconds,
              "search_seconds": search_s}
    print(f"{options.spec} ({options.metric}): {len(queries)} queries x {gallery.shape[0]} gallery, "
          f"top-{k}; build {index.build_seconds:.2f} s, search {search_s:.2f} s")
    if not index.exact:
        ks = cfg.TEST.FAISS.RECALL_KS
        approx = approximation_report(index, args.gallery, queries, ks,
                                      cfg.TEST.FAISS.APPROX_QUERIES,
                                      approx_index=idx if max(ks) <= k else None)
        report["approximation"] = approx
        print(f"approximate: recall vs exact on {approx['sample']} queries: " + ", ".join(
            f"{key} {value:.4f}" for key, value in approx.items() if key.startswith("recall")))
    os.makedirs(args.output, exist_ok=True)
    np.save(os.path.join(args.output, "topk_indices.npy"), idx)
    np.save(os.path.join(args.output, "topk_distances.npy"), dist)
    with open(os.path.join(args.output, "search.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.output}/topk_indices.npy, topk_distances.npy, search.json")


def main(argv=None):
    return run_tool(build_parser(), search, USER_ERRORS, argv)


if __name__ == "__main__":
    sys.exit(main())

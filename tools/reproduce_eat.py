#!/usr/bin/env python
"""Reproduce EAT's tables: train and evaluate the rows you select, print each table in the paper's
layout with the paper's numbers beside ours.

    python tools/reproduce_eat.py --tables table-1,table-3 [--datasets CUB200]
        [--backbones MobileNetV2] [--methods pal,eat] [--output logs/reproduce_eat]
        [--pretrain MobileNetV2=/path/mobilenet_v2.pth,BNInception=/path/bn_inception.pth]
        [--num-gpus N] [--dataset-map CUB200=MyCUB] [--dry-run]
        [KEY VALUE ...]      # config overrides for every run

The rows come from configs/EAT/paper_results.json (Tables 1-4 of Ke, "Towards Adversarially Robust
Deep Metric Learning"). Each row (dataset, backbone, method) is

* a training run of configs/EAT/<dataset>_<backbone>/<method>.yml (tools/train_net.py), its
  backbone's ImageNet weights from --pretrain;
* an evaluation of its final model by tools/robust_eval.py in the paper's clustering protocol:
  NMI, F1 and Recall@k clean and under white-box PGD-10 at 8/255 on every test sample
  (CLUSTERING_EVAL).

Each row runs on the datasets its config names (In-Shop: trains on InShop, tests on InShopQuery, the
paper's query-only test set); --dataset-map NAME=REGISTERED trains and tests NAME's rows on another
registered dataset instead. Next to the paper's columns, the PGD-10 line gets our ERS-style summary
(robust_eval's; the paper reports none).

Table 3's "EAT w/ Data Split" is Table 1's CUB200 PAL + EAT row: one run serves both. Runs are
skipped when done (model_final.pth; results.json of the same command), so an interrupted
reproduction continues where it stopped: training resumes from its last checkpoint. Table 2's
numbers are missing from the paper's text: its rows print "?" for the paper.
"""
import argparse
import json
import os
import shlex
import sys

from reproduce_common import (REPO, ReproduceError, csv_list, evaluate, evaluated,  # tools/
                              load_tables, parse_dataset_map, parse_pairs, select_tables, train,
                              train_command)
from run_state import final_weights, resume_flags

PAPER_RESULTS = os.path.join(REPO, "configs", "EAT", "paper_results.json")
CONFIGS = os.path.join(REPO, "configs", "EAT")
ROBUST_EVAL = os.path.join(REPO, "tools", "robust_eval.py")
# The paper's test attack ("Implementation Details": PGD, 8/255, 10 iterations, white-box, every
# test sample perturbed, no clean template) as tools/robust_eval.py's clustering protocol; the one
# place to change if its options change.
CLUSTERING_EVAL = ["--protocol", "clustering", "--attacks", "SMA", "--eps", "8", "--steps", "10"]
ATTACKED_MODE = "PGD-10"


def eval_option(name):
    """The value of ``name`` in CLUSTERING_EVAL."""
    return CLUSTERING_EVAL[CLUSTERING_EVAL.index(name) + 1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default="all",
                        help="comma-separated table ids of paper_results.json, or 'all'")
    parser.add_argument("--datasets", default="", help="only rows on these datasets")
    parser.add_argument("--backbones", default="", help="only rows of these backbones")
    parser.add_argument("--methods", default="", help="only rows of these methods")
    parser.add_argument("--pretrain", default="",
                        help="BACKBONE=PATH,...: the ImageNet state dict of each backbone")
    parser.add_argument("--dataset-map", default="",
                        help="NAME=REGISTERED_NAME,...: train/test on another registered dataset")
    parser.add_argument("--output", default=os.path.join("logs", "reproduce_eat"))
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per training run")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    return parser.parse_args(argv)


def row_config(row):
    return os.path.join(CONFIGS, f"{row['dataset']}_{row['backbone']}", f"{row['method']}.yml")


def sets_pretrain(opts):
    """Whether the KEY VALUE overrides give the ImageNet weights themselves (or need none)."""
    keys = dict(zip(opts[::2], opts[1::2]))
    return "MODEL.BACKBONE.PRETRAIN_PATH" in keys or \
        keys.get("MODEL.BACKBONE.PRETRAIN", "").lower() == "false"


class Run:
    """One row's training run and its evaluation."""

    def __init__(self, config, opts, out):
        self.config, self.opts, self.out = config, opts, out
        self.eval_out = os.path.join(out, "eval", f"clustering_{eval_option('--attacks')}_eps"
                                     f"{eval_option('--eps')}_steps{eval_option('--steps')}")

    def train_command(self, num_gpus):
        return train_command(self.config, self.opts, self.out, num_gpus)

    def eval_command(self):
        return [sys.executable, ROBUST_EVAL, "--config-file", self.config, *CLUSTERING_EVAL,
                "--output", self.eval_out, *self.opts, "MODEL.WEIGHTS", final_weights(self.out)]

    def state(self):
        """"evaluated", "trained", "resumes" (has a checkpoint) or "new"."""
        if evaluated(self.eval_out, self.eval_command()):
            return "evaluated"
        if os.path.isfile(final_weights(self.out)):
            return "trained"
        return "resumes" if resume_flags(self.out) else "new"


def build_plan(args, tables):
    """{(dataset, backbone, method): Run} for the selected rows, and the rows as (table, row) in
    table order; a backbone without ImageNet weights is a ReproduceError (a note with --dry-run)."""
    output = os.path.abspath(args.output)
    datasets = parse_dataset_map(args.dataset_map)
    weights = parse_pairs(args.pretrain, "--pretrain", "PATH")
    keep = {"dataset": csv_list(args.datasets), "backbone": csv_list(args.backbones),
            "method": csv_list(args.methods)}
    runs, rows, unweighted = {}, [], set()
    for table in tables:
        for row in table["rows"]:
            if any(wanted and row[field] not in wanted for field, wanted in keep.items()):
                continue
            rows.append((table, row))
            key = (row["dataset"], row["backbone"], row["method"])
            if key in runs:
                continue
            config = row_config(row)
            if not os.path.isfile(config):
                raise ReproduceError(f"no config {os.path.relpath(config, REPO)} for {table['id']} "
                                     f"row {' / '.join(key)}")
            data = datasets.get(row["dataset"])  # else the config's (InShop tests on InShopQuery)
            opts = ["DATASETS.NAMES", f'("{data}",)', "DATASETS.TESTS", f'("{data}",)'] if data else []
            if row["backbone"] in weights:
                opts += ["MODEL.BACKBONE.PRETRAIN_PATH", weights[row["backbone"]]]
            elif not sets_pretrain(args.opts):
                unweighted.add(row["backbone"])
            out = os.path.join(output, *key)
            runs[key] = Run(config, opts + list(args.opts) + ["OUTPUT_DIR", out], out)
    if not rows:
        raise ReproduceError("no table row matches --datasets/--backbones/--methods")
    if unweighted:
        message = (f"--pretrain: no ImageNet weights for {', '.join(sorted(unweighted))}: give "
                   f"--pretrain BACKBONE=/path/to/state_dict.pth (or MODEL.BACKBONE.PRETRAIN False)")
        if not args.dry_run:
            raise ReproduceError(message)
        print(f"note: {message}")
    return runs, rows


def read_results(run):
    """{"Clean": metrics, ATTACKED_MODE: metrics} of a run's evaluation ({} before it ran).

    Reads the results.json of tools/robust_eval.py --protocol clustering
    (robustreid/evaluation/robust_clustering.py): the test set's entry ``datasets[0]`` with
    ``clean`` and one ``cells`` entry per PGD setting (``attack``, ``eps``, ``steps``), metrics
    under the ClusteringEvaluator's names (NMI, F1, R@k) in percent, attacked cells also ``ERS``."""
    path = os.path.join(run.eval_out, "results.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        dataset = json.load(f)["datasets"][0]
    attack = (eval_option("--attacks"), float(eval_option("--eps")), int(eval_option("--steps")))
    attacked = [c for c in dataset["cells"]
                if (c["attack"], float(c["eps"]), int(c["steps"])) == attack]
    return {"Clean": dataset["clean"], **({ATTACKED_MODE: attacked[0]} if attacked else {})}


def cell(value):
    return "—" if value is None else f"{value:.2f}"


def print_tables(runs, rows):
    """Each table in the paper's layout (a Clean and a PGD-10 line per method), every cell
    "ours (paper)" in percent; "?" where the paper's number is not in its text; then our
    ERS-style summary on the PGD-10 line (the paper has none)."""
    by_table = {}
    for table, row in rows:
        by_table.setdefault(table["id"], (table, []))[1].append(row)
    for table, table_rows in by_table.values():
        columns = table["columns"]
        print(f"\n### {table['id']}: {table['title']}\nours (paper), %\n")
        print("| Dataset | Backbone | Method | Mode | " + " | ".join(columns) + " | ERS* |")
        print("|---|---|---|---|" + "---|" * (len(columns) + 1))
        for row in table_rows:
            ours = read_results(runs[(row["dataset"], row["backbone"], row["method"])])
            for mode in table["modes"]:
                paper = row["values"][mode]
                cells = [f"{cell(ours.get(mode, {}).get(c))} "
                         f"({'?' if paper[c] is None else cell(paper[c])})" for c in columns]
                ers = cell(ours.get(mode, {}).get("ERS")) if mode == ATTACKED_MODE else ""
                print(f"| {row['dataset']} | {row['backbone']} | {row['method']} | {mode} | "
                      + " | ".join(cells) + f" | {ers} |")
        print("\n*ERS-style summary (ours, robust_eval's): the mean over NMI, F1 and every R@k "
              "evaluated of 100 x attacked / clean; not in the paper.")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.num_gpus < 1:
            raise ReproduceError("--num-gpus must be >= 1")
        runs, rows = build_plan(args, select_tables(load_tables(PAPER_RESULTS), args.tables))
        print(f"{len(rows)} table rows: {len(runs)} training runs and evaluations under "
              f"{os.path.abspath(args.output)}")
        if args.dry_run:
            for key, run in runs.items():
                state = run.state()
                print(f"{' / '.join(key)}: {state}")
                if state in ("new", "resumes"):
                    print("  train: " + shlex.join(run.train_command(args.num_gpus)))
                if state != "evaluated":
                    print("  evaluate: " + shlex.join(run.eval_command()))
            return 0
        for i, (key, run) in enumerate(runs.items(), 1):
            print(f"[{i}/{len(runs)}] {' / '.join(key)}", flush=True)
            train(run.config, run.opts, run.out, args.num_gpus)
            evaluate(run.eval_command(), run.eval_out)
    except ReproduceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_tables(runs, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Reproduce DDDefense's tables: train and evaluate the rows you select, print each table in the
paper's layout with the paper's numbers beside ours.

    python tools/reproduce_dddefense.py --tables main-3,main-4 [--datasets Market1501]
        [--backbones R50] [--methods metric_at,dddefense] [--output logs/reproduce_dddefense]
        [--num-gpus N] [--dataset-map Market1501=MyMarket] [--eval-max-queries N] [--dry-run]
        [KEY VALUE ...]      # config overrides for every training run (e.g. a weights path)

The rows come from configs/DDDefense/paper_results.json (every table of the paper and its
supplementary, as published). Each row maps to:

* a training run: configs/DDDefense/methods/<method>.yml + the dataset + the backbone (R18, R50,
  R101, APNet, OSNet, ViT) + the batch size (supplementary Table 5); input-transformation rows
  (BitSqueezing, MedianSmoothing2D, BS+MS) reuse the undefended "origin" model; methods on the
  diffusion-balanced set ("+Diffusion model", "Ours") first run tools/balance_data.py with
  configs/<dataset>/balance_diffusion.yml (once per dataset); AMD rows (offline adversarial
  training) train the "origin" model, make the adversarial set from its final checkpoint with
  tools/make_adversarial_set.py (<output>/<dataset>/<backbone>/amd_set), then train amd.yml on it;
* an evaluation: tools/robust_eval.py with the table's attacks / budgets / iterations, the row's
  input defense, its test dataset (cross-dataset tables) or its surrogate (black-box: the attacks are
  crafted on the vanilla model of the "source" backbone, trained here too);
* supplementary Table 7 (training cost) reads seconds per epoch from the runs' fastreid logs.

Runs are shared between tables and skipped when already done (model_final.pth / results.json with
the same settings), so an interrupted reproduction continues where it stopped: training resumes from
its last checkpoint. DAS has no public specification in the papers: its rows are listed as "n/a".
Rows whose method needs something not available (e.g. the diffusion-balanced training set) are
reported with the reason and skipped, never silently dropped.
"""
import argparse
import json
import os
import re
import sys
from typing import NamedTuple, Optional

from reproduce_common import (REPO, ReproduceError, csv_list, evaluate as run_evaluation,  # tools/
                              load_tables, parse_dataset_map, run, select_tables, train as run_training)

PAPER_RESULTS = os.path.join(REPO, "configs", "DDDefense", "paper_results.json")
METHODS_DIR = os.path.join(REPO, "configs", "DDDefense", "methods")
BALANCE_DATA = os.path.join(REPO, "tools", "balance_data.py")
MAKE_ADVERSARIAL_SET = os.path.join(REPO, "tools", "make_adversarial_set.py")
ROBUST_EVAL = os.path.join(REPO, "tools", "robust_eval.py")

# Config overrides per backbone key of paper_results.json (R50 is Base-R50.yml's own).
BACKBONES = {
    "R18": ["MODEL.BACKBONE.DEPTH", "18x", "MODEL.BACKBONE.FEAT_DIM", "512"],
    "R50": [],
    "R101": ["MODEL.BACKBONE.DEPTH", "101x"],
    # weight decay 0.001 for APNet (DDDefense supplementary)
    "APNet": ["MODEL.BACKBONE.NAME", "build_apnet_backbone", "SOLVER.WEIGHT_DECAY", "0.001",
              "SOLVER.WEIGHT_DECAY_NORM", "0.001"],
    "OSNet": ["MODEL.BACKBONE.NAME", "build_osnet_backbone", "MODEL.BACKBONE.DEPTH", "x1_0",
              "MODEL.BACKBONE.FEAT_DIM", "512"],
    "ViT": ["MODEL.BACKBONE.NAME", "build_vit_backbone", "MODEL.BACKBONE.DEPTH", "base",
            "MODEL.BACKBONE.FEAT_DIM", "768", "MODEL.BACKBONE.STRIDE_SIZE", "(16, 16)"],
}
# Rows evaluated on the undefended model behind an input transformation (robustreid.attacks).
INPUT_DEFENSES = {"bit_squeezing": "BitSqueezing", "median_smoothing": "MedianSmoothing2D",
                  "bs_ms": "BitSqueezing+MedianSmoothing2D"}
UNSPECIFIED = {"das": "DAS has no public specification in the papers"}
# Methods trained on adversarial copies of the training set made once by the "origin" model (AMD).
ADVERSARIAL_SET_METHODS = ("amd",)
COLUMN = re.compile(r"^(?P<attack>\w+) (?P<eps>[\d.]+)/255-(?P<steps>\d+)$")


class Evaluation(NamedTuple):
    training: tuple            # key of the evaluated model's training run
    args: list                 # robust_eval options (attacks, budgets, defense, ...)
    out: str                   # its output directory
    surrogate: Optional[tuple] = None     # training key of the black-box source model
    test_dataset: Optional[str] = None    # cross-dataset rows: the registered test dataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default="main-2,main-3,main-4,main-5",
                        help="comma-separated table ids of paper_results.json, or 'all'")
    parser.add_argument("--datasets", default="", help="only rows on these training datasets")
    parser.add_argument("--backbones", default="", help="only rows of these backbones")
    parser.add_argument("--methods", default="", help="only rows of these methods")
    parser.add_argument("--dataset-map", default="",
                        help="NAME=REGISTERED_NAME,...: train/test on another registered dataset")
    parser.add_argument("--output", default=os.path.join("logs", "reproduce_dddefense"))
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per training run")
    parser.add_argument("--eval-max-queries", type=int, default=0,
                        help="attack a seeded subset of the queries (0 = all, as the paper)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for training")
    return parser.parse_args(argv)


def enables_balancing(config):
    """Whether a yml (or its _BASE_ chain) sets DATASETS.BALANCED.ENABLED (read without loading it:
    loading checks the balanced set, which may not exist yet)."""
    import yaml

    with open(config) as f:
        data = yaml.safe_load(f) or {}
    enabled = data.get("DATASETS", {}).get("BALANCED", {}).get("ENABLED")
    if enabled is not None or "_BASE_" not in data:
        return bool(enabled)
    return enables_balancing(os.path.join(os.path.dirname(config), data["_BASE_"]))


def attack_columns(columns):
    """(attacks, eps values, steps values) of a table's attack columns, in first-seen order."""
    parsed = [COLUMN.match(c) for c in columns if c != "Clean"]
    parsed = [m for m in parsed if m]
    unique = lambda key: list(dict.fromkeys(m[key] for m in parsed))  # noqa: E731
    return unique("attack"), unique("eps"), unique("steps")


class Plan:
    """The training runs and evaluations the selected rows need (each once), and the row -> result
    mapping the printed tables read."""

    def __init__(self, args):
        self.args = args
        self.output = os.path.abspath(args.output)
        self.dataset_map = parse_dataset_map(args.dataset_map)
        self.trainings = {}   # key -> (config file, opts, output dir)
        self.balancings = {}  # dataset -> (balance config, opts, output dir)
        self.adversarial_sets = {}  # training key -> (training key of the model crafting it, dir)
        self.evaluations = {}  # output dir -> Evaluation
        self.rows = []        # (table, row, evaluation key or None, note)

    def dataset(self, name):
        return self.dataset_map.get(name, name)

    def training(self, method, dataset, backbone, batch_size=None):
        if backbone not in BACKBONES:
            raise ReproduceError(f"no backbone settings for {backbone!r}; known: {list(BACKBONES)}")
        config = os.path.join(METHODS_DIR, f"{method}.yml")
        if not os.path.isfile(config):
            return None, f"no config {os.path.relpath(config, REPO)}"
        name = f"{method}" + (f"_bs{batch_size}" if batch_size else "")
        out = os.path.join(self.output, dataset, backbone, name)
        data = self.dataset(dataset)
        opts = ["DATASETS.NAMES", f'("{data}",)', "DATASETS.TESTS", f'("{data}",)',
                *BACKBONES[backbone]]
        if batch_size:
            opts += ["SOLVER.IMS_PER_BATCH", str(batch_size)]
        adversarial_set = None
        if method in ADVERSARIAL_SET_METHODS:  # before the check below: the set is not diffusion's
            source, missing = self.training("origin", dataset, backbone)
            if source is None:
                return None, missing
            adversarial_set = (source, os.path.join(self.output, dataset, backbone, "amd_set"))
            opts += ["DATASETS.BALANCED.PATH", adversarial_set[1]]
        elif enables_balancing(config):
            balance_config = os.path.join(REPO, "configs", dataset, "balance_diffusion.yml")
            if not os.path.isfile(balance_config):
                return None, f"no {os.path.relpath(balance_config, REPO)} for the balanced set"
            balanced = os.path.join(self.output, dataset, "balanced")
            self.balancings[dataset] = (balance_config, ["DATASETS.NAMES", f'("{data}",)'],
                                        balanced)
            opts += ["DATASETS.BALANCED.PATH", balanced]
        opts += [*self.args.opts, "OUTPUT_DIR", out]
        key = (method, dataset, backbone, batch_size)
        self.trainings[key] = (config, opts, out)
        if adversarial_set:
            self.adversarial_sets[key] = adversarial_set
        return key, ""

    def add_row(self, table, row):
        method = row["method"]
        if method in UNSPECIFIED:
            self.rows.append((table, row, None, UNSPECIFIED[method]))
            return
        train_method = "origin" if method in INPUT_DEFENSES or method == "none" else method
        key, missing = self.training(train_method, row["dataset"], row["backbone"],
                                     row.get("batch_size"))
        if key is None:
            self.rows.append((table, row, None, missing))
            return
        if table["columns"] == ["cost (s/epoch)"]:
            self.rows.append((table, row, ("cost", key), ""))
            return
        attacks, eps, steps = attack_columns(table["columns"])
        eval_args = ["--attacks", ",".join(attacks), "--eps", ",".join(eps),
                     "--steps", ",".join(steps)]
        if self.args.eval_max_queries:
            eval_args += ["--max-queries", str(self.args.eval_max_queries)]
        if method in INPUT_DEFENSES:
            eval_args += ["--defense", INPUT_DEFENSES[method]]
        parts = ["+".join(attacks), "eps" + "+".join(eps), "steps" + "+".join(steps)]
        test = row.get("test_dataset")
        if test:
            parts.append(f"on_{test}")
        surrogate = None
        if row.get("source"):
            surrogate, missing = self.training("origin", row["dataset"], row["source"])
            if surrogate is None:
                self.rows.append((table, row, None, missing))
                return
            parts.append(f"from_{row['source']}")
        if method in INPUT_DEFENSES:
            parts.append(INPUT_DEFENSES[method])
        out = os.path.join(self.trainings[key][2], "eval", "_".join(parts))
        self.evaluations[out] = Evaluation(key, eval_args, out, surrogate,
                                           self.dataset(test) if test else None)
        self.rows.append((table, row, ("eval", out), ""))


def build_plan(args, tables):
    plan = Plan(args)
    keep = {"dataset": csv_list(args.datasets), "backbone": csv_list(args.backbones),
            "method": csv_list(args.methods)}
    for table in tables:
        for row in table["rows"]:
            if all(not wanted or row.get(field) in wanted for field, wanted in keep.items()):
                plan.add_row(table, row)
    if not plan.rows:
        raise ReproduceError("no table row matches --datasets/--backbones/--methods")
    return plan


def make_adversarial_set(plan, key):
    """The adversarial training set of ``key`` from its source model's final checkpoint (resumable;
    skipped once complete)."""
    source, out = plan.adversarial_sets[key]
    manifest = os.path.join(out, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            if json.load(f).get("complete"):
                return
    source_out = plan.trainings[source][2]
    run([sys.executable, MAKE_ADVERSARIAL_SET, "--config-file", os.path.join(source_out, "config.yaml"),
         "--weights", os.path.join(source_out, "model_final.pth"), "--output", out, "--no-progress"],
        os.path.join(out, "reproduce.log"))


def train(plan, key):
    config, opts, out = plan.trainings[key]
    run_training(config, opts, out, plan.args.num_gpus)


def evaluate(plan, evaluation):
    config, opts, train_out = plan.trainings[evaluation.training]
    args = list(evaluation.args)
    if evaluation.surrogate:  # the source model's config as train_net dumped it, and its weights
        s_out = plan.trainings[evaluation.surrogate][2]
        args += ["--surrogate-config", os.path.join(s_out, "config.yaml"),
                 "--surrogate-weights", os.path.join(s_out, "model_final.pth")]
    opts = list(opts)
    if evaluation.test_dataset:
        opts += ["DATASETS.TESTS", f'("{evaluation.test_dataset}",)']
    command = [sys.executable, ROBUST_EVAL, "--config-file", config, *args, "--output",
               evaluation.out, *opts, "MODEL.WEIGHTS", os.path.join(train_out, "model_final.pth")]
    run_evaluation(command, evaluation.out)


def our_cell(plan, result_ref, column):
    if result_ref is None:
        return None
    kind, ref = result_ref
    if kind == "cost":
        out = plan.trainings[ref][2]
        return epoch_cost(out)
    path = os.path.join(ref, "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        dataset = json.load(f)["datasets"][0]
    if column == "Clean":
        cell = dataset["clean"]
    else:
        cells = {c["label"]: c for c in dataset["cells"]}
        if column not in cells:
            return None
        cell = cells[column]
    return [cell["mAP"], cell["Rank-1"]]


def epoch_cost(train_out):
    """Training seconds per epoch from the run's log: fastreid's overall seconds per iteration
    times iterations per epoch (from the last "epoch/iter: E/I" line; both 0-based)."""
    log = os.path.join(train_out, "log.txt")
    if not os.path.isfile(log):
        return None
    with open(log) as f:
        text = f.read()
    speed = re.findall(r"Overall training speed: \d+ iterations in \S+ \(([\d.]+) s / it\)", text)
    progress = re.findall(r"epoch/iter: (\d+)/(\d+)", text)
    if not speed or not progress:
        return None
    epoch, iteration = map(int, progress[-1])
    return float(speed[-1]) * (iteration + 1) / (epoch + 1)


def format_cell(value):
    if value is None:
        return "—"
    if isinstance(value, (int, float)):
        return f"{value:.1f}"
    return f"{value[0]:.2f}/{value[1]:.2f}"


def row_label(row):
    """(dataset, backbone, method) cells of a row; the method cell names its source model or batch
    size where the table has them (black-box, batch-size tables)."""
    dataset = row["dataset"] + (f"->{row['test_dataset']}" if row.get("test_dataset") else "")
    method = row["method"]
    if row.get("source"):
        method += f" from {row['source']}"
    if row.get("batch_size"):
        method += f" bs {row['batch_size']}"
    return dataset, row["backbone"], method


def print_tables(plan):
    """Each table in the paper's layout; every cell "ours (paper)" as mAP/Rank-1."""
    by_table = {}
    for table, row, ref, note in plan.rows:
        by_table.setdefault(table["id"], (table, []))[1].append((row, ref, note))
    for table, rows in by_table.values():
        print(f"\n### {table['id']}: {table['title']}\nours (paper), mAP/Rank-1 %\n")
        print("| Dataset | Backbone | Method | " + " | ".join(table["columns"]) + " |")
        print("|---|---|---|" + "---|" * len(table["columns"]))
        for row, ref, note in rows:
            cells = []
            for column in table["columns"]:
                paper = format_cell(row["values"].get(column))
                cells.append(f"{format_cell(our_cell(plan, ref, column))} ({paper})"
                             if ref else f"n/a ({paper})")
            line = f"| {' | '.join(row_label(row))} | " + " | ".join(cells) + " |"
            print(line + (f"  <- {note}" if note else ""))


def main(argv=None):
    args = parse_args(argv)
    try:
        plan = build_plan(args, select_tables(load_tables(PAPER_RESULTS), args.tables))
        print(f"{len(plan.rows)} table rows: {len(plan.balancings)} balanced sets, "
              f"{len(plan.adversarial_sets)} adversarial sets, {len(plan.trainings)} training runs, "
              f"{len(plan.evaluations)} evaluations under {plan.output}")
        for table, row, ref, note in plan.rows:
            if note:
                print(f"skipped {table['id']} {' | '.join(row_label(row))}: {note}")
        if args.dry_run:
            for config, _, out in plan.balancings.values():
                print(f"balance {os.path.relpath(config, REPO)} -> {out}")
            for key, (config, opts, out) in plan.trainings.items():
                if key in plan.adversarial_sets:  # its source model is trained earlier in this order
                    source, adversarial = plan.adversarial_sets[key]
                    weights = os.path.join(plan.trainings[source][2], "model_final.pth")
                    print(f"adversarial set {weights} -> {adversarial}")
                print(f"train {os.path.relpath(config, REPO)} -> {out}")
            for e in plan.evaluations.values():
                source = f" from {plan.trainings[e.surrogate][2]}" if e.surrogate else ""
                test = f" on {e.test_dataset}" if e.test_dataset else ""
                print(f"evaluate {plan.trainings[e.training][2]}{test}{source} "
                      f"{' '.join(e.args)} -> {e.out}")
            return 0
        for dataset, (config, opts, out) in plan.balancings.items():
            print(f"[balance] {dataset}", flush=True)  # resumable: continues where it stopped
            run([sys.executable, BALANCE_DATA, "--config-file", config, "--output", out, *opts],
                os.path.join(out, "reproduce.log"))
        for i, key in enumerate(plan.trainings, 1):
            if key in plan.adversarial_sets:
                print(f"[adversarial set] {plan.adversarial_sets[key][1]}", flush=True)
                make_adversarial_set(plan, key)
            print(f"[train {i}/{len(plan.trainings)}] {key}", flush=True)
            train(plan, key)
        for i, evaluation in enumerate(plan.evaluations.values(), 1):
            print(f"[evaluate {i}/{len(plan.evaluations)}] {evaluation.out}", flush=True)
            evaluate(plan, evaluation)
    except ReproduceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_tables(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())

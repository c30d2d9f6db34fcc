#!/usr/bin/env python
"""A robustness leaderboard: every (config, weights) model evaluated under one protocol file, one
table with clean, white-box, transfer, query-based, UAP and corruption columns.

    python tools/robust_board.py --protocol configs/SynthReID/boards/demo.yml \\
        [--model NAME=CONFIG:WEIGHTS ...] [--output logs/robust_board] [--columns A,B] [--models X,Y]

The protocol file (YAML; paths relative to it)::

    overrides: {KEY: VALUE}                 # optional, for every model (e.g. DATASETS.TESTS)
    columns:                                # column name -> tools/robust_eval.py options
      white_box: {protocol: retrieval, attacks: FNA, eps: 8, steps: 16}
      transfer: {protocol: retrieval, attacks: FNA, eps: 8, steps: 16, surrogate: undefended}
      query: {protocol: query, attacks: NES,HSJA, eps: 8, query-budget: 1000}
      uap: {protocol: uap, eps: 8, steps: 100, surrogate: undefended}
      corruptions: {protocol: corruptions, corruptions: all, severity: 1-5}
    models:                                 # optional; --model NAME=CONFIG:WEIGHTS adds more
      undefended: {config: bagtricks_R18.yml, weights: ../../logs/.../model_final.pth}

Each option is robust_eval's ``--KEY VALUE`` (a true flag: ``KEY: true``); ``surrogate: NAME``
crafts on the board's model NAME (its config and weights: --surrogate-config/--surrogate-weights),
and is left out for NAME itself ("—" in the table). Each model x column is one robust_eval run in
OUTPUT/MODEL/COLUMN (its console output in console.log there); one whose results.json is that of
the same options on the same weights is skipped (tools/evidence.py's check), so a rerun finishes
only what is missing and an interrupted board resumes. --columns / --models run only those cells
now (the others are skipped if finished, else left for later): several processes or machines can
share one board's output, each taking some columns or models; every one of them writes the board of
the cells finished so far.

Writes OUTPUT/board.md, board.csv and board.json: one row per model (x test dataset), the clean
mAP/Rank-1 and per column the worst cell (lowest mAP) of its run, "mAP/Rank-1"; a corruption
column shows CIL-ReID's corruption evaluation (a corruption and a severity per image) and adds the
mean over its corruption x severity grid and ImageNet-C's mCE against the first model. Bad input
exits 2 with one "error: ..." line.
"""
import argparse
import csv
import json
import os
import sys
import time

import yaml

import robustreid  # noqa: F401  (compat patches + registrations)
import evidence  # tools/evidence.py: robust_eval runs in-process, resumability
import robust_eval  # tools/robust_eval.py: the options a column may set
from robustreid.attacks import AttackConfigError
from robustreid.cli import OneLineParser
from robustreid.config import ConfigError
from robustreid.engine import USER_ERRORS
from robustreid.evaluation.corruption_report import normalized_mce
from robustreid.evaluation.report_files import write_report_files


class BoardError(ValueError):
    """A bad protocol file, model or column, reported as one line."""


def build_parser():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", required=True, metavar="FILE", help="the board's YAML file")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=CONFIG:WEIGHTS",
                        help="a model to evaluate (repeatable; after the file's models)")
    parser.add_argument("--output", default=os.path.join("logs", "robust_board"))
    parser.add_argument("--columns", default="", metavar="A,B",
                        help="run only these columns' cells now (default: all)")
    parser.add_argument("--models", default="", metavar="X,Y",
                        help="run only these models' cells now (default: all)")
    return parser


def selection(text, known, option):
    """The names of a --columns / --models value (all of ``known`` when empty)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BoardError(f"{option}: unknown {unknown}; the board's: {', '.join(known)}")
    return set(names or known)


def _relative(base, path):
    return os.path.normpath(os.path.join(base, str(path)))


def load_protocol(path):
    """(columns {name: options}, overrides [KEY, VALUE, ...], models {name: (config, weights)})."""
    if not os.path.isfile(path):
        raise BoardError(f"--protocol: file not found: {path}")
    with open(path) as f:
        try:
            spec = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise BoardError(f"{path}: not YAML: {str(e).splitlines()[0]}") from None
    unknown = set(spec) - {"columns", "overrides", "models"} if isinstance(spec, dict) else None
    if unknown is None or unknown or not isinstance(spec.get("columns"), dict) or not spec["columns"]:
        raise BoardError(f"{path}: expected 'columns: {{NAME: {{protocol: ..., ...}}}}' and "
                         "optionally 'overrides' and 'models'"
                         + (f"; unknown: {sorted(unknown)}" if unknown else ""))
    base = os.path.dirname(os.path.abspath(path))
    for name, options in spec["columns"].items():
        if not evidence.NAME.match(str(name)) or not isinstance(options, dict):
            raise BoardError(f"{path}: column {name!r} needs a name of letters, digits, '_', '.', "
                             "'-' and a mapping of robust_eval options")
    models = {}
    for name, entry in (spec.get("models") or {}).items():
        if not isinstance(entry, dict) or set(entry) != {"config", "weights"}:
            raise BoardError(f"{path}: model {name}: needs exactly 'config' and 'weights'")
        models[str(name)] = (_relative(base, entry["config"]), _relative(base, entry["weights"]))
    return ({str(k): dict(v) for k, v in spec["columns"].items()},
            evidence.pairs(spec.get("overrides") or [], f"{path}: overrides"), models)


def parse_model(text):
    """``NAME=CONFIG:WEIGHTS`` -> (name, (config, weights)), paths relative to the cwd."""
    name, equals, paths = text.partition("=")
    config, colon, weights = paths.rpartition(":")
    if not (equals and name and colon and config and weights):
        raise BoardError(f"--model {text}: expected NAME=CONFIG:WEIGHTS")
    return name, (os.path.abspath(config), os.path.abspath(weights))


def column_argv(options, models, model):
    """robust_eval's options of one column for ``model`` (None: the column is its own surrogate)."""
    known = robust_eval.build_parser()._option_string_actions  # argparse has no public listing
    argv = []
    for key, value in options.items():
        if key != "surrogate" and (f"--{key}" not in known or key in ("output", "config-file")):
            raise BoardError(f"option {key!r} is not a robust_eval option a column may set (the "
                             "config, weights and output are the board's)")
        if key == "surrogate":
            if str(value) not in models:
                raise BoardError(f"surrogate {value!r} is not a model of the board; models: "
                                 f"{', '.join(models)}")
            if str(value) == model:
                return None
            config, weights = models[str(value)]
            argv += ["--surrogate-config", config, "--surrogate-weights", weights]
        elif value is True:
            argv.append(f"--{key}")
        elif value is not False:
            argv += [f"--{key}", str(value)]
    return argv


def plan(columns, overrides, models, output):
    """Every (model, column, eval_dir, argv or None), model-major; each argv validated."""
    cells = []
    for model, (config, weights) in models.items():
        if not evidence.NAME.match(model):
            raise BoardError(f"model name {model!r}: use letters, digits, '_', '.', '-'")
        for path, what in ((config, "config"), (weights, "weights")):
            if not os.path.isfile(path):
                raise BoardError(f"model {model}: {what} file not found: {path}")
        for column, options in columns.items():
            try:
                options_argv = column_argv(options, models, model)
            except BoardError as e:
                raise BoardError(f"column {column}: {e}") from None
            eval_dir = os.path.join(output, model, column)
            argv = None if options_argv is None else [
                "--config-file", config, *options_argv, "--output", eval_dir, *overrides,
                "MODEL.WEIGHTS", weights]
            if argv is not None:
                try:
                    evidence.eval_settings(argv)
                except (*USER_ERRORS, AttackConfigError) as e:
                    raise BoardError(f"column {column}, model {model}: {e}") from None
            cells.append((model, column, eval_dir, argv))
    return cells


def execute(cells, models, columns):
    """Run every cell of ``models`` x ``columns`` not finished yet (one progress line per cell)."""
    for i, (model, column, eval_dir, argv) in enumerate(cells, 1):
        label = f"[{i}/{len(cells)}] {model} / {column}"
        if argv is None:
            print(f"{label}: left out (the column's surrogate is this model)", flush=True)
            continue
        if evidence.evaluated(eval_dir, argv):
            print(f"{label}: skipped (finished earlier)", flush=True)
            continue
        if model not in models or column not in columns:
            print(f"{label}: not run now (--models / --columns)", flush=True)
            continue
        print(f"{label}: started", flush=True)
        log = os.path.join(eval_dir, "console.log")
        start = time.perf_counter()
        try:
            with evidence.console_to(log):
                evidence.evaluate(argv)
        except evidence.EvidenceError as e:
            raise BoardError(f"{model} / {column}: {e} after {time.perf_counter() - start:.1f} s; "
                             f"see {log}") from None
        print(f"{label}: finished in {time.perf_counter() - start:.1f} s", flush=True)


def column_value(entry):
    """One dataset entry of a column's report -> its board cell: the worst cell (lowest mAP), or
    for corruptions CIL-ReID's corruption evaluation plus the grid mean."""
    if entry.get("protocol") == "corruptions":
        mixed = entry["mixed"]
        return {"mAP": mixed["mAP"], "Rank-1": mixed["Rank-1"], "setting": "corruption eval.",
                "grid_mAP": entry["summary"]["mean"]["mAP"]}
    worst = min(entry["cells"], key=lambda c: c["mAP"])
    return {"mAP": worst["mAP"], "Rank-1": worst["Rank-1"], "setting": worst["label"]}


def collect(cells, models, columns):
    """The board's rows: per model and test dataset, clean and every finished column's cell."""
    rows, entries = {}, {}
    for model, column, eval_dir, argv in cells:
        if argv is None or not evidence.evaluated(eval_dir, argv):
            continue
        with open(os.path.join(eval_dir, "results.json")) as f:
            report = json.load(f)
        for entry in report["datasets"]:
            row = rows.setdefault((model, entry["dataset"]), {
                "model": model, "dataset": entry["dataset"], "config": models[model][0],
                "weights": models[model][1], "clean": None, "cells": {}})
            row["clean"] = row["clean"] or {m: entry["clean"][m] for m in ("mAP", "Rank-1")}
            row["cells"][column] = {**column_value(entry), "report": os.path.join(eval_dir,
                                                                                 "results.json")}
            entries[model, entry["dataset"], column] = entry
    reference = next(iter(models), None)
    for (model, dataset), row in rows.items():
        for column in columns:
            entry, ref = entries.get((model, dataset, column)), entries.get((reference, dataset,
                                                                              column))
            if entry is not None and ref is not None and entry.get("protocol") == "corruptions":
                row["cells"][column]["mCE"] = normalized_mce(entry, ref)
    return list(rows.values())


def corruption_columns(rows, columns):
    return [c for c in columns if any("grid_mAP" in r["cells"].get(c, {}) for r in rows)]


def _pair(cell):
    return "—" if cell is None else f"{cell['mAP']:.1f}/{cell['Rank-1']:.1f}"


def _number(value):
    return "—" if value is None else f"{value:.1f}"


def markdown(board):
    rows, columns = board["rows"], board["columns"]
    corrupted = corruption_columns(rows, columns)
    header = ["Model", "Dataset", "Clean", *columns,
              *[f"{c} grid mean mAP" for c in corrupted], *[f"{c} mCE" for c in corrupted]]
    lines = [f"Robustness board ({os.path.basename(board['protocol'])}): mAP/Rank-1 (%); per column "
             "the worst of its attack cells (lowest mAP); corruption columns: CIL-ReID's "
             "corruption evaluation, the mean over the corruption x severity grid and mCE (%) "
             f"against {board['reference']}; — = not run (the column's surrogate is the model, "
             "or not run yet).",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [_pair(r["cells"].get(c)) for c in columns]
        extra = ([_number(r["cells"].get(c, {}).get("grid_mAP")) for c in corrupted]
                 + [_number(r["cells"].get(c, {}).get("mCE")) for c in corrupted])
        lines.append(f"| {r['model']} | {r['dataset']} | {_pair(r['clean'])} | "
                     + " | ".join(cells + extra) + " |")
    lines += ["", "Columns:", ""]
    for column, options in board["column_options"].items():
        settings = dict.fromkeys(c["setting"] for r in rows
                                 for c in [r["cells"].get(column)] if c)
        lines.append(f"- {column}: {json.dumps(options)}; worst cells: {', '.join(settings)}")
    return "\n".join(lines) + "\n"


def write_csv(board, path):
    columns = board["columns"]
    corrupted = corruption_columns(board["rows"], columns)
    fields = ["model", "dataset", "clean_mAP", "clean_Rank-1",
              *[f"{c}_{m}" for c in columns for m in ("mAP", "Rank-1")],
              *[f"{c}_{m}" for c in corrupted for m in ("grid_mAP", "mCE")]]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in board["rows"]:
            values = {"model": r["model"], "dataset": r["dataset"],
                      "clean_mAP": r["clean"]["mAP"], "clean_Rank-1": r["clean"]["Rank-1"]}
            for c in columns:
                cell = r["cells"].get(c, {})
                for m in ("mAP", "Rank-1", "grid_mAP", "mCE"):
                    if f"{c}_{m}" in fields:
                        values[f"{c}_{m}"] = cell.get(m)
            writer.writerow(values)


def write_board(board, output):
    """board.json, board.md and board.csv in ``output``; their paths."""
    return write_report_files(board, output, markdown, {"board.csv": write_csv}, stem="board")


def main(argv=None):
    ns = build_parser().parse_args(argv)
    output = os.path.abspath(ns.output)
    try:
        columns, overrides, models = load_protocol(ns.protocol)
        for text in ns.model:
            name, paths = parse_model(text)
            if name in models:
                raise BoardError(f"--model {text}: model {name!r} is defined twice")
            models[name] = paths
        if not models:
            raise BoardError("no models: give 'models' in the protocol file or --model "
                             "NAME=CONFIG:WEIGHTS")
        cells = plan(columns, overrides, models, output)
        execute(cells, selection(ns.models, list(models), "--models"),
                selection(ns.columns, list(columns), "--columns"))
    except (BoardError, evidence.EvidenceError, ConfigError, *USER_ERRORS,
            AttackConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    board = {"protocol": os.path.abspath(ns.protocol), "columns": list(columns),
             "column_options": columns, "overrides": overrides, "reference": next(iter(models)),
             "models": {k: {"config": c, "weights": w} for k, (c, w) in models.items()},
             "rows": collect(cells, models, columns),
             "argv": list(sys.argv[1:] if argv is None else argv)}
    paths = write_board(board, output)
    print("\n" + markdown(board))
    print(f"board: {paths['board.md']}, {paths['board.csv']}, {paths['board.json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Evidence from training runs: train each method over several seeds, attack every model, and report
mean ± std per method and metric plus paired differences with confidence intervals.

    python tools/evidence.py --spec configs/SynthReID/evidence/orderings.yml [--seeds 3]
    python tools/evidence.py --method undefended=configs/SynthReID/bagtricks_R18.yml \\
        --method metric_at=configs/SynthReID/demo_metric_at_R18.yml weights_from=undefended \\
        --compare metric_at:undefended [--dataset SynthReID] [--override KEY VALUE ...]
        [--protocol retrieval|clustering] [--attacks FNA,SMA,IFGSM] [--eps 8] [--steps 16]
        [--ci t|bootstrap] [--level 0.95] [--output logs/evidence] [any other tools/robust_eval.py
        option, e.g. --max-queries 50 --attack-option WMA:loss=fna]

Methods: ``--method NAME=CONFIG [weights_from=OTHER] [KEY VALUE ...]`` (repeatable) and/or a YAML
spec (``--spec``: ``methods: {NAME: {config: ..., weights_from: ..., overrides: {KEY: VALUE}}}``,
``compare: [A:B, ...]``; config paths relative to the spec file). ``weights_from=OTHER`` fine-tunes
from OTHER's model of the same seed (MODEL.WEIGHTS; for an EAT method, EAT.ENABLED, every ensemble
member starts from it: EAT.MEMBER_WEIGHTS). Each method runs with seeds 0..N-1
(ROBUSTREID.SEED) in OUTPUT/NAME/seedS: trained by tools/train_net.py's code path, then evaluated
clean and under each attack by tools/robust_eval.py's (in OUTPUT/NAME/seedS/robust_eval). Overrides
apply in this order: --dataset, the method's, --override, the seed. Options this tool does not
know are handed to robust_eval unchanged. ``--protocol clustering`` evaluates every model in
robust_eval's clustering protocol (EAT: every test sample attacked by PGD, NMI, F1 and R@k; default
attack SMA at 8/255 with 10 steps) and aggregates those metrics and their ERS-style summary.

Resumable: a run whose robust_eval/results.json matches the requested evaluation is skipped, a
trained run is only evaluated, a partly trained run continues from its last checkpoint (--resume).
A run directory trained with another config is refused (error line), never silently reused.
Each run's console output goes to its console.log; this tool prints one line per run and the table.

Writes OUTPUT/results.json (every run's numbers, the seeds, configs, overrides and the summary),
OUTPUT/results.md (mean ± sample std, ddof=1, per method x metric; paired differences A - B over
the seeds with their interval and n) and OUTPUT/results.png (bars with ±1 std error bars).
Intervals: Student-t on the paired differences (default) or a seeded percentile bootstrap.
"""
import argparse
import contextlib
import fnmatch
import json
import logging
import os
import re
import sys
import time
from typing import NamedTuple, Optional

import yaml

import robustreid  # noqa: F401  (compat patches + registrations)
import robust_eval  # tools/robust_eval.py (tools/ is on sys.path: this file runs as a script)
import train_net  # tools/train_net.py: the training this tool runs
from robustreid.attacks import AttackConfigError
from robustreid.checksums import sha256_of
from robustreid.cli import OneLineParser
from robustreid.config import load_config
from robustreid.engine import USER_ERRORS, preflight
from robustreid.evaluation.intervals import INTERVALS, mean_std, paired_interval
from robustreid.evaluation.plots import figure_axes, save_figure
from robustreid.evaluation.report_files import write_report_files
from run_state import final_weights, prune_checkpoints, resume_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Keys that do not change what a run trains: those resolve_device sets from the machine (a run
# may resume on another device) and where the run lives (a finished run copied into another
# --output, e.g. the undefended models shared by several specs, is the same run).
RUN_PLACE_KEYS = ("MODEL.DEVICE", "SOLVER.AMP.ENABLED", "OUTPUT_DIR")
# 0 = "count the training identities"; fastreid rewrites config.yaml with the count.
AUTO_CLASSES = "MODEL.HEADS.NUM_CLASSES"
MEASURES = ("mAP", "Rank-1")  # of the retrieval protocol; clustering reports list their own
# --attacks/--eps/--steps when not given, per robust_eval protocol.
ATTACK_DEFAULTS = {"retrieval": {"attacks": "FNA,SMA,IFGSM", "eps": "8", "steps": "16"},
                   "clustering": robust_eval.PROTOCOL_DEFAULTS["clustering"]}
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # method names are directory names


class EvidenceError(ValueError):
    """A bad method, spec, comparison or run directory, reported as one line."""


class Method(NamedTuple):
    name: str
    config: str                   # absolute path
    overrides: list               # KEY VALUE ...
    weights_from: Optional[str] = None


class Run(NamedTuple):
    method: Method
    seed: int
    out: str                      # the training's OUTPUT_DIR
    opts: list                    # every KEY VALUE of the run, MODEL.WEIGHTS of weights_from aside
    source: Optional[str] = None  # OUTPUT_DIR of the run it fine-tunes

    @property
    def label(self):
        return f"{self.method.name} seed {self.seed}"

    @property
    def eval_dir(self):
        return os.path.join(self.out, "robust_eval")

    def train_opts(self):
        if not self.source:
            return list(self.opts)
        key = fine_tuning_key(self.method.config, self.opts)
        return [*self.opts, key, final_weights(self.source)]

    def train_argv(self):
        return ["--config-file", self.method.config, *resume_flags(self.out), *self.train_opts()]


def fine_tuning_key(config, opts):
    """The key that starts a run from another method's model: EAT.MEMBER_WEIGHTS for an EAT
    ensemble (every member starts from that single model), else MODEL.WEIGHTS."""
    return "EAT.MEMBER_WEIGHTS" if load_config(config, opts).EAT.ENABLED else "MODEL.WEIGHTS"


# --------------------------------------------------------------------------- command line

def build_parser():
    # allow_abbrev=False: the options this parser does not know go to robust_eval, whole.
    parser = OneLineParser(description=__doc__, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", action="append", nargs="+", default=[],
                        metavar="NAME=CONFIG",
                        help="NAME=CONFIG [weights_from=NAME] [KEY VALUE ...] (repeatable)")
    parser.add_argument("--spec", default="", metavar="FILE", help="YAML file of methods/compare")
    parser.add_argument("--compare", action="append", default=[], metavar="A:B",
                        help="paired difference A - B per metric (repeatable)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (ROBUSTREID.SEED)")
    parser.add_argument("--dataset", default="", help="train and test on this registered dataset")
    parser.add_argument("--override", action="append", nargs=2, default=[],
                        metavar=("KEY", "VALUE"),
                        help="config override for every run (repeatable)")
    parser.add_argument("--protocol", choices=robust_eval.PROTOCOLS, default="retrieval",
                        help="robust_eval's protocol (clustering: every test sample attacked)")
    parser.add_argument("--attacks", help="default FNA,SMA,IFGSM; clustering: SMA")
    parser.add_argument("--eps", help="L-inf budgets in 1/255 units (default 8)")
    parser.add_argument("--steps", help="attack iterations (default 16; clustering: 10)")
    parser.add_argument("--ci", choices=INTERVALS, default="t", help="paired-difference interval")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level")
    parser.add_argument("--bootstrap-samples", type=int, default=10000)
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join("logs", "evidence"))
    parser.add_argument("--only", action="append", default=[], metavar="METHOD/seedS",
                        help="run only the runs matching this glob, e.g. 'eat/seed2' or 'at/*' "
                             "(repeatable): splits one study across processes on the same "
                             "--output; writes no table (run again without --only for it)")
    parser.add_argument("--prune-checkpoints", action="store_true",
                        help="delete each finished run's intermediate checkpoints "
                             "(model_<epoch>.pth; EAT keeps ~1.9 GB per seed), keeping "
                             "model_final.pth and model_best.pth; runs finished earlier too")
    return parser


def pairs(values, where):
    """KEY VALUE strings from a YAML mapping or list (values as a command line gives them)."""
    if isinstance(values, dict):
        values = [item for key, value in values.items() for item in (key, value)]
    if not isinstance(values, list) or len(values) % 2:
        raise EvidenceError(f"{where}: overrides must be a KEY: VALUE mapping or KEY VALUE pairs")
    return [str(v) for v in values]


def parse_method(tokens):
    """``NAME=CONFIG [weights_from=OTHER] [KEY VALUE ...]`` -> Method (CONFIG relative to cwd)."""
    name, equals, config = tokens[0].partition("=")
    weights_from = [t.partition("=")[2] for t in tokens[1:] if t.startswith("weights_from=")]
    overrides = [t for t in tokens[1:] if not t.startswith("weights_from=")]
    if not (equals and name and config) or len(weights_from) > 1 or len(overrides) % 2:
        raise EvidenceError(f"--method {' '.join(tokens)}: expected NAME=CONFIG "
                            "[weights_from=NAME] [KEY VALUE ...]")
    return Method(name, os.path.abspath(config), overrides, (weights_from or [None])[0])


def load_spec(path):
    """(methods, comparisons) of a YAML spec; config paths are relative to the spec's directory."""
    if not os.path.isfile(path):
        raise EvidenceError(f"--spec: file not found: {path}")
    with open(path) as f:
        try:
            spec = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise EvidenceError(f"{path}: not YAML: {str(e).splitlines()[0]}") from None
    unknown = set(spec) - {"methods", "compare"} if isinstance(spec, dict) else None
    if unknown is None or unknown or not isinstance(spec.get("methods"), dict):
        raise EvidenceError(f"{path}: expected 'methods: {{NAME: {{config: FILE, ...}}}}' and "
                            f"optionally 'compare: [A:B, ...]'" + (f"; unknown: {sorted(unknown)}"
                                                                  if unknown else ""))
    methods = []
    for name, entry in spec["methods"].items():
        where = f"{path}: method {name}"
        if not isinstance(entry, dict) or "config" not in entry:
            raise EvidenceError(f"{where}: needs 'config: FILE'")
        extra = set(entry) - {"config", "weights_from", "overrides"}
        if extra:
            raise EvidenceError(f"{where}: unknown key(s) {sorted(extra)}; known: config, "
                                "weights_from, overrides")
        config = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)),
                                               str(entry["config"])))
        methods.append(Method(str(name), config, pairs(entry.get("overrides") or [], where),
                              entry.get("weights_from")))
    compare = spec.get("compare") or []
    if not isinstance(compare, list):
        raise EvidenceError(f"{path}: compare must be a list of A:B")
    return methods, [str(c) for c in compare]


def order_methods(methods):
    """Methods with every weights_from source before its users (else the given order)."""
    by_name = {}
    for m in methods:
        if not NAME.match(m.name):
            raise EvidenceError(f"method name {m.name!r}: use letters, digits, '_', '.', '-'")
        if m.name in by_name:
            raise EvidenceError(f"method {m.name!r} is defined twice")
        by_name[m.name] = m
    ordered, visiting = [], set()

    def visit(m):
        if m in ordered:
            return
        if m.name in visiting:
            raise EvidenceError(f"method {m.name}: weights_from forms a cycle")
        visiting.add(m.name)
        if m.weights_from is not None:
            if m.weights_from not in by_name:
                raise EvidenceError(f"method {m.name}: weights_from {m.weights_from!r} is not a "
                                    f"method; methods: {', '.join(by_name)}")
            visit(by_name[m.weights_from])
        ordered.append(m)

    for m in methods:
        visit(m)
    return ordered


def parse_comparisons(entries, names, seeds):
    comparisons = []
    for entry in entries:
        a, colon, b = entry.partition(":")
        if not colon:
            raise EvidenceError(f"--compare {entry!r}: expected A:B (two method names)")
        unknown = [n for n in (a, b) if n not in names]
        if unknown:
            raise EvidenceError(f"--compare {entry}: unknown method {unknown[0]!r}; methods: "
                                f"{', '.join(names)}")
        comparisons.append((a, b))
    if comparisons and seeds < 2:
        raise EvidenceError(f"--seeds {seeds}: a paired interval needs at least 2 seeds "
                            f"(--compare {entries[0]})")
    return list(dict.fromkeys(comparisons))


def plan_runs(methods, ns):
    """Every (method, seed) run, sources first within each seed (a seed's set completes early)."""
    dataset = (["DATASETS.NAMES", f'("{ns.dataset}",)', "DATASETS.TESTS", f'("{ns.dataset}",)']
               if ns.dataset else [])
    overrides = [item for pair in ns.override for item in pair]
    output = os.path.abspath(ns.output)
    out = lambda name, seed: os.path.join(output, name, f"seed{seed}")  # noqa: E731
    return [Run(m, seed, out(m.name, seed),
                [*dataset, *m.overrides, *overrides, "ROBUSTREID.SEED", str(seed),
                 "OUTPUT_DIR", out(m.name, seed)],
                out(m.weights_from, seed) if m.weights_from else None)
            for seed in range(ns.seeds) for m in methods]


def eval_argv(run, ns, passthrough):
    attack = {key: getattr(ns, key) or ATTACK_DEFAULTS[ns.protocol][key]
              for key in ("attacks", "eps", "steps")}
    return ["--config-file", run.method.config, "--protocol", ns.protocol,
            "--attacks", attack["attacks"], "--eps", attack["eps"], "--steps", attack["steps"],
            *passthrough, "--output", run.eval_dir, *run.opts,
            "MODEL.WEIGHTS", final_weights(run.out)]


def eval_settings(argv):
    """The settings robust_eval records in results.json for ``argv`` (what "done" is checked
    against), every option validated; ConfigError/AttackConfigError naming the one at fault."""
    ns = robust_eval.build_parser().parse_args(argv)
    settings = robust_eval.parse_settings(ns)
    weights = ns.opts[-1]  # eval_argv ends with MODEL.WEIGHTS PATH
    settings.update(config_file=os.path.abspath(ns.config_file), opts=list(ns.opts),
                    weights_sha256=sha256_of(weights) if os.path.isfile(weights) else None)
    return json.loads(json.dumps(settings))  # as read back from the file: lists, string keys


def check_inputs(ns, extra):
    """Every check that can fail, before any run: (methods, comparisons, runs, passthrough)."""
    if not ns.method and not ns.spec:
        raise EvidenceError("no methods: give --spec FILE and/or --method NAME=CONFIG ...")
    if ns.seeds < 1:
        raise EvidenceError(f"--seeds must be >= 1, got {ns.seeds}")
    if not 0 < ns.level < 1 or ns.bootstrap_samples < 1:
        raise EvidenceError(f"--level must be in (0, 1) and --bootstrap-samples >= 1, got "
                            f"{ns.level:g} and {ns.bootstrap_samples}")
    methods, compare = load_spec(ns.spec) if ns.spec else ([], [])
    methods = order_methods(methods + [parse_method(tokens) for tokens in ns.method])
    comparisons = parse_comparisons(compare + ns.compare, [m.name for m in methods], ns.seeds)
    check_passthrough(extra)
    runs = plan_runs(methods, ns)
    for run in runs[:len(methods)]:  # the first seed: configs and data (the other seeds differ
        try:                         # only by ROBUSTREID.SEED and OUTPUT_DIR)
            eval_settings(eval_argv(run, ns, extra))
            preflight(load_config(run.method.config, run.opts))  # weights_from's: trained later
        except (*USER_ERRORS, AttackConfigError) as e:
            raise EvidenceError(f"method {run.method.name}: {e}") from None
    for run in runs:
        check_same_training(run)
    return methods, comparisons, select_runs(runs, ns.only), extra


def select_runs(runs, patterns):
    """The runs whose NAME/seedS matches one of the ``--only`` globs (all when none is given)."""
    if not patterns:
        return runs
    keys = [f"{run.method.name}/seed{run.seed}" for run in runs]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(k, p) for k in keys)]
    if unmatched:
        raise EvidenceError(f"--only {unmatched[0]!r} matches no run; runs: {', '.join(keys)}")
    return [run for run, k in zip(runs, keys) if any(fnmatch.fnmatchcase(k, p) for p in patterns)]


def check_passthrough(extra):
    """Options for robust_eval: only its own options (it would take stray words as config keys),
    not those this tool sets per run."""
    unset = "\0"
    ns = robust_eval.build_parser().parse_args(["--config-file", unset, *extra])
    if ns.opts:
        raise EvidenceError(f"unrecognized arguments: {' '.join(ns.opts)}")
    if ns.config_file != unset or ns.output:
        raise EvidenceError(f"{' '.join(extra)}: the config file and robust_eval's output "
                            "directory are set per run by this tool")


def flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}


def check_same_training(run):
    """Refuse a run directory whose config.yaml (rewritten by every training start) differs from
    what this run asks for: reusing it would report another recipe's numbers."""
    dumped = os.path.join(run.out, "config.yaml")
    if not os.path.isfile(dumped):
        return
    with open(dumped) as f:
        before = flat(yaml.safe_load(f))
    now = flat(yaml.safe_load(load_config(run.method.config, run.train_opts()).dump()))
    if now.get(AUTO_CLASSES) == 0:  # the trainer writes the training set's count in its place
        now[AUTO_CLASSES] = before.get(AUTO_CLASSES)
    # A key the run's code did not have yet, now at its default, trained the same way
    defaults = flat(yaml.safe_load(load_config().dump()))
    changed = [k for k in sorted(before.keys() | now.keys())
               if k not in RUN_PLACE_KEYS and before.get(k) != now.get(k)
               and not (k not in before and k in defaults and now.get(k) == defaults[k])]
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
        raise EvidenceError(f"{run.out} was trained with another config ({shown}"
                            f"{'; ...' if len(changed) > 3 else ''}): delete it or use another "
                            "--output")


# --------------------------------------------------------------------------- running

def train(argv):
    """tools/train_net.py with ``argv`` (in this process)."""
    if train_net.cli(argv) != 0:
        raise EvidenceError("tools/train_net.py failed")


def evaluate(argv):
    """tools/robust_eval.py with ``argv`` (in this process); writes results.json to --output."""
    if robust_eval.main(argv) != 0:
        raise EvidenceError("tools/robust_eval.py failed")


def evaluated(eval_dir, argv):
    """Whether ``eval_dir``/results.json is robust_eval's report of ``argv`` on the current
    weights (tools/robust_board.py asks it too)."""
    path = os.path.join(eval_dir, "results.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            recorded = json.load(f)["settings"]
    except (ValueError, KeyError):  # cut short while being written
        return False
    recorded.setdefault("protocol", "retrieval")  # reports from before robust_eval's --protocol
    # The config's path is not compared: check_same_training compares the config itself, and a
    # spec run from another checkout (a worktree, a moved repo) must not re-evaluate every run.
    return all(recorded.get(k) == v for k, v in eval_settings(argv).items() if k != "config_file")


@contextlib.contextmanager
def console_to(path):
    """The run's console output (fastreid's logger, progress bars, warnings) into ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            yield
        finally:
            # setup() adds fastreid's handlers per output directory, bound to this file: drop them.
            logging.getLogger("fastreid").handlers.clear()


def execute(runs, ns, passthrough):
    """Train and evaluate every run not done yet, one progress line per run start/skip/finish."""
    for i, run in enumerate(runs, 1):
        label = f"[{i}/{len(runs)}] {run.label}"
        argv = eval_argv(run, ns, passthrough)
        if os.path.isfile(final_weights(run.out)) and evaluated(run.eval_dir, argv):
            print(f"{label}: skipped (finished earlier){pruned(run, ns)}", flush=True)
            continue
        trained = os.path.isfile(final_weights(run.out))
        source = os.path.relpath(run.source, os.path.abspath(ns.output)) if run.source else ""
        how = ("trained earlier, evaluating" if trained else
               "resuming from its last checkpoint" if resume_flags(run.out) else
               f"fine-tuning {source}" if source else "training")
        if not trained and run.source and not os.path.isfile(final_weights(run.source)):
            raise EvidenceError(f"{run.label} fine-tunes {source}, which has no "
                                f"{os.path.basename(final_weights(run.source))} yet: train it "
                                f"first (with --only, select it too)")
        print(f"{label}: started ({how})", flush=True)
        log = os.path.join(run.out, "console.log")
        start = time.perf_counter()
        try:
            with console_to(log):
                if not trained:
                    train(run.train_argv())
                trained_at = time.perf_counter()
                evaluate(argv)
        except EvidenceError as e:
            raise EvidenceError(f"{run.label}: {e} after {time.perf_counter() - start:.1f} s; see "
                                f"{log}") from None
        except BaseException:  # the traceback follows; say where the run's own output went
            print(f"{label}: failed after {time.perf_counter() - start:.1f} s; log: {log}",
                  file=sys.stderr, flush=True)
            raise
        end = time.perf_counter()
        training = "" if trained else f"training {trained_at - start:.1f} s, "
        print(f"{label}: finished in {end - start:.1f} s ({training}robust evaluation "
              f"{end - trained_at:.1f} s){pruned(run, ns)}", flush=True)


def pruned(run, ns):
    """--prune-checkpoints on a finished run; what it freed, for the run's progress line."""
    freed = prune_checkpoints(run.out) if ns.prune_checkpoints else 0
    return f"; {freed / 2 ** 20:.0f} MB of intermediate checkpoints deleted" if freed else ""


# --------------------------------------------------------------------------- summary

def run_metrics(report):
    """{"Clean mAP": .., "Clean Rank-1": .., "FNA 8/255-16 mAP": .., ...} of a robust_eval report
    ("Clean NMI", ..., "PGD-10 8/255 R@1", "PGD-10 8/255 ERS" of a clustering one); names start
    with the dataset when it evaluated several."""
    metrics = {}
    for d in report["datasets"]:
        prefix = f"{d['dataset']} " if len(report["datasets"]) > 1 else ""
        for setting, result in [("Clean", d["clean"])] + [(c["label"], c) for c in d["cells"]]:
            extra = ["ERS"] if result.get("ERS") is not None else []  # clustering's attacked rows
            for measure in [*d.get("metrics", MEASURES), *extra]:
                metrics[f"{prefix}{setting} {measure}"] = result[measure]
    return metrics


def collect(runs):
    records = []
    for run in runs:
        path = os.path.join(run.eval_dir, "results.json")
        with open(path) as f:
            report = json.load(f)
        records.append({"method": run.method.name, "seed": run.seed, "run_dir": run.out,
                        "report": path, "weights_sha256": report["settings"].get("weights_sha256"),
                        "metrics": run_metrics(report)})
    return records


def summarize(records, comparisons, ci="t", level=0.95, bootstrap_samples=10000, bootstrap_seed=0):
    """Per method x metric: mean, sample std (ddof=1), n and the per-seed values; per comparison
    A:B and metric: the paired differences A - B (seeds both ran), their mean and interval."""
    metrics = list(dict.fromkeys(m for r in records for m in r["metrics"]))
    values = {}  # method -> metric -> seed -> value
    for r in records:
        for metric, value in r["metrics"].items():
            values.setdefault(r["method"], {}).setdefault(metric, {})[r["seed"]] = value
    cells = {}
    for method, by_metric in values.items():
        cells[method] = {}
        for metric in metrics:
            per_seed = by_metric.get(metric, {})
            if per_seed:
                mean, std = mean_std(list(per_seed.values()))
                cells[method][metric] = {"mean": mean, "std": std, "n": len(per_seed),
                                         "values": {str(s): v for s, v in sorted(per_seed.items())}}
    differences = []
    for a, b in comparisons:
        for metric in metrics:
            va, vb = values.get(a, {}).get(metric, {}), values.get(b, {}).get(metric, {})
            seeds = sorted(va.keys() & vb.keys())
            if len(seeds) < 2:
                continue
            diffs = [va[s] - vb[s] for s in seeds]
            low, high = paired_interval(diffs, level, ci, bootstrap_samples, bootstrap_seed)
            differences.append({"a": a, "b": b, "metric": metric, "n": len(seeds), "seeds": seeds,
                                "differences": diffs, "mean": mean_std(diffs)[0], "low": low,
                                "high": high})
    interval = {"method": ci, "level": level}
    if ci == "bootstrap":
        interval.update(samples=bootstrap_samples, seed=bootstrap_seed)
    return {"metrics": metrics, "std": "sample standard deviation over seeds (ddof=1)",
            "interval": interval, "cells": cells, "differences": differences}


def _mean_std(cell):
    if cell is None:
        return ""
    std = f" ± {cell['std']:.2f}" if cell["std"] is not None else ""  # one seed: no spread
    return f"{cell['mean']:.2f}{std}"


def markdown(results):
    """results.md: the mean ± std table, then the paired-difference table."""
    summary, settings = results["summary"], results["settings"]
    metrics, interval = summary["metrics"], summary["interval"]
    kind = ("Student-t" if interval["method"] == "t" else
            f"percentile bootstrap ({interval['samples']} resamples, seed {interval['seed']})")
    level = f"{100 * interval['level']:g}%"
    measured = ("NMI, F1 and Recall@k (%) in the clustering protocol, every test sample attacked, "
                "ERS-style: mean of attacked / clean"
                if settings.get("protocol") == "clustering" else "mAP and Rank-1 (%)")
    lines = [f"# Evidence: {len(results['methods'])} methods x {len(settings['seeds'])} seeds",
             "",
             f"{measured}, mean ± sample std (ddof=1) over seeds "
             f"{', '.join(map(str, settings['seeds']))}; clean and under each tools/robust_eval.py "
             f"attack (ATTACK eps-steps)"
             + (f", robust_eval options {' '.join(settings['robust_eval_options'])}"
                if settings["robust_eval_options"] else "") + ".", "",
             "| Method | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for method, cells in summary["cells"].items():
        n = max((c["n"] for c in cells.values()), default=0)
        lines.append(f"| {method} | {n} | " + " | ".join(_mean_std(cells.get(m)) for m in metrics)
                     + " |")
    if summary["differences"]:
        lines += ["", f"## Paired differences A − B (same seed), {level} {kind} interval", "",
                  f"| A − B | Metric | n | Mean difference | {level} CI | Excludes 0 |",
                  "|---|---|---|---|---|---|"]
        for d in summary["differences"]:
            excludes = "yes" if d["low"] > 0 or d["high"] < 0 else "no"
            lines.append(f"| {d['a']} − {d['b']} | {d['metric']} | {d['n']} | {d['mean']:+.2f} | "
                         f"[{d['low']:+.2f}, {d['high']:+.2f}] | {excludes} |")
    lines += ["", "## Methods", ""]
    for name, m in results["methods"].items():
        source = f", fine-tuning {m['weights_from']}" if m["weights_from"] else ""
        overrides = f": {' '.join(m['overrides'])}" if m["overrides"] else ""
        lines.append(f"- {name}: {os.path.relpath(m['config'], REPO)}{source}{overrides}")
    return "\n".join(lines) + "\n"


def plot(summary, path):
    """One panel per measure (mAP, Rank-1; NMI, F1, R@k, ERS): a bar per method and setting, ±1 std
    error bars."""
    measures = list(dict.fromkeys(m.rpartition(" ")[2] for m in summary["metrics"]))
    plt, fig, axes = figure_axes(len(measures))
    methods = list(summary["cells"])
    width = 0.8 / max(len(methods), 1)
    for ax, measure in zip(axes, measures):
        metrics = [m for m in summary["metrics"] if m.rpartition(" ")[2] == measure]
        for i, method in enumerate(methods):
            cells = [summary["cells"][method].get(m) for m in metrics]
            ax.bar([x + (i - (len(methods) - 1) / 2) * width for x in range(len(metrics))],
                   [c["mean"] if c else 0 for c in cells], width,
                   yerr=[(c["std"] or 0) if c else 0 for c in cells], capsize=3, label=method)
        ax.set_xticks(range(len(metrics)), [m.rpartition(" ")[0] for m in metrics], rotation=20,
                      ha="right")
        ax.set(ylabel=f"{measure} (%)", ylim=(0, 100), title=f"{measure}: mean ± std over seeds")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    save_figure(plt, fig, path)


def write_results(results, output):
    """results.json, results.md and results.png in ``output``; returns their paths."""
    return write_report_files(results, output, markdown,
                              {"results.png": lambda report, path: plot(report["summary"], path)})


def main(argv=None):
    ns, extra = build_parser().parse_known_args(argv)
    try:
        methods, comparisons, runs, passthrough = check_inputs(ns, extra)
        execute(runs, ns, passthrough)
        if ns.only:
            print(f"{len(runs)} selected run(s) done; the table: the same command without --only",
                  flush=True)
            return 0
    except (EvidenceError, *USER_ERRORS, AttackConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    records = collect(runs)
    attack_settings = eval_settings(eval_argv(runs[0], ns, passthrough))
    results = {
        "settings": {"seeds": list(range(ns.seeds)), "dataset": ns.dataset or None,
                     "protocol": ns.protocol,
                     "overrides": [item for pair in ns.override for item in pair],
                     **{k: attack_settings[k] for k in ("attacks", "eps", "steps")},
                     "robust_eval_options": passthrough, "spec": ns.spec or None,
                     "argv": list(sys.argv[1:] if argv is None else argv)},
        "methods": {m.name: {"config": m.config, "overrides": m.overrides,
                             "weights_from": m.weights_from} for m in methods},
        "comparisons": [f"{a}:{b}" for a, b in comparisons],
        "runs": records,
        "summary": summarize(records, comparisons, ns.ci, ns.level, ns.bootstrap_samples,
                             ns.bootstrap_seed),
    }
    paths = write_results(results, os.path.abspath(ns.output))
    print("\n" + markdown(results))
    print(f"results: {paths['results.json']}, {paths['results.md']}, {paths['results.png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

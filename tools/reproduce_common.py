"""What the paper-reproduction tools (reproduce_dddefense.py, reproduce_eat.py) share: the table
selection of a paper_results.json, running a step with its output in a log, and the skip / resume
rules of a training run and of an evaluation. Plans are made without importing torch."""
import json
import os
import subprocess
import sys

from run_state import final_weights, resume_flags  # tools/run_state.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")


class ReproduceError(ValueError):
    """A bad selection or a missing input, reported as one line."""


def csv_list(text):
    return [item for item in text.split(",") if item]


def parse_pairs(text, option, value_name):
    """``"A=x,B=y"`` -> {"A": "x", "B": "y"}; anything else names ``option``."""
    pairs = [item.partition("=") for item in csv_list(text)]
    bad = [name + eq + value for name, eq, value in pairs if not (name and eq and value)]
    if bad:
        raise ReproduceError(f"{option}: {', '.join(map(repr, bad))} is not NAME={value_name}")
    return {name: value for name, _, value in pairs}


def parse_dataset_map(text):
    """``"Market1501=MyMarket,DukeMTMC=MyDuke"`` -> {paper name: registered name}."""
    return parse_pairs(text, "--dataset-map", "REGISTERED_NAME")


def load_tables(path):
    with open(path) as f:
        return {table["id"]: table for table in json.load(f)["tables"]}


def select_tables(tables, spec):
    ids = list(tables) if spec == "all" else csv_list(spec)
    unknown = [i for i in ids if i not in tables]
    if unknown:
        raise ReproduceError(f"--tables: unknown table(s) {unknown}; available: {', '.join(tables)}")
    return [tables[i] for i in ids]


def run(command, log):
    """Run one step, its output appended to ``log``; a failure is a ReproduceError naming both."""
    print("$ " + " ".join(command), flush=True)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f:
        process = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if process.returncode:
        raise ReproduceError(f"command failed (exit {process.returncode}), see {log}: "
                             + " ".join(command))


def train_command(config, opts, out, num_gpus=1):
    """tools/train_net.py for a run in ``out``: --resume when it has a checkpoint to continue."""
    return [sys.executable, TRAIN_NET, "--config-file", config, "--num-gpus", str(num_gpus),
            *resume_flags(out), *opts]


def train(config, opts, out, num_gpus=1):
    """Train unless the run in ``out`` is finished; an interrupted one resumes."""
    if os.path.isfile(final_weights(out)):
        return
    run(train_command(config, opts, out, num_gpus), os.path.join(out, "reproduce.log"))


def evaluated(out, command):
    """Whether ``out`` holds the results.json of this very evaluation ``command``."""
    results = os.path.join(out, "results.json")
    if not os.path.isfile(results):
        return False
    with open(results) as f:
        return json.load(f)["settings"].get("command") == command[2:]


def evaluate(command, out):
    """Run a tools/robust_eval.py ``command`` writing ``out``/results.json, unless that file already
    holds its results; records the command there (what "already done" compares)."""
    if evaluated(out, command):
        return
    run(command, os.path.join(out, "reproduce.log"))
    results = os.path.join(out, "results.json")
    with open(results) as f:
        report = json.load(f)
    report["settings"]["command"] = command[2:]  # without the interpreter and the tool's path
    with open(results + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(results + ".tmp", results)

"""tools/reproduce_eat.py: the plan of a table (dry run), and the skip / resume rules on fake run
directories with the steps stubbed (no training: the DML datasets and robust_eval's clustering
protocol live on other branches)."""
import json
import os
import shlex
import sys

import reproduce_common
import reproduce_eat
from conftest import REPO

MNV2 = "MobileNetV2=/weights/mobilenet_v2.pth"
ATTACK = ["--protocol", "clustering", "--attacks", "SMA", "--eps", "8", "--steps", "10"]


def run_tool(capsys, *args):
    code = reproduce_eat.main(list(args))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_dry_run_lists_table_3s_runs_and_commands(tmp_path, capsys):
    code, lines, err = run_tool(capsys, "--tables", "table-3", "--pretrain", MNV2, "--output",
                                str(tmp_path), "--dry-run", "SOLVER.IMS_PER_BATCH", "120")
    assert code == 0, err
    assert lines[0] == f"3 table rows: 3 training runs and evaluations under {tmp_path}"
    assert [line for line in lines if not line.startswith("  ")][1:] == [
        "CUB200 / MobileNetV2 / naive_ensemble: new", "CUB200 / MobileNetV2 / eat_no_split: new",
        "CUB200 / MobileNetV2 / eat: new"]
    trains = [shlex.split(line.split(": ", 1)[1]) for line in lines if line.startswith("  train:")]
    evals = [shlex.split(line.split(": ", 1)[1]) for line in lines if line.startswith("  evaluate:")]
    assert len(trains) == len(evals) == 3
    out = tmp_path / "CUB200" / "MobileNetV2" / "eat"
    opts = ["DATASETS.NAMES", '("CUB200",)', "DATASETS.TESTS", '("CUB200",)',
            "MODEL.BACKBONE.PRETRAIN_PATH", "/weights/mobilenet_v2.pth",
            "SOLVER.IMS_PER_BATCH", "120", "OUTPUT_DIR", str(out)]
    config = os.path.join(REPO, "configs", "EAT", "CUB200_MobileNetV2", "eat.yml")
    assert trains[2] == [sys.executable, os.path.join(REPO, "tools", "train_net.py"),
                         "--config-file", config, "--num-gpus", "1", *opts]
    assert evals[2] == [sys.executable, os.path.join(REPO, "tools", "robust_eval.py"),
                        "--config-file", config, *ATTACK,
                        "--output", str(out / "eval" / "clustering_SMA_eps8_steps10"),
                        *opts, "MODEL.WEIGHTS", str(out / "model_final.pth")]


def test_rows_shared_by_tables_train_once_and_each_backbone_needs_its_weights(tmp_path, capsys):
    code, lines, _ = run_tool(capsys, "--tables", "table-1,table-2,table-3", "--datasets",
                              "CUB200", "--pretrain", MNV2, "--output", str(tmp_path), "--dry-run")
    assert code == 0
    # Table 3's "EAT w/ Data Split" is Table 1's CUB200 EAT row: 6 + 6 + 3 rows, 14 runs
    assert lines[:2] == ["note: --pretrain: no ImageNet weights for BNInception: give --pretrain "
                         "BACKBONE=/path/to/state_dict.pth (or MODEL.BACKBONE.PRETRAIN False)",
                         f"15 table rows: 14 training runs and evaluations under {tmp_path}"]
    assert sum(line.startswith("  train:") for line in lines) == 14
    assert any("configs/EAT/CUB200_BNInception/trades.yml" in line for line in lines)
    code, _, err = run_tool(capsys, "--tables", "table-2", "--output", str(tmp_path))
    assert code == 2 and err.startswith("error: --pretrain: no ImageNet weights for BNInception")
    code, _, err = run_tool(capsys, "--tables", "table-5", "--output", str(tmp_path))
    assert code == 2 and err.strip() == ("error: --tables: unknown table(s) ['table-5']; "
                                         "available: table-1, table-2, table-3, table-4")


def fake_results(out, command, nmi):
    """robust_eval's report of the clustering protocol, written where a finished evaluation is."""
    os.makedirs(out, exist_ok=True)
    metrics = {"NMI": nmi, "F1": 4.0, "R@1": 24.0, "R@8": 47.0}
    report = {"settings": {"command": command[2:]},
              "datasets": [{"clean": {**metrics, "NMI": nmi + 20},
                            "cells": [{"attack": "SMA", "eps": 8.0, "steps": 10, **metrics}]}]}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f)


def test_finished_steps_are_skipped_and_an_interrupted_training_resumes(tmp_path, capsys,
                                                                         monkeypatch):
    args = ["--tables", "table-3", "--pretrain", MNV2, "--output", str(tmp_path)]
    runs, _ = reproduce_eat.build_plan(reproduce_eat.parse_args(args),
                                       [reproduce_eat.load_tables(reproduce_eat.PAPER_RESULTS)["table-3"]])
    naive, no_split, eat = (runs[("CUB200", "MobileNetV2", m)]
                            for m in ("naive_ensemble", "eat_no_split", "eat"))
    # eat: trained and evaluated; eat_no_split: stopped mid-training; naive_ensemble: trained,
    # evaluated by another command (its results are stale)
    for run in (eat, naive):
        os.makedirs(run.out)
        open(os.path.join(run.out, "model_final.pth"), "w").close()
    fake_results(eat.eval_out, eat.eval_command(), 38.0)
    fake_results(naive.eval_out, naive.eval_command()[:-2], 30.0)
    os.makedirs(no_split.out)
    with open(os.path.join(no_split.out, "last_checkpoint"), "w") as f:
        f.write("model_0004.pth")

    commands = []

    def fake_run(command, log):  # robust_eval writes its report; train_net its final weights
        commands.append(command)
        if command[1].endswith("robust_eval.py"):
            out = command[command.index("--output") + 1]
            fake_results(out, command, 36.0 if "eat_no_split" in out else 34.0)
        else:
            open(os.path.join(command[command.index("OUTPUT_DIR") + 1], "model_final.pth"),
                 "w").close()

    monkeypatch.setattr(reproduce_common, "run", fake_run)
    code, lines, err = run_tool(capsys, *args, "--dry-run")
    assert [line for line in lines if " / " in line and not line.startswith("  ")] == [
        "CUB200 / MobileNetV2 / naive_ensemble: trained", "CUB200 / MobileNetV2 / eat_no_split: resumes",
        "CUB200 / MobileNetV2 / eat: evaluated"]
    assert commands == []  # a dry run runs nothing

    code, lines, err = run_tool(capsys, *args)
    assert code == 0, err
    assert [(os.path.basename(c[1]), c[c.index("--config-file") + 1].split("/")[-1]) for c in commands] == [
        ("robust_eval.py", "naive_ensemble.yml"), ("train_net.py", "eat_no_split.yml"),
        ("robust_eval.py", "eat_no_split.yml")]
    assert "--resume" in commands[1]
    # ours (paper) in the paper's layout, Clean and PGD-10 lines per method
    assert "| CUB200 | MobileNetV2 | eat | PGD-10 | 38.00 (38.02) | 4.00 (4.84) | 24.00 (24.02) | " \
           "47.00 (47.49) |" in lines
    assert "| CUB200 | MobileNetV2 | eat_no_split | Clean | 56.00 (59.28) | 4.00 (21.25) | " \
           "24.00 (54.49) | 47.00 (82.02) |" in lines
    assert "| CUB200 | MobileNetV2 | naive_ensemble | PGD-10 | 34.00 (34.76) | 4.00 (3.26) | " \
           "24.00 (17.91) | 47.00 (40.91) |" in lines

    commands.clear()  # everything done now: a rerun runs nothing
    assert run_tool(capsys, *args)[0] == 0 and commands == []


def test_table_2_prints_a_question_mark_for_the_missing_paper_numbers(tmp_path, capsys):
    args = reproduce_eat.parse_args(["--tables", "table-2", "--methods", "eat", "--output",
                                     str(tmp_path), "MODEL.BACKBONE.PRETRAIN", "False"])
    tables = reproduce_eat.select_tables(reproduce_eat.load_tables(reproduce_eat.PAPER_RESULTS),
                                         args.tables)
    runs, rows = reproduce_eat.build_plan(args, tables)
    reproduce_eat.print_tables(runs, rows)
    lines = capsys.readouterr().out.splitlines()
    assert "| CUB200 | BNInception | eat | Clean | — (?) | — (?) | — (?) | — (?) | — (?) | — (?) |" \
        in lines

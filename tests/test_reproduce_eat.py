"""tools/reproduce_eat.py: the plan of a table (dry run), the skip / resume rules on fake run
directories with the steps stubbed, and the reading of robust_eval's clustering report as its real
writer writes it."""
import json
import os
import shlex
import sys

import pytest

import reproduce_common
import reproduce_eat
from conftest import REPO, make_tiny_cfg

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
    opts = ["MODEL.BACKBONE.PRETRAIN_PATH", "/weights/mobilenet_v2.pth",  # the config's datasets
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
           "47.00 (47.49) | — |" in lines
    assert "| CUB200 | MobileNetV2 | eat_no_split | Clean | 56.00 (59.28) | 4.00 (21.25) | " \
           "24.00 (54.49) | 47.00 (82.02) |  |" in lines
    assert "| CUB200 | MobileNetV2 | naive_ensemble | PGD-10 | 34.00 (34.76) | 4.00 (3.26) | " \
           "24.00 (17.91) | 47.00 (40.91) | — |" in lines

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
    assert "| CUB200 | BNInception | eat | Clean | — (?) | — (?) | — (?) | — (?) | — (?) | — (?) |  |" \
        in lines
    assert "| CUB200 | BNInception | eat | PGD-10 | — (?) | — (?) | — (?) | — (?) | — (?) | — (?) | — |" \
        in lines


def test_rows_run_on_their_configs_datasets_unless_mapped(tmp_path):
    """In-Shop's rows test on InShopQuery (their config's, the paper's test set): the tool sets no
    dataset unless --dataset-map maps the row's, then training and test both use the mapped one."""
    def eval_opts(*extra):
        args = reproduce_eat.parse_args(["--tables", "table-1,table-4", "--methods", "eat",
                                         "--output", str(tmp_path), *extra,
                                         "MODEL.BACKBONE.PRETRAIN", "False"])
        tables = reproduce_eat.select_tables(reproduce_eat.load_tables(reproduce_eat.PAPER_RESULTS),
                                             args.tables)
        runs, _ = reproduce_eat.build_plan(args, tables)
        return {key[0]: run.eval_command() for key, run in runs.items()}

    commands = eval_opts()
    assert sorted(commands) == ["CARS196", "CUB200", "InShop"]
    assert not any("DATASETS.TESTS" in c or "DATASETS.NAMES" in c for c in commands.values())
    mapped = eval_opts("--dataset-map", "InShop=MyInShop")
    assert mapped["InShop"][-8:-4] == ["DATASETS.TESTS", '("MyInShop",)', "MODEL.BACKBONE.PRETRAIN",
                                       "False"]
    assert mapped["InShop"][-10:-8] == ["DATASETS.NAMES", '("MyInShop",)']
    assert "DATASETS.TESTS" not in mapped["CUB200"]


@pytest.mark.usefixtures("one_thread")
def test_results_are_read_from_robust_evals_clustering_report(tmp_path, datasets_root, capsys,
                                                             monkeypatch):
    """results.json written by robust_eval --protocol clustering itself (a tiny model on
    SynthReIDTiny, the eval options of the tool's command; the scores made up), read back."""
    import torch
    from fastreid.modeling.meta_arch import build_model

    import robust_eval
    from robustreid.evaluation import robust_clustering

    args = reproduce_eat.parse_args(["--tables", "table-3", "--methods", "eat", "--output",
                                     str(tmp_path / "repro"), "MODEL.BACKBONE.PRETRAIN", "False"])
    tables = reproduce_eat.select_tables(reproduce_eat.load_tables(reproduce_eat.PAPER_RESULTS),
                                         args.tables)
    runs, rows = reproduce_eat.build_plan(args, tables)
    run = runs[("CUB200", "MobileNetV2", "eat")]
    weights = tmp_path / "model.pth"
    torch.save({"model": build_model(make_tiny_cfg(tmp_path)).state_dict()}, weights)
    scores = iter([{"NMI": 60.0, "F1": 20.0, "R@1": 50.0, "R@8": 80.0},   # clean, then PGD-10
                   {"NMI": 30.0, "F1": 5.0, "R@1": 25.0, "R@8": 40.0}])
    monkeypatch.setattr(robust_clustering, "score_clustering", lambda cfg, f, labels: next(scores))
    command = run.eval_command()
    eval_options = command[command.index("--protocol"):command.index("--output") + 2]
    assert robust_eval.main([
        "--config-file", os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml"),
        *eval_options, "--max-queries", "20", "DATASETS.TESTS", "('SynthReIDTiny',)",
        "INPUT.SIZE_TEST", "[64,32]", "DATALOADER.NUM_WORKERS", "0",
        "TEST.CLUSTERING.RECALL_KS", "(1, 8)", "MODEL.WEIGHTS", str(weights)]) == 0
    capsys.readouterr()
    ours = reproduce_eat.read_results(run)
    assert ours["Clean"] == {"NMI": 60.0, "F1": 20.0, "R@1": 50.0, "R@8": 80.0}
    assert {k: ours["PGD-10"][k] for k in ("NMI", "F1", "R@1", "R@8")} == \
        {"NMI": 30.0, "F1": 5.0, "R@1": 25.0, "R@8": 40.0}
    assert ours["PGD-10"]["ERS"] == pytest.approx((50 + 25 + 50 + 50) / 4)
    reproduce_eat.print_tables(runs, rows)
    lines = capsys.readouterr().out.splitlines()
    assert "| CUB200 | MobileNetV2 | eat | PGD-10 | 30.00 (38.02) | 5.00 (4.84) | 25.00 (24.02) | " \
           "40.00 (47.49) | 43.75 |" in lines
    assert "| CUB200 | MobileNetV2 | eat | Clean | 60.00 (56.91) | 20.00 (19.28) | 50.00 (52.78) | " \
           "80.00 (80.48) |  |" in lines

"""tools/evidence.py: statistics over seeds, its reports, resumable runs, input checks; one tiny run."""
import glob
import importlib.util
import json
import math
import os
import shutil

import pytest
import yaml

from conftest import REPO

TOOLS = os.path.join(REPO, "tools")
SPEC = os.path.join(REPO, "configs", "SynthReID", "evidence", "orderings.yml")
BOT = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")
METRIC_AT = os.path.join(REPO, "configs", "SynthReID", "demo_metric_at_R18.yml")
T_975_2 = 4.302653  # Student-t quantile 0.975 with 2 degrees of freedom (tables)


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("evidence_tool", os.path.join(TOOLS, "evidence.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module


# --------------------------------------------------------------------------- statistics

def test_mean_and_sample_std():
    from robustreid.evaluation.intervals import mean_std

    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5 / 3))  # ddof=1, not sqrt(5/4)
    assert mean_std([7.0]) == (7.0, None)  # one seed: no spread to report


def test_paired_t_interval_by_hand():
    from robustreid.evaluation.intervals import paired_interval

    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); 2 -+ 4.302653/sqrt(3) = 2 -+ 2.484138
    low, high = paired_interval([1.0, 2.0, 3.0])
    assert low == pytest.approx(2 - T_975_2 / math.sqrt(3), abs=1e-6)
    assert high == pytest.approx(2 + T_975_2 / math.sqrt(3), abs=1e-6)
    assert high - 2 == pytest.approx(2.484138, abs=1e-6)
    low, high = paired_interval([1.0, 2.0, 3.0], level=0.90)  # t_{0.95,2} = 2.919986
    assert (low, high) == pytest.approx((2 - 2.919986 / math.sqrt(3), 2 + 2.919986 / math.sqrt(3)),
                                        abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        paired_interval([1.0])


def test_bootstrap_interval_is_seeded_and_holds_the_mean():
    from robustreid.evaluation.intervals import paired_interval

    diffs = [0.5, 2.0, 1.0, 3.5, 1.5]
    first = paired_interval(diffs, method="bootstrap", bootstrap_samples=2000, seed=3)
    assert paired_interval(diffs, method="bootstrap", bootstrap_samples=2000, seed=3) == first
    assert paired_interval(diffs, method="bootstrap", bootstrap_samples=2000, seed=4) != first
    low, high = first
    assert min(diffs) <= low < sum(diffs) / len(diffs) < high <= max(diffs)
    # narrower than the t interval here (percentile bootstrap ignores the small-n t quantile)
    t_low, t_high = paired_interval(diffs)
    assert t_low < low and high < t_high


# --------------------------------------------------------------------------- summary and reports

def record(method, seed, clean_map, fna_map):
    return {"method": method, "seed": seed, "metrics": {
        "Clean mAP": clean_map, "Clean Rank-1": 90.0, "FNA 8/255-16 mAP": fna_map,
        "FNA 8/255-16 Rank-1": 10.0}}


def hand_made_results(tool, ci="t"):
    # a - b on FNA mAP: seed 0: 11 - 10 = 1, seed 1: 14 - 12 = 2, seed 2: 12 - 9 = 3 (pairs by seed,
    # whatever the record order)
    records = [record("a", 0, 50.0, 11.0), record("b", 1, 41.0, 12.0), record("a", 1, 52.0, 14.0),
               record("b", 0, 41.0, 10.0), record("a", 2, 54.0, 12.0), record("b", 2, 41.0, 9.0)]
    summary = tool.summarize(records, [("a", "b")], ci=ci, bootstrap_samples=1000, bootstrap_seed=0)
    return {"settings": {"seeds": [0, 1, 2], "robust_eval_options": []},
            "methods": {"a": {"config": METRIC_AT, "overrides": ["ADV_TRAIN.STEPS", "2"],
                              "weights_from": "b"},
                        "b": {"config": BOT, "overrides": [], "weights_from": None}},
            "summary": summary}


def test_summary_cells_and_paired_differences(tool):
    summary = hand_made_results(tool)["summary"]
    assert summary["metrics"] == ["Clean mAP", "Clean Rank-1", "FNA 8/255-16 mAP",
                                  "FNA 8/255-16 Rank-1"]
    cell = summary["cells"]["a"]["Clean mAP"]
    assert (cell["mean"], cell["std"], cell["n"]) == (52.0, 2.0, 3)
    assert cell["values"] == {"0": 50.0, "1": 52.0, "2": 54.0}
    assert summary["cells"]["b"]["Clean Rank-1"]["std"] == 0.0
    fna = next(d for d in summary["differences"] if d["metric"] == "FNA 8/255-16 mAP")
    assert fna["seeds"] == [0, 1, 2] and fna["differences"] == [1.0, 2.0, 3.0]
    assert (fna["n"], fna["mean"]) == (3, 2.0)
    assert (fna["low"], fna["high"]) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-5)
    assert len(summary["differences"]) == 4  # one per metric
    assert summary["interval"] == {"method": "t", "level": 0.95}


def test_markdown_tables(tool):
    lines = tool.markdown(hand_made_results(tool)).splitlines()
    assert "| Method | n | Clean mAP | Clean Rank-1 | FNA 8/255-16 mAP | FNA 8/255-16 Rank-1 |" in lines
    assert "| a | 3 | 52.00 ± 2.00 | 90.00 ± 0.00 | 12.33 ± 1.53 | 10.00 ± 0.00 |" in lines
    assert "## Paired differences A − B (same seed), 95% Student-t interval" in lines
    assert "| a − b | FNA 8/255-16 mAP | 3 | +2.00 | [-0.48, +4.48] | no |" in lines
    assert "| a − b | Clean mAP | 3 | +11.00 | [+6.03, +15.97] | yes |" in lines  # diffs 9, 11, 13: sd 2
    assert lines[-2:] == ["- a: configs/SynthReID/demo_metric_at_R18.yml, fine-tuning b: "
                          "ADV_TRAIN.STEPS 2", "- b: configs/SynthReID/bagtricks_R18.yml"]
    bootstrap = tool.markdown(hand_made_results(tool, ci="bootstrap"))
    assert "95% percentile bootstrap (1000 resamples, seed 0) interval" in bootstrap


# --------------------------------------------------------------------------- runs (faked)

TINY = ["--dataset", "SynthReIDTiny", "--override", "DATALOADER.VERIFY_IMAGES", "False",
        "--override", "SOLVER.IMS_PER_BATCH", "16",  # SynthReIDTiny has 60 training images
        "--attacks", "FNA", "--steps", "1"]


def opt(argv, key):
    return argv[len(argv) - 1 - argv[::-1].index(key) + 1]  # the last value given to key


@pytest.fixture
def fake_runs(tool, monkeypatch):
    """train/evaluate replaced by fakes that write what the real ones would (weights, config dump,
    robust_eval's results.json) and record their argv."""
    from robustreid.config import load_config

    calls = {"train": [], "evaluate": []}

    def train(argv):
        calls["train"].append(argv)
        opts = argv[argv.index("--config-file") + 2:]
        opts = [o for o in opts if o != "--resume"]
        out = opt(argv, "OUTPUT_DIR")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.yaml"), "w") as f:
            f.write(load_config(argv[argv.index("--config-file") + 1], opts).dump())
        with open(os.path.join(out, "model_final.pth"), "wb") as f:
            f.write(out.encode())

    def evaluate(argv):
        calls["evaluate"].append(argv)
        seed, method = int(opt(argv, "ROBUSTREID.SEED")), opt(argv, "OUTPUT_DIR").split(os.sep)[-2]
        bonus = {"base": 0.0, "at": 5.0 + seed}[method]
        report = {"settings": tool.eval_settings(argv), "datasets": [{
            "dataset": "SynthReIDTiny", "clean": {"mAP": 60.0 + seed, "Rank-1": 80.0},
            "cells": [{"label": "FNA 8/255-1", "mAP": 20.0 + seed + bonus, "Rank-1": 30.0}]}]}
        os.makedirs(opt(argv, "--output"), exist_ok=True)
        with open(os.path.join(opt(argv, "--output"), "results.json"), "w") as f:
            json.dump(report, f)

    monkeypatch.setattr(tool, "train", train)
    monkeypatch.setattr(tool, "evaluate", evaluate)
    return calls


def methods_args(tmp_path, *extra):
    return ["--method", f"base={BOT}", "--method", f"at={METRIC_AT}", "weights_from=base",
            "ADV_TRAIN.STEPS", "2", "--compare", "at:base", "--seeds", "2",
            "--output", str(tmp_path / "ev"), *TINY, *extra]


def test_runs_results_json_and_resume(tool, fake_runs, tmp_path, datasets_root, capsys):
    args = methods_args(tmp_path, "--max-queries", "4")
    assert tool.main(args) == 0
    out = capsys.readouterr().out
    assert len(fake_runs["train"]) == 4 and len(fake_runs["evaluate"]) == 4
    # the fine-tuned run starts from the base model of its own seed
    at_seed1 = fake_runs["train"][3]
    assert opt(at_seed1, "MODEL.WEIGHTS") == str(tmp_path / "ev" / "base" / "seed1" / "model_final.pth")
    assert opt(at_seed1, "ROBUSTREID.SEED") == "1" and opt(at_seed1, "ADV_TRAIN.STEPS") == "2"
    assert opt(fake_runs["evaluate"][0], "--max-queries") == "4"  # robust_eval option passed on
    assert "[4/4] at seed 1: started (fine-tuning base/seed1)" in out
    assert "[4/4] at seed 1: finished in " in out

    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["settings"]["seeds"] == [0, 1]
    assert results["settings"]["attacks"] == ["FNA"] and results["settings"]["steps"] == [1]
    assert results["settings"]["robust_eval_options"] == ["--max-queries", "4"]
    assert results["methods"]["at"] == {"config": METRIC_AT, "overrides": ["ADV_TRAIN.STEPS", "2"],
                                        "weights_from": "base"}
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("base", 0), ("at", 0),
                                                                  ("base", 1), ("at", 1)]
    assert results["runs"][3]["metrics"] == {"Clean mAP": 61.0, "Clean Rank-1": 80.0,
                                             "FNA 8/255-1 mAP": 27.0, "FNA 8/255-1 Rank-1": 30.0}
    (fna,) = [d for d in results["summary"]["differences"] if d["metric"] == "FNA 8/255-1 mAP"]
    assert fna["differences"] == [5.0, 6.0] and fna["n"] == 2
    assert "| at − base | FNA 8/255-1 mAP | 2 | +5.50 |" in (tmp_path / "ev" / "results.md").read_text()
    assert (tmp_path / "ev" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| at | 2 | 60.50 ± 0.71 |" in out  # the table is printed

    # Everything is done: a second invocation trains and evaluates nothing.
    assert tool.main(args) == 0
    assert len(fake_runs["train"]) == 4 and len(fake_runs["evaluate"]) == 4
    assert capsys.readouterr().out.count("skipped (finished earlier)") == 4

    # Another attack setting re-evaluates every run, training none.
    assert tool.main(methods_args(tmp_path, "--max-queries", "5")) == 0
    assert len(fake_runs["train"]) == 4 and len(fake_runs["evaluate"]) == 8


def test_partly_trained_run_resumes(tool, fake_runs, tmp_path, datasets_root, capsys):
    assert tool.main(methods_args(tmp_path)) == 0
    run = tmp_path / "ev" / "at" / "seed1"
    (run / "model_final.pth").unlink()  # as if stopped after an intermediate checkpoint
    (run / "last_checkpoint").write_text("model_0000.pth")
    assert tool.main(methods_args(tmp_path)) == 0
    assert len(fake_runs["train"]) == 5 and "--resume" in fake_runs["train"][4]
    assert opt(fake_runs["train"][4], "OUTPUT_DIR") == str(run)
    assert "at seed 1: started (resuming from its last checkpoint)" in capsys.readouterr().out


def test_run_trained_with_another_config_is_refused(tool, fake_runs, tmp_path, datasets_root, capsys):
    assert tool.main(methods_args(tmp_path)) == 0
    capsys.readouterr()
    code = tool.main(methods_args(tmp_path, "--override", "SOLVER.BASE_LR", "0.1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and len(fake_runs["train"]) == 4
    from robustreid.config import load_config

    base_lr = load_config(BOT).SOLVER.BASE_LR
    assert err[0].startswith(f"error: {tmp_path / 'ev' / 'base' / 'seed0'} was trained with another "
                             f"config (SOLVER.BASE_LR: {base_lr} -> 0.1)")


def test_run_dumped_by_older_code_is_reused_when_new_keys_are_at_their_defaults(
        tool, fake_runs, tmp_path, datasets_root, capsys):
    """A config key added after a run was trained is absent from its config.yaml: at its default
    the run trained the same way (reused); set otherwise it did not (refused)."""
    assert tool.main(methods_args(tmp_path)) == 0
    for dumped in (tmp_path / "ev").glob("*/seed*/config.yaml"):
        cfg = yaml.safe_load(dumped.read_text())
        del cfg["ADV_TRAIN"]["SEPARATE_LOSSES"]  # as written before the key existed
        dumped.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert tool.main(methods_args(tmp_path)) == 0
    assert len(fake_runs["train"]) == 4
    assert capsys.readouterr().out.count("skipped (finished earlier)") == 4
    code = tool.main(methods_args(tmp_path, "--override", "ADV_TRAIN.SEPARATE_LOSSES", "True"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "ADV_TRAIN.SEPARATE_LOSSES: None -> True" in err[0]


# --------------------------------------------------------------------------- input checks

@pytest.mark.parametrize("args, message", [
    (["--method", "a=/nonexistent.yml"], "method a: config file not found: /nonexistent.yml"),
    (["--method", f"a={BOT}", "MODEL.NO_SUCH_KEY", "1"], "method a: command-line option: "
                                                          "Non-existent key: MODEL.NO_SUCH_KEY"),
    (["--method", f"a={BOT}", "SOLVER.BASE_LR"], "expected NAME=CONFIG [weights_from=NAME]"),
    (["--method", f"a={BOT}", "--method", f"b={BOT}", "--compare", "a:c"],
     "--compare a:c: unknown method 'c'; methods: a, b"),
    (["--method", f"a={BOT}", "--method", f"b={BOT}", "--compare", "a:b", "--seeds", "1"],
     "--seeds 1: a paired interval needs at least 2 seeds"),
    (["--method", f"a={BOT}", "weights_from=z"], "method a: weights_from 'z' is not a method"),
    (["--method", f"a={BOT}", "--method", f"a={BOT}"], "method 'a' is defined twice"),
    (["--method", f"a={BOT}", "--attacks", "NOPE"], "method a: --attacks: unknown attack(s) ['NOPE']"),
    (["--method", f"a={BOT}", "--attack-option", "FNA:nope=1"], "--attack-option: FNA"),
    (["--method", f"a={BOT}", "--max-queries", "4", "stray"], "unrecognized arguments: stray"),
    (["--method", f"a={BOT}", "--protocol", "clustering", "--guides", "query"],
     "method a: --guides applies to --protocol retrieval only"),
    (["--method", f"a={BOT}", "--protocol", "clustering", "--attacks", "FNA"],
     "method a: --attacks 'FNA': --protocol clustering runs PGD"),
    (["--spec", "/nonexistent.yml"], "--spec: file not found: /nonexistent.yml"),
])
def test_bad_input_is_one_error_line(tool, fake_runs, tmp_path, datasets_root, capsys, args, message):
    code = tool.main([*args, "--dataset", "SynthReIDTiny", "--output", str(tmp_path / "ev")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and message in err[0], err
    assert not fake_runs["train"] and not (tmp_path / "ev").exists()  # stopped before any run


def test_orderings_spec(tool):
    from robustreid.config import load_config

    methods, compare = tool.load_spec(SPEC)
    methods = tool.order_methods(methods)
    names = [m.name for m in methods]
    assert names == ["undefended", "metric_at", "dddefense", "fnes", "discriminator", "self_meta",
                     "clean_adv"]
    assert compare == ["metric_at:undefended", "dddefense:metric_at"]
    assert all(m.weights_from == "undefended" for m in methods[1:])
    configs = {m.name: load_config(m.config, m.overrides) for m in methods}  # every key exists
    switches = lambda c: (c.ADV_TRAIN.ENABLED, c.ADV_TRAIN.INCLUDE_CLEAN,  # noqa: E731
                          c.ADV_TRAIN.FNES.ENABLED, c.ADV_TRAIN.DISCRIMINATOR.ENABLED,
                          c.META_LEARNING.ENABLED)
    assert switches(configs["undefended"]) == (False, False, False, False, False)
    assert switches(configs["metric_at"]) == (True, False, False, False, False)
    assert switches(configs["fnes"]) == (True, False, True, False, False)
    assert switches(configs["discriminator"]) == (True, True, False, True, False)
    assert switches(configs["self_meta"]) == (True, True, False, False, True)
    assert switches(configs["clean_adv"]) == (True, True, False, False, False)
    assert switches(configs["dddefense"]) == (True, True, True, True, True)
    # the ablations differ from Metric AT only in their switches (same schedule and attack)
    for name in ("fnes", "discriminator", "self_meta", "clean_adv"):
        assert configs[name].SOLVER.MAX_EPOCH == configs["metric_at"].SOLVER.MAX_EPOCH
        assert configs[name].ADV_TRAIN.STEPS == configs["metric_at"].ADV_TRAIN.STEPS


# --------------------------------------------------------------------------- end to end

@pytest.mark.usefixtures("one_thread")
def test_tiny_end_to_end(tool, tmp_path, datasets_root, capsys):
    """Real training and robust evaluation: 1 epoch, 2 seeds, FNA with 1 step on 4 queries."""
    overrides = ["INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]",
                 "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "16", "TEST.IMS_PER_BATCH",
                 "32", "SOLVER.MAX_EPOCH", "1", "SOLVER.STEPS", "[1]", "SOLVER.WARMUP_ITERS", "0",
                 "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.EVAL_PERIOD", "1"]
    args = ["--method", f"bot={BOT}", *overrides, "--seeds", "2", "--max-queries", "4",
            "--output", str(tmp_path / "ev"), *TINY]
    assert tool.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("finished in") == 2
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    runs = results["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert all(set(r["metrics"]) == {"Clean mAP", "Clean Rank-1", "FNA 8/255-1 mAP",
                                     "FNA 8/255-1 Rank-1"} for r in runs)
    assert runs[0]["weights_sha256"] != runs[1]["weights_sha256"]  # the seeds trained two models
    cell = results["summary"]["cells"]["bot"]["Clean mAP"]
    assert cell["n"] == 2 and cell["std"] is not None
    assert (tmp_path / "ev" / "bot" / "seed1" / "console.log").stat().st_size > 0
    assert tool.main(args) == 0
    assert capsys.readouterr().out.count("skipped (finished earlier)") == 2


# --------------------------------------------------------------------------- clustering, EAT

EAT = os.path.join(REPO, "configs", "SynthReID", "eat_R18.yml")
EAT3 = os.path.join(REPO, "configs", "SynthReID", "evidence", "eat3.yml")


def fake_clustering_evaluate(tool, fake_runs, nmi):
    """An evaluate that writes robust_eval --protocol clustering's report (NMI, F1, R@k and ERS),
    the attacked NMI of a method's seed being ``nmi(method, seed)``, and records its argv."""
    def evaluate(argv):
        fake_runs["evaluate"].append(argv)
        seed, method = int(opt(argv, "ROBUSTREID.SEED")), opt(argv, "OUTPUT_DIR").split(os.sep)[-2]
        report = {"settings": tool.eval_settings(argv), "datasets": [{
            "dataset": "SynthReIDTiny", "metrics": ["NMI", "F1", "R@1"],
            "clean": {"NMI": 60.0, "F1": 20.0, "R@1": 50.0},
            "cells": [{"label": "PGD-10 8/255", "NMI": nmi(method, seed), "F1": 5.0, "R@1": 10.0,
                       "ERS": 50.0 + seed}]}]}
        os.makedirs(opt(argv, "--output"), exist_ok=True)
        with open(os.path.join(opt(argv, "--output"), "results.json"), "w") as f:
            json.dump(report, f)

    return evaluate


def test_clustering_protocol_reaches_robust_eval_and_eat_fine_tunes_its_members(
        tool, fake_runs, tmp_path, datasets_root, monkeypatch, capsys):
    monkeypatch.setattr(tool, "evaluate", fake_clustering_evaluate(
        tool, fake_runs, lambda method, seed: {"base": 20.0, "eat": 30.0 + seed}[method]))
    args = ["--method", f"base={BOT}", "--method", f"eat={EAT}", "weights_from=base",
            "--compare", "eat:base", "--seeds", "2", "--protocol", "clustering",
            "--output", str(tmp_path / "ev"), *TINY[:8], "--max-queries", "20"]  # TINY's data
    assert tool.main(args) == 0
    capsys.readouterr()
    evaluated = fake_runs["evaluate"][0]
    assert [opt(evaluated, k) for k in ("--protocol", "--attacks", "--eps", "--steps",
                                        "--max-queries")] == ["clustering", "SMA", "8", "10", "20"]
    # the ensemble's members start from the single model of the same seed, MODEL.WEIGHTS unset
    eat_seed1 = fake_runs["train"][3]
    assert opt(eat_seed1, "EAT.MEMBER_WEIGHTS") == str(tmp_path / "ev" / "base" / "seed1" /
                                                       "model_final.pth")
    assert "MODEL.WEIGHTS" not in eat_seed1
    assert "MODEL.WEIGHTS" not in fake_runs["train"][0]  # base trains from scratch

    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["settings"]["protocol"] == "clustering"
    assert (results["settings"]["attacks"], results["settings"]["steps"]) == (["SMA"], [10])
    assert results["runs"][3]["metrics"] == {
        "Clean NMI": 60.0, "Clean F1": 20.0, "Clean R@1": 50.0, "PGD-10 8/255 NMI": 31.0,
        "PGD-10 8/255 F1": 5.0, "PGD-10 8/255 R@1": 10.0, "PGD-10 8/255 ERS": 51.0}
    (nmi,) = [d for d in results["summary"]["differences"] if d["metric"] == "PGD-10 8/255 NMI"]
    assert nmi["differences"] == [10.0, 11.0]
    table = (tmp_path / "ev" / "results.md").read_text()
    assert "NMI, F1 and Recall@k (%) in the clustering protocol" in table
    assert "| eat − base | PGD-10 8/255 NMI | 2 | +10.50 |" in table
    # done: a second call evaluates nothing; the retrieval protocol is another evaluation
    assert tool.main(args) == 0 and len(fake_runs["evaluate"]) == 4
    assert tool.main([a for a in args if a not in ("--protocol", "clustering")]) == 0
    assert len(fake_runs["evaluate"]) == 8 and len(fake_runs["train"]) == 4


def test_eat3_spec_fine_tunes_at_and_eat_from_the_undefended_model_and_compares_them(
        tool, fake_runs, tmp_path, datasets_root, monkeypatch, capsys):
    """configs/SynthReID/evidence/eat3.yml (issue 14's "Done when") with its header's options:
    the commands it builds (train and evaluation faked)."""
    configs = os.path.join(REPO, "configs", "SynthReID")
    methods, compare = tool.load_spec(EAT3)
    assert methods == [
        tool.Method("undefended", os.path.join(configs, "bagtricks_R18.yml"), []),
        tool.Method("at", os.path.join(configs, "at_R18.yml"), [], "undefended"),
        tool.Method("eat", os.path.join(configs, "eat_R18.yml"), [], "undefended")]
    assert compare == ["eat:at", "at:undefended"]
    monkeypatch.setattr(tool, "evaluate", fake_clustering_evaluate(
        tool, fake_runs, lambda method, seed: {"undefended": 5.0, "at": 20.0, "eat": 30.0}[method]
        + seed))
    out = tmp_path / "ev"
    assert tool.main(["--spec", EAT3, "--protocol", "clustering", "--seeds", "3", "--output",
                      str(out), *TINY[:8]]) == 0  # TINY's data
    capsys.readouterr()
    trains = {(opt(a, "OUTPUT_DIR").split(os.sep)[-2], int(opt(a, "ROBUSTREID.SEED"))): a
              for a in fake_runs["train"]}
    assert len(fake_runs["train"]) == len(trains) == 9
    for seed in range(3):
        undefended = str(out / "undefended" / f"seed{seed}" / "model_final.pth")
        for method, config, starts in (("undefended", "bagtricks_R18.yml", None),
                                       ("at", "at_R18.yml", "MODEL.WEIGHTS"),
                                       ("eat", "eat_R18.yml", "EAT.MEMBER_WEIGHTS")):
            argv = trains[method, seed]
            assert opt(argv, "--config-file") == os.path.join(configs, config)
            for key in ("MODEL.WEIGHTS", "EAT.MEMBER_WEIGHTS"):  # the source of the same seed
                assert (opt(argv, key) if key in argv else None) == \
                    (undefended if key == starts else None), (method, seed, key)
    assert len(fake_runs["evaluate"]) == 9
    assert all([opt(argv, k) for k in ("--protocol", "--attacks", "--eps", "--steps")] ==
               ["clustering", "SMA", "8", "10"] for argv in fake_runs["evaluate"])
    results = json.loads((out / "results.json").read_text())
    nmi = {(d["a"], d["b"]): d["differences"] for d in results["summary"]["differences"]
           if d["metric"] == "PGD-10 8/255 NMI"}
    assert nmi == {("eat", "at"): [10.0] * 3, ("at", "undefended"): [15.0] * 3}
    assert {d["metric"] for d in results["summary"]["differences"]} >= {"PGD-10 8/255 R@1"}


def test_same_configs_from_another_checkout_are_not_reevaluated(tool, fake_runs, tmp_path,
                                                                datasets_root, capsys):
    """A spec rerun from another worktree names the same configs by other paths: the runs (same
    config contents, same weights) are reused, not re-evaluated."""
    assert tool.main(methods_args(tmp_path)) == 0
    moved = tmp_path / "checkout"
    shutil.copytree(os.path.dirname(os.path.dirname(BOT)), moved)
    bot, metric_at = (str(moved / os.path.relpath(p, os.path.dirname(os.path.dirname(BOT))))
                      for p in (BOT, METRIC_AT))
    args = ["--method", f"base={bot}", "--method", f"at={metric_at}", "weights_from=base",
            "ADV_TRAIN.STEPS", "2", "--compare", "at:base", "--seeds", "2",
            "--output", str(tmp_path / "ev"), *TINY]
    capsys.readouterr()
    assert tool.main(args) == 0
    assert len(fake_runs["train"]) == 4 and len(fake_runs["evaluate"]) == 4
    assert capsys.readouterr().out.count("skipped (finished earlier)") == 4


@pytest.mark.parametrize("spec", sorted(glob.glob(os.path.join(REPO, "configs", "**", "evidence",
                                                                "*.yml"), recursive=True)),
                         ids=lambda p: os.path.relpath(p, REPO))
def test_every_shipped_spec_loads_and_its_overrides_exist(tool, spec):
    """A spec in the repo names configs that exist and overrides that are config keys, and its
    comparisons name its methods: a typo fails here, not hours into a run."""
    from robustreid.config import load_config

    methods, compare = tool.load_spec(spec)
    methods = tool.order_methods(methods)
    tool.parse_comparisons(compare, [m.name for m in methods], 3)
    for m in methods:
        load_config(m.config, m.overrides)


def test_paper_steps_spec_differs_from_orderings_only_in_the_training_attacks_steps(tool):
    from robustreid.config import load_config

    methods = {m.name: m for m in tool.load_spec(
        os.path.join(REPO, "configs", "SynthReID", "evidence", "paper_steps.yml"))[0]}
    for name in ("metric_at", "dddefense"):
        four = load_config(methods[name].config, methods[name].overrides)
        eight = load_config(methods[f"{name}_steps8"].config, methods[f"{name}_steps8"].overrides)
        assert (four.ADV_TRAIN.STEPS, eight.ADV_TRAIN.STEPS) == (4, 8)
        eight.defrost()
        eight.ADV_TRAIN.STEPS = 4
        assert eight.dump() == four.dump()


def test_finished_run_copied_into_another_output_is_reused(tool, fake_runs, tmp_path,
                                                           datasets_root, capsys):
    """The undefended models of one spec copied into another spec's --output (as the MP-SNN and
    EAT specs share orderings' models): the copy trained the same way, only its OUTPUT_DIR in
    config.yaml differs; it is evaluated there, not refused and not retrained."""
    assert tool.main(methods_args(tmp_path)) == 0
    other = tmp_path / "other"
    for seed in (0, 1):
        shutil.copytree(tmp_path / "ev" / "base" / f"seed{seed}", other / "base" / f"seed{seed}",
                        ignore=shutil.ignore_patterns("robust_eval"))
    args = ["--method", f"base={BOT}", "--seeds", "2", "--output", str(other), *TINY]
    capsys.readouterr()
    assert tool.main(args) == 0
    assert len(fake_runs["train"]) == 4 and len(fake_runs["evaluate"]) == 6
    assert capsys.readouterr().out.count("started (trained earlier, evaluating)") == 2


def test_only_splits_a_study_across_processes(tool, fake_runs, tmp_path, datasets_root, capsys):
    """--only runs the matching runs and writes no table; a fine-tuning run whose source is not
    trained yet is refused by name; the full command afterwards only aggregates."""
    assert tool.main(methods_args(tmp_path, "--only", "at/seed1")) == 2
    assert "at seed 1 fine-tunes base/seed1, which has no model_final.pth yet" in capsys.readouterr().err
    assert not fake_runs["train"]

    assert tool.main(methods_args(tmp_path, "--only", "base/*")) == 0
    assert tool.main(methods_args(tmp_path, "--only", "at/seed1", "--only", "at/seed0")) == 0
    out = capsys.readouterr().out
    assert [opt(a, "OUTPUT_DIR").split(os.sep)[-2:] for a in fake_runs["train"]] == [
        ["base", "seed0"], ["base", "seed1"], ["at", "seed0"], ["at", "seed1"]]
    assert "selected run(s) done" in out and not (tmp_path / "ev" / "results.json").exists()

    assert tool.main(methods_args(tmp_path)) == 0
    assert len(fake_runs["train"]) == 4 and len(fake_runs["evaluate"]) == 4
    assert capsys.readouterr().out.count("skipped (finished earlier)") == 4
    assert (tmp_path / "ev" / "results.json").exists()

    assert tool.main(methods_args(tmp_path, "--only", "eat/*")) == 2
    assert "--only 'eat/*' matches no run; runs: base/seed0, at/seed0" in capsys.readouterr().err


def test_prune_checkpoints_keeps_final_and_best_of_finished_runs_only(tool, fake_runs, tmp_path,
                                                                      datasets_root, capsys,
                                                                      monkeypatch):
    """--prune-checkpoints deletes model_<epoch>.pth of a run once it is finished (trained now or
    earlier) and evaluated; model_final/model_best stay; an unfinished run keeps what it resumes
    from."""
    import run_state

    fake_train = tool.train

    def train_with_epoch_checkpoints(argv):
        fake_train(argv)
        out = opt(argv, "OUTPUT_DIR")
        for name in ("model_0000.pth", "model_0001.pth", "model_best.pth"):
            with open(os.path.join(out, name), "wb") as f:
                f.write(b"\0" * 2 ** 20)

    monkeypatch.setattr(tool, "train", train_with_epoch_checkpoints)
    assert tool.main(methods_args(tmp_path, "--only", "base/seed0")) == 0
    base0 = tmp_path / "ev" / "base" / "seed0"
    assert (base0 / "model_0001.pth").exists()  # without the option nothing is deleted

    assert tool.main(methods_args(tmp_path, "--prune-checkpoints")) == 0
    out = capsys.readouterr().out
    assert "[1/4] base seed 0: skipped (finished earlier); 2 MB of intermediate checkpoints deleted" in out
    assert out.count("; 2 MB of intermediate checkpoints deleted") == 4  # 3 trained now
    for run in ("base/seed0", "base/seed1", "at/seed0", "at/seed1"):
        assert sorted(p.name for p in (tmp_path / "ev" / run).glob("*.pth")) == [
            "model_best.pth", "model_final.pth"]

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "model_0000.pth").write_bytes(b"\0")
    assert run_state.prune_checkpoints(str(unfinished)) == 0
    assert (unfinished / "model_0000.pth").exists()

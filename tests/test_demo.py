"""tools/demo.py: its verdict on the papers' orderings, and the whole run at toy size (the real demo
takes ~15 CPU minutes)."""
from conftest import load_tool


def report(**maps):
    return {"datasets": [{"cells": [{"attack": a, "mAP": m} for a, m in maps.items()]}]}


def test_orderings_say_which_claim_holds_cell_by_cell():
    demo = load_tool("demo")
    lines = demo.ordering_lines({
        "undefended": report(FNA=4.6, SMA=30.7, IFGSM=3.2),
        "metric_at": report(FNA=38.9, SMA=60.4, IFGSM=27.0),
        "dddefense": report(FNA=28.9, SMA=70.0, IFGSM=30.0)})
    assert lines == [
        "metric_at >= undefended (the papers' ordering, mAP): reproduced in this run "
        "(FNA 38.9 vs 4.6; SMA 60.4 vs 30.7; IFGSM 27.0 vs 3.2)",
        "dddefense >= metric_at (the papers' ordering, mAP): NOT reproduced in this run "
        "(FNA 28.9 vs 38.9)"]  # only FNA is DDDefense's claim: its SMA/IFGSM lead is not read


def test_one_failing_attack_fails_the_claim_and_missing_stages_are_skipped():
    demo = load_tool("demo")
    lines = demo.ordering_lines({"undefended": report(FNA=4.6, SMA=61.0, IFGSM=3.2),
                                 "metric_at": report(FNA=38.9, SMA=60.4, IFGSM=27.0)})
    assert len(lines) == 1 and "NOT reproduced" in lines[0] and "SMA 60.4 vs 61.0" in lines[0]
    assert demo.ordering_lines({"undefended": report(FNA=1.0)}) == []


def test_the_demo_runs_end_to_end_on_tiny_data(tmp_path, datasets_root, capsys):
    # README's main command (`make demo`) at toy size: every stage trains one epoch on
    # SynthReIDTiny, is attacked and reported; the stages chain their weights.
    import json
    import os

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = load_tool("demo").main([
            "--output", str(tmp_path / "demo"), "DATASETS.NAMES", "('SynthReIDTiny',)",
            "DATASETS.TESTS", "('SynthReIDTiny',)", "INPUT.SIZE_TRAIN", "[64,32]",
            "INPUT.SIZE_TEST", "[64,32]", "DATALOADER.NUM_WORKERS", "0",
            "SOLVER.IMS_PER_BATCH", "16", "SOLVER.MAX_EPOCH", "1", "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.STEPS", "[1]", "TEST.EVAL_PERIOD", "1", "TEST.IMS_PER_BATCH", "32"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0
    assert "| Undefended BoT R18 | SynthReIDTiny |" in out and "metric_at >= undefended" in out
    for stage in ("undefended", "metric_at", "dddefense"):
        assert os.path.exists(tmp_path / "demo" / stage / "model_final.pth")
        report = json.loads((tmp_path / "demo" / stage / "robust_eval" / "results.json").read_text())
        cells = report["datasets"][0]["cells"]
        assert [c["label"] for c in cells] == ["FNA 8/255-16", "SMA 8/255-16", "IFGSM 8/255-16"]
        assert all(c["within_budget"] for c in cells)
    # later stages start from the undefended model, not from scratch
    config = (tmp_path / "demo" / "dddefense" / "config.yaml").read_text()
    assert str(tmp_path / "demo" / "undefended" / "model_final.pth") in config

"""tools/demo.py's verdict on the papers' orderings (the demo itself takes ~15 CPU minutes)."""
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

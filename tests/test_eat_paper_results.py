"""configs/EAT/paper_results.json: EAT's Tables 1-4 as printed (the paper text in
../shared/papers/eat-ensemble-adversarial-training-dml.txt), cells pinned by hand, the OCR defects'
readings checked against the cross-table identity (Table 3's "EAT w/ Data Split" is Table 1's
CUB200 PAL + EAT row)."""
import json
import os

import pytest

from conftest import REPO

PATH = os.path.join(REPO, "configs", "EAT", "paper_results.json")
METHODS = ["pal", "at", "mixup", "iat", "trades", "eat"]


@pytest.fixture(scope="module")
def tables():
    with open(PATH, encoding="utf-8") as f:
        return {t["id"]: t for t in json.load(f)["tables"]}


def row(tables, tid, **keys):
    rows = [r for r in tables[tid]["rows"] if all(r[k] == v for k, v in keys.items())]
    assert len(rows) == 1, (tid, keys)
    return rows[0]["values"]


def test_every_row_of_tables_1_to_4(tables):
    assert list(tables) == ["table-1", "table-2", "table-3", "table-4"]
    layout = {tid: [(r["dataset"], r["backbone"], r["method"]) for r in t["rows"]]
              for tid, t in tables.items()}
    assert layout == {
        "table-1": [(d, "MobileNetV2", m) for d in ("CUB200", "CARS196") for m in METHODS],
        "table-2": [("CUB200", "BNInception", m) for m in METHODS],
        "table-3": [("CUB200", "MobileNetV2", m) for m in ("naive_ensemble", "eat_no_split", "eat")],
        "table-4": [("InShop", "MobileNetV2", m) for m in METHODS]}
    assert tables["table-1"]["columns"] == tables["table-2"]["columns"] == \
        ["NMI", "F1", "R@1", "R@2", "R@4", "R@8"]
    assert tables["table-3"]["columns"] == ["NMI", "F1", "R@1", "R@8"]
    assert tables["table-4"]["columns"] == ["NMI", "F1", "R@1", "R@10", "R@20"]


def test_cells_are_numbers_and_recall_grows_with_k(tables):
    """Every printed cell a percentage; Table 2's body is missing from the text (null, marked)."""
    for tid, table in tables.items():
        recalls = [c for c in table["columns"] if c.startswith("R@")]
        for r in table["rows"]:
            assert list(r["values"]) == table["modes"] == ["Clean", "PGD-10"]
            for mode, cells in r["values"].items():
                assert list(cells) == table["columns"]
                if r.get("unreadable"):
                    assert tid == "table-2" and set(cells.values()) == {None}
                    continue
                assert all(isinstance(v, float) and 0 < v < 100 for v in cells.values()), (tid, r)
                assert [cells[k] for k in recalls] == sorted(cells[k] for k in recalls), (tid, r)
                if mode == "PGD-10":  # the attack lowers every metric
                    clean = r["values"]["Clean"]
                    assert all(cells[c] < clean[c] for c in table["columns"]), (tid, r)
    assert all(r.get("unreadable") for r in tables["table-2"]["rows"])


PINNED = [  # (table, dataset, method, mode, column, value as printed)
    ("table-1", "CUB200", "pal", "Clean", "NMI", 59.97),   # header printed "NM."
    ("table-1", "CUB200", "eat", "PGD-10", "R@1", 24.02),
    ("table-1", "CUB200", "mixup", "PGD-10", "R@8", 26.85),
    ("table-1", "CARS196", "pal", "PGD-10", "F1", 0.97),    # printed ". 97"
    ("table-1", "CARS196", "trades", "PGD-10", "F1", 0.93),  # printed ".93"
    ("table-1", "CARS196", "at", "Clean", "R@1", 39.97),
    ("table-1", "CARS196", "eat", "PGD-10", "R@8", 54.21),
    ("table-3", "CUB200", "naive_ensemble", "PGD-10", "R@8", 40.91),
    ("table-3", "CUB200", "eat_no_split", "Clean", "NMI", 59.28),
    ("table-3", "CUB200", "eat", "Clean", "NMI", 56.91),     # printed "5691"
    ("table-4", "InShop", "pal", "Clean", "R@20", 86.70),    # row label printed "PAL."
    ("table-4", "InShop", "iat", "PGD-10", "F1", 8.80),
    ("table-4", "InShop", "eat", "PGD-10", "R@10", 66.16),
]


@pytest.mark.parametrize("tid, dataset, method, mode, column, value", PINNED)
def test_pinned_cells(tables, tid, dataset, method, mode, column, value):
    assert row(tables, tid, dataset=dataset, method=method)[mode][column] == value


def test_table_3_ours_is_table_1s_cub200_eat_row(tables):
    full = row(tables, "table-1", dataset="CUB200", method="eat")
    for mode, cells in row(tables, "table-3", method="eat").items():
        assert cells == {c: full[mode][c] for c in cells}

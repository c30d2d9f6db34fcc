"""configs/DDDefense/paper_results.json: the DDDefense paper's results tables (main 1-5, supp 1-7).

Schema checks plus cells pinned by hand against the paper text, including the cross-table identities
used to recover main Table 2's OCR-garbled column order (Ours == Table 3 'All modules' == Table 4 'Ours')."""
import json
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(REPO, "configs", "DDDefense", "paper_results.json")

TABLE_IDS = [f"main-{i}" for i in range(1, 6)] + [f"supp-{i}" for i in range(1, 8)]
DATASETS = {"Market1501", "DukeMTMC", "CUHK03", "MSMT17", "CIFAR10"}
BACKBONES = {"R18", "R50", "R101", "APNet", "OSNet", "ViT"}
METHODS = {"origin", "bit_squeezing", "median_smoothing", "bs_ms", "amd", "adv_train", "das", "dddefense",
           "metric_at", "metric_at_diffusion", "metric_at_adversarial_learning", "metric_at_self_meta",
           "metric_at_fnes", "at_pgd", "none",
           "at", "at_finetuned_classifier"}  # main-1 (CIFAR-10) rows
ATTACK_COLUMN = re.compile(r"^(FNA|SMA|IFGSM) (8|10)/255-16$")
SCALAR_TABLES = {"main-1", "supp-7"}  # cells are single numbers, not [mAP, Rank-1]


@pytest.fixture(scope="module")
def data():
    with open(PATH, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tables(data):
    return {t["id"]: t for t in data["tables"]}


def cell(tables, tid, column, **keys):
    rows = [r for r in tables[tid]["rows"] if all(r.get(k) == v for k, v in keys.items())]
    assert len(rows) == 1, (tid, keys, len(rows))
    return rows[0]["values"][column]


def row_values(tables, tid, **keys):
    rows = [r for r in tables[tid]["rows"] if all(r.get(k) == v for k, v in keys.items())]
    assert len(rows) == 1, (tid, keys, len(rows))
    return rows[0]["values"]


# --- schema -----------------------------------------------------------------------------------------
def test_tables_present_in_order(data):
    assert "DDDefense" in data["source"]
    assert [t["id"] for t in data["tables"]] == TABLE_IDS
    counts = {t["id"]: len(t["rows"]) for t in data["tables"]}
    assert counts == {"main-1": 4, "main-2": 16, "main-3": 12, "main-4": 6, "main-5": 6, "supp-1": 16,
                      "supp-2": 6, "supp-3": 48, "supp-4": 12, "supp-5": 8, "supp-6": 6, "supp-7": 12}


def test_schema(data):
    for t in data["tables"]:
        tid, cols = t["id"], t["columns"]
        assert t["title"] and len(set(cols)) == len(cols)
        if tid == "main-1":
            assert cols == ["Clean", "PGD"]
        elif tid == "supp-7":
            assert cols == ["cost (s/epoch)"]
        else:
            assert all(c == "Clean" or ATTACK_COLUMN.match(c) for c in cols), cols
        for r in t["rows"]:
            assert r["dataset"] in DATASETS and r["backbone"] in BACKBONES and r["method"] in METHODS, r
            assert set(r["values"]) == set(cols), (tid, r)
            unreadable = set(r.get("unreadable", []))
            assert unreadable <= set(cols)
            for c in cols:
                v = r["values"][c]
                if c in unreadable:
                    assert v is None
                elif tid in SCALAR_TABLES:
                    assert isinstance(v, float) and v > 0, (tid, r)
                else:
                    assert isinstance(v, list) and len(v) == 2, (tid, r, c)
                    assert all(isinstance(x, float) and 0.0 <= x <= 100.0 for x in v), (tid, r, c)
            if "test_dataset" in r:
                assert r["test_dataset"] in DATASETS and r["test_dataset"] != r["dataset"]
        if tid in ("main-5", "supp-2"):
            assert all("test_dataset" in r for r in t["rows"])
        if tid == "supp-3":
            assert all(r["source"] in BACKBONES for r in t["rows"])
        if tid == "supp-5":
            assert [r["batch_size"] for r in t["rows"]] == [32, 64, 128, 256] * 2


def test_only_the_known_unreadable_cells(data):
    holes = [(t["id"], r["dataset"], r["method"]) for t in data["tables"] for r in t["rows"] if r.get("unreadable")]
    assert holes == [("supp-2", "Market1501", "metric_at"), ("supp-2", "Market1501", "dddefense")]


def test_column_orders_as_printed(tables):
    t3 = ["Clean", "FNA 8/255-16", "SMA 8/255-16", "IFGSM 8/255-16", "FNA 10/255-16", "SMA 10/255-16", "IFGSM 10/255-16"]
    t5 = ["Clean", "FNA 8/255-16", "FNA 10/255-16", "SMA 8/255-16", "SMA 10/255-16", "IFGSM 8/255-16", "IFGSM 10/255-16"]
    assert tables["main-3"]["columns"] == tables["main-4"]["columns"] == t3
    assert tables["main-2"]["columns"] == tables["main-5"]["columns"] == t5
    assert tables["supp-1"]["columns"] == tables["supp-2"]["columns"] == t5


# --- cross-table identities --------------------------------------------------------------------------
@pytest.mark.parametrize("ds", ["Market1501", "DukeMTMC"])
def test_ours_identical_across_main_2_3_4(tables, ds):
    t2 = row_values(tables, "main-2", dataset=ds, method="dddefense")
    assert t2 == row_values(tables, "main-3", dataset=ds, method="dddefense")
    assert t2 == row_values(tables, "main-4", dataset=ds, method="dddefense")
    assert row_values(tables, "main-3", dataset=ds, method="metric_at") == \
        row_values(tables, "main-4", dataset=ds, method="metric_at")


def test_batch_64_equals_main_tables(tables):
    for method in ("metric_at", "dddefense"):
        main = row_values(tables, "main-3", dataset="Market1501", method=method)
        supp = row_values(tables, "supp-5", method=method, batch_size=64)
        assert supp == {k: main[k] for k in supp}


# --- hand-pinned cells ----------------------------------------------------------------------------------
PINNED = [
    # main-1 (CIFAR-10 accuracy)
    ("main-1", "Clean", dict(backbone="R18", method="at"), 87.273),
    ("main-1", "PGD", dict(backbone="R50", method="at_finetuned_classifier"), 50.218),
    # main-2 (garbled header; Ours Market row is Table 3's All-modules row)
    ("main-2", "Clean", dict(dataset="Market1501", method="origin"), [78.49, 92.01]),
    ("main-2", "FNA 8/255-16", dict(dataset="Market1501", method="origin"), [0.20, 0.17]),
    ("main-2", "FNA 10/255-16", dict(dataset="Market1501", method="dddefense"), [24.80, 45.93]),
    ("main-2", "SMA 8/255-16", dict(dataset="Market1501", method="dddefense"), [50.13, 72.60]),
    ("main-2", "IFGSM 10/255-16", dict(dataset="Market1501", method="dddefense"), [31.20, 54.22]),
    ("main-2", "SMA 10/255-16", dict(dataset="DukeMTMC", method="das"), [19.36, 29.89]),
    ("main-2", "IFGSM 8/255-16", dict(dataset="DukeMTMC", method="adv_train"), [16.64, 29.94]),
    # main-3 (ablation)
    ("main-3", "SMA 8/255-16", dict(dataset="Market1501", method="metric_at_fnes"), [49.25, 71.11]),
    ("main-3", "IFGSM 10/255-16", dict(dataset="DukeMTMC", method="metric_at_diffusion"), [24.93, 43.67]),
    # main-4
    ("main-4", "Clean", dict(dataset="Market1501", method="at_pgd"), [64.24, 85.48]),
    ("main-4", "SMA 10/255-16", dict(dataset="DukeMTMC", method="at_pgd"), [29.16, 45.47]),
    # main-5 (cross-dataset, header Clean, FNA 8, FNA 10, SMA 8, SMA 10, IFGSM 8, IFGSM 10)
    ("main-5", "FNA 10/255-16", dict(dataset="Market1501", test_dataset="DukeMTMC", method="metric_at"), [2.96, 9.07]),
    ("main-5", "SMA 8/255-16", dict(dataset="DukeMTMC", test_dataset="Market1501", method="dddefense"), [14.16, 34.32]),
    ("main-5", "Clean", dict(dataset="DukeMTMC", test_dataset="Market1501", method="none"), [25.18, 53.47]),
    # supp-1 (APNet white-box)
    ("supp-1", "SMA 8/255-16", dict(dataset="Market1501", method="dddefense"), [59.10, 79.63]),
    ("supp-1", "FNA 10/255-16", dict(dataset="DukeMTMC", method="das"), [7.31, 13.06]),
    # supp-2 (APNet cross-dataset)
    ("supp-2", "IFGSM 10/255-16", dict(dataset="DukeMTMC", method="metric_at"), [7.62, 23.64]),
    ("supp-2", "FNA 8/255-16", dict(dataset="Market1501", method="none"), [2.36, 4.49]),
    ("supp-2", "SMA 8/255-16", dict(dataset="Market1501", method="dddefense"), [13.55, 24.24]),
    ("supp-2", "Clean", dict(dataset="Market1501", method="metric_at"), None),
    # supp-3 (black-box)
    ("supp-3", "SMA 8/255-16", dict(dataset="Market1501", backbone="R50", source="ViT", method="metric_at"), [62.28, 84.26]),
    ("supp-3", "IFGSM 8/255-16", dict(dataset="DukeMTMC", backbone="APNet", source="R101", method="dddefense"), [59.21, 77.67]),
    ("supp-3", "FNA 8/255-16", dict(dataset="DukeMTMC", backbone="R50", source="R50", method="dddefense"), [53.98, 73.92]),
    # supp-4 (CUHK03 / MSMT17)
    ("supp-4", "Clean", dict(dataset="MSMT17", backbone="R50", method="origin"), [48.10, 76.63]),
    ("supp-4", "SMA 8/255-16", dict(dataset="CUHK03", backbone="APNet", method="dddefense"), [23.34, 20.86]),
    # supp-5 (batch size)
    ("supp-5", "FNA 8/255-16", dict(method="dddefense", batch_size=32), [33.43, 57.87]),
    ("supp-5", "Clean", dict(method="metric_at", batch_size=256), [57.51, 81.29]),
    # supp-6 (ResNet101)
    ("supp-6", "Clean", dict(dataset="Market1501", method="origin"), [86.06, 94.57]),
    ("supp-6", "IFGSM 8/255-16", dict(dataset="DukeMTMC", method="dddefense"), [31.29, 48.74]),
    # supp-7 (training cost, s/epoch)
    ("supp-7", "cost (s/epoch)", dict(dataset="Market1501", backbone="R50", method="origin"), 20.695),
    ("supp-7", "cost (s/epoch)", dict(dataset="DukeMTMC", backbone="APNet", method="dddefense"), 774.5),
    ("supp-7", "cost (s/epoch)", dict(dataset="DukeMTMC", backbone="R50", method="dddefense"), 627.0),
]


@pytest.mark.parametrize("tid,column,keys,expected", PINNED, ids=[f"{p[0]}:{i}" for i, p in enumerate(PINNED)])
def test_pinned_cells(tables, tid, column, keys, expected):
    assert cell(tables, tid, column, **keys) == expected


def test_every_table_has_pins():
    assert {p[0] for p in PINNED} == set(TABLE_IDS)

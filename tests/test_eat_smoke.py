"""End-to-end smoke runs of EAT's paths on a tiny CUB200 (the fixture, 32x32, random init, two
members, one PGD step in training): a configs/EAT row of the EAT method, through its _BASE_ list,
trains and robust_eval --protocol clustering evaluates it; tools/reproduce_eat.py does both for a
table row and prints ours next to the paper's numbers."""
import json
import os
import re

import pytest
import torch

from conftest import REPO, load_tool

pytestmark = pytest.mark.usefixtures("one_thread")

ROW = os.path.join(REPO, "configs", "EAT", "CUB200_MobileNetV2", "eat.yml")
# the row at toy scale: no ImageNet weights, 32x32 crops, 2 members (the clustering evaluator's
# blocks follow), 1 training PGD step, 2 epochs (the first is Proxy-Anchor's warm-up)
TINY_ROW = ["MODEL.BACKBONE.PRETRAIN", "False", "INPUT.SIZE_TRAIN", "[32,32]",
            "INPUT.SIZE_TEST", "[32,32]", "INPUT.CROP.SIZE", "[32,32]", "SOLVER.IMS_PER_BATCH", "8",
            "SOLVER.MAX_EPOCH", "2", "EAT.MEMBERS", "2", "TEST.CLUSTERING.MEMBERS", "2",
            "EAT.STEPS", "1", "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "16"]


@pytest.fixture
def cub200(tmp_path, monkeypatch):
    """A private datasets root with a CUB200 of 6 classes x 4 images (3 train, 3 test: 12 test
    images, more than Recall@8 needs), also for subprocesses."""
    import fastreid.data.build as data_build

    from robustreid.data.dml_fixtures import write_cub200

    root = str(tmp_path / "datasets")
    write_cub200(root, num_classes=6, imgs_per_class=4)
    monkeypatch.setattr(data_build, "_root", root)
    monkeypatch.setenv("FASTREID_DATASETS", root)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return root


def test_an_eat_row_trains_and_robust_eval_clusters_it(cub200, tmp_path, capsys):
    out = tmp_path / "run"
    assert load_tool("train_net").cli(["--config-file", ROW, *TINY_ROW, "OUTPUT_DIR", str(out)]) == 0
    # the row's recipe ran inside the ensemble: Proxy-Anchor in every member, its warm-up
    state = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert sorted(k for k in state if k.endswith("proxies")) == [
        "members.0.proxy_anchor.loss.proxies", "members.1.proxy_anchor.loss.proxies"]
    assert "Proxy-Anchor warm-up: backbone(s) frozen until epoch 1" in (out / "log.txt").read_text()

    report_dir = tmp_path / "eval"
    assert load_tool("robust_eval").main([
        "--config-file", ROW, "--protocol", "clustering", "--steps", "2", "--output",
        str(report_dir), *TINY_ROW, "MODEL.WEIGHTS", str(out / "model_final.pth")]) == 0
    capsys.readouterr()
    (d,) = json.loads((report_dir / "results.json").read_text())["datasets"]
    assert (d["dataset"], d["num_samples"], d["num_classes"]) == ("CUB200", 12, 3)
    assert (d["members"], d["inference"], d["metrics"]) == (2, "vote", ["NMI", "F1", "R@1", "R@2",
                                                                        "R@4", "R@8"])
    (cell,) = d["cells"]
    assert cell["label"] == "PGD-2 8/255" and cell["attack_target"] == "surrogate: mean embedding"
    assert cell["within_budget"] and all(0 <= cell[m] <= 100 for m in d["metrics"])


def test_reproduce_eat_trains_evaluates_and_prints_a_row(cub200, tmp_path, capsys):
    reproduce_eat = load_tool("reproduce_eat")
    args = ["--tables", "table-3", "--methods", "eat", "--output", str(tmp_path / "repro"),
            *TINY_ROW]
    assert reproduce_eat.main(args) == 0
    lines = capsys.readouterr().out.splitlines()

    def row(mode, papers, ers):
        """The table line of the row: "ours (paper)" per column (NMI, F1, R@1, R@8), then ERS*."""
        cells = [rf"\d+\.\d\d \({re.escape(paper)}\)" for paper in papers] + [ers]
        return re.compile(rf"\| CUB200 \| MobileNetV2 \| eat \| {mode} \| " +
                          r" \| ".join(cells) + r" \|")

    clean = row("Clean", ("56.91", "19.28", "52.78", "80.48"), "")
    attacked = row("PGD-10", ("38.02", "4.84", "24.02", "47.49"), r"\d+\.\d\d")  # ours only
    assert any(clean.fullmatch(line) for line in lines), lines
    assert any(attacked.fullmatch(line) for line in lines), lines
    assert reproduce_eat.main(args) == 0  # done: a rerun trains and evaluates nothing
    assert not any(line.startswith("$ ") for line in capsys.readouterr().out.splitlines())

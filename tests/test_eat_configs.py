"""configs/EAT: one config per row of EAT's Tables 1-4, each a list of parts (_BASE_): the recipe
(Base-EAT.yml), a dataset, a backbone (the <Dataset>_<Backbone>.yml combination) and a method;
every row loads as a config."""
import json
import os

import pytest
import yaml

from conftest import REPO

EAT_DIR = os.path.join(REPO, "configs", "EAT")
BASELINES = ("at", "mixup", "iat", "trades")           # DML_DEFENSE.METHOD
ENSEMBLES = {"eat": (True, True), "eat_no_split": (False, True),  # EAT.DATA_SPLIT, SELF_TRANSFER
             "naive_ensemble": (False, False)}
RECALL_KS = {"CUB200": (1, 2, 4, 8), "CARS196": (1, 2, 4, 8), "InShop": (1, 10, 20)}
TEST_SETS = {"InShop": "InShopQuery"}  # EAT's In-Shop test set: the query part alone
BACKBONES = {"MobileNetV2": ("build_mobilenetv2_backbone", 1280),
             "BNInception": ("build_bninception_backbone", 1024)}


def paper_rows():
    with open(os.path.join(EAT_DIR, "paper_results.json")) as f:
        tables = json.load(f)["tables"]
    return sorted({(r["dataset"], r["backbone"], r["method"]) for t in tables for r in t["rows"]})


def row_config(dataset, backbone, method):
    return os.path.join(EAT_DIR, f"{dataset}_{backbone}", f"{method}.yml")


def raw(path):
    with open(path) as f:
        return yaml.safe_load(f) or {}


ROWS = paper_rows()


def test_every_table_row_has_one_config_made_of_its_parts():
    assert len(ROWS) == 26  # Table 1: 12, Table 2: 6, Table 3: 2 more (EAT's is Table 1's), Table 4: 6
    written = {(d.rsplit("_", 1)[0], d.rsplit("_", 1)[1], f[:-4])
               for d in os.listdir(EAT_DIR) if os.path.isdir(os.path.join(EAT_DIR, d)) and "_" in d
               for f in os.listdir(os.path.join(EAT_DIR, d))}
    assert written == set(ROWS)
    for dataset, backbone, method in ROWS:
        row = raw(row_config(dataset, backbone, method))
        assert row == {"_BASE_": [f"../{dataset}_{backbone}.yml", f"../methods/{method}.yml"],
                       "OUTPUT_DIR": f"logs/eat/{dataset}/{backbone}/{method}"}
        combination = raw(os.path.join(EAT_DIR, f"{dataset}_{backbone}.yml"))
        assert combination["_BASE_"] == ["Base-EAT.yml", f"datasets/{dataset}.yml",
                                         f"backbones/{backbone}.yml"]


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_rows_add_only_their_switch_to_the_recipe(method):
    from robustreid.config import read_config_file

    pal = read_config_file(row_config("CUB200", "MobileNetV2", "pal"))
    row = read_config_file(row_config("CUB200", "MobileNetV2", method))
    assert row.pop("DML_DEFENSE") == {"METHOD": method}
    assert row.pop("OUTPUT_DIR") == f"logs/eat/CUB200/MobileNetV2/{method}"
    pal.pop("OUTPUT_DIR")
    assert row == pal


@pytest.mark.parametrize("dataset, backbone, method", ROWS, ids=["/".join(r) for r in ROWS])
def test_rows_load_with_the_papers_recipe(dataset, backbone, method):
    from robustreid.config import load_config

    cfg = load_config(row_config(dataset, backbone, method))
    solver = cfg.SOLVER
    assert (solver.OPT, solver.BASE_LR, solver.MAX_EPOCH, solver.SCHED) == \
        ("AdamW", 1e-4, 200, "CosineAnnealingLR")
    assert tuple(cfg.MODEL.LOSSES.NAME) == ("ProxyAnchorLoss",)
    heads = cfg.MODEL.HEADS
    assert (heads.EMBEDDING_DIM, heads.NECK_FEAT, heads.WITH_BNNECK) == (512, "after", False)
    assert cfg.INPUT.CROP.ENABLED and list(cfg.INPUT.CROP.SIZE) == [224, 224] and cfg.INPUT.FLIP.ENABLED
    assert cfg.MODEL.BACKBONE.PRETRAIN and cfg.MODEL.BACKBONE.PRETRAIN_PATH == ""
    assert (cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.FEAT_DIM) == BACKBONES[backbone]
    assert tuple(cfg.DATASETS.NAMES) == (dataset,)
    assert tuple(cfg.DATASETS.TESTS) == (TEST_SETS.get(dataset, dataset),)
    assert cfg.TEST.EVALUATOR == "ClusteringEvaluator"
    assert tuple(cfg.TEST.CLUSTERING.RECALL_KS) == RECALL_KS[dataset]
    assert cfg.OUTPUT_DIR == f"logs/eat/{dataset}/{backbone}/{method}"
    if method not in ENSEMBLES:
        assert cfg.MODEL.META_ARCHITECTURE == "RobustBaseline" and not cfg.EAT.ENABLED
        assert cfg.DML_DEFENSE.METHOD == ("" if method == "pal" else method)
        return
    eat = cfg.EAT
    assert cfg.MODEL.META_ARCHITECTURE == "EnsembleReID" and eat.ENABLED
    assert (eat.MEMBERS, eat.EPS, eat.STEPS, eat.INFERENCE) == (3, 16.0, 10, "vote")
    assert (eat.DATA_SPLIT, eat.SELF_TRANSFER) == ENSEMBLES[method]
    assert (cfg.TEST.CLUSTERING.MEMBERS, cfg.TEST.CLUSTERING.INFERENCE) == (3, "vote")


@pytest.mark.usefixtures("one_thread")
def test_row_models_build_offline_and_give_the_papers_embeddings():
    import torch
    from fastreid.modeling.meta_arch import build_model
    from fastreid.utils.events import EventStorage

    from robustreid.config import load_config

    offline = ["MODEL.BACKBONE.PRETRAIN", "False", "MODEL.HEADS.NUM_CLASSES", "4",
               "MODEL.DEVICE", "cpu"]
    images = torch.rand(4, 3, 64, 64) * 255
    pal = build_model(load_config(row_config("CUB200", "BNInception", "pal"), offline)).train()
    with EventStorage():
        losses = pal({"images": images.clone(), "targets": torch.arange(4)})
    assert list(losses) == ["loss_proxy_anchor"] and losses["loss_proxy_anchor"] > 0
    eat = build_model(load_config(row_config("CUB200", "MobileNetV2", "eat"), offline)).eval()
    with torch.no_grad():
        blocks = eat({"images": images}).view(4, 3, 512)  # three members' unit embeddings
    assert torch.allclose(blocks.norm(dim=2), torch.ones(4, 3), atol=1e-5)

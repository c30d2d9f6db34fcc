"""ONNX export (robustreid.inference, tools/export_onnx.py): onnxruntime's features equal torch's
for every project architecture, the same Rank-1/mAP on a dataset, and fastreid's export failures."""
import robustreid  # noqa: F401  (first: compat patches make fastreid importable)

import os
import re

import numpy as np
import pytest
import torch
import yaml
from conftest import load_tool, make_tiny_cfg

from robustreid.config import ConfigError
from robustreid.engine import RobustTrainer
from robustreid.inference import (FeatureExtractor, OnnxFeatureExtractor, export_onnx,
                                  load_deploy_config)

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")

ARCHITECTURES = {
    "Baseline": (),
    "RobustBaseline": ("MODEL.META_ARCHITECTURE", "RobustBaseline"),
    "APNet": ("MODEL.BACKBONE.NAME", "build_apnet_backbone"),
    "dual-branch+MLP": ("MODEL.BACKBONE.NAME", "build_dual_branch_backbone",
                        "MODEL.HEADS.NAME", "MLPClassifierHead",
                        "MODEL.BACKBONE.DUAL_BRANCH.NUM_PARTS", "2",
                        "MODEL.BACKBONE.DUAL_BRANCH.PART_DIM", "32",
                        "MODEL.BACKBONE.FEAT_DIM", "576", "MODEL.HEADS.NUM_CLASSES", "12"),
    "MP-SNN noise, off at test time": ("MODEL.META_ARCHITECTURE", "RobustBaseline",
                                       "MODEL.NOISE.ENABLED", "True",
                                       "MODEL.NOISE.TEST_TIME", "False"),
}


def saved_model_cfg(tmp_path, *opts, seed=0):
    """A tiny config with MODEL.WEIGHTS: a seeded random-init model saved as a checkpoint."""
    cfg = make_tiny_cfg(tmp_path / "out", *opts)
    torch.manual_seed(seed)
    model = RobustTrainer.build_model(cfg)
    with torch.no_grad():  # BN statistics away from (0, 1), so the BN layers are really tested
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    weights = str(tmp_path / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    return cfg


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_onnxruntime_features_equal_torch(name, tmp_path, datasets_root):
    cfg = saved_model_cfg(tmp_path, *ARCHITECTURES[name])
    extractor = FeatureExtractor(cfg, batch_size=5)
    path = export_onnx(extractor, tmp_path / "model.onnx")
    images = torch.rand(7, 3, 64, 32, generator=torch.Generator().manual_seed(1)) * 255
    ours = extractor(images)
    theirs = OnnxFeatureExtractor(path, cfg, batch_size=3)(images)  # other batch sizes: dynamic
    assert ours.shape == (7, int(cfg.MODEL.BACKBONE.FEAT_DIM)) and np.abs(ours).max() > 1e-2
    assert np.abs(ours - theirs).max() < 1e-4
    # the extractor leaves the caller's batch as it was (fastreid normalises in place)
    assert torch.equal(images, torch.rand(7, 3, 64, 32, generator=torch.Generator().manual_seed(1))
                       * 255)


def test_export_tool_same_rank1_and_map_on_a_dataset(tmp_path, datasets_root, capsys):
    cfg = saved_model_cfg(tmp_path)
    with open(tmp_path / "config.yml", "w") as f:
        f.write(cfg.dump())
    code = load_tool("export_onnx").main(["--config-file", str(tmp_path / "config.yml"),
                                          "--output", str(tmp_path / "m.onnx"), "--check-dataset",
                                          "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"parity: max \|torch - onnxruntime\| = \S+ on 8 images", out)
    line = [x for x in out.splitlines() if x.startswith("SynthReIDTiny: torch")][0]
    torch_scores, ort_scores = re.findall(r"\{[^}]*\}", line)
    assert torch_scores == ort_scores and "'mAP'" in torch_scores


def test_feature_extractor_reads_images_and_fills_a_store(tmp_path, datasets_root):
    from fastreid.data.data_utils import read_image
    from fastreid.data.transforms import build_transforms

    from robustreid.data.validation import build_dataset

    cfg = saved_model_cfg(tmp_path)
    paths = [item[0] for item in build_dataset("SynthReIDTiny").gallery[:6]]
    extractor = FeatureExtractor(cfg, batch_size=4)
    transform = build_transforms(cfg, is_train=False)
    batch = torch.stack([transform(read_image(p)) for p in paths])
    np.testing.assert_allclose(extractor(paths), extractor(batch), atol=1e-5)
    store = extractor.extract_to_store(paths, tmp_path / "store", chunk_images=4)
    np.testing.assert_allclose(np.load(store.path), extractor(paths), atol=1e-5)
    assert store.complete and store.fill(lambda a, b: 1 / 0) == 0  # nothing left to compute


def test_fastreid_model_zoo_config_names_and_agw_layers_export(tmp_path, datasets_root):
    # A pre-1.0 fastreid config (its model zoo's config.yaml): these names fail fastreid 1.4's
    # registry assertion ("Expected pool types are ...") before anything is exported.
    cfg = saved_model_cfg(tmp_path, "MODEL.BACKBONE.WITH_IBN", "True", "MODEL.BACKBONE.WITH_NL",
                          "True", "MODEL.HEADS.POOL_LAYER", "GeneralizedMeanPoolingP")
    data = yaml.safe_load(cfg.dump())
    data["MODEL"]["HEADS"].update(POOL_LAYER="gempoolP", CLS_LAYER="circleSoftmax")
    with open(tmp_path / "zoo.yml", "w") as f:
        yaml.safe_dump(data, f)
    zoo = load_deploy_config(str(tmp_path / "zoo.yml"))
    assert (zoo.MODEL.HEADS.POOL_LAYER, zoo.MODEL.HEADS.CLS_LAYER) == (
        "GeneralizedMeanPoolingP", "CircleSoftmax")
    extractor = FeatureExtractor(zoo)
    path = export_onnx(extractor, tmp_path / "agw.onnx")
    images = torch.rand(3, 3, 64, 32) * 255
    assert np.abs(extractor(images) - OnnxFeatureExtractor(path, zoo)(images)).max() < 1e-4


@pytest.mark.parametrize("case, message", [
    ("no-weights", "MODEL.WEIGHTS file not found"),
    ("mismatch", "MODEL.WEIGHTS .* does not match the config"),
    ("noise-on", "MODEL.NOISE.TEST_TIME True: the model draws noise at test time"),
])
def test_export_tool_user_errors_are_one_line(case, message, tmp_path, datasets_root, capsys):
    noise = ("MODEL.META_ARCHITECTURE", "RobustBaseline", "MODEL.NOISE.ENABLED", "True")
    cfg = saved_model_cfg(tmp_path, *(noise if case == "noise-on" else ()))
    with open(tmp_path / "config.yml", "w") as f:
        f.write(cfg.dump())
    weights = {"no-weights": str(tmp_path / "absent.pth")}.get(case, cfg.MODEL.WEIGHTS)
    opts = ["MODEL.BACKBONE.FEAT_DIM", "256", "MODEL.BACKBONE.DEPTH", "34x"] \
        if case == "mismatch" else []
    code = load_tool("export_onnx").main(["--config-file", str(tmp_path / "config.yml"),
                                          "--output", str(tmp_path / "m.onnx"),
                                          "MODEL.WEIGHTS", weights, *opts])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.match(f"error: {message}", err[0]), err
    assert not os.path.exists(tmp_path / "m.onnx")


def test_feature_extractor_needs_weights(tmp_path, datasets_root):
    with pytest.raises(ConfigError, match="needs trained weights"):
        FeatureExtractor(make_tiny_cfg(tmp_path / "out"))


def test_extract_features_tool_writes_a_store_search_reads(tmp_path, datasets_root, capsys):
    from robustreid.data.validation import build_dataset

    cfg = saved_model_cfg(tmp_path)
    with open(tmp_path / "config.yml", "w") as f:
        f.write(cfg.dump())
    paths = [item[0] for item in build_dataset("SynthReIDTiny").gallery[:7]]
    (tmp_path / "list.txt").write_text("\n".join(paths) + "\n")
    tool = load_tool("extract_features")
    argv = ["--config-file", str(tmp_path / "config.yml"), "--images", str(tmp_path / "list.txt"),
            "--store", str(tmp_path / "store"), "--chunk", "3", "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS]
    assert tool.main(argv) == 0
    written = np.load(tmp_path / "store" / "features.npy")
    np.testing.assert_allclose(written, FeatureExtractor(cfg)(paths), atol=1e-5)
    assert (tmp_path / "store" / "images.txt").read_text().split() == paths
    assert tool.main(argv) == 0  # complete: reopened, nothing recomputed
    np.testing.assert_array_equal(np.load(tmp_path / "store" / "features.npy"), written)
    capsys.readouterr()
    assert tool.main([*argv[:3], str(tmp_path / "nowhere"), *argv[4:]]) == 2
    assert capsys.readouterr().err.startswith("error: --images")

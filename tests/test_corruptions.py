"""Common corruptions (CIL-ReID protocol): each of imagecorruptions' 19 corruptions and CIL-ReID's
rain on 64x32 and smaller images with today's numpy / scikit-image (robustreid.compat), seeding, the evaluator (mAP
falls with severity on a trained model), the report and robust_eval --protocol corruptions."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, load_tool

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")
TINY_OPTS = ["DATASETS.TESTS", "('SynthReIDTiny',)", "INPUT.SIZE_TEST", "[64,32]",
             "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "32"]
# Corruptions that are functions of the image alone (no random draw).
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate",
                 "jpeg_compression", "gaussian_blur", "saturate"}
# What imagecorruptions 1.1.2 raises without robustreid.compat's patch (measured).
UPSTREAM_FAILURES = {"glass_blur": ("imagecorruptions_gaussian", "multichannel"),
                     "gaussian_blur": ("imagecorruptions_gaussian", "multichannel"),
                     "fog": ("imagecorruptions_float_", "float_")}


def person_image(height=64, width=32, seed=0):
    """A smooth RGB image (upsampled 8x4 random blocks), like a small pedestrian crop."""
    blocks = (np.random.default_rng(seed).random((8, 4, 3)) * 255).astype(np.uint8)
    return Image.fromarray(blocks).resize((width, height), Image.BILINEAR)


@pytest.mark.parametrize("name", [
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate"])
def test_each_corruption_runs_seeded_on_small_images(name):
    from robustreid.data.corruptions import CORRUPTIONS, corrupt_image

    assert name in CORRUPTIONS
    image = person_image()
    pixels = np.asarray(image)
    for severity in (1, 2, 3, 4, 5):
        out = corrupt_image(image, name, severity, seed=7)
        assert out.size == image.size and out.mode == "RGB"
        assert np.abs(np.asarray(out, float) - pixels).mean() > 0.5  # it corrupts
        assert np.array_equal(np.asarray(corrupt_image(image, name, severity, seed=7)), out)
    if name not in DETERMINISTIC:  # another seed, another draw
        assert not np.array_equal(np.asarray(corrupt_image(image, name, 3, seed=8)), out)
    # Below imagecorruptions' 32-pixel minimum: enlarged first, still corrupted
    tiny = corrupt_image(person_image(24, 12), name, 5, seed=7)
    assert min(tiny.size) == 32 and tiny.size[1] > tiny.size[0]


def test_rain_is_cil_reids_seeded_rain_on_small_images():
    from robustreid.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt_image

    assert CORRUPTIONS[-1] == "rain" and len(CORRUPTIONS) == 20  # CIL-ReID's 20
    image = person_image()
    pixels = np.asarray(image, float)
    for severity in (1, 2, 3, 4, 5):
        out = corrupt_image(image, "rain", severity, seed=7)
        assert out.size == image.size and out.mode == "RGB"  # 64 high: kept (> 60)
        assert np.abs(np.asarray(out, float) - pixels).mean() > 0.5
        assert np.array_equal(np.asarray(corrupt_image(image, "rain", severity, seed=7)), out)
        assert not np.array_equal(np.asarray(corrupt_image(image, "rain", severity, seed=8)), out)
    # CIL-ReID enlarges images up to 60 pixels high to 65 (aspect kept) before drawing drops
    assert corrupt_image(person_image(40, 20), "rain", 3, seed=0).size == (32, 65)
    # On a flat grey image the pixels no drop touched are darkened by -(0.05 + 0.05 severity) of
    # 255; the drops (bright) cover more of the image as the rain gets heavier
    grey = Image.new("RGB", (64, 128), (128, 128, 128))
    covered = []
    for severity in SEVERITIES:
        out = np.asarray(corrupt_image(grey, "rain", severity, seed=0), float)
        assert out.min() == pytest.approx(128 - 255 * (0.05 + 0.05 * severity), abs=1), severity
        covered.append((out > out.min()).mean())
    assert covered == sorted(covered) and covered[-1] > 0.9, covered


@pytest.mark.parametrize("name", sorted(UPSTREAM_FAILURES))
def test_compat_fixes_the_corruptions_that_fail_upstream(name, monkeypatch):
    import imagecorruptions.corruptions as corruptions
    from robustreid import compat
    from robustreid.data.corruptions import corrupt_image

    patch, message = UPSTREAM_FAILURES[name]
    assert patch in compat.applied_patches()
    attribute = {"imagecorruptions_gaussian": "gaussian", "imagecorruptions_float_": "np"}[patch]
    monkeypatch.setattr(corruptions, attribute, compat.original(patch))
    with pytest.raises((TypeError, AttributeError), match=message):
        corrupt_image(person_image(), name, 3, seed=0)
    monkeypatch.undo()
    corrupt_image(person_image(), name, 3, seed=0)


def test_compat_makes_impulse_noise_follow_numpy_seeds(monkeypatch):
    import imagecorruptions.corruptions as corruptions
    from robustreid import compat
    from robustreid.data.corruptions import corrupt_image

    def twice():
        return [np.asarray(corrupt_image(person_image(), "impulse_noise", 3, seed=0))
                for _ in range(2)]

    assert np.array_equal(*twice())
    monkeypatch.setattr(corruptions, "sk", compat.original("imagecorruptions_seeded_noise"))
    assert not np.array_equal(*twice())  # scikit-image >= 0.21: a fresh generator each call


def test_imagecorruptions_needs_the_pkg_resources_stand_in():
    # Without robustreid, imagecorruptions 1.1.2 does not import on setuptools >= 81
    plain = subprocess.run([sys.executable, "-c", "import imagecorruptions"], capture_output=True,
                           text=True, timeout=120)
    assert plain.returncode != 0 and "No module named 'pkg_resources'" in plain.stderr
    import robustreid  # noqa: F401

    assert "pkg_resources" not in sys.modules  # the stand-in served the import only


def test_corrupted_images_are_seeded_per_image_and_mixed_draws_vary(tmp_path):
    from robustreid.data.corruptions import MIXED, CorruptedImages

    paths = []
    for i in range(12):
        path = tmp_path / f"{i:04d}_c1s1_000000_00.jpg"
        person_image(seed=i).save(path)
        paths.append((str(path), i, 1))
    listing = sorted(os.listdir(tmp_path))
    to_array = np.asarray
    data = CorruptedImages(paths, to_array, "gaussian_noise", 3, seed=0, split="query")
    reversed_data = CorruptedImages(paths[::-1], to_array, "gaussian_noise", 3, seed=0,
                                    split="query")
    assert np.array_equal(data[0]["images"], data[0]["images"])
    assert not np.array_equal(data[0]["images"], reversed_data[len(paths) - 1]["images"])  # index
    gallery = CorruptedImages(paths, to_array, "gaussian_noise", 3, seed=0, split="gallery")
    assert not np.array_equal(data[0]["images"], gallery[0]["images"])
    assert data[3]["targets"] == 3 and data[3]["img_paths"] == paths[3][0]
    mixed = CorruptedImages(paths, to_array, MIXED, None, seed=0, split="query")
    draws = [mixed.corruption_of(i)[:2] for i in range(len(paths))]
    assert len({c for c, _ in draws}) >= 5 and len({s for _, s in draws}) >= 3
    assert draws == [mixed.corruption_of(i)[:2] for i in range(len(paths))]
    mixed[0]
    assert sorted(os.listdir(tmp_path)) == listing  # nothing written


@pytest.fixture(scope="module")
def model(trained_tiny):
    return trained_tiny(0)


def test_map_falls_monotonically_with_severity(model):
    from robustreid.evaluation.corruption_evaluator import CorruptionEvaluator

    cfg, net, _, _ = model
    evaluator = CorruptionEvaluator(cfg, net, "SynthReIDTiny", progress=False)
    # Corruptions whose distortion grows with severity at every level (ImageNet-C's design); the
    # mean over them per severity must not increase, and severity 5 must cost most of the skill.
    entry = evaluator.run(["gaussian_noise", "gaussian_blur", "contrast"], [1, 2, 3, 4, 5],
                          mixed=False)
    by_severity = [entry["summary"]["by_severity"][str(s)]["mAP"] for s in range(1, 6)]
    clean, chance = entry["clean"]["mAP"], entry["chance"]["mAP"]
    assert clean > chance + 10
    assert all(a >= b for a, b in zip([clean] + by_severity, by_severity)), (clean, by_severity)
    assert by_severity[-1] < clean - 0.5 * (clean - chance), (clean, by_severity, chance)
    assert entry["summary"]["mCE"] == pytest.approx(100 - np.mean(by_severity))


def test_one_side_corrupted_keeps_the_other_clean(model):
    from robustreid.evaluation.corruption_evaluator import CorruptionEvaluator

    cfg, net, _, _ = model
    evaluator = CorruptionEvaluator(cfg, net, "SynthReIDTiny", corrupt="query", progress=False)
    evaluator.evaluate_clean()
    gallery = evaluator.gallery.features.clone()
    result = evaluator.evaluate_corruption("contrast", 5)
    assert result["mAP"] < evaluator.clean["mAP"]
    assert evaluator.gallery.features.equal(gallery)


def test_normalized_mce_against_a_reference():
    from robustreid.evaluation.corruption_report import corruption_summary, normalized_mce

    def entry(maps):
        cells = [{"corruption": c, "severity": s, "mAP": m, "Rank-1": m, "mINP": m}
                 for c, row in maps.items() for s, m in zip((1, 2), row)]
        return {"clean": {"mAP": 90.0}, "cells": cells}

    model = entry({"noise": [80.0, 60.0], "blur": [70.0, 50.0]})
    reference = entry({"noise": [60.0, 40.0], "blur": [70.0, 50.0]})
    # noise: (20 + 40) / (40 + 60) = 0.6; blur: 1.0
    assert normalized_mce(model, reference) == pytest.approx(80.0)
    summary = corruption_summary(model)
    assert summary["by_severity"]["1"]["mAP"] == 75.0 and summary["mean"]["mAP"] == 65.0
    assert summary["mCE"] == pytest.approx(35.0) and summary["relative_mCE"] == pytest.approx(25.0)
    assert normalized_mce(model, entry({"noise": [1.0, 2.0]})) is None  # other grid


def test_cli_corruption_protocol_writes_the_cil_report(model, tmp_path, capsys):
    out = tmp_path / "report"
    code = load_tool("robust_eval").main([
        "--config-file", CONFIG, "--protocol", "corruptions", "--corruptions",
        "gaussian_noise,pixelate", "--severity", "1,5", "--output", str(out),
        "MODEL.WEIGHTS", model[2], *TINY_OPTS])
    assert code == 0, capsys.readouterr().err[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["corruptions"] == ["gaussian_noise", "pixelate"]
    assert report["settings"]["severities"] == [1, 5]
    (dataset,) = report["datasets"]
    assert [(c["corruption"], c["severity"]) for c in dataset["cells"]] == [
        ("gaussian_noise", 1), ("gaussian_noise", 5), ("pixelate", 1), ("pixelate", 5)]
    assert dataset["mixed"]["corruption"] == "mixed" and dataset["corrupted"] == "both"
    table = (out / "results.md").read_text()
    assert "| Severity | gaussian_noise | pixelate | mean |" in table
    assert f"| {dataset['mixed']['mAP']:.1f} |" in table.split("\n\n")[1]
    assert (out / "corruption_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--protocol", "corruptions", "--severity", "0-6"], "--severity"),
    (["--protocol", "corruptions", "--corruptions", "hail"], "hail"),
    (["--protocol", "corruptions", "--eps", "8"], "--eps"),
    (["--protocol", "corruptions", "--attack-gallery"], "--attack-gallery"),
    (["--severity", "3"], "--severity applies to --protocol corruptions only"),
])
def test_cli_bad_corruption_options_exit_2_with_one_line(args, message, tmp_path, capsys):
    code = load_tool("robust_eval").main(["--config-file", CONFIG, *args, "--output",
                                          str(tmp_path / "out"), "MODEL.WEIGHTS", "w.pth"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err

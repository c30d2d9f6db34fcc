"""Universal adversarial perturbation: learned on training images, within its L-inf budget, one
perturbation for every query; crafted on one trained model it lowers another's mAP (transfer through
the surrogate option); robust_eval --protocol uap."""
import json
import os

import pytest
import torch

from conftest import REPO, load_tool

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")
TINY_OPTS = ["DATASETS.TESTS", "('SynthReIDTiny',)", "INPUT.SIZE_TEST", "[64,32]",
             "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "32"]


@pytest.fixture(scope="module")
def models(trained_tiny):
    """(surrogate seed 0, target seed 1): two independently trained tiny models."""
    return trained_tiny(0), trained_tiny(1)


def surrogate_of(trained):
    from robustreid.engine import build_surrogate_extractor

    cfg, _, weights, _ = trained
    return build_surrogate_extractor(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), weights)


def test_uap_from_one_model_lowers_another_models_map(models):
    from robustreid.evaluation.universal_evaluator import UAPCell, UAPEvaluator

    surrogate, (cfg, model, _, _) = models
    evaluator = UAPEvaluator(cfg, model, "SynthReIDTiny", progress=False,
                             surrogate=surrogate_of(surrogate), step_size=2)
    clean = evaluator.evaluate_clean()["mAP"]
    noise = evaluator.evaluate_noise(16)["mAP"]
    result = evaluator.evaluate_cell(UAPCell(16.0, 30))
    # Measured (seeds 0 -> 1): clean 53.6, noise 53.6, transferred UAP 44.6 (white-box: 26.7)
    assert result["mAP"] < min(clean, noise) - 4, (clean, noise, result["mAP"])
    assert result["transfer"] and result["within_budget"]
    assert result["delta_linf_255"] <= 16 + 1e-4 and result["max_linf_255"] <= 16 + 1e-3
    assert result["fit_steps"] == 30 and result["training_images"] == len(evaluator.train_items)
    query_paths = {item[0] for item in evaluator.query.items}
    assert not query_paths & {item[0] for item in evaluator.train_items}  # learned off the test set


def test_one_perturbation_for_every_image_and_its_errors():
    from robustreid.attacks import ReidFeatureExtractor
    from robustreid.attacks.universal import UniversalPerturbation

    class Features(torch.nn.Module):
        def forward(self, batched):
            return batched["images"].flatten(1)[:, :5]

    torch.manual_seed(0)
    uap = UniversalPerturbation(ReidFeatureExtractor(Features(), fold_bn=False), eps=8, steps=3)
    with pytest.raises(RuntimeError, match="before fit"):
        uap.perturb(torch.rand(2, 3, 4, 2))
    uap.fit(iter([torch.rand(4, 3, 4, 2) for _ in range(5)]))
    assert uap.fit_stats["fit_steps"] == 3 and uap.fit_stats["fit_images_seen"] == 12
    x = torch.full((3, 3, 4, 2), 0.5)
    adv = uap.perturb(x)
    assert torch.equal(adv[0], adv[1]) and (adv - x).abs().max() <= 8 / 255 + 1e-6
    with pytest.raises(ValueError, match="shape"):
        uap.perturb(torch.rand(1, 3, 8, 4))


def test_cli_uap_protocol_transfer_report(models, tmp_path, capsys):
    surrogate, target = models
    out = tmp_path / "report"
    code = load_tool("robust_eval").main([
        "--config-file", CONFIG, "--protocol", "uap", "--eps", "8", "--steps", "2",
        "--surrogate-config", os.path.join(surrogate[0].OUTPUT_DIR, "config.yaml"),
        "--surrogate-weights", surrogate[2], "--output", str(out),
        "MODEL.WEIGHTS", target[2], *TINY_OPTS])
    assert code == 0, capsys.readouterr().err[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["protocol"] == "uap" and report["settings"]["steps"] == [2]
    (cell,) = report["datasets"][0]["cells"]
    assert cell["label"] == "UAP 8/255-2" and cell["transfer"] and cell["fit_steps"] == 2
    (noise,) = report["datasets"][0]["noise_baselines"]  # the control of the UAP's budget
    assert (noise["label"], noise["eps"], noise["within_budget"]) == ("uniform noise 8/255", 8.0, True)
    table = (out / "results.md").read_text()
    assert "learned on the surrogate config.yaml (transfer)" in table and "| UAP 8/255-2 |" in table
    assert f"| SynthReIDTiny | uniform noise 8/255 | {noise['Rank-1']:.1f} |" in table
    assert "uniform noise" not in table.split("\n\n")[1]  # the papers' table: attacks only


@pytest.mark.parametrize("args, message", [
    (["--protocol", "uap", "--attacks", "FNA"], "attack UAP"),
    (["--protocol", "uap", "--guides", "gallery"], "--guides"),
    (["--protocol", "uap", "--eps", "0.5"], "--eps"),
    (["--protocol", "uap", "--surrogate-config", "x.yml"], "--surrogate-weights"),
])
def test_cli_bad_uap_options_exit_2_with_one_line(args, message, tmp_path, capsys):
    code = load_tool("robust_eval").main(["--config-file", CONFIG, *args, "--output",
                                          str(tmp_path / "out"), "MODEL.WEIGHTS", "w.pth"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err

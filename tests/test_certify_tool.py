"""tools/certify.py end to end on SynthReIDTiny (tiny n), its input checks, and the noise-training
switch (INPUT.GAUSSIAN_NOISE) for models that smoothing certifies."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, load_tool, make_tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

CERTIFY = os.path.join(REPO, "tools", "certify.py")
CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")
TINY_OPTS = ["DATASETS.NAMES", "('SynthReIDTiny',)", "DATASETS.TESTS", "('SynthReIDTiny',)",
             "INPUT.SIZE_TRAIN", "[64,32]", "INPUT.SIZE_TEST", "[64,32]",
             "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "32"]
TINY_N = ["--n0", "4", "--n", "24", "--batch", "16"]
LAST_LINE = re.compile(r"^certified_rank1@0\.25=\d+\.\d certified_rank1@0\.5=\d+\.\d "
                       r"abstain=\d+\.\d seconds_per_query=\d+\.\d{3}$")


@pytest.fixture(scope="module")
def weights(tmp_path_factory, datasets_root):
    """A ResNet-18 trained 2 epochs on SynthReIDTiny (a few seconds)."""
    from fastreid.utils.env import seed_all_rng
    from robustreid.engine import RobustTrainer

    seed_all_rng(0)
    cfg = make_tiny_cfg(tmp_path_factory.mktemp("certify_model"))
    trainer = RobustTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return os.path.join(cfg.OUTPUT_DIR, "model_final.pth")


def test_cli_certifies_queries_and_ends_with_the_headline(weights, datasets_root, tmp_path):
    out = tmp_path / "certify"
    env = dict(os.environ, FASTREID_DATASETS=datasets_root, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, CERTIFY, "--config-file", CONFIG, "--sigmas", "0.25,0.5", *TINY_N,
         "--max-queries", "6", "--output", str(out), "MODEL.WEIGHTS", weights, *TINY_OPTS],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert LAST_LINE.match(lines[-1]), lines[-1]
    assert "| sigma | r=0 | r=0.25 |" in result.stdout

    report = json.loads((out / "certified.json").read_text())
    settings = report["settings"]
    assert settings["decision"] == "retrieval" and settings["sigmas"] == [0.25, 0.5]
    assert (settings["n0"], settings["n"], settings["alpha"]) == (4, 24, 0.001)
    assert len(settings["weights_sha256"]) == 64 and settings["dataset"] == "SynthReIDTiny"
    images = report["images"]
    assert 0 < len(images) <= 6 and all({"path", "pid", "camid"} <= set(i) for i in images)
    first = report["sigmas"][0]
    assert [e["sigma"] for e in report["sigmas"]] == [0.25, 0.5]
    for entry in report["sigmas"]:
        records = entry["records"]
        assert [r["index"] for r in records] == list(range(len(images)))
        assert [r["label"] for r in records] == [i["pid"] for i in images]
        for r in records:
            assert r["correct"] == (r["prediction"] == r["label"])
            assert (r["prediction"] == -1) == (r["p_lower"] < 0.5)
            assert r["radius"] >= 0 and (r["prediction"] != -1 or r["radius"] == 0)
        summary = entry["summary"]
        assert summary["abstain"] == pytest.approx(
            100 * sum(r["prediction"] == -1 for r in records) / len(records))
    at = {r: 100 * sum(x["correct"] and x["radius"] >= r for x in first["records"]) / len(images)
          for r in (0.25, 0.5)}
    assert lines[-1] == (f"certified_rank1@0.25={at[0.25]:.1f} certified_rank1@0.5={at[0.5]:.1f} "
                         f"abstain={first['summary']['abstain']:.1f} "
                         f"seconds_per_query={first['summary']['seconds_per_image']:.3f}")
    table = (out / "certified.md").read_text()
    assert f"| 0.25 | {first['summary']['certified']['0']:.1f} |" in table
    assert (out / "certified_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_base_decision_is_the_clean_rank1(weights, datasets_root, tmp_path, capsys):
    """Without noise, the retrieval decision of every query is its Rank-1 answer: the base accuracy
    the report gives equals the robust evaluation's clean Rank-1 (same queries, metric, junk)."""
    from robustreid.engine import RobustTrainer
    from robustreid.evaluation.robust import RobustEvaluator

    out = tmp_path / "certify"
    opts = ["MODEL.WEIGHTS", weights, *TINY_OPTS, "TEST.METRIC", "cosine"]
    code = load_tool("certify").main(["--config-file", CONFIG, "--sigmas", "0.12", *TINY_N,
                                      "--output", str(out), *opts])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("certified_rank1@0.25=")
    report = json.loads((out / "certified.json").read_text())
    cfg = make_tiny_cfg(tmp_path / "eval", *opts)
    evaluator = RobustEvaluator(cfg, RobustTrainer.load_for_eval(cfg), "SynthReIDTiny",
                                progress=False)
    clean = evaluator.evaluate_clean()
    summary = report["sigmas"][0]["summary"]
    assert summary["num_images"] == int(evaluator._valid.sum())
    assert summary["base_accuracy"] == pytest.approx(clean["Rank-1"])


def test_classifier_decision_certifies_training_images(weights, datasets_root, tmp_path, capsys):
    out = tmp_path / "certify"
    code = load_tool("certify").main(["--config-file", CONFIG, "--decision", "classifier",
                                      "--sigmas", "0.25", *TINY_N, "--max-queries", "5",
                                      "--output", str(out), "MODEL.WEIGHTS", weights, *TINY_OPTS])
    assert code == 0
    report = json.loads((out / "certified.json").read_text())
    assert report["settings"]["decision"] == "classifier"
    records = report["sigmas"][0]["records"]
    assert len(records) == 5 and len(report["images"]) == 5
    # labels are the training loader's class indices: fastreid's relabelling of sorted pids
    from robustreid.data.validation import build_dataset

    pids = sorted({pid for _, pid, _ in build_dataset("SynthReIDTiny").train})
    assert [r["label"] for r in records] == [pids.index(i["pid"]) for i in report["images"]]
    assert "| sigma |" in (out / "certified.md").read_text()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.match(r"^certified_accuracy@0\.25=\S+ certified_accuracy@0\.5=\S+ abstain=", last)


@pytest.mark.parametrize("args, opts, message", [
    (["--sigmas", "64"], [], "looks like 0-255 units"),
    (["--sigmas", "0.25,x"], [], "--sigmas: '0.25,x'"),
    (["--alpha", "0.7"], [], "--alpha must be in (0, 0.5)"),
    (["--n", "0"], [], "argument --n: must be an integer >= 1"),
    (["--decision", "ranking"], [], "argument --decision: invalid choice"),
    ([], ["CERTIFY.DECISION", "ranking"], "CERTIFY.DECISION must be one of retrieval, classifier"),
    ([], ["CERTIFY.SIGMAS", "(0.25, 64.0)"], "CERTIFY.SIGMAS must be a noise level"),
    ([], ["MODEL.WEIGHTS", "/nonexistent/model.pth"], "/nonexistent/model.pth"),
    ([], ["MODEL.WEIGHTS", ""], "no weights to certify"),
    (["--decision", "classifier"], ["MODEL.HEADS.NUM_CLASSES", "3"],
     "MODEL.HEADS.NUM_CLASSES is 3"),
    ([], ["--n", "8"], "put the options before the KEY VALUE pairs: --n"),
    (["--denoiser", "/nonexistent/denoiser.pth"], [], "/nonexistent/denoiser.pth"),
    (["--denoiser", CONFIG], [], "cannot be read"),
])
def test_cli_bad_input_exits_2_with_one_clear_line(args, opts, message, weights, tmp_path, capsys):
    code = exit_code(["--config-file", CONFIG, *args, "--output", str(tmp_path / "out"),
                      "MODEL.WEIGHTS", weights, *TINY_OPTS, *opts])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()  # stopped before any work


def exit_code(argv):
    """The tool's exit status, whether main returns it or argparse exits."""
    try:
        return load_tool("certify").main(argv)
    except SystemExit as e:
        return e.code


# --------------------------------------------------------------------------- noise training

def test_gaussian_noise_switch_changes_training_inputs_only(tmp_path, datasets_root):
    from fastreid.utils.events import EventStorage
    from robustreid.engine import RobustTrainer
    from robustreid.engine.train_steps import GaussianNoiseBatch, build_batch_phases

    off = make_tiny_cfg(tmp_path / "off")
    on = make_tiny_cfg(tmp_path / "on", "INPUT.GAUSSIAN_NOISE.ENABLED", "True",
                       "INPUT.GAUSSIAN_NOISE.SIGMA", "0.25")
    assert build_batch_phases(off) == []
    assert [type(p) for p in build_batch_phases(on)] == [GaussianNoiseBatch]

    trainer = RobustTrainer(on)
    step = trainer._trainer
    loaded, trained = [], []
    batches = step._data_loader_iter

    def recording_loader():
        for batch in batches:
            loaded.append(batch["images"].clone())
            yield batch

    class Recording:  # a last batch phase: sees what the objective gets
        name = "recording"

        def __call__(self, model, batch):
            trained.append(batch["images"].clone())
            return batch

    step._data_loader_iter = recording_loader()
    step.batch_phases.append(Recording())
    with EventStorage(0):
        step.run_step()
    noise = (trained[0] - loaded[0]) / 255.0
    assert noise.mean().abs() < 0.01 and noise.std().item() == pytest.approx(0.25, rel=0.02)
    assert trained[0].min() < 0 or trained[0].max() > 255  # not clipped (Cohen et al.)

    # evaluation: the same model scores the same with the switch on or off
    model = trainer.model.eval()
    with torch.no_grad():
        assert RobustTrainer.test(on, model) == RobustTrainer.test(off, model)


def test_noise_sigma_is_checked_before_training(tmp_path, datasets_root):
    from robustreid.config import ConfigError
    from robustreid.engine.train_steps import check_training_config

    cfg = make_tiny_cfg(tmp_path / "out", "INPUT.GAUSSIAN_NOISE.ENABLED", "True",
                        "INPUT.GAUSSIAN_NOISE.SIGMA", "64.0")
    with pytest.raises(ConfigError, match="INPUT.GAUSSIAN_NOISE.SIGMA .*looks like 0-255 units"):
        check_training_config(cfg)


def test_denoiser_goes_in_front_of_the_model_for_queries_and_gallery(weights, datasets_root,
                                                                      tmp_path, capsys):
    """--denoiser: the checkpoint of tools/train_denoiser.py (its DENOISER keys in the opts) is
    loaded, recorded in the report, and every image the model sees passes through it: a denoiser
    that returns one grey image makes every query's decision the same identity."""
    from robustreid.engine import RobustTrainer
    from robustreid.engine.denoiser_training import DenoiserTrainer

    den_opts = ["DENOISER.ARCH", "SmallUNet", "DENOISER.WIDTH", "4", "DENOISER.MODE", "first_order",
                "DENOISER.OUTPUT", "features"]
    cfg = make_tiny_cfg(tmp_path / "den", "MODEL.WEIGHTS", weights, *den_opts)
    trainer = DenoiserTrainer(cfg, RobustTrainer.load_for_eval(cfg), str(tmp_path / "den"))
    trainer.checkpointer.save("denoiser_final")
    path = str(tmp_path / "den" / "denoiser_final.pth")
    tool = load_tool("certify")

    def certify(output):
        return tool.main(["--config-file", CONFIG, "--sigmas", "0.25", *TINY_N, "--max-queries",
                          "6", "--denoiser", path, "--output", str(output), "MODEL.WEIGHTS",
                          weights, *TINY_OPTS, *den_opts])

    assert certify(tmp_path / "a") == 0
    report = json.loads((tmp_path / "a" / "certified.json").read_text())
    assert report["settings"]["denoiser"] == path and len(report["settings"]["denoiser_sha256"]) == 64

    class Grey(torch.nn.Module):
        def forward(self, x01):
            return torch.full_like(x01, 0.5)

    seen = []

    def grey_denoiser(cfg, p):
        seen.append(p)
        return Grey()

    tool.load_denoiser = grey_denoiser
    assert certify(tmp_path / "b") == 0
    records = json.loads((tmp_path / "b" / "certified.json").read_text())["sigmas"][0]["records"]
    assert seen == [path, path] and len({r["prediction"] for r in records}) == 1
    capsys.readouterr()

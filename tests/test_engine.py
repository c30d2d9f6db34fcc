"""RobustTrainer / train_net: end-to-end training, bad input (resuming: test_resume.py; 2-process
training: test_distributed.py)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_tiny_cfg

TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")
TINY_OPTS = ["DATASETS.NAMES", "('SynthReIDTiny',)", "DATASETS.TESTS", "('SynthReIDTiny',)",
             "INPUT.SIZE_TRAIN", "[64,32]", "INPUT.SIZE_TEST", "[64,32]",
             "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "16",
             "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "[100]", "SOLVER.CHECKPOINT_PERIOD", "1"]


def train_net(*args, datasets_root, timeout=600):
    env = dict(os.environ, FASTREID_DATASETS=datasets_root, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TRAIN_NET, "--config-file", CONFIG, *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("opts, message", [
    (["MODEL.NO_SUCH_KEY", "1"], "MODEL.NO_SUCH_KEY"),
    (["MODEL.WEIGHTS", "/nonexistent/model.pth"], "/nonexistent/model.pth"),
    (["DATASETS.NAMES", "('Market1501',)"], "Market1501"),
    (["DATASETS.NAMES", "('NoSuchSet',)"], "NoSuchSet"),
])
def test_bad_input_stops_before_training_with_one_clear_line(opts, message, datasets_root,
                                                             tmp_path):
    result = train_net(*TINY_OPTS, "OUTPUT_DIR", str(tmp_path), *opts, datasets_root=datasets_root)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line, result.stderr
    assert "Traceback" not in result.stderr and "Starting training" not in result.stderr


def test_undecodable_image_is_named_before_training(tiny_cfg, datasets_root):
    from robustreid.data.validation import DatasetError, build_dataset
    from robustreid.engine import preflight

    preflight(tiny_cfg)  # the generated set is clean
    victim = build_dataset("SynthReIDTiny").gallery[0][0]
    original = open(victim, "rb").read()
    try:
        with open(victim, "wb") as f:
            f.write(b"not a jpeg")
        with pytest.raises(DatasetError, match=os.path.basename(victim)):
            preflight(tiny_cfg)
    finally:
        with open(victim, "wb") as f:
            f.write(original)


def test_config_file_errors_name_the_file(tmp_path):
    from robustreid.config import ConfigError, load_config

    bad = tmp_path / "bad.yml"
    bad.write_text("SOLVER:\n  BASE_LR: fast\n")
    with pytest.raises(ConfigError, match="bad.yml.*SOLVER.BASE_LR"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yml"))


def test_train_then_eval_only_reproduces_metrics(tmp_path, datasets_root):
    out = tmp_path / "run"
    trained = train_net(*TINY_OPTS, "SOLVER.MAX_EPOCH", "2", "TEST.EVAL_PERIOD", "2",
                        "OUTPUT_DIR", str(out), datasets_root=datasets_root)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (out / "model_final.pth").is_file()
    evaluated = train_net("--eval-only", *TINY_OPTS, "MODEL.WEIGHTS", str(out / "model_final.pth"),
                          "OUTPUT_DIR", str(tmp_path / "eval"), datasets_root=datasets_root)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

    def table_row(log):  # fastreid prints a csv-style table; its last row holds the numbers
        rows = [l for l in log.splitlines() if l.startswith("| SynthReIDTiny")]
        return rows[-1]
    assert table_row(trained.stdout + trained.stderr) == table_row(evaluated.stdout +
                                                                   evaluated.stderr)




def test_eval_only_refuses_weights_that_do_not_fit_the_config(tmp_path, datasets_root):
    from fastreid.modeling.meta_arch import build_model

    from robustreid.config import ConfigError
    from robustreid.engine import preflight

    cfg = make_tiny_cfg(tmp_path)
    cfg.MODEL.HEADS.NUM_CLASSES = 12
    torch.save({"model": build_model(cfg).state_dict()}, tmp_path / "r18.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "r18.pth")
    preflight(cfg, eval_only=True)  # fits
    cfg.MODEL.BACKBONE.DEPTH = "34x"  # fastreid's checkpointer would only warn and skip
    with pytest.raises(ConfigError, match="does not match the config"):
        preflight(cfg, eval_only=True)


def test_training_may_add_noise_modules_to_weights_that_lack_them(tmp_path, datasets_root):
    from robustreid.config import ConfigError
    from robustreid.engine import RobustTrainer, check_weights_fit

    cfg = make_tiny_cfg(tmp_path, "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "100")
    trainer = RobustTrainer(cfg)
    trainer.checkpointer.save("plain")
    noisy = make_tiny_cfg(tmp_path, "MODEL.NOISE.ENABLED", "True",
                          "MODEL.WEIGHTS", str(tmp_path / "plain.pth"))
    check_weights_fit(noisy, training=True)  # fine-tuning adds the noise scales
    with pytest.raises(ConfigError, match="noise_modules"):
        check_weights_fit(noisy)  # evaluating needs them

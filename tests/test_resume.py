"""Interrupted and resumed runs (issue 13): a run stopped by Ctrl-C in its last epoch neither
evaluates nor promotes a model and leaves a checkpoint that --resume continues; the resumed run
ends with the very checkpoint the uninterrupted run ends with (every tensor and value: model,
optimizer moments, both LR schedulers, the robust parts, RNG states, data position); --resume
refuses checkpoints that cannot be continued before anything is built."""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import robustreid  # noqa: F401  (compat patches before fastreid.engine is imported)
from fastreid.engine.hooks import HookBase

from conftest import REPO, make_tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")
# 3 steps per epoch: the warm-up (5 iterations) runs into epoch 1, across the resume.
COMMON = ("SOLVER.WARMUP_ITERS", "5", "TEST.EVAL_PERIOD", "100", "TEST.ROBUST.BEST_METRIC", "mAP")
# Random starts of the attack, FNES's omega draws, the discriminator and its optimizer/scheduler.
ROBUST = ("MODEL.META_ARCHITECTURE", "RobustBaseline", "ADV_TRAIN.ENABLED", "True",
          "ADV_TRAIN.STEPS", "1", "ADV_TRAIN.INCLUDE_CLEAN", "True", "ADV_TRAIN.FNES.ENABLED", "True",
          "ADV_TRAIN.DISCRIMINATOR.ENABLED", "True")
# Two source domains; BAU's strong views made by a loader worker; ADIN with its schedule: f_N is
# pre-trained on 3 batches of the stream between epochs 0 and 1.
DG = ("DATASETS.NAMES", "('SynthReIDTiny_D0', 'SynthReIDTiny_D1')",
      "DATASETS.TESTS", "('SynthReIDTiny_D2',)", "MODEL.META_ARCHITECTURE", "RobustBaseline",
      "DATALOADER.NUM_WORKERS", "1", "DG.BAU.ENABLED", "True", "DG.ADIN.ENABLED", "True",
      "DG.ADIN.SCHEDULE.NUISANCE_PRETRAIN_ITERS", "3", "DG.ADIN.SCHEDULE.VAL_PERIOD", "3")

# EAT: two members, each on its data parts (every member and its optimizer moments must come back),
# and the random starts of the self-transferring attack.
EAT = ("MODEL.META_ARCHITECTURE", "EnsembleReID", "EAT.ENABLED", "True", "EAT.MEMBERS", "2",
       "EAT.STEPS", "1")


class StopInEpoch(HookBase):
    """Raises ``error`` (Ctrl-C by default) after the first step of ``epoch``."""

    def __init__(self, epoch, error=KeyboardInterrupt):
        self.epoch, self.error = epoch, error

    def after_step(self):
        if self.trainer.epoch == self.epoch:
            raise self.error


def build(cfg, resume=False, stop=None):
    from fastreid.utils.env import seed_all_rng

    from robustreid.engine import RobustTrainer

    seed_all_rng(0)  # as tools/train_net.py's setup() with ROBUSTREID.SEED 0
    trainer = RobustTrainer(cfg)
    if stop is not None:
        trainer.register_hooks([stop])
    trainer.resume_or_load(resume=resume)
    return trainer


def assert_identical(a, b, where="checkpoint"):
    """Every entry equal: tensors bit for bit (torch.equal), everything else by ==."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (where, set(a) ^ set(b))
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("opts", [(), ROBUST, DG, EAT],
                         ids=["bagtricks", "dddefense", "bau_adin", "eat"])
def test_resumed_run_ends_with_the_uninterrupted_runs_checkpoint(opts, tmp_path, datasets_root):
    # Checkpoints only at the end: the stopped run must write its last epoch boundary itself.
    opts = (*COMMON, "SOLVER.CHECKPOINT_PERIOD", "5", *opts)
    straight_dir, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    build(make_tiny_cfg(straight_dir, *opts)).train()

    stopped = build(make_tiny_cfg(stopped_dir, *opts), stop=StopInEpoch(1))
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    # Ctrl-C in the last epoch: no evaluation of the half-trained model, nothing promoted, and the
    # end of epoch 0 written for --resume.
    assert not hasattr(stopped, "_last_eval_results")
    assert sorted(p.name for p in stopped_dir.glob("*.pth")) == ["model_0000.pth"]
    assert (stopped_dir / "last_checkpoint").read_text() == "model_0000.pth"

    resumed = build(make_tiny_cfg(stopped_dir, *opts), resume=True)
    assert resumed.start_epoch == 1
    resumed.train()
    final = [torch.load(d / "model_final.pth", weights_only=True) for d in (straight_dir, stopped_dir)]
    assert {"optimizer", "lr_sched", "warmup_sched", "training_state"} <= set(final[0])
    if "ADV_TRAIN.DISCRIMINATOR.ENABLED" in opts:
        assert {"discriminator", "discriminator_optimizer", "discriminator_scheduler"} <= set(final[0])
    if "DG.ADIN.ENABLED" in opts:
        assert final[0]["nuisance_schedule"]["stage"] != "pretrain"
        assert {"nuisance_head", "nuisance_optimizer", "nuisance_scheduler"} <= set(final[0])
    if "EAT.ENABLED" in opts:
        members = {key.split(".")[1] for key in final[0]["model"] if key.startswith("members.")}
        assert members == {"0", "1"}
    assert_identical(final[0], final[1])


def test_resumed_run_keeps_comparing_model_best_against_its_best_metric(tmp_path, datasets_root):
    """fastreid's model_best.pth tracker (PeriodicCheckpointer.best_metric) comes back on --resume:
    otherwise it restarts at -1 and the next evaluated model replaces model_best.pth, however bad."""
    from fastreid.engine.hooks import PeriodicCheckpointer

    opts = ("SOLVER.WARMUP_ITERS", "5", "TEST.EVAL_PERIOD", "1", "SOLVER.CHECKPOINT_PERIOD", "1")
    out = tmp_path / "run"
    stopped = build(make_tiny_cfg(out, *opts), stop=StopInEpoch(1))
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    best = torch.load(out / "model_best.pth", weights_only=True)["metric"]
    assert best > 0  # epoch 0 was evaluated and promoted
    resumed = build(make_tiny_cfg(out, *opts), resume=True)
    (periodic,) = [h for h in resumed._hooks if isinstance(h, PeriodicCheckpointer)]
    assert periodic.best_metric == best


def test_an_error_during_training_keeps_the_last_boundary_and_evaluates_nothing(tmp_path,
                                                                               datasets_root):
    out = tmp_path / "run"
    trainer = build(make_tiny_cfg(out, *COMMON), stop=StopInEpoch(1, RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        trainer.train()
    assert not hasattr(trainer, "_last_eval_results")
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000.pth"]
    assert (out / "last_checkpoint").read_text() == "model_0000.pth"
    assert torch.load(out / "model_0000.pth", weights_only=True)["epoch"] == 0


# --- the data stream -------------------------------------------------------------------------------
def test_sampler_replays_its_stream_from_any_position_with_its_own_numpy_state():
    from fastreid.data.samplers import NaiveIdentitySampler

    from robustreid.data.train_stream import ReplayableSampler

    items = [(f"{pid}_{k}.jpg", pid, k % 3) for pid in range(10) for k in range(5)]

    def stream(start=0, n=40, interleave=False):
        sampler = ReplayableSampler(NaiveIdentitySampler(items, 8, 4, seed=7), chunk=8)
        sampler.start = start
        out = []
        for key in sampler:
            if interleave:
                np.random.rand()  # someone else's numpy draws
            out.append(key)
            if len(out) == n:
                return out

    np.random.seed(3)
    full = stream()
    untouched = np.random.RandomState(3).get_state()
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), untouched))
    assert stream(interleave=True) == full
    assert stream(start=16, n=24) == full[16:]
    assert len({seed for _, seed in full}) == len(full)  # one transform seed per position
    # fastreid's index stream itself is unchanged (the bare sampler, nothing else drawing)
    assert [i for i, _ in full] == [int(i) for _, i in zip(range(40), NaiveIdentitySampler(
        items, 8, 4, seed=7))]


def test_batch_n_depends_on_its_position_alone_not_on_workers_or_restarts(tmp_path, datasets_root):
    from robustreid.data.dg import build_dg_train_loader

    def batches(workers, start=0, n=3):
        cfg = make_tiny_cfg(tmp_path, *DG[:6], "DG.BAU.ENABLED", "True",
                            "DATALOADER.NUM_WORKERS", str(workers))
        stream = build_dg_train_loader(cfg)
        stream.load_state_dict({"batches": start, "seed": 11})
        torch.manual_seed(workers)  # the loading process's own streams must not matter ...
        before = torch.get_rng_state()
        out = [next(stream) for _ in range(n)]
        assert torch.equal(torch.get_rng_state(), before)  # ... nor move
        return out, stream.state_dict()

    fresh, state = batches(0)
    assert state == {"batches": 3, "seed": 11}
    restarted, _ = batches(2, start=1, n=2)
    for a, b in zip(fresh[1:], restarted):
        assert a["img_paths"] == b["img_paths"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["images_strong"],
                                                                     b["images_strong"])


# --- the command line -------------------------------------------------------------------------------
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
TINY_OPTS = ["DATASETS.NAMES", "('SynthReIDTiny',)", "DATASETS.TESTS", "('SynthReIDTiny',)",
             "INPUT.SIZE_TRAIN", "[64,32]", "INPUT.SIZE_TEST", "[64,32]",
             "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "16", "SOLVER.MAX_EPOCH", "2",
             "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.EVAL_PERIOD", "100"]
# tools/train_net.py with a hook that presses Ctrl-C after the first step of epoch 1
CTRL_C_IN_EPOCH_1 = f"""
import runpy, sys
import robustreid
from fastreid.engine.hooks import HookBase
from robustreid.engine import RobustTrainer

class CtrlC(HookBase):
    def after_step(self):
        if self.trainer.epoch == 1:
            raise KeyboardInterrupt

build_hooks = RobustTrainer.build_hooks
RobustTrainer.build_hooks = lambda self: build_hooks(self) + [CtrlC()]
sys.argv[0] = {TRAIN_NET!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_exits_non_zero_with_one_line_saying_how_to_resume(tmp_path, datasets_root):
    out = tmp_path / "run"
    env = dict(os.environ, FASTREID_DATASETS=datasets_root, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", CTRL_C_IN_EPOCH_1, "--config-file", CONFIG,
                             *TINY_OPTS, "OUTPUT_DIR", str(out)], env=env, capture_output=True,
                            text=True, timeout=600, cwd=REPO)
    assert result.returncode == 130, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"interrupted: to continue, rerun with --resume (before the KEY VALUE options): it "
        f"resumes {out / 'model_0000.pth'}")
    log = result.stdout + result.stderr
    assert "Training stopped in epoch 1 (iteration 3) by KeyboardInterrupt" in log
    assert "Traceback" not in log and "Evaluation results" not in log
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000.pth"]


def test_killed_run_resumes_to_the_uninterrupted_runs_checkpoint(tmp_path, datasets_root):
    from robustreid.config import load_config
    from robustreid.engine import resolve_device

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # the uninterrupted run in this process, as train_net's main() runs it (seeded, same config)
    build(resolve_device(load_config(CONFIG, [*TINY_OPTS, "OUTPUT_DIR", str(straight)]))).train()
    env = dict(os.environ, FASTREID_DATASETS=datasets_root, OMP_NUM_THREADS="1")
    args = [sys.executable, TRAIN_NET, "--config-file", CONFIG]
    proc = subprocess.Popen([*args, *TINY_OPTS, "OUTPUT_DIR", str(killed)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "last_checkpoint").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # in epoch 1 (the last), no chance to clean up
    proc.wait()
    assert not (killed / "model_final.pth").exists()
    assert (killed / "last_checkpoint").read_text() == "model_0000.pth"
    resumed = subprocess.run([*args, "--resume", *TINY_OPTS, "OUTPUT_DIR", str(killed)], env=env,
                             cwd=REPO, timeout=600, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Starting training from epoch 1" in resumed.stdout
    assert_identical(*[torch.load(d / "model_final.pth", weights_only=True)
                       for d in (straight, killed)])


def train_net(capsys, *args):
    """tools/train_net.py's cli() in this process (for checks that stop before training)."""
    spec = importlib.util.spec_from_file_location("train_net", TRAIN_NET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.cli(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err, captured.err.strip().splitlines()


@pytest.fixture(scope="module")
def checkpoint_of_epoch_0(tmp_path_factory, datasets_root):
    out = tmp_path_factory.mktemp("epoch0")
    build(make_tiny_cfg(out)).checkpointer.save("model_0000", epoch=0)
    return out


@pytest.fixture
def resumable(checkpoint_of_epoch_0, tmp_path):
    """An OUTPUT_DIR that --resume continues at epoch 1 (a copy: tests damage it)."""
    return shutil.copytree(checkpoint_of_epoch_0, tmp_path / "run")


def _resume(capsys, out, *opts):
    return train_net(capsys, "--config-file", CONFIG, "--resume", *TINY_OPTS, "OUTPUT_DIR",
                     str(out), *opts)


def _assert_one_error_line(code, log, err, *words):
    assert code == 2  # cli() caught a user error (anything else would raise here)
    assert err[-1].startswith("error: ") and all(w in err[-1] for w in words), err[-3:]
    assert "Starting training" not in log


def test_resume_refuses_a_truncated_checkpoint(resumable, capsys):
    path = resumable / "model_0000.pth"
    path.write_bytes(path.read_bytes()[:5000])
    _assert_one_error_line(*_resume(capsys, resumable), str(path), "cannot be read")


def test_resume_refuses_a_dangling_last_checkpoint(resumable, capsys):
    (resumable / "last_checkpoint").write_text("model_0007.pth")
    _assert_one_error_line(*_resume(capsys, resumable), "last_checkpoint", "model_0007.pth",
                           "does not exist")


def test_resume_refuses_another_architectures_checkpoint(resumable, capsys):
    from fastreid.modeling.meta_arch import build_model

    cfg = make_tiny_cfg(resumable, "MODEL.BACKBONE.DEPTH", "34x")
    cfg.MODEL.DEVICE = "cpu"
    # ResNet-34 holds every ResNet-18 tensor with the same shape, plus more blocks: fastreid's
    # load() (and the MODEL.WEIGHTS check) would take it, leaving nothing random.
    torch.save({"model": build_model(cfg).state_dict(), "epoch": 0}, resumable / "model_0000.pth")
    _assert_one_error_line(*_resume(capsys, resumable), "model_0000.pth", "another model",
                           "backbone.layer1.2")


def test_resume_refuses_a_finished_run(resumable, capsys):
    _assert_one_error_line(*_resume(capsys, resumable, "SOLVER.MAX_EPOCH", "1"),
                           "nothing left to train", "SOLVER.MAX_EPOCH")


def test_resume_refuses_a_checkpoint_without_a_configured_part(resumable):
    from robustreid.config import ConfigError

    cfg = make_tiny_cfg(resumable, "MODEL.META_ARCHITECTURE", "RobustBaseline",
                        "ADV_TRAIN.ENABLED", "True", "ADV_TRAIN.INCLUDE_CLEAN", "True",
                        "ADV_TRAIN.DISCRIMINATOR.ENABLED", "True")
    with pytest.raises(ConfigError, match="has no 'discriminator'"):
        build(cfg, resume=True)


def test_resume_without_a_checkpoint_says_a_new_run_starts(tmp_path, datasets_root, caplog):
    with caplog.at_level("INFO"):
        trainer = build(make_tiny_cfg(tmp_path / "empty"), resume=True)
    assert trainer.start_epoch == 0
    assert "holds no checkpoint (no last_checkpoint file): a new run starts" in caplog.text

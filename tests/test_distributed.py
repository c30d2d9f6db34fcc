"""Multi-process training (2 gloo processes on CPU): every trainable part stays identical on all
ranks, and the launch path works.

The processes run on CPU with CUDA hidden from them, whatever the machine has, so these tests run
(and are never skipped) on GPU machines too. Each run has a free port and a join timeout: a hung
collective fails the test instead of hanging the suite.
"""
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from conftest import make_tiny_cfg
from robustreid import compat

JOIN_TIMEOUT_S = 300
DG_DATA = ("DATASETS.NAMES", "('SynthReIDTiny_D0', 'SynthReIDTiny_D1')",
           "DATASETS.TESTS", "('SynthReIDTiny_D2',)", "MODEL.META_ARCHITECTURE", "RobustBaseline")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(main_func, *args, timeout=JOIN_TIMEOUT_S):
    """``main_func(*args)`` on 2 gloo CPU processes (RobustReID's CPU worker for fastreid's
    launch); a child's exception fails the caller, and so does a run longer than ``timeout`` s
    (the children are killed)."""
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # inherited by the spawned children
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        url = f"tcp://127.0.0.1:{_free_port()}"
        context = mp.start_processes(compat._distributed_worker,
                                     args=(main_func, 2, 2, 0, url, args), nprocs=2, join=False,
                                     start_method="spawn")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"2-process run did not finish within {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def _all_reduce_worker(out_dir):
    import torch.distributed as dist
    from fastreid.utils import comm

    value = torch.tensor([float(comm.get_rank() + 1)])
    dist.all_reduce(value)
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.txt"), "w") as f:
        f.write(f"{dist.get_backend()} {comm.get_world_size()} {value.item()}")


def test_launch_two_processes_on_cpu(tmp_path):
    run_two_processes(_all_reduce_worker, str(tmp_path), timeout=120)
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "gloo 2 3.0"


def _train_worker(cfg, out_dir):
    """Train as tools/train_net.py does (seed SEED + rank), then save every trainable part's state
    as this rank holds it, and rank 0's final evaluation."""
    from fastreid.utils import comm
    from fastreid.utils.env import seed_all_rng

    from robustreid.engine import RobustTrainer
    from robustreid.parallel import unwrap

    seed_all_rng(cfg.ROBUSTREID.SEED + comm.get_rank())
    trainer = RobustTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    state = {name: part.state_dict() for name, part in trainer.checkpointer.checkpointables.items()}
    state["model"] = unwrap(trainer.model).state_dict()
    torch.save(state, os.path.join(out_dir, f"rank{comm.get_rank()}.pth"))
    if comm.is_main_process() and results:
        metrics = {k: float(v) for k, v in results.items() if k != "dataset"}
        torch.save(metrics, os.path.join(out_dir, "results.pth"))


def _differences(a, b, path=""):
    """Paths at which two nested state dicts differ (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
            a.shape == b.shape and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path} (keys)"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}/{i}")]
    return [] if a == b else [path]


def train_on_two_processes(tmp_path, *opts):
    """(rank 0's state, rank 1's state) after a 2-process run of the tiny config + ``opts``."""
    from robustreid.data.validation import build_dataset

    cfg = make_tiny_cfg(tmp_path / "out", "MODEL.DEVICE", "cpu", "SOLVER.MAX_EPOCH", "1", *opts)
    cfg.freeze()
    for name in cfg.DATASETS.NAMES:  # generated once here, not by both ranks at once
        build_dataset(name)
    run_two_processes(_train_worker, cfg, str(tmp_path))
    return (torch.load(tmp_path / "rank0.pth", weights_only=True),
            torch.load(tmp_path / "rank1.pth", weights_only=True))


def assert_ranks_identical(rank0, rank1):
    assert rank0.keys() == rank1.keys()
    differing = _differences(rank0, rank1)
    assert not differing, f"{len(differing)} tensors differ between the ranks: {differing[:8]}"


def test_plain_training_keeps_ranks_identical_and_evaluates_like_one_process(tmp_path,
                                                                             datasets_root):
    from robustreid.engine import RobustTrainer

    rank0, rank1 = train_on_two_processes(tmp_path, "TEST.EVAL_PERIOD", "1")
    assert_ranks_identical(rank0, rank1)  # weights, BN statistics, optimizer and schedulers
    # Evaluation gathered both ranks' features: single-process evaluation of the same weights agrees.
    cfg = make_tiny_cfg(tmp_path / "eval", "MODEL.DEVICE", "cpu")
    cfg.MODEL.HEADS.NUM_CLASSES = rank0["model"]["heads.weight"].shape[0]
    model = RobustTrainer.build_model(cfg)
    model.load_state_dict(rank0["model"])
    expected = RobustTrainer.test(cfg, model)
    distributed = torch.load(tmp_path / "results.pth", weights_only=True)
    for metric in ("Rank-1", "mAP", "mINP"):
        assert distributed[metric] == pytest.approx(expected[metric], abs=1e-6)


# ADIN's schedule from the first step: f_N pre-trained 2 iterations, validated every 2 steps.
ADIN = ("DG.ADIN.ENABLED", "True", "DG.ADIN.SCHEDULE.PRETRAIN_EPOCHS", "0",
        "DG.ADIN.SCHEDULE.NUISANCE_PRETRAIN_ITERS", "2", "DG.ADIN.SCHEDULE.VAL_PERIOD", "2")


def assert_memory_kept_in_sync(rank0, rank1):
    """BAU's prototypes are unit vectors after every update; prototypes that drifted apart and
    were averaged (the epoch-end buffer sync) are not."""
    prototypes = rank0["model"]["bau_memory.prototypes"]
    assert (rank0["model"]["bau_memory.domains"] >= 0).all()  # initialised
    torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(len(prototypes)))


def test_discriminator_nuisance_head_and_memory_stay_identical_across_ranks(tmp_path,
                                                                          datasets_root):
    """DDDefense's D, ADIN's f_N (adversarial sub-problem: the identity classifier gets no
    gradient) and BAU's memory, trained through DDP's forward."""
    rank0, rank1 = train_on_two_processes(
        tmp_path, *DG_DATA, *ADIN, "DG.ADIN.SCHEDULE.THRESHOLD_I_TRIGGER", "1.0",
        "DG.BAU.ENABLED", "True", "ADV_TRAIN.ENABLED", "True", "ADV_TRAIN.INCLUDE_CLEAN", "True",
        "ADV_TRAIN.STEPS", "1", "ADV_TRAIN.DISCRIMINATOR.ENABLED", "True")
    assert {"discriminator", "discriminator_optimizer", "nuisance_head",
            "nuisance_optimizer"} <= rank0.keys()
    assert rank0["nuisance_schedule"]["stage"] == "adversarial"
    assert rank0["discriminator_optimizer"]["state"]  # D was trained
    assert_ranks_identical(rank0, rank1)
    assert_memory_kept_in_sync(rank0, rank1)
    # the one checkpoint (written by rank 0) holds what every rank trained
    saved = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    for part in ("discriminator", "nuisance_head"):
        assert not _differences(saved[part], rank1[part]), part


def test_meta_learning_with_nuisance_head_and_memory_stays_identical_across_ranks(tmp_path,
                                                                                datasets_root):
    """Self-meta learning's functional step (forwards that bypass DDP) with f_N and BAU's memory."""
    rank0, rank1 = train_on_two_processes(tmp_path, *DG_DATA, *ADIN, "META_LEARNING.ENABLED",
                                          "True", "META_LEARNING.FIRST_ORDER", "True",
                                          "DG.BAU.ENABLED", "True")
    assert rank0["nuisance_optimizer"]["state"]  # f_N was trained
    assert_ranks_identical(rank0, rank1)
    assert_memory_kept_in_sync(rank0, rank1)

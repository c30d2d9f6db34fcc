"""Multi-process training (2 gloo processes on CPU): every trainable part stays identical on all
ranks; the helpers that keep it so agree across processes; tools' launch path runs gloo on CPU;
two "machines" (two tools/train_net.py on localhost) train as one run, and meet over the network,
not loopback; torchrun's processes are one run; each process crafts the adversarial examples of its
own images against the whole batch; tools/robust_eval.py on two processes gives the one-process
results.

The processes run on CPU with CUDA hidden from them, whatever the machine has, so these tests run
(and are never skipped) on GPU machines too. Each run has a free port and a join timeout: a hung
collective fails the test instead of hanging the suite.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from conftest import REPO, make_tiny_cfg
from robustreid import compat

JOIN_TIMEOUT_S = 300
CPU_PROCESS_ENV = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
DG_DATA = ("DATASETS.NAMES", "('SynthReIDTiny_D0',)",
           "DATASETS.TESTS", "('SynthReIDTiny_D2',)", "MODEL.META_ARCHITECTURE", "RobustBaseline")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(main_func, *args, timeout=JOIN_TIMEOUT_S):
    """``main_func(*args)`` on 2 gloo CPU processes (RobustReID's CPU worker for fastreid's
    launch); a child's exception fails the caller, and so does a run longer than ``timeout`` s
    (the children are killed)."""
    saved = {k: os.environ.get(k) for k in CPU_PROCESS_ENV}
    os.environ.update(CPU_PROCESS_ENV)  # inherited by the spawned children
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


class _ScoresItsInput(torch.nn.Module):
    """A stand-in re-id model for ADIN's validation: BN's running mean decides the prediction."""

    def __init__(self, running_mean):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(2)
        self.bn.running_mean.copy_(running_mean)

    @property
    def heads(self):  # identity_logits(model, ...) asks the heads: the features are the logits
        return self

    def forward(self, batch):
        return self.bn(batch["images"])

    def identity_logits(self, features):
        return features


def _helpers_worker(out_dir):
    """What each rank sees: how fastreid's launch() would have run it, an all-reduce, the rows of
    both ranks, ADIN's validation error; saved per rank."""
    import importlib

    import torch.distributed as dist
    from fastreid.utils import comm

    from robustreid.engine.dg_steps import ADINSchedule
    from robustreid.parallel import all_gather_rows

    # tools/train_net.py's launch() on a machine without CUDA runs this worker, not fastreid's
    # (which asserts CUDA and uses NCCL)
    launch = importlib.import_module("fastreid.engine.launch")
    with pytest.raises(AssertionError, match="cuda"):
        compat.original("cpu_distributed_launch")(0, _helpers_worker, 2, 2, 0, "unused", ())
    rank = comm.get_rank()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    rows = all_gather_rows(torch.full((rank + 1, 2), float(rank)), torch.arange(rank + 1))
    # Class 0 iff x0 - x1 > m0 - m1 (m: BN running mean): threshold 0 on rank 0, 2 on rank 1,
    # 1 for the averaged model. Each rank holds half of the validation split.
    model = _ScoresItsInput(torch.tensor([0.0, 0.0]) if rank == 0 else torch.tensor([1.0, -1.0]))
    differences = [[1.5, 0.5], [1.5, 1.8]][rank]
    batch = {"images": torch.tensor([[d, 0.0] for d in differences]),
             "targets": torch.zeros(2, dtype=torch.long)}
    schedule = ADINSchedule(None, [batch], 0, 0, 0.2, 0.4, 1)
    torch.save({"launch_worker": launch._distributed_worker is compat._distributed_worker,
                "backend": dist.get_backend(), "world_size": comm.get_world_size(),
                "all_reduce": value.item(), "rows": rows,
                "validation_error": schedule.validation_error(model)},
               os.path.join(out_dir, f"rank{rank}.pth"))


def test_two_gloo_processes_on_cpu_share_rows_and_validation_error(tmp_path):
    run_two_processes(_helpers_worker, str(tmp_path), timeout=120)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pth", weights_only=True)
        assert got["launch_worker"]
        assert (got["backend"], got["world_size"], got["all_reduce"]) == ("gloo", 2, 3.0)
        features, ids = got["rows"]
        assert torch.equal(features, torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert torch.equal(ids, torch.tensor([0, 0, 1]))
        # one error for both ranks: the averaged model's (1 of 4 wrong), not a rank's own (0 of 2
        # on rank 0, 2 of 2 on rank 1) nor the unaveraged models' pooled (2 of 4)
        assert got["validation_error"] == 0.25


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


# Checkpointables of the main process alone: its PeriodicCheckpointer's model_best record.
MAIN_PROCESS_ONLY = {"periodic_best"}


def assert_ranks_identical(rank0, rank1):
    assert rank0.keys() - rank1.keys() == MAIN_PROCESS_ONLY and rank1.keys() <= rank0.keys()
    rank0 = {key: value for key, value in rank0.items() if key not in MAIN_PROCESS_ONLY}
    differing = _differences(rank0, rank1)
    assert not differing, f"{len(differing)} tensors differ between the ranks: {differing[:8]}"


# ADIN's schedule from the first step: f_N pre-trained 2 iterations, validated every 2 steps.
ADIN = ("DG.ADIN.ENABLED", "True", "DG.ADIN.SCHEDULE.PRETRAIN_EPOCHS", "0",
        "DG.ADIN.SCHEDULE.NUISANCE_PRETRAIN_ITERS", "2", "DG.ADIN.SCHEDULE.VAL_PERIOD", "2")


def assert_memory_kept_in_sync(state):
    """BAU's prototypes are unit vectors after every update; prototypes that drifted apart on the
    ranks and were averaged (the epoch-end buffer sync) are not."""
    prototypes = state["model"]["bau_memory.prototypes"]
    assert (state["model"]["bau_memory.domains"] >= 0).all()  # initialised
    torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(len(prototypes)))


def test_discriminator_nuisance_head_and_memory_stay_identical_across_ranks(tmp_path,
                                                                          datasets_root):
    """DDDefense's D, ADIN's f_N (adversarial sub-problem: the identity classifier gets no
    gradient) and BAU's memory, trained through DDP's forward; then the distributed evaluation."""
    from robustreid.engine import RobustTrainer

    opts = (*DG_DATA, *ADIN, "DG.ADIN.SCHEDULE.THRESHOLD_I_TRIGGER", "1.0",
            "DG.BAU.ENABLED", "True", "ADV_TRAIN.ENABLED", "True", "ADV_TRAIN.INCLUDE_CLEAN", "True",
            "ADV_TRAIN.STEPS", "1", "ADV_TRAIN.DISCRIMINATOR.ENABLED", "True")
    rank0, rank1 = train_on_two_processes(tmp_path, *opts, "TEST.EVAL_PERIOD", "1")
    assert {"discriminator", "discriminator_optimizer", "nuisance_head",
            "nuisance_optimizer"} <= rank0.keys()
    assert rank0["nuisance_schedule"]["stage"] == "adversarial"
    assert rank0["discriminator_optimizer"]["state"]  # D was trained
    assert_ranks_identical(rank0, rank1)  # model, BN statistics, every optimizer and scheduler
    assert_memory_kept_in_sync(rank0)
    # the one checkpoint (written by rank 0) holds what every rank trained
    saved = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    for part in ("discriminator", "nuisance_head"):
        assert not _differences(saved[part], rank1[part]), part
    # Evaluation gathered both ranks' features: single-process evaluation of the same weights agrees.
    cfg = make_tiny_cfg(tmp_path / "eval", "MODEL.DEVICE", "cpu", *opts)
    cfg.MODEL.HEADS.NUM_CLASSES = rank0["model"]["heads.weight"].shape[0]
    model = RobustTrainer.build_model(cfg)
    model.load_state_dict(rank0["model"])
    expected = RobustTrainer.test(cfg, model)
    distributed = torch.load(tmp_path / "results.pth", weights_only=True)
    for metric in ("Rank-1", "mAP", "mINP"):
        assert distributed[metric] == pytest.approx(expected[metric], abs=1e-6)


def test_meta_learning_with_nuisance_head_and_memory_stays_identical_across_ranks(tmp_path,
                                                                                datasets_root):
    """Self-meta learning's functional step (forwards that bypass DDP) with f_N and BAU's memory
    (first order: the gradients are all-reduced the same way, at about half the cost)."""
    rank0, rank1 = train_on_two_processes(tmp_path, *DG_DATA, *ADIN, "META_LEARNING.ENABLED",
                                          "True", "META_LEARNING.FIRST_ORDER", "True",
                                          "DG.BAU.ENABLED", "True")
    assert rank0["nuisance_optimizer"]["state"]  # f_N was trained
    assert_ranks_identical(rank0, rank1)
    assert_memory_kept_in_sync(rank0)


# The D/f_N/BAU run above, as two machines of one process each.
ROBUST_PARTS = (*DG_DATA, *ADIN, "DG.ADIN.SCHEDULE.THRESHOLD_I_TRIGGER", "1.0", "DG.BAU.ENABLED",
                "True", "ADV_TRAIN.ENABLED", "True", "ADV_TRAIN.INCLUDE_CLEAN", "True",
                "ADV_TRAIN.STEPS", "1", "ADV_TRAIN.DISCRIMINATOR.ENABLED", "True")


MACHINE = os.path.join(REPO, "tests", "multinode_support.py")


def cpu_process_env(**variables):
    """os.environ for CPU processes (CUDA hidden, one thread) + ``variables``, without
    GLOO_SOCKET_IFNAME (the launch decides it)."""
    env = dict(os.environ, **CPU_PROCESS_ENV, **variables)
    env.pop("GLOO_SOCKET_IFNAME", None)
    return env


def run_commands(commands, env, timeout=JOIN_TIMEOUT_S):
    """Run the commands at once (in REPO, with ``env``); their (exit code, output)."""
    processes = [subprocess.Popen(command, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
                 for command in commands]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in processes]
        return [(p.returncode, output) for p, output in zip(processes, outputs)]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_machines_through_train_net_end_identical_with_one_checkpoint(tmp_path, datasets_root):
    """tools/train_net.py --num-machines 2 --machine-rank 0/1 --dist-url tcp://127.0.0.1:PORT, one
    process per machine, each machine with its own OUTPUT_DIR (no shared disk)."""
    from robustreid.data.validation import build_dataset

    cfg = make_tiny_cfg(tmp_path / "unused", "MODEL.DEVICE", "cpu", "SOLVER.MAX_EPOCH", "1",
                        "TEST.EVAL_PERIOD", "1", *ROBUST_PARTS)
    for name in (*cfg.DATASETS.NAMES, *cfg.DATASETS.TESTS):  # generated once here
        build_dataset(name)
    config = tmp_path / "tiny.yml"
    config.write_text(cfg.dump())
    url = f"tcp://127.0.0.1:{_free_port()}"
    machines = [[sys.executable, MACHINE, "train", "--config-file", str(config), "--num-machines",
                 "2", "--machine-rank", str(rank), "--dist-url", url,
                 "OUTPUT_DIR", str(tmp_path / f"machine{rank}")]
                for rank in range(2)]
    results = run_commands(machines, cpu_process_env(FASTREID_DATASETS=datasets_root,
                                                     MULTINODE_STATE_DIR=str(tmp_path)))
    for rank, (code, output) in enumerate(results):
        assert code == 0, f"machine {rank}:\n{output[-3000:]}"
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in range(2))
    assert rank0["nuisance_schedule"]["stage"] == "adversarial"
    assert rank0["discriminator_optimizer"]["state"]  # D was trained
    assert_ranks_identical(rank0, rank1)  # model, BN statistics, D, f_N, optimizers, schedules
    assert_memory_kept_in_sync(rank0)
    # checkpoints are written once, by rank 0, and hold what every rank trained
    assert not list((tmp_path / "machine1").glob("*.pth"))
    saved = torch.load(tmp_path / "machine0" / "model_final.pth", weights_only=True)
    for part in ("model", "discriminator", "nuisance_head"):
        assert not _differences(saved[part], rank1[part]), part


def _network_address():
    """This machine's IPv4 address on its route out (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.254", 9))
        except OSError:
            pytest.skip("no network interface besides loopback")
        return s.getsockname()[0]


def test_two_machines_connect_over_the_network_not_loopback(tmp_path):
    """fast-reid#629: gloo binds to the address the hostname resolves to, 127.0.0.1 where /etc/hosts
    says so (as on this machine), and tells the other machine to connect there. Rendezvous at this
    machine's network address: every connection of both processes uses no loopback address."""
    url = f"tcp://{_network_address()}:{_free_port()}"
    results = run_commands([[sys.executable, MACHINE, "report", str(tmp_path), "--num-machines", "2",
                             "--machine-rank", str(rank), "--dist-url", url] for rank in range(2)],
                           cpu_process_env(), timeout=120)
    for rank, (code, output) in enumerate(results):
        assert code == 0, f"machine {rank}:\n{output[-3000:]}"
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["sum"] == 2.0 and report["addresses"], report
        assert not [a for a in report["addresses"] if a.startswith("127.")], report


def test_torchruns_processes_are_the_workers_of_one_run(tmp_path):
    """torchrun starts the processes itself: each is a worker of torchrun's job (fastreid's
    launch() ran each alone, world size 1, every one writing its own checkpoints)."""
    ((code, output),) = run_commands([[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc-per-node", "2", MACHINE, "report", str(tmp_path)]],
                                     cpu_process_env(), timeout=120)
    assert code == 0, output[-3000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (report["world_size"], report["sum"]) == (2, 2.0), report


def _adversarial_worker(cfg, weights, batch, out_dir):
    """ADV_TRAIN's phase (FNA, 2 steps) on this rank's half of ``batch`` (2 whole identities)."""
    from fastreid.modeling import build_model
    from fastreid.utils import comm

    from robustreid.engine.train_steps import MetricAdversarialBatch

    rank = comm.get_rank()
    model = build_model(cfg)
    model.load_state_dict(torch.load(weights, weights_only=True))
    own = {key: value[4 * rank:4 * rank + 4] for key, value in batch.items()}
    torch.manual_seed(rank)
    adversarial = MetricAdversarialBatch("FNA", 8.0, 2, 0.0, "euclidean", include_clean=False)
    torch.save(adversarial(model, own)["images"], os.path.join(out_dir, f"adv{rank}.pth"))


def test_each_rank_attacks_its_own_images_against_the_whole_batch(tmp_path, datasets_root,
                                                                   one_thread):
    """DDDefense eq. 3's guide set A is the training batch: with 2 processes, the batch of both
    (FNA's farthest other identity may be the other rank's), as on one process."""
    from fastreid.modeling import build_model

    from robustreid.attacks import GuideSet, ReidFeatureExtractor, build_attack

    cfg = make_tiny_cfg(tmp_path / "out", "MODEL.DEVICE", "cpu")
    cfg.MODEL.HEADS.NUM_CLASSES = 4
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    torch.save(model.state_dict(), tmp_path / "model.pth")
    batch = {"images": torch.rand(8, 3, 64, 32) * 255,
             "targets": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), "camids": torch.zeros(8).long()}
    run_two_processes(_adversarial_worker, cfg, str(tmp_path / "model.pth"), batch, str(tmp_path),
                      timeout=120)
    extractor = ReidFeatureExtractor(model)
    images01, pids = batch["images"] / 255, batch["targets"]
    halves = (slice(0, 4), slice(4, 8))  # each rank's images, forwarded as that rank does
    with extractor.frozen_eval():
        with torch.no_grad():
            guides = GuideSet(torch.cat([extractor(images01[half]) for half in halves]), pids)
        for rank, half in enumerate(halves):
            torch.manual_seed(rank)
            attack = build_attack("FNA", extractor, eps=8.0, steps=2, distance="euclidean")
            expected = attack.perturb(images01[half], pids[half], guides,
                                      sample_index=torch.arange(8)[half]).mul(255)
            got = torch.load(tmp_path / f"adv{rank}.pth", weights_only=True)
            assert torch.equal(got, expected), (got - expected).abs().max()


def test_robust_eval_on_two_processes_equals_one_process(tmp_path, datasets_root, one_thread):
    """tools/robust_eval.py --num-gpus 2 (gloo on CPU) shares out the query batches and gathers
    them: the report's numbers are the one-process run's, with a random-start attack (SMA)."""
    import robust_eval
    from fastreid.modeling import build_model

    from robustreid.data.validation import build_dataset
    from robustreid.evaluation.attack_grid import METRICS

    build_dataset("SynthReIDTiny")
    torch.manual_seed(0)
    weights = tmp_path / "model.pth"
    torch.save({"model": build_model(make_tiny_cfg(tmp_path / "unused")).state_dict()}, weights)
    args = ["--config-file", os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml"),
            "--attacks", "SMA", "--eps", "8", "--steps", "2", "MODEL.WEIGHTS", str(weights),
            "MODEL.DEVICE", "cpu", "DATASETS.TESTS", "('SynthReIDTiny',)", "INPUT.SIZE_TEST",
            "[64,32]", "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "4"]
    assert robust_eval.main(["--output", str(tmp_path / "one"), *args]) == 0
    ((code, output),) = run_commands([[sys.executable, os.path.join(REPO, "tools", "robust_eval.py"),
                                       "--num-gpus", "2", "--output", str(tmp_path / "two"), *args]],
                                     cpu_process_env(FASTREID_DATASETS=datasets_root))
    assert code == 0, output[-3000:]
    assert "| Clean | SMA 8/255-2 |" in output  # the launching process prints rank 0's report
    one, two = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two"))
    assert (one["settings"]["processes"], two["settings"]["processes"]) == (1, 2)
    (single,), (split,) = one["datasets"], two["datasets"]
    assert single["num_query"] > 2 * 4  # more than one batch for each process
    assert split["clean"] == single["clean"]
    (cell,), (split_cell,) = single["cells"], split["cells"]
    for key in (*METRICS, "per_identity_mAP", "max_linf_255", "max_budget_used", "within_budget"):
        assert split_cell[key] == cell[key], key

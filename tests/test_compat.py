"""Each compat patch: the upstream failure it fixes is reproduced without it, and gone with it
(cpu_distributed_launch: tests/test_distributed.py, in CPU processes also on GPU machines;
multinode_rendezvous: tests/test_rendezvous.py and tests/test_distributed.py)."""
import os
import subprocess
import sys

import pytest
import torch

from robustreid import compat

ALL_PATCHES = ["collections_abc_aliases", "torch_six", "advertorch_zero_gradients",
               "contiguous_optimizer", "cpu_data_loader", "evaluator_no_cython_exit",
               "cpu_distributed_launch", "multinode_rendezvous", "metric_printer_eta",
               "mobilenetv2_pretrain", "imagecorruptions_resources", "imagecorruptions_gaussian",
               "imagecorruptions_float_", "imagecorruptions_seeded_noise"]


def run_python(code, skip=""):
    env = dict(os.environ, ROBUSTREID_COMPAT_SKIP=skip)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


def test_every_patch_is_needed_on_this_stack_and_applied_once():
    assert compat.applied_patches() == ALL_PATCHES
    assert compat.apply() == ALL_PATCHES  # idempotent: nothing applied twice


@pytest.mark.parametrize("skip, code, error", [
    ("collections_abc_aliases", "import robustreid", "cannot import name 'Mapping'"),
    ("torch_six", "import robustreid", "No module named 'torch._six'"),
    ("advertorch_zero_gradients", "import robustreid, advertorch.attacks",
     "cannot import name 'zero_gradients'"),
])
def test_import_time_patches_fix_real_import_errors(skip, code, error):
    broken = run_python(code, skip=skip)
    assert broken.returncode != 0 and error in broken.stderr, broken.stderr[-2000:]
    fixed = run_python(code)
    assert fixed.returncode == 0, fixed.stderr[-2000:]


def test_unknown_skip_name_is_reported():
    result = run_python("import robustreid", skip="no_such_patch")
    assert result.returncode != 0 and "no_such_patch" in result.stderr


def test_zero_gradients_shim_zeroes_tensors_and_nested_lists():
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    (a.sum() * 2 + b.sum()).backward()
    compat._zero_gradients([a, (b,)])
    assert a.grad.abs().sum() == 0 and b.grad.abs().sum() == 0


def test_advertorch_attack_runs_on_torch2():
    from advertorch.attacks import LinfPGDAttack

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    adv = LinfPGDAttack(model, eps=0.1, nb_iter=3, eps_iter=0.05).perturb(x, y)
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(adv, x)


def _one_default_trainer_step(cfg, build_optimizer):
    """One SimpleTrainer step through DefaultTrainer's own optimizer path; returns weight change."""
    from fastreid.engine.train_loop import SimpleTrainer
    from fastreid.modeling.meta_arch import build_model
    from fastreid.utils.events import EventStorage

    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer, params = build_optimizer(cfg, model)
    batch = {"images": torch.rand(8, 3, 64, 32) * 255, "targets": torch.arange(4).repeat(2),
             "camids": torch.zeros(8, dtype=torch.long)}
    trainer = SimpleTrainer(model, iter([batch]), optimizer, params)
    before = model.backbone.conv1.weight.detach().clone()
    with EventStorage(0):
        trainer.run_step()
    return (model.backbone.conv1.weight.detach() - before).abs().max().item()


def test_default_trainer_optimizer_path_trains(tiny_cfg):
    from fastreid.engine import DefaultTrainer

    cfg = tiny_cfg.clone()
    cfg.MODEL.HEADS.NUM_CLASSES = 4
    assert _one_default_trainer_step(cfg, DefaultTrainer.build_optimizer) > 0
    # The bug the patch fixes: fastreid's contiguous optimizer leaves the weights untouched.
    unpatched = compat.original("contiguous_optimizer")
    assert _one_default_trainer_step(cfg, unpatched) == 0


def test_loaders_work_without_cuda(tiny_cfg):
    from fastreid.data import build_reid_test_loader, build_reid_train_loader

    train_loader = build_reid_train_loader(tiny_cfg)
    batch = next(iter(train_loader))
    assert batch["images"].shape == (16, 3, 64, 32) and batch["images"].device.type == "cpu"
    test_loader, num_query = build_reid_test_loader(tiny_cfg, dataset_name="SynthReIDTiny")
    assert num_query > 0 and next(iter(test_loader))["images"].shape[1:] == (3, 64, 32)
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            compat.original("cpu_data_loader")(0, dataset=train_loader.dataset)


def test_reid_evaluator_builds_without_cython(tiny_cfg, monkeypatch):
    from fastreid.evaluation import ReidEvaluator

    ReidEvaluator(tiny_cfg, num_query=2)  # would otherwise run `make` and sys.exit(1)
    import fastreid.evaluation.rank_cylib as rank_cylib
    failed_make = subprocess.CompletedProcess(args=["make"], returncode=2)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed_make)
    with pytest.raises(SystemExit):
        compat.original("evaluator_no_cython_exit")(ReidEvaluator.__new__(ReidEvaluator))
    assert rank_cylib.compile_helper  # the upstream helper that exits is still there, untouched

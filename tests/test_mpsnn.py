"""MP-SNN (thesis chapter 5): noise modules, the losses of eq. 5.2-5.7, Algorithm 2's two optimizers,
Algorithm 3's meta step over the tasks V, P, PA, and retrieval-time noise averaging."""
import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO

IMAGE_SIZE = ["[32, 16]"] * 2
PIDS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


@pytest.fixture(autouse=True)
def _storage():
    """fastreid's training forward logs accuracy into the current EventStorage."""
    from fastreid.utils.events import EventStorage

    with EventStorage(0) as storage:
        yield storage


def _cfg(*noise_opts, meta_arch="RobustBaseline"):
    """ResNet-18 BoT at 32 x 16 with 4 classes, CPU; ``noise_opts`` for MODEL.NOISE / MPSNN keys."""
    from robustreid.config import load_config
    from robustreid.modeling.noise import add_mpsnn_config

    cfg = load_config(os.path.join(REPO, "configs/SynthReID/bagtricks_R18.yml"), [
        "MODEL.META_ARCHITECTURE", meta_arch, "MODEL.DEVICE", "cpu", "MODEL.HEADS.NUM_CLASSES", "4",
        "INPUT.SIZE_TRAIN", IMAGE_SIZE[0], "INPUT.SIZE_TEST", IMAGE_SIZE[1],
        "SOLVER.AMP.ENABLED", "False", "SOLVER.OPT", "SGD", "SOLVER.BASE_LR", "0.01"])
    cfg.defrost()
    add_mpsnn_config(cfg)
    cfg.merge_from_list(list(noise_opts))
    return cfg


NOISE_ON = ("MODEL.NOISE.ENABLED", "True", "MODEL.NOISE.BLOCKS", "('layer2', 'layer3')")


def _model(cfg, seed=0):
    from fastreid.modeling.meta_arch import build_model

    from robustreid.modeling.noise import attach_noise_modules

    torch.manual_seed(seed)
    return attach_noise_modules(build_model(cfg), cfg)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.rand(8, 3, 32, 16, generator=g) * 255, "targets": PIDS.clone(),
            "camids": torch.zeros(8, dtype=torch.long)}


def _fresh(batch):
    return {**batch, "images": batch["images"].clone()}  # fastreid normalises images in place


# --- noise modules -----------------------------------------------------------------------------------
def test_noise_changes_training_outputs_and_is_bit_identical_when_off():
    from robustreid.modeling.noise import noise_disabled

    plain = _model(_cfg())
    noisy = _model(_cfg(*NOISE_ON, "MODEL.NOISE.TEST_TIME", "False"))
    assert not hasattr(plain, "noise_modules")  # MODEL.NOISE.ENABLED False: fastreid's model
    state = noisy.state_dict()
    assert sorted(k for k in state if k.startswith("noise_modules.")) == [
        "noise_modules.anisotropic.phi", "noise_modules.isotropic.layer2.scale",
        "noise_modules.isotropic.layer3.scale"]
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())  # same weights
    batch = _batch()

    plain.eval(), noisy.eval()  # TEST_TIME False: deterministic, fastreid's features at test time
    with torch.no_grad():
        assert torch.equal(noisy(_fresh(batch)), plain(_fresh(batch)))
        for module in noisy.noise_modules.modules():
            if hasattr(module, "test_time"):
                module.test_time = True  # the default: the stochastic model at test time too
        assert not torch.equal(noisy(_fresh(batch)), noisy(_fresh(batch)))

    plain.train(), noisy.train()
    with noise_disabled(noisy):  # train mode, every module off: fastreid's step, bit for bit
        off = noisy(_fresh(batch))
    reference = plain(_fresh(batch))
    assert all(torch.equal(off[k], reference[k]) for k in reference)
    first, second = noisy(_fresh(batch)), noisy(_fresh(batch))
    assert first["loss_triplet"] != second["loss_triplet"]  # a new draw each forward
    assert first["loss_cls"] != reference["loss_cls"]


def test_attach_sizes_each_block_and_a_deep_copy_uses_its_own_noise():
    noisy = _model(_cfg(*NOISE_ON, "MODEL.NOISE.BLOCKS", "('layer2', 'layer3.1')",
                        "MODEL.NOISE.ANISOTROPIC.RANK", "16"))
    iso = noisy.noise_modules.isotropic
    assert iso["layer2"].scale.shape == (128,) and iso["layer3_1"].scale.shape == (256,)
    assert torch.equal(iso["layer2"].scale, torch.full((128,), 0.25))
    phi = noisy.noise_modules.anisotropic.phi
    assert phi.shape == (512, 16) and torch.equal(phi[:16], torch.eye(16) * 0.1)
    with pytest.raises(ValueError, match="no module 'layer9'"):
        _model(_cfg(*NOISE_ON, "MODEL.NOISE.BLOCKS", "('layer9',)"))

    noisy.train()
    noisy(_fresh(_batch()))  # leaves pre-noise features behind: a copy must not carry them
    twin = copy.deepcopy(noisy)
    with torch.no_grad():
        for p in twin.noise_modules.parameters():
            p.zero_()  # zero noise in the copy only
    batch = _batch()
    twin.eval(), noisy.eval()
    with torch.no_grad():
        assert torch.equal(twin(_fresh(batch)), twin(_fresh(batch)))
        assert not torch.equal(noisy(_fresh(batch)), noisy(_fresh(batch)))


def test_noise_covariances_match_their_parameters_empirically():
    from robustreid.modeling.noise import AnisotropicNoise, IsotropicNoise

    torch.manual_seed(0)
    aniso = AnisotropicNoise(3, rank=2).eval()
    with torch.no_grad():
        aniso.phi.copy_(torch.tensor([[1.0, 0.0], [0.5, 0.8], [-0.3, 0.4]]))
    sigma = aniso.phi @ aniso.phi.t()
    with torch.no_grad():
        draws = aniso(torch.zeros(200_000, 3))
    assert draws.mean(0).abs().max() < 0.01
    assert torch.allclose(draws.t() @ draws / len(draws), sigma, atol=0.015)  # Sigma = phi phi^T

    iso = IsotropicNoise(2, 0.5).train()
    with torch.no_grad():
        iso.scale.copy_(torch.tensor([0.3, -1.2]))  # std = |scale|
        std = iso(torch.zeros(50_000, 2, 1, 1)).std(dim=(0, 2, 3))
    assert torch.allclose(std, torch.tensor([0.3, 1.2]), rtol=0.02)


# --- losses (eq. 5.2, 5.3, 5.6, 5.7) ---------------------------------------------------------------
def test_fca_loss_by_hand():
    from robustreid.modeling.losses.mpsnn import fca_loss, hard_pairs

    f = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 3.0]], requires_grad=True)
    t = torch.tensor([0, 0, 1, 1])
    phi = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # Sigma = [[4, 2], [2, 2]]
    pos, neg, valid = hard_pairs(f, t)
    assert pos.tolist() == [1, 0, 3, 2] and neg.tolist() == [2, 2, 0, 0] and valid.all()
    # d = f_p - f_n: [1, -2], [0, -2], [0, 3], [0, 2]; d^T Sigma d = 4, 8, 18, 8
    assert fca_loss(f, t, phi).item() == pytest.approx(math.log((4 + 8 + 18 + 8) / 4))
    fca_loss(f, t, phi).backward()  # features receive the gradient (theta in L_FCA(theta, phi_a))
    assert f.grad.abs().sum() > 0
    lonely = fca_loss(f, torch.zeros(4, dtype=torch.long), phi)  # no negatives: left out
    assert lonely.item() == 0.0


def test_noise_regularizer_and_total_by_hand():
    from robustreid.modeling.losses.mpsnn import (harmonic_temperature, mpsnn_loss_terms,
                                                  noise_regularizer)

    assert harmonic_temperature(0) == 1.0
    assert harmonic_temperature(2) == pytest.approx(1 + 1 / 2 + 1 / 3)
    scales = [torch.tensor([0.25, -0.04]), torch.tensor([1.0])]  # sqrt|.|: 0.5, 0.2, 1
    r = noise_regularizer(scales, epoch=2)
    assert r.item() == pytest.approx(-1.7 / (11 / 6))
    assert noise_regularizer(scales, epoch=0).item() == pytest.approx(-1.7)

    clean = {"loss_cls": torch.tensor(2.0), "loss_triplet": torch.tensor(0.5)}
    adv = {"loss_cls": torch.tensor(3.0), "loss_triplet": torch.tensor(1.0)}
    terms = mpsnn_loss_terms(clean, regularizer=r, lam=1e-4, fca=torch.tensor(0.7), adv_losses=adv,
                             eta=0.5)
    # eq. 5.7 = (CE + Tri + lambda r) - L_FCA + eta (CE_adv + Tri_adv)
    expected = 2.0 + 0.5 + 1e-4 * r.item() - 0.7 + 0.5 * (3.0 + 1.0)
    assert sum(terms.values()).item() == pytest.approx(expected)
    assert terms["loss_fca"].item() == pytest.approx(-0.7)  # FCA is maximised (eq. 5.6)
    assert mpsnn_loss_terms(clean) == clean  # eq. 5.1


# --- Algorithm 2: two optimizers ---------------------------------------------------------------
def _setup(*opts):
    from robustreid.engine.mpsnn import (MpsnnObjective, build_mpsnn_phases,
                                         check_mpsnn_config, excluding_noise_scales)
    from fastreid.solver import build_optimizer

    from robustreid.engine.train_steps import PhasedTrainer

    cfg = _cfg(*NOISE_ON, "MPSNN.ENABLED", "True", "MPSNN.ADV.STEPS", "1", *opts)
    check_mpsnn_config(cfg)
    model = _model(cfg)
    with excluding_noise_scales(model):  # RobustTrainer.build_optimizer
        optimizer, param_wrapper = build_optimizer(cfg, model, contiguous=False)
    objective = MpsnnObjective.from_config(cfg, model)
    trainer = PhasedTrainer(model, [_batch()], optimizer, param_wrapper, build_mpsnn_phases(cfg),
                            objective)
    hook = objective.hook()
    hook.trainer = SimpleNamespace(epoch=0, storage=None)
    return cfg, model, optimizer, objective, trainer, hook


@pytest.mark.parametrize("alternation", ["sequential", "shared"])
def test_noise_scales_move_only_with_their_own_optimizer(alternation):
    from fastreid.utils.events import EventStorage

    _, model, optimizer, objective, trainer, hook = _setup(
        "MPSNN.META.ENABLED", "False", "MPSNN.ALTERNATION", alternation)
    scales = list(model.noise_modules.isotropic.parameters())
    in_model_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_model_optimizer & {id(p) for p in scales}
    assert id(model.noise_modules.anisotropic.phi) in in_model_optimizer  # phi_a: with theta
    assert len(trainer.batch_phases) == 1  # PGD examples for L_Adv

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with EventStorage(0) as storage:
        hook.trainer.storage = storage
        trainer.run_step()  # (theta, phi_a) step on L_Tot (eq. 5.7) ...
        after_model_step = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert all(p.grad is not None for p in scales)  # ... they had gradients, and still:
        for name in ("noise_modules.isotropic.layer2.scale", "noise_modules.isotropic.layer3.scale"):
            assert torch.equal(after_model_step[name], before[name])
        for name in ("noise_modules.anisotropic.phi", "backbone.conv1.weight", "heads.weight"):
            assert not torch.equal(after_model_step[name], before[name])
        stats = {n: b.clone() for n, b in model.named_buffers()}
        hook.after_step()  # ... then phi's own step (Algorithm 2, step 3)
    for name, p in model.named_parameters():
        moved = not torch.equal(p.detach(), after_model_step[name])
        assert moved == name.startswith("noise_modules.isotropic"), name
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers())  # BN stats untouched
    assert all(p.grad is None for p in scales)  # cleared for the next step
    assert "loss_fca" in storage.histories() and "adv/loss_cls" in storage.histories()


# --- Algorithm 3: meta training over V, P, PA ------------------------------------------------------
@pytest.mark.parametrize("test_task,outer", [("V", "thesis"), ("PA", "thesis"), ("P", "mldg")])
def test_meta_step_over_tasks_uses_the_shared_meta_losses(test_task, outer, monkeypatch):
    import robustreid.engine.mpsnn as mpsnn

    _, model, optimizer, objective, trainer, _ = _setup("MPSNN.META.OUTER_LOSS", outer,
                                                        "MPSNN.META.FIRST_ORDER",
                                                        str(test_task == "PA"))
    calls = []

    def spy(module, loss_fn, meta_train, meta_test, inner_lr, first_order):
        calls.append((meta_train.tasks, meta_test.tasks, len(meta_train.clean["targets"]),
                      len(meta_test.clean["targets"]), inner_lr, first_order))
        return meta_losses(module, loss_fn, meta_train, meta_test, inner_lr, first_order)

    meta_losses = mpsnn.meta_losses
    monkeypatch.setattr(mpsnn, "meta_losses", spy)
    monkeypatch.setattr(objective.task_rng, "choice", lambda tasks: test_task)
    data = trainer.batch_phases[0](model, _batch())  # clean + PGD rows
    losses = objective(model, data, optimizer)

    train_tasks = [t for t in ("V", "P", "PA") if t != test_task]
    assert calls == [(train_tasks, [test_task], 4, 4, 0.01, test_task == "PA")]
    prefixes = {"/".join(k.split("/")[:2]) for k in losses}  # role/task
    if outer == "thesis":  # eq. 5.11: L_mte(Theta) + L_mte(Theta')
        assert prefixes == {f"meta_test/{test_task}", f"meta_test_theta/{test_task}"}
    else:
        assert prefixes == {f"meta_test/{test_task}"} | {f"meta_train/{t}" for t in train_tasks}
    assert ("meta_test/PA/adv/loss_cls" in losses) == (test_task == "PA")
    assert ("meta_test/V/loss_fca" in losses) is False  # V: eq. 5.1, no noise terms

    sum(losses.values()).backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.noise_modules.anisotropic.phi.grad is not None
    scale_grad = model.noise_modules.isotropic["layer2"].scale.grad
    # V as meta-test in the thesis's outer loss with second-order terms still reaches phi through
    # Theta' = Theta - alpha grad L_mtr (P, PA use noise), P/PA reach it directly.
    assert scale_grad is not None and scale_grad.abs().sum() > 0


# --- checkpoints ----------------------------------------------------------------------------------
def test_noise_optimizer_and_scheduler_round_trip_through_a_checkpoint(tmp_path):
    from fastreid.utils.events import EventStorage

    from robustreid.engine.checkpoint import RobustCheckpointer

    cfg, model, _, objective, trainer, hook = _setup(
        "MPSNN.META.ENABLED", "False", "MPSNN.ALTERNATION", "shared", "MPSNN.NOISE_STEPS", "(1,)")
    with EventStorage(0) as storage:
        hook.trainer.storage = storage
        trainer.run_step()
        hook.after_step()
        hook.after_epoch()  # epoch 1: lr x 0.1
    assert objective.noise_optimizer.param_groups[0]["lr"] == pytest.approx(3e-5)
    objective.task_rng.random()  # the meta-test task draws: a resumed run continues them
    RobustCheckpointer(model, str(tmp_path), **objective.checkpointables()).save("model_0000")
    assert set(objective.checkpointables()) == {"noise_optimizer", "noise_scheduler",
                                                "mpsnn_task_rng"}

    from robustreid.engine.mpsnn import MpsnnObjective

    fresh_model = _model(cfg, seed=5)
    fresh = MpsnnObjective.from_config(cfg, fresh_model)
    RobustCheckpointer(fresh_model, str(tmp_path), **fresh.checkpointables()).resume_or_load(
        str(tmp_path / "model_0000.pth"), resume=True)
    assert fresh.noise_scheduler.state_dict() == objective.noise_scheduler.state_dict()
    assert fresh.task_rng.getstate() == objective.task_rng.getstate()
    assert fresh.noise_optimizer.param_groups[0]["lr"] == pytest.approx(3e-5)
    old, new = objective.noise_optimizer.state_dict(), fresh.noise_optimizer.state_dict()
    assert old["state"].keys() == new["state"].keys() and len(new["state"]) == 2
    for key in old["state"]:
        assert torch.equal(old["state"][key]["momentum_buffer"], new["state"][key]["momentum_buffer"])
    assert torch.equal(fresh_model.noise_modules.isotropic["layer2"].scale,
                       model.noise_modules.isotropic["layer2"].scale)


# --- evaluation and config ----------------------------------------------------------------------------
def test_noise_averaged_features_are_the_mean_of_draws():
    from robustreid.modeling.noise import NoiseAveragedModel, noise_averaged

    model = _model(_cfg(*NOISE_ON)).eval()
    assert noise_averaged(model, 1) is model
    averaged = noise_averaged(model, 3)
    assert isinstance(averaged, NoiseAveragedModel) and not averaged.training
    batch = _batch()
    images = batch["images"].clone()
    with torch.no_grad():
        torch.manual_seed(7)
        mean = averaged(batch)
        torch.manual_seed(7)
        draws = [model(_fresh(batch)) for _ in range(3)]
    assert torch.equal(batch["images"], images)  # the caller's images are not normalised in place
    assert torch.allclose(mean, torch.stack(draws).mean(0))
    deterministic = _model(_cfg(*NOISE_ON, "MODEL.NOISE.TEST_TIME", "False"))
    assert noise_averaged(deterministic, 3) is deterministic  # nothing to average


def test_config_defaults_are_the_theses_and_bad_settings_are_config_errors():
    from robustreid.config import ConfigError
    from robustreid.engine.mpsnn import check_mpsnn_config
    from robustreid.modeling.noise import add_mpsnn_config

    cfg = _cfg()
    assert add_mpsnn_config(cfg) is cfg  # idempotent
    m = cfg.MPSNN
    assert (m.LAMBDA, m.ETA, m.NOISE_LR, m.NOISE_MOMENTUM, m.NOISE_WEIGHT_DECAY) == \
        (1e-4, 0.5, 3e-4, 0.9, 1e-5)
    assert (m.ADV.ATTACK, m.ADV.EPS, m.ADV.STEPS) == ("PGD", 8.0, 7)
    assert tuple(m.META.TASKS) == ("V", "P", "PA") and cfg.MODEL.NOISE.TEST_TIME
    check_mpsnn_config(cfg)
    for opts, message in [
        (("MPSNN.ENABLED", "True"), "MODEL.NOISE.ENABLED"),
        ((*NOISE_ON, "MPSNN.ENABLED", "True", "MPSNN.META.TASKS", "('V',)"), "MPSNN.META.TASKS"),
        ((*NOISE_ON, "MPSNN.ENABLED", "True", "ADV_TRAIN.ENABLED", "True"), "ADV_TRAIN.ENABLED"),
        ((*NOISE_ON, "MPSNN.ENABLED", "True", "MPSNN.ALTERNATION", "both"), "MPSNN.ALTERNATION"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_mpsnn_config(_cfg(*opts))
    with pytest.raises(ConfigError, match="RobustBaseline"):
        check_mpsnn_config(_cfg(*NOISE_ON, "MPSNN.ENABLED", "True", meta_arch="Baseline"))

"""Denoised smoothing training (thesis chapter 6): the loss of eq. 6.9-6.13, the zeroth-order
gradient through a black box, the training modes, their query counts, checkpoints and resume, and
tools/train_denoiser.py."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import load_tool, make_tiny_cfg
from robustreid.config import ConfigError
from robustreid.modeling.losses.denoising import DenoisingLoss, mmd

pytestmark = pytest.mark.usefixtures("one_thread")

# Four points: p = {(0,0), (1,0)}, q = {(0,1), (1,1)}; pairwise distances 1 (four pairs), sqrt 2 (two)
P = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
Q = torch.tensor([[0.0, 1.0], [1.0, 1.0]])


def test_mmd_equals_hand_computation():
    # linear kernel: squared distance between the means (0.5, 0) and (0.5, 1)
    assert mmd(P, Q, "linear").item() == pytest.approx(1.0)
    # gaussian, bandwidth = 1 x median distance (1): k_pp = k_qq = (2 + 2e^-1/2) / 4,
    # k_pq = (2e^-1/2 + 2e^-1) / 4, so MMD^2 = (1 + e^-1/2) - (e^-1/2 + e^-1) = 1 - 1/e
    assert mmd(P, Q, "gaussian", (1.0,)).item() == pytest.approx(1 - math.exp(-1), rel=1e-6)
    # bandwidth 2: the same with exponents divided by 4; several bandwidths average
    assert mmd(P, Q, "gaussian", (2.0,)).item() == pytest.approx(1 - math.exp(-0.25), rel=1e-6)
    assert mmd(P, Q, "gaussian", (1.0, 2.0)).item() == pytest.approx(
        (2 - math.exp(-1) - math.exp(-0.25)) / 2, rel=1e-6)
    assert mmd(P, P, "gaussian").item() == pytest.approx(0.0, abs=1e-7)


def test_loss_terms_and_weights():
    torch.manual_seed(0)
    clean, denoised = torch.randn(4, 5), torch.randn(4, 5)
    loss = DenoisingLoss("logits", match=1.0, cosine=1.0, mmd=4.0)
    total, terms = loss(clean, denoised)
    ce = -(F.softmax(clean, 1) * F.log_softmax(denoised, 1)).sum(1).mean()
    torch.testing.assert_close(terms["match"], ce)
    torch.testing.assert_close(terms["cosine"], 1 - F.cosine_similarity(clean, denoised).mean())
    torch.testing.assert_close(terms["mmd"], mmd(clean, denoised))
    torch.testing.assert_close(total, ce + terms["cosine"] + 4 * terms["mmd"])
    # features: feature matching instead of the cross-entropy
    _, terms = DenoisingLoss("features")(clean, denoised)
    torch.testing.assert_close(terms["match"], ((clean - denoised) ** 2).mean())
    # identical outputs: cosine and MMD vanish, the cross-entropy is the soft label's entropy
    _, terms = loss(clean, clean)
    assert terms["cosine"].abs() < 1e-6 and terms["mmd"].abs() < 1e-6
    entropy = -(F.softmax(clean, 1) * F.log_softmax(clean, 1)).sum(1).mean()
    torch.testing.assert_close(terms["match"], entropy)


def test_zeroth_order_loss_gradient_matches_back_propagation():
    """The black box's part of the chain rule estimated from queries: CGE exactly (to O(xi^2)),
    RGE in direction; the batch-coupled MMD term included."""
    from robustreid.attacks.black_box import BlackBox
    from robustreid.attacks.zeroth_order import cge, rge
    from robustreid.engine.denoiser_training import zeroth_order_loss_gradient

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 12, generator=g, dtype=torch.float64)
    model = lambda z: torch.tanh(z @ weight.T)  # noqa: E731
    point = torch.randn(4, 12, generator=g, dtype=torch.float64)
    clean = model(torch.randn(4, 12, generator=g, dtype=torch.float64))
    loss = DenoisingLoss("logits")
    z = point.clone().requires_grad_()
    true, = torch.autograd.grad(loss(clean, model(z))[0], z)

    box = BlackBox(model)
    value, _, grad = zeroth_order_loss_gradient(loss, box, clean, point,
                                                lambda f, x, fx: cge(f, x, 1e-4, "central", f_x=fx))
    torch.testing.assert_close(value, loss(clean, model(point))[0])
    torch.testing.assert_close(grad, true, rtol=1e-5, atol=1e-7)
    assert box.queries == 4 * (1 + 2 * 12)
    _, _, grad = zeroth_order_loss_gradient(
        loss, box, clean, point,
        lambda f, x, fx: rge(f, x, 3000, 0.005, f_x=fx, generator=torch.Generator().manual_seed(1)))
    assert F.cosine_similarity(grad, true, dim=1).min() > 0.97


# ------------------------------------------------------------------------------- training runs

def _cfg(output, *opts):
    return make_tiny_cfg(output, "MODEL.HEADS.NUM_CLASSES", "12", "DENOISER.ARCH", "SmallUNet",
                         "DENOISER.WIDTH", "4", "DENOISER.IMS_PER_BATCH", "4", "DENOISER.LR", "0.001",
                         "DENOISER.LOG_PERIOD", "1", "DENOISER.AE.WIDTH", "4",
                         "DENOISER.AE.LATENT_DIM", "4", *opts)


def _model(cfg):
    from robustreid.engine import RobustTrainer

    torch.manual_seed(0)
    return RobustTrainer.build_model(cfg).eval()


def _trainer(cfg, model, output=""):
    from fastreid.utils.env import seed_all_rng
    from robustreid.engine.denoiser_training import DenoiserTrainer

    seed_all_rng(1)  # as tools do (setup): the data order's seed comes from numpy
    return DenoiserTrainer(cfg, model, str(output))


def _objective(trainer, x, noise):
    """L_Tot of the current denoiser on a fixed batch and noise (white-box evaluation)."""
    with torch.no_grad(), trainer.extractor.frozen_eval():
        trainer.front.denoiser.eval()
        clean = trainer.model_output(x)
        return trainer.loss(clean, trainer.model_output(trainer.front.denoiser(x + noise)))[0].item()


def test_first_order_training_lowers_the_loss(tmp_path, datasets_root):
    """15 white-box steps on one batch (fresh noise each step) lower L_Tot on fixed noise. On
    retrieval features: an untrained model's identity logits are nearly uniform."""
    cfg = _cfg(tmp_path, "DENOISER.MODE", "first_order", "DENOISER.SIGMA", "0.5",
               "DENOISER.LR", "0.01", "DENOISER.IMS_PER_BATCH", "8", "DENOISER.ITERS", "2",
               "DENOISER.OUTPUT", "features")
    model = _model(cfg)
    trainer = _trainer(cfg, model)
    x = next(_trainer(cfg, model).stream)["images"] / 255.0
    noise = 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    before = _objective(trainer, x, noise)
    with trainer.extractor.frozen_eval():
        for _ in range(15):
            trainer._denoiser_step(x)
    after = _objective(trainer, x, noise)
    assert after < 0.9 * before, (before, after)
    summary = trainer.train()  # the loop: two more steps on the training stream, no queries
    assert summary["queries"] == 0 and summary["iterations"] == 2
    assert all(p.grad is None for p in model.parameters())


def _parameters(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_rge_training_queries_only_through_the_black_box(tmp_path, datasets_root):
    """ZO-RUDS: q + 2 queries per sample per step (f(x), f(z) and q forward differences), the model
    never gets a gradient, the denoiser moves."""
    from robustreid.engine.denoiser_training import queries_per_sample

    cfg = _cfg(tmp_path, "DENOISER.MODE", "rge", "DENOISER.Q", "3", "DENOISER.ITERS", "2")
    model = _model(cfg)
    trainer = _trainer(cfg, model)
    before = _parameters(trainer.front.denoiser)
    summary = trainer.train()
    assert queries_per_sample(cfg) == 3 + 2
    assert summary["queries"] == trainer.black_box.queries == 2 * 4 * (3 + 2)
    assert summary["queries_per_sample_per_step"] == 5
    assert all(p.grad is None for p in model.parameters())
    after = trainer.front.denoiser.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # antithetic differences: 2q + 2
    central = _cfg(tmp_path, "DENOISER.MODE", "rge", "DENOISER.Q", "3", "DENOISER.ITERS", "1",
                   "DENOISER.RGE_DIFFERENCE", "central")
    assert _trainer(central, model).train()["queries"] == 4 * (2 * 3 + 2)


def test_cge_ae_pretrains_the_autoencoder_then_trains_encoder_and_denoiser(tmp_path, datasets_root):
    """ZO-AE-RUDS (C): reconstruction pre-training moves the whole autoencoder and queries nothing;
    then CGE in the 4-d latent costs 2 * 4 + 2 queries per sample, moves the denoiser and the encoder,
    and leaves the decoder (now inside the black box) as it was."""
    from robustreid.engine.denoiser_training import load_denoiser

    out = tmp_path / "cge"
    cfg = _cfg(out, "DENOISER.MODE", "cge_ae", "DENOISER.AE.PRETRAIN_ITERS", "2",
               "DENOISER.ITERS", "2", "DENOISER.CHECKPOINT_PERIOD", "2")
    trainer = _trainer(cfg, _model(cfg), out)
    initial = _parameters(trainer.front)
    summary = trainer.train()
    assert summary["queries"] == 2 * 4 * (2 * 4 + 2)
    pretrained = load_denoiser(cfg, str(out / "denoiser_0000002.pth")).state_dict()
    final = trainer.front.state_dict()

    def moved(prefix, a, b):
        return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))

    assert moved("autoencoder.decoder.", initial, pretrained)
    assert not moved("denoiser.", initial, pretrained)
    assert not moved("autoencoder.decoder.", pretrained, final)
    assert moved("autoencoder.encoder.", pretrained, final) and moved("denoiser.", pretrained, final)


def test_mse_warm_start_trains_the_denoiser_alone_without_queries(tmp_path, datasets_root, caplog):
    """DENOISER.MSE_PRETRAIN_ITERS: the denoiser alone on ||D(x + eta) - x||^2 with its own Adam, no
    query; the mode's iterations and learning-rate schedule follow unchanged."""
    from robustreid.engine.denoiser_training import load_denoiser

    out = tmp_path / "warm"
    cfg = _cfg(out, "DENOISER.MODE", "rge", "DENOISER.Q", "2", "DENOISER.SIGMA", "0.25",
               "DENOISER.MSE_PRETRAIN_ITERS", "150", "DENOISER.MSE_PRETRAIN_LR", "0.01",
               "DENOISER.WIDTH", "8", "DENOISER.ITERS", "1", "DENOISER.CHECKPOINT_PERIOD", "150", "DENOISER.LOG_PERIOD", "150")
    trainer = _trainer(cfg, _model(cfg), out)
    x = next(_trainer(cfg, trainer.extractor.model).stream)["images"] / 255.0
    noise = 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))

    def mse(front):
        with torch.no_grad():
            return F.mse_loss(front.denoiser.eval()(x + noise), x).item()

    before = mse(trainer.front)
    with caplog.at_level("INFO", logger="robustreid.engine.denoiser_training"):
        summary = trainer.train()
    # the progress line gives the rate of the stage's own optimizer
    assert "iter 150/151 (denoiser MSE pre-training)" in caplog.text and "lr 1.00e-02" in caplog.text
    warm = load_denoiser(cfg, str(out / "denoiser_0000150.pth"))
    # below the noisy input itself (sigma^2 = 0.0625): it denoises, not merely copies
    assert mse(warm) < 0.8 * F.mse_loss(x + noise, x).item(), (before, mse(warm))
    assert summary["iterations"] == 151 and summary["queries"] == 1 * 4 * (2 + 2)  # the ZO step only
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.001)
    assert trainer.scheduler.last_epoch == 1
    assert all(p.grad is None for p in trainer.extractor.model.parameters())


def test_resume_continues_exactly_and_checkpoints_load(tmp_path, datasets_root):
    """Stopped after 3 of 5 iterations (autoencoder pre-training, MSE warm start, one ZO step) and
    resumed: the same weights, optimizer states, scheduler and query count as the uninterrupted run."""
    from robustreid.engine.denoiser_training import load_denoiser

    opts = ("DENOISER.MODE", "rge_ae", "DENOISER.Q", "2", "DENOISER.AE.PRETRAIN_ITERS", "1",
            "DENOISER.MSE_PRETRAIN_ITERS", "1", "DENOISER.DECAY_EVERY", "2")
    model = _model(_cfg(tmp_path))
    whole = _trainer(_cfg(tmp_path / "a", *opts, "DENOISER.ITERS", "3"), model, tmp_path / "a")
    whole.train()
    _trainer(_cfg(tmp_path / "b", *opts, "DENOISER.ITERS", "1"), model, tmp_path / "b").train()
    torch.manual_seed(123)  # whatever ran in between: the checkpoint's generators take over
    resumed = _trainer(_cfg(tmp_path / "b", *opts, "DENOISER.ITERS", "3"), model, tmp_path / "b")
    resumed.resume_or_start(resume=True)
    assert resumed.progress.iteration == 3
    resumed.train()
    for key, value in whole.front.state_dict().items():
        torch.testing.assert_close(resumed.front.state_dict()[key], value, rtol=0, atol=0)
    assert resumed.black_box.queries == whole.black_box.queries == 3 * 4 * (2 + 2)
    assert resumed.scheduler.state_dict() == whole.scheduler.state_dict()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # decayed at iteration 2
    for a, b in ((whole.optimizer, resumed.optimizer), (whole.ae_optimizer, resumed.ae_optimizer),
                 (whole.mse_optimizer, resumed.mse_optimizer)):
        for state_a, state_b in zip(a.state_dict()["state"].values(), b.state_dict()["state"].values()):
            torch.testing.assert_close(state_a["exp_avg"], state_b["exp_avg"], rtol=0, atol=0)

    cfg = _cfg(tmp_path, *opts)
    front = load_denoiser(cfg, str(tmp_path / "a" / "denoiser_final.pth"))
    assert not front.training
    for key, value in whole.front.state_dict().items():
        torch.testing.assert_close(front.state_dict()[key], value)
    with pytest.raises(ConfigError, match="does not match DENOISER"):  # no autoencoder in rge
        load_denoiser(_cfg(tmp_path, "DENOISER.MODE", "rge"), str(tmp_path / "a" / "denoiser_final.pth"))


@pytest.mark.parametrize("key,value,message", [
    ("DENOISER.MODE", "zo", "DENOISER.MODE must be one of"),
    ("DENOISER.ARCH", "UNet3", "DENOISER.ARCH must be one of"),
    ("DENOISER.Q", "0", "DENOISER.Q must be an integer >= 1"),
    ("DENOISER.XI", "0.0", "DENOISER.XI must be a number > 0"),
    ("DENOISER.LOSS.MMD", "-1.0", "DENOISER.LOSS.MMD must be a number >= 0"),
])
def test_bad_denoiser_settings_are_config_errors(tmp_path, key, value, message):
    from robustreid.engine.denoiser_training import check_denoiser_config

    with pytest.raises(ConfigError, match=message):
        check_denoiser_config(_cfg(tmp_path, key, value))


def test_logits_need_a_sized_classifier(tmp_path, datasets_root):
    cfg = _cfg(tmp_path, "MODEL.HEADS.NUM_CLASSES", "0")
    with pytest.raises(ConfigError, match="MODEL.HEADS.NUM_CLASSES 0"):
        _trainer(cfg, _model(cfg))
    cfg = _cfg(tmp_path, "MODEL.HEADS.NUM_CLASSES", "0", "DENOISER.OUTPUT", "features")
    _trainer(cfg, _model(cfg))


def test_autoencoder_modes_need_image_sides_divisible_by_their_levels(tmp_path):
    from robustreid.engine.denoiser_training import check_denoiser_config

    cfg = _cfg(tmp_path, "DENOISER.MODE", "cge_ae", "INPUT.SIZE_TRAIN", "[60, 32]",
               "INPUT.SIZE_TEST", "[60, 32]")
    with pytest.raises(ConfigError, match="multiples of 2\\^DENOISER.AE.LEVELS = 16"):
        check_denoiser_config(cfg)
    check_denoiser_config(_cfg(tmp_path, "INPUT.SIZE_TRAIN", "[60, 32]", "INPUT.SIZE_TEST",
                               "[60, 32]"))  # the U-Net takes any size


def test_train_denoiser_tool(tmp_path, datasets_root, capsys):
    """One ZO iteration end to end from a weights file (the classifier sized from it: the config
    says NUM_CLASSES 0); bad input is one error line, exit 2."""
    from robustreid.engine import RobustCheckpointer
    from robustreid.engine.denoiser_training import load_denoiser

    cfg = _cfg(tmp_path)
    weights = tmp_path / "model.pth"
    RobustCheckpointer(_model(cfg), str(tmp_path)).save("model")
    tool = load_tool("train_denoiser")
    config = os.path.join(os.path.dirname(__file__), "..", "configs/SynthReID/bagtricks_R18.yml")
    base = ["--config-file", config, "--output", str(tmp_path / "den"),
            "DATASETS.NAMES", "('SynthReIDTiny',)", "DATASETS.TESTS", "('SynthReIDTiny',)",
            "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]",
            "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "run"),
            "DENOISER.ARCH", "SmallUNet", "DENOISER.WIDTH", "4", "DENOISER.IMS_PER_BATCH", "4",
            "DENOISER.Q", "2", "DENOISER.ITERS", "1"]
    assert tool.main(base + ["MODEL.WEIGHTS", str(weights)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "1 iterations" in last and "16 queries (4 per sample per step)" in last, last
    load_denoiser(cfg, str(tmp_path / "den" / "denoiser_final.pth"))

    assert tool.main(base + ["MODEL.WEIGHTS", str(weights), "DENOISER.MODE", "zo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: DENOISER.MODE must be one of"), err
    assert tool.main(base) == 2
    assert "error: no model to train a denoiser for" in capsys.readouterr().err

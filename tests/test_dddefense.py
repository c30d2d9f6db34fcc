"""DDDefense's bi-adversarial self-meta defense: FNES (eq. 4), the feature discriminator (eq. 6-8),
self-meta learning (eq. 9-13), and their switches in RobustTrainer."""
import math

import pytest
import torch
import torch.nn as nn

from conftest import make_tiny_cfg

DDD_OPTS = ("MODEL.META_ARCHITECTURE", "RobustBaseline", "ADV_TRAIN.ENABLED", "True",
            "ADV_TRAIN.STEPS", "2", "ADV_TRAIN.INCLUDE_CLEAN", "True",
            "ADV_TRAIN.FNES.ENABLED", "True",
            "ADV_TRAIN.DISCRIMINATOR.ENABLED", "True", "META_LEARNING.ENABLED", "True")


# --- FNES (eq. 4) ------------------------------------------------------------------------------
def test_fnes_labels_follow_eq4():
    from robustreid.engine.fnes import FnesSettings, fnes_labels

    s = FnesSettings()  # gamma 1.5, U(0.3, 0.8), lambda1 0.9, lambda2 0.95, v 0.01
    k = 5
    pids, far = torch.tensor([0, 3]), torch.tensor([4, 1])
    omega = torch.tensor([0.5, 0.3])
    labels = fnes_labels(pids, far, omega, k, s, has_far=torch.tensor([True, True]))
    assert torch.allclose(labels.sum(1), torch.ones(2))
    w = 0.5  # row 0, by hand: true 0, far 4, others 1..3
    assert labels[0, 0].item() == pytest.approx(w * 0.9 + (1 - w) * (0.95 - 0.01))
    assert labels[0, 4].item() == pytest.approx(w * 0.1 / 4 + (1 - w) * (0.05 / 4 + 0.01))
    for other in (1, 2, 3):
        assert labels[0, other].item() == pytest.approx(w * 0.1 / 4 + (1 - w) * 0.05 / 4)
    w = 0.3  # row 1: v moved from class 3 to class 1
    assert labels[1, 3].item() == pytest.approx(w * 0.9 + (1 - w) * 0.94)
    assert labels[1, 1].item() == pytest.approx(w * 0.025 + (1 - w) * (0.0125 + 0.01))
    # A sample without another identity in its guide set keeps phi(y, lambda2) unmoved.
    alone = fnes_labels(pids, far, omega, k, s, has_far=torch.tensor([False, True]))
    assert alone[0, 4].item() == pytest.approx(0.5 * 0.025 + 0.5 * 0.0125)


def test_fnes_images_lie_between_x_and_the_scaled_perturbation():
    from robustreid.engine.fnes import fnes_images

    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 4) * 0.5 + 0.25  # interior: no clipping
    x_hat = x + (torch.rand_like(x) * 2 - 1) * 5 / 255
    omega = torch.tensor([0.3, 0.5, 0.7, 0.8])
    adv = fnes_images(x, x_hat, omega, gamma=1.5)
    expected = x + ((1 - omega) * 1.5).view(-1, 1, 1, 1) * (x_hat - x)  # eq. 4 expanded
    assert torch.allclose(adv, expected, atol=1e-7)
    delta, scaled = adv - x, 1.5 * (x_hat - x)
    assert (delta * scaled >= 0).all() and (delta.abs() <= scaled.abs() + 1e-7).all()
    # At the image border x_adv stays a valid image.
    assert fnes_images(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([0.3]),
                       1.5).min() >= 0


def test_soft_cross_entropy_on_smoothed_labels_is_fastreids_loss():
    from fastreid.modeling.losses import cross_entropy_loss
    from robustreid.modeling.losses.soft_labels import smooth_labels, soft_cross_entropy

    torch.manual_seed(0)
    logits, pids = torch.randn(6, 7), torch.tensor([0, 1, 2, 3, 4, 6])
    ours = soft_cross_entropy(logits, smooth_labels(pids, 7, 0.9))
    assert torch.equal(ours, cross_entropy_loss(logits, pids, 0.1))


# --- feature discriminator (eq. 6-8) -----------------------------------------------------------
def test_discriminator_losses_by_hand():
    from robustreid.modeling.losses.feature_adversary import (discriminator_loss,
                                                              encoder_confusion_loss)

    logits = torch.tensor([0.0, math.log(3.0), 0.0])  # D = 0.5, 0.75 (clean); 0.5 (adversarial)
    is_adv = torch.tensor([False, False, True])
    expected = -((math.log(0.5) + math.log(0.75)) / 2 + math.log(1 - 0.5))
    assert discriminator_loss(logits, is_adv).item() == pytest.approx(expected)
    assert encoder_confusion_loss(logits, is_adv).item() == pytest.approx(-expected)


def test_discriminator_learns_separable_features_and_encoder_loss_spares_it():
    from robustreid.engine.adversarial_learning import FeatureAdversary
    from robustreid.modeling.losses.feature_adversary import FeatureDiscriminator

    torch.manual_seed(0)
    d = FeatureDiscriminator(8, (16,))
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    adversary = FeatureAdversary(d, opt, torch.optim.lr_scheduler.MultiStepLR(opt, [1]), 0.001)
    features = torch.cat([torch.randn(16, 8) + 2, torch.randn(16, 8) - 2])
    is_adv = torch.arange(32) >= 16
    losses = [adversary.update(features, is_adv).item() for _ in range(60)]
    assert losses[0] > 0.5 and losses[-1] < 0.05 * losses[0]

    d_grads = [p.grad.clone() for p in d.parameters()]  # from D's last update
    feats = features.clone().requires_grad_(True)
    adversary.encoder_loss(feats, is_adv).backward()
    assert feats.grad.abs().sum() > 0  # L_E reaches the encoder's features ...
    assert all(torch.equal(p.grad, g) for p, g in zip(d.parameters(), d_grads))  # ... never D


# --- self-meta learning (eq. 9-13) ---------------------------------------------------------------
def test_split_by_identity_keeps_identities_whole():
    from robustreid.engine.meta_step import split_by_identity

    torch.manual_seed(0)
    pids = torch.arange(16).repeat_interleave(4).repeat(2)  # 16 ids x 4, clean + adversarial
    test = split_by_identity(pids, 0.25)
    assert len(torch.unique(pids[test])) == 4
    assert not set(pids[test].tolist()) & set(pids[~test].tolist())


class _Quadratic(nn.Module):
    """A tiny model with a non-quadratic loss, so second-order terms matter."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64))

    def forward(self, batch):
        return {"loss": torch.tanh(batch["x"] @ self.w - batch["y"]).pow(2).mean()}


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_step_gradient_matches_finite_differences(first_order):
    from torch.func import functional_call

    from robustreid.engine.meta_step import meta_losses

    torch.manual_seed(0)
    model, alpha = _Quadratic(), 0.5
    train = {"x": torch.randn(6, 3, dtype=torch.float64), "y": torch.randn(6, dtype=torch.float64)}
    test = {"x": torch.randn(3, 3, dtype=torch.float64), "y": torch.randn(3, dtype=torch.float64)}

    def loss_fn(params, batch):
        return functional_call(model, params, (batch,))

    total = sum(meta_losses(model, loss_fn, train, test, alpha, first_order).values())
    grad, = torch.autograd.grad(total, model.w)

    def loss_at(w, batch):
        return torch.tanh(batch["x"] @ w - batch["y"]).pow(2).mean()

    def inner_grad(w):
        w = w.detach().requires_grad_(True)
        return torch.autograd.grad(loss_at(w, train), w)[0]

    def objective(w):  # eq. 13 evaluated directly
        return loss_at(w, train) + loss_at(w - alpha * inner_grad(w), test)

    w0, h = model.w.detach(), 1e-6
    if first_order:  # grad L_mt(theta) + grad L_mt-test at theta_temp, by finite differences
        temp = w0 - alpha * inner_grad(w0)
        expected = torch.stack([
            (loss_at(w0 + h * e, train) - loss_at(w0 - h * e, train)
             + loss_at(temp + h * e, test) - loss_at(temp - h * e, test)) / (2 * h)
            for e in torch.eye(3, dtype=torch.float64)])
    else:
        expected = torch.stack([(objective(w0 + h * e) - objective(w0 - h * e)) / (2 * h)
                                for e in torch.eye(3, dtype=torch.float64)])
    assert torch.allclose(grad, expected, atol=1e-7)
    if not first_order:  # the second-order term is not negligible here
        temp = w0 - alpha * inner_grad(w0)
        fo = torch.autograd.functional.jacobian(lambda w: loss_at(w, train), w0) + \
            torch.autograd.functional.jacobian(lambda w: loss_at(w, test), temp)
        assert (grad - fo).abs().max() > 1e-3


def test_meta_test_forward_leaves_running_statistics_alone():
    from torch.func import functional_call

    from robustreid.engine.meta_step import meta_losses

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    def loss_fn(params, batch):
        return {"loss": functional_call(model, params, (batch,)).pow(2).mean()}

    train, test = torch.randn(8, 4), torch.randn(8, 4) * 10 + 5
    reference = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    reference.load_state_dict(model.state_dict())
    reference(train)  # the meta-train forward alone
    meta_losses(model, loss_fn, train, test, 0.1)
    assert torch.allclose(model[1].running_mean, reference[1].running_mean)
    assert torch.allclose(model[1].running_var, reference[1].running_var)


# --- the switches inside RobustTrainer -----------------------------------------------------------
def _train(cfg):
    from fastreid.utils.env import seed_all_rng

    from robustreid.engine import RobustTrainer

    seed_all_rng(0)  # as tools/train_net.py's setup() with ROBUSTREID.SEED 0
    trainer = RobustTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


def test_every_switch_off_is_fastreids_training_bit_for_bit(tmp_path, datasets_root):
    """RobustTrainer with RobustBaseline and every switch off against fastreid's own DefaultTrainer
    (Baseline, SimpleTrainer's step, fastreid's hooks and LR schedule), from the same initial
    weights on the same batches: every weight and buffer equal after an epoch of steps. The
    reference differs from stock fastreid only by robustreid.compat's torch 2 optimizer fix
    (without it fastreid does not train at all)."""
    from fastreid.engine import DefaultTrainer
    from fastreid.engine.train_loop import SimpleTrainer
    from fastreid.utils.env import seed_all_rng

    from robustreid.engine import RobustTrainer

    class FastreidTrainer(DefaultTrainer):
        @classmethod
        def test(cls, cfg, model):  # skipped: it reads the weights, never changes them, and
            return {}  # fastreid's Python ranker builds a ragged CMC array numpy 2 rejects here

    opts = ("SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "100")
    seed_all_rng(0)
    robust = RobustTrainer(make_tiny_cfg(tmp_path / "robust", *opts, "MODEL.META_ARCHITECTURE",
                                         "RobustBaseline"))
    (tmp_path / "fastreid").mkdir()  # fastreid expects default_setup to have made it
    seed_all_rng(0)
    reference = FastreidTrainer(make_tiny_cfg(tmp_path / "fastreid", *opts))
    assert type(reference._trainer) is SimpleTrainer and type(reference.model).__name__ == "Baseline"
    initial = {k: v.clone() for k, v in robust.model.state_dict().items()}
    reference.model.load_state_dict(initial)
    assert robust.max_iter == reference.max_iter >= 3
    batches = [next(robust._trainer._data_loader_iter) for _ in range(robust.max_iter)]
    for trainer in (robust, reference):
        # fastreid normalises images in place: each trainer gets its own copies
        trainer._trainer._data_loader_iter = iter([{**b, "images": b["images"].clone()}
                                                   for b in batches])
        trainer.resume_or_load(resume=False)
        trainer.train()
    trained, expected = robust.model.state_dict(), reference.model.state_dict()
    assert trained.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(trained[name], value), name
    assert not torch.equal(expected["backbone.conv1.weight"], initial["backbone.conv1.weight"])


def test_dddefense_trains_and_saves_every_trainable_part(tmp_path, datasets_root):
    # that a resumed run continues all of them exactly: test_resume.py
    cfg = make_tiny_cfg(tmp_path, *DDD_OPTS, "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "100")
    first = _train(cfg)
    history = first.storage.histories()
    for key in ("meta_train/loss_cls", "meta_test/loss_triplet", "meta_train/loss_adv_encoder",
                "loss_discriminator", "time/adversarial"):
        assert key in history, key
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert {"discriminator", "discriminator_optimizer", "discriminator_scheduler",
            "best_robust"} <= set(saved)
    assert saved["discriminator_scheduler"]["last_epoch"] == 1  # stepped once per epoch
    d = first.objective.adversary
    assert d.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.SOLVER.BASE_LR * 0.5)


def test_fnes_batch_marks_adversarial_rows_and_soft_labels(tiny_cfg):
    from fastreid.modeling.meta_arch import build_model

    from robustreid.engine.train_steps import MetricAdversarialBatch

    cfg = tiny_cfg.clone()
    cfg.MODEL.HEADS.NUM_CLASSES = 4
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = {"images": torch.rand(8, 3, 64, 32) * 255, "targets": torch.arange(4).repeat(2),
             "camids": torch.arange(8) % 3}
    cfg.defrost()
    cfg.ADV_TRAIN.FNES.ENABLED = True
    cfg.ADV_TRAIN.INCLUDE_CLEAN = True
    cfg.ADV_TRAIN.STEPS = 2
    torch.manual_seed(0)
    out = MetricAdversarialBatch.from_config(cfg)(model, batch)
    assert out["is_adversarial"].tolist() == [False] * 8 + [True] * 8
    soft = out["soft_targets"]
    assert soft.shape == (16, 4) and torch.allclose(soft.sum(1), torch.ones(16))
    assert torch.equal(soft[:8].argmax(1), batch["targets"])
    assert torch.allclose(soft[:8].max(1).values, torch.full((8,), 0.9))  # phi(y, 1 - CE.EPSILON)
    delta = (out["images"][8:] - batch["images"]).abs().amax()
    assert delta <= 1.05 * 5 + 1e-3  # (1 - omega) * gamma <= 0.7 * 1.5 of the 5/255 budget
    # By hand from the same seeded draws: FNA's x_hat (the phase without FNES), then omega;
    # x_adv = x + (1 - omega) gamma (x_hat - x) in [0, 1] (eq. 4).
    cfg.ADV_TRAIN.FNES.ENABLED = False
    torch.manual_seed(0)
    x_hat = MetricAdversarialBatch.from_config(cfg)(model, batch)["images"][8:] / 255
    w = (1 - torch.empty(8).uniform_(0.3, 0.8)).view(8, 1, 1, 1)
    x = batch["images"] / 255
    expected = (x + w * 1.5 * (x_hat - x)).clamp(0, 1)
    assert torch.allclose(out["images"][8:] / 255, expected, atol=1e-6)
    assert not torch.allclose(expected, x_hat, atol=1e-3)


@pytest.mark.parametrize("opts, message", [
    (("ADV_TRAIN.ENABLED", "True", "ADV_TRAIN.FNES.ENABLED", "True"), "RobustBaseline"),
    (("MODEL.META_ARCHITECTURE", "RobustBaseline", "ADV_TRAIN.DISCRIMINATOR.ENABLED", "True"),
     "ADV_TRAIN.ENABLED"),
    (("MODEL.META_ARCHITECTURE", "RobustBaseline", "ADV_TRAIN.ENABLED", "True",
      "ADV_TRAIN.DISCRIMINATOR.ENABLED", "True"), "INCLUDE_CLEAN"),
    (("MODEL.META_ARCHITECTURE", "RobustBaseline", "META_LEARNING.ENABLED", "True",
      "META_LEARNING.TEST_FRACTION", "1.0"), "TEST_FRACTION"),
    (("MODEL.META_ARCHITECTURE", "RobustBaseline", "ADV_TRAIN.ENABLED", "True",
      "ADV_TRAIN.FNES.ENABLED", "True", "ADV_TRAIN.FNES.GAMMA", "0.5"), "GAMMA"),
])
def test_impossible_switch_combinations_are_config_errors(opts, message, tmp_path):
    from robustreid.config import ConfigError
    from robustreid.engine.train_steps import check_training_config

    with pytest.raises(ConfigError, match=message):
        check_training_config(make_tiny_cfg(tmp_path, *opts))


def test_best_robust_checkpoint_keeps_the_resume_tag(tmp_path, datasets_root):
    cfg = make_tiny_cfg(tmp_path, "SOLVER.MAX_EPOCH", "2", "TEST.EVAL_PERIOD", "1",
                        "TEST.ROBUST.BEST_METRIC", "mAP")
    trainer = _train(cfg)
    assert (tmp_path / "model_best_robust.pth").is_file()
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"
    best = torch.load(tmp_path / "model_best_robust.pth", weights_only=True)
    assert best["best_metric"]["mAP"] == pytest.approx(trainer.best_robust.best)


def test_separate_losses_sum_the_clean_and_adversarial_parts_of_eq10(tiny_cfg):
    """ADV_TRAIN.SEPARATE_LOSSES: l(G, x, y) + l(G, x_adv, y_adv), each part's losses on its own
    rows; off, one loss over the combined batch (the default, unchanged)."""
    from fastreid.modeling.meta_arch import build_model
    from fastreid.utils.events import EventStorage

    cfg = tiny_cfg.clone()
    cfg.defrost()
    cfg.MODEL.META_ARCHITECTURE = "RobustBaseline"
    cfg.MODEL.HEADS.NUM_CLASSES = 4
    torch.manual_seed(0)
    combined = build_model(cfg).train()
    cfg.ADV_TRAIN.SEPARATE_LOSSES = True
    separate = build_model(cfg).train()
    separate.load_state_dict(combined.state_dict())
    torch.manual_seed(1)
    images = torch.rand(16, 3, 64, 32) * 255
    pids = torch.arange(4).repeat(4)
    is_adv = torch.arange(16) >= 8
    batch = {"images": images, "targets": pids, "camids": torch.zeros(16, dtype=torch.long),
             "is_adversarial": is_adv}
    with EventStorage(0):  # fastreid's losses log the classifier accuracy
        # One training-mode forward over the 16 rows (BN batch statistics of the whole batch),
        # then the losses by hand on each half of the head outputs.
        # (fastreid's preprocess_image normalises the batch's images in place: a copy per forward)
        losses, outputs = separate(dict(batch, images=images.clone()), return_outputs=True)
        expected = {}
        for rows in (~is_adv, is_adv):
            part = {k: v[rows] for k, v in outputs.items() if k != "neck_features"}
            for name, value in combined.losses(part, pids[rows]).items():
                expected[name] = expected.get(name, 0) + value
        whole = combined(dict(batch, images=images.clone()))
        plain = separate({"images": images.clone(), "targets": pids, "camids": batch["camids"]})
    assert set(losses) == set(expected) == {"loss_cls", "loss_triplet"}
    for name in losses:
        assert torch.allclose(losses[name], expected[name], rtol=1e-5), name
    # CE is a mean over rows: over two equal halves the combined loss is half the summed parts;
    # the triplet loss mines within each part instead of across them, so it differs otherwise.
    assert torch.allclose(whole["loss_cls"], 0.5 * losses["loss_cls"], rtol=1e-5)
    assert not torch.allclose(whole["loss_triplet"], 0.5 * losses["loss_triplet"])
    # Without adversarial rows the switch changes nothing.
    assert all(torch.equal(plain[k], whole[k]) for k in whole)

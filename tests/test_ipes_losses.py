"""IPES-GAN's losses and schedule (issue 16, item 2): hand-computed values of eq. 3.1-3.18 and the
w2 / w4 ramp of eq. 3.19 (0 for 20K iterations, then linear to 3 over 6K)."""
import math

import pytest
import torch
import torch.nn.functional as F

from robustreid.config import load_config
from robustreid.modeling.losses.ipes import (camera_loss, cyclic_reconstruction_loss,
                                             feature_consistency_loss, ipes_objective_weights,
                                             lsgan_discriminator_loss, lsgan_generator_loss,
                                             ramped_weight, soft_label_cross_entropy,
                                             teacher_kl_divergence, weighted_total)


def test_cyclic_reconstruction_loss_hand_case():
    source = torch.zeros(1, 3, 2, 2)
    source_cycled = torch.full((1, 3, 2, 2), 0.5)             # |0 - 0.5| everywhere: 0.5
    target = torch.ones(2, 3, 2, 2)
    target_cycled = target.clone()
    target_cycled[0, 0, 0, 0] = -1.0                           # one element off by 2 of 24
    loss = cyclic_reconstruction_loss(source, source_cycled, target, target_cycled)
    assert loss.item() == pytest.approx(0.5 + 2 / 24)


def test_feature_consistency_targets_the_real_features():
    real = torch.tensor([[1.0, 2.0]], requires_grad=True)
    regenerated = torch.tensor([[2.0, 0.0]], requires_grad=True)
    style, style_again = torch.zeros(1, 4), torch.full((1, 4), 0.25)
    loss = feature_consistency_loss([(real, regenerated), (style, style_again)])
    assert loss.item() == pytest.approx((1 + 2) / 2 + 0.25)
    loss.backward()
    assert real.grad is None and regenerated.grad.tolist() == [[0.5, -0.5]]


def test_camera_and_lsgan_losses():
    logits = torch.tensor([[0.0, math.log(3.0)]])            # p = (1/4, 3/4)
    assert camera_loss([(logits, torch.tensor([1])), (logits, torch.tensor([0]))]).item() == \
        pytest.approx(-math.log(0.75) - math.log(0.25))
    fake = [torch.tensor([0.0, 1.0]), torch.tensor([[3.0]])]
    assert lsgan_generator_loss(fake).item() == pytest.approx(0.5 + 4.0)
    real = [torch.tensor([1.0, 0.0])]
    assert lsgan_discriminator_loss(real, fake).item() == pytest.approx(0.5 + 0.5 + 9.0)


def test_soft_cross_entropy_is_the_cross_entropy_to_eq_3_16_labels():
    torch.manual_seed(0)
    logits, labels, eps = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2]), 0.1
    soft = torch.full((5, 7), eps / 7)
    soft[torch.arange(5), labels] = 1 - eps + eps / 7
    expected = -(soft * F.log_softmax(logits, 1)).sum(1).mean()
    assert soft_label_cross_entropy(logits, labels, eps).item() == pytest.approx(expected.item())
    # hand case, uniform logits over 4 classes: -log(1/4) whatever eps
    assert soft_label_cross_entropy(torch.zeros(1, 4), torch.tensor([1]), 0.3).item() == \
        pytest.approx(math.log(4))


def test_kl_divergence_to_the_teacher():
    teacher = torch.tensor([[math.log(0.5), math.log(0.5)]])
    student = torch.tensor([[math.log(0.25), math.log(0.75)]], requires_grad=True)
    kl = teacher_kl_divergence(student, teacher)
    assert kl.item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    assert teacher_kl_divergence(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_w2_and_w4_stay_zero_for_20k_iterations_then_ramp_to_3_over_6k():
    cfg = load_config()  # the thesis's defaults
    for iteration, expected in [(0, 0.0), (20000, 0.0), (23000, 1.5), (26000, 3.0), (40000, 3.0)]:
        weights = ipes_objective_weights(cfg, iteration)
        assert weights["loss_con"] == weights["loss_kl"] == pytest.approx(expected), iteration
        assert (weights["loss_cyc"], weights["loss_cam"], weights["loss_adv"], weights["loss_ce"],
                weights["loss_soft_ce"]) == (5.0, 1.0, 1.0, 1.0, 0.5)
    assert ramped_weight(20001, 3.0, 20000, 6000) == pytest.approx(3.0 / 6000)
    assert ramped_weight(5, 2.0, 4, 0) == 2.0  # no ramp: on at once after the start


def test_weighted_total_skips_zero_weights():
    a = torch.tensor(2.0, requires_grad=True)
    nan = torch.tensor(float("nan"))
    total = weighted_total({"loss_cyc": a, "loss_kl": nan}, {"loss_cyc": 5.0, "loss_kl": 0.0})
    assert total.item() == 10.0

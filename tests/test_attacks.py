"""robustreid.attacks: losses and first steps against hand-computed values on a 2-D linear "model",
budgets, input safety, settings errors, advertorch equivalence, BPDA, EOT, and a real fastreid model."""
import pytest
import torch
import torch.nn as nn
from advertorch.attacks import LinfPGDAttack
from advertorch.defenses import BitSqueezing
from fastreid.layers.any_softmax import Linear as LinearClassifier

import robustreid.attacks as attacks
from robustreid.attacks import (AttackConfigError, EOTAttack, GuideSet, ReidFeatureExtractor,
                                build_attack, build_defense, eps_from_255)
from robustreid.attacks.iterative import random_start

from conftest import REPO, make_tiny_cfg

ALL_ATTACKS = ["FGSM", "FNA", "FNA_PULL", "IFGSM", "MIFGSM", "NIFGSM", "PGD", "SINIFGSM", "SMA"]
FGSM_FAMILY = ["FGSM", "IFGSM", "MIFGSM", "NIFGSM", "SINIFGSM"]


class LinearReid(nn.Module):
    """A fastreid-shaped toy: reads batched["images"] in [0, 255], normalises it IN PLACE (as
    fastreid's preprocess_image does) and returns A @ flatten(x); heads.weight / heads.cls_layer
    give identity logits. ``inputs`` records every [0, 1] batch it was given."""

    def __init__(self, A, classifier, scale=1.0, sign_flip=False):
        super().__init__()
        self.A = nn.Parameter(A.clone())
        self.heads = nn.Module()
        self.heads.weight = nn.Parameter(classifier.clone())
        self.heads.cls_layer = LinearClassifier(len(classifier), scale, 0.0)
        self.sign_flip = sign_flip
        self.inputs = []

    def forward(self, batched):
        images = batched["images"]
        images.div_(255.0)
        self.inputs.append(images.detach().clone())
        features = images.flatten(1) @ self.A.T
        if self.sign_flip:  # a stochastic model: each forward multiplies each feature by +-1
            features = features * (torch.randint(0, 2, (len(features), 1)) * 2 - 1)
        return features


# --- the 2-D world: images are (1, 1, 2), f(x) = diag(2, 1) x --------------------------------------
A2 = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
W2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])  # 3 identity classes
X = torch.tensor([[0.5, 0.5], [0.25, 0.75]]).view(2, 1, 1, 2)  # f = (1, .5) and (.5, .75)
PIDS = torch.tensor([1, 2])
# Guide rows: 0 and 2 are the two attacked samples themselves (sample_index [0, 2]).
GUIDE_FEATURES = torch.tensor([[1.0, 0.5], [0.0, 1.0],     # pid 1: centroid (.5, .75)
                               [0.5, 0.75], [1.5, 0.75],   # pid 2: centroid (1, .75)
                               [3.0, 1.0], [3.0, 0.0],     # pid 3: centroid (3, .5)
                               [-1.0, 2.0]])               # pid 4: centroid (-1, 2)
GUIDE_PIDS = torch.tensor([1, 1, 2, 2, 3, 3, 4])
SAMPLE_INDEX = torch.tensor([0, 2])
G1, G3 = GUIDE_FEATURES[1], GUIDE_FEATURES[3]  # each sample's only other same-ID guide
C3, C4 = torch.tensor([3.0, 0.5]), torch.tensor([-1.0, 2.0])
# Farthest other-ID centroids from the clean features, by squared Euclidean distance:
#   sample 0, f=(1,.5):  c2 .0625, c3 4, c4 6.25       -> c4
#   sample 1, f=(.5,.75): c1 0,    c3 6.3125, c4 3.8125 -> c3
# and by cosine distance sample 1 switches to c4 (1 - cos = .316 for c3, .504 for c4).
D = torch.tensor([[0.01, -0.02], [-0.03, 0.015]]).view(2, 1, 1, 2)  # a point to evaluate losses at


def sq(a, b):
    return ((a - b) ** 2).sum(-1)


def cos_dist(a, b):
    return 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def unit(v):
    return v / v.norm(dim=-1, keepdim=True)


def ama(f):
    return sq(unit(f[0]), unit(G1)) + sq(unit(f[1]), unit(G3))


HAND_LOSSES = {  # f: (2, 2) features of the two samples at the evaluated point
    "FNA": lambda f: sq(f[0], G1) - sq(f[0], C4) + sq(f[1], G3) - sq(f[1], C3),
    "FNA_PULL": lambda f: -sq(f[0], C4) - sq(f[1], C3),
    "IFGSM": ama, "FGSM": ama, "MIFGSM": ama, "NIFGSM": ama,
}
LABELS = torch.tensor([0, 2])


def hand_objective(name, x):
    """The objective each attack maximises, written from its formula with the numbers above."""
    f = x.flatten(1) @ A2.T
    if name == "SMA":
        return sq(f, X.flatten(1) @ A2.T).sum()
    if name == "PGD":
        logits = f @ W2.T
        return -(logits.log_softmax(1)[torch.arange(2), LABELS]).sum()
    if name == "SINIFGSM":  # mean over the 5 scale copies x / 2^i
        return sum(ama((x / 2 ** i).flatten(1) @ A2.T) for i in range(5)) / 5
    return HAND_LOSSES[name](f)


def toy_extractor(**kw):
    return ReidFeatureExtractor(LinearReid(A2, W2, **kw))


def guide_args(name):
    """What each attack is given besides the images and pids: PGD its class labels."""
    if name == "PGD":
        return dict(targets=LABELS)
    return dict(guides=GuideSet(GUIDE_FEATURES, GUIDE_PIDS), sample_index=SAMPLE_INDEX)


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_loss_matches_hand_computed_value(name):
    attack = build_attack(name, toy_extractor(), eps=8, steps=1)
    if name == "PGD":
        objective = attack.objective(X, LABELS)
    else:
        objective = attack.objective(X, PIDS, **guide_args(name))
    value = objective(X + D)
    assert value.item() == pytest.approx(hand_objective(name, X + D).item(), rel=1e-5, abs=1e-6)


def test_fna_value_at_the_clean_point_by_hand():
    # sample 0: |f-g1|^2 - |f-c4|^2 = 1.25 - 6.25; sample 1: |f-g3|^2 - |f-c3|^2 = 1 - 6.3125
    attack = build_attack("FNA", toy_extractor(), eps=8, steps=1)
    value = attack.objective(X, PIDS, GuideSet(GUIDE_FEATURES, GUIDE_PIDS), SAMPLE_INDEX)(X)
    assert value.item() == pytest.approx(-5.0 - 5.3125, rel=1e-6)


def test_cosine_distance_picks_the_farthest_centroid_by_cosine():
    attack = build_attack("FNA", toy_extractor(), eps=8, steps=1, distance="cosine")
    value = attack.objective(X, PIDS, GuideSet(GUIDE_FEATURES, GUIDE_PIDS), SAMPLE_INDEX)(X + D)
    f = (X + D).flatten(1) @ A2.T
    expected = (cos_dist(f[0], G1) - cos_dist(f[0], C4)) + (cos_dist(f[1], G3) - cos_dist(f[1], C4))
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", FGSM_FAMILY)
def test_fgsm_family_with_the_fna_loss(name):
    attack = build_attack(name, toy_extractor(), eps=8, steps=1, loss="fna")
    value = attack.objective(X, PIDS, GuideSet(GUIDE_FEATURES, GUIDE_PIDS), SAMPLE_INDEX)(X + D)
    scale_copies = 5 if name == "SINIFGSM" else 1
    expected = sum(HAND_LOSSES["FNA"](((X + D) / 2 ** i).flatten(1) @ A2.T)
                   for i in range(scale_copies)) / scale_copies
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_first_step_follows_the_sign_of_the_hand_gradient(name):
    eps01 = 8 / 255
    attack = build_attack(name, toy_extractor(), eps=8, steps=1,
                          **({} if name == "SMA" else {"rand_init": False}))
    torch.manual_seed(0)
    adv = attack.perturb(X, PIDS, **guide_args(name))
    # SMA starts from advertorch's uniform draw in the eps-ball, reproduced here.
    torch.manual_seed(0)
    start = X + (torch.zeros_like(X).uniform_(-1, 1) * eps01 if name == "SMA" else 0)
    point = start.clone().requires_grad_(True)
    hand_objective(name, point).backward()
    assert point.grad.abs().min() > 0  # every coordinate has a direction to check
    step = attack.step_size / 255
    expected = X + (start - X + step * point.grad.sign()).clamp(-eps01, eps01)
    assert torch.allclose(adv, expected, atol=1e-6), (adv - X).flatten() * 255
    assert attack.step_size == {"FGSM": 8, "NIFGSM": 8, "SINIFGSM": 8, "PGD": 20}.get(name, 1)


@pytest.mark.parametrize("name, nesterov", [("MIFGSM", False), ("NIFGSM", True)])
def test_two_momentum_steps_by_hand(name, nesterov):
    step, eps01 = 1 / 255, 8 / 255
    extractor = toy_extractor()
    adv = build_attack(name, extractor, eps=8, steps=2, step_size=1).perturb(X, PIDS,
                                                                            **guide_args(name))

    def normalised_gradient(point):  # grad / mean|grad| per sample
        point = point.clone().requires_grad_(True)
        hand_objective(name, point).backward()
        return point.grad / point.grad.abs().mean(dim=(1, 2, 3), keepdim=True)

    g1 = normalised_gradient(X)
    x1 = X + step * g1.sign()
    look_ahead = (x1 + step * 1.0 * g1).clamp(0, 1) if nesterov else x1
    g2 = 1.0 * g1 + normalised_gradient(look_ahead)
    x2 = X + (x1 - X + step * g2.sign()).clamp(-eps01, eps01)
    seen = extractor.model.inputs
    assert len(seen) == 2 and torch.allclose(seen[1], look_ahead, atol=1e-6)
    assert torch.allclose(adv, x2, atol=1e-6)


def saturated_batch():
    """A training-mode linear model, its extractor, 6 images (two saturated: the [0, 1] box binds)
    of 3 identities."""
    torch.manual_seed(1)
    model = LinearReid(torch.randn(4, 3 * 8 * 4), torch.randn(5, 4))
    model.train()
    x = torch.rand(6, 3, 8, 4)
    x[0] = 0.0
    x[1] = 1.0
    return model, ReidFeatureExtractor(model), x, torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_budget_range_and_input_safety(name):
    model, extractor, x, pids = saturated_batch()
    x_before = x.clone()
    flags = [p.requires_grad for p in model.parameters()]
    attack = build_attack(name, extractor, eps=8, steps=5)
    torch.manual_seed(0)
    with torch.no_grad():  # attacks enable gradients themselves
        adv = attack.perturb(x, pids)
    assert adv.shape == x.shape and not adv.requires_grad
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert all(seen.min() >= 0 and seen.max() <= 1 for seen in model.inputs)  # iterates stay images
    # The steps climbed the objective from where they started (x, or the seeded random start):
    # a random start alone moves the images too, but does not do this.
    torch.manual_seed(0)
    start = x + random_start(x, 8 / 255) if attack.rand_init else x
    objective = attack.objective(x, pids)
    with torch.no_grad():
        assert objective(adv) > objective(start)
    assert torch.equal(x, x_before)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert (attack.name, attack.eps, attack.distance) == (name, 8.0, "euclidean")
    assert torch.equal(build_attack(name, extractor, eps=0, steps=5).perturb(x, pids), x)


def test_batch_is_its_own_guide_set_by_default():
    extractor = toy_extractor()
    x = torch.rand(4, 1, 1, 2)
    pids = torch.tensor([5, 5, 7, 7])
    attack = build_attack("FNA", extractor, eps=8, steps=3, rand_init=False)
    guides = GuideSet(extractor(x).detach(), pids)
    assert torch.equal(attack.perturb(x, pids), attack.perturb(x, pids, guides, torch.arange(4)))


@pytest.mark.parametrize("name", ["FNA", "SMA"])
def test_guide_rows_serve_as_clean_features(name):
    # With sample_index the clean features are the guide rows: only the 3 step forwards run;
    # without it, one more (clean) forward.
    for sample_index, forwards in ((SAMPLE_INDEX, 3), (None, 4)):
        extractor = toy_extractor()
        guides = GuideSet(GUIDE_FEATURES, GUIDE_PIDS) if sample_index is not None else None
        build_attack(name, extractor, eps=8, steps=3).perturb(X, PIDS, guides, sample_index)
        assert len(extractor.model.inputs) == forwards


def test_sample_without_guides_is_left_unchanged():
    guides = GuideSet(GUIDE_FEATURES[:1], GUIDE_PIDS[:1])  # only the sample itself
    for name in ("FNA", "MIFGSM", "SINIFGSM"):
        adv = build_attack(name, toy_extractor(), eps=8, steps=3, rand_init=False).perturb(
            X[:1], PIDS[:1], guides, SAMPLE_INDEX[:1])
        assert torch.equal(adv, X[:1]), name


def test_sample_index_must_match_the_pids():
    attack = build_attack("FNA", toy_extractor(), eps=8, steps=1)
    with pytest.raises(AttackConfigError, match="sample_index"):
        attack.perturb(X, PIDS, GuideSet(GUIDE_FEATURES, GUIDE_PIDS), torch.tensor([0, 1]))


@pytest.mark.parametrize("value", [0.03, -1, "abc", float("nan"), float("inf"), True])
def test_eps_from_255_rejects(value):
    with pytest.raises(AttackConfigError, match=repr(value).replace("(", r"\(")) as error:
        eps_from_255(value)
    if value == 0.03:
        assert "give 8 for 8/255" in str(error.value)


def test_eps_from_255_converts_once():
    assert eps_from_255(8) == 8 / 255 and eps_from_255(0) == 0.0 and eps_from_255(10.0) == 10 / 255


def test_settings_errors():
    extractor = toy_extractor()
    with pytest.raises(AttackConfigError) as error:
        build_attack("fna", extractor, eps=8, steps=16)
    assert all(name in str(error.value) for name in ALL_ATTACKS)
    # WMA (tests/test_wma.py) has a transport budget, not the L-inf one the tests here check.
    assert attacks.registered_attacks() == sorted(ALL_ATTACKS + ["WMA"])
    for steps in (0, 1.5, True, "16"):
        with pytest.raises(AttackConfigError, match="steps"):
            build_attack("FNA", extractor, eps=8, steps=steps)
    with pytest.raises(AttackConfigError, match="distance"):
        build_attack("FNA", extractor, eps=8, steps=16, distance="l1")
    with pytest.raises(AttackConfigError, match="scales"):
        build_attack("FNA", extractor, eps=8, steps=16, scales=3)
    with pytest.raises(AttackConfigError, match="rand_init"):
        build_attack("SMA", extractor, eps=8, steps=16, rand_init=False)
    with pytest.raises(AttackConfigError, match="step_size"):
        build_attack("FNA", extractor, eps=8, steps=16, step_size=0)
    with pytest.raises(AttackConfigError, match=r"\[0, 3\)"):
        build_attack("PGD", extractor, eps=8, steps=1).perturb(X, PIDS, targets=torch.tensor([0, 3]))


# --- EOT -------------------------------------------------------------------------------------------
def test_eot_gradient_is_the_mean_of_the_draws_gradients_by_hand():
    # One same-ID guide g and one other identity c; each forward of the model multiplies the
    # features by a random sign s = +-1, so the FNA loss of one draw is |s f - g|^2 - |s f - c|^2
    # with f = A x. EOT over n draws must ascend the mean of the n draws' losses.
    extractor = toy_extractor(sign_flip=True)
    g, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    guides = GuideSet(torch.stack([g, c]), torch.tensor([1, 2]))
    x, n, seed = X[:1], 8, 0

    def attack_gradient(attack):
        objective = attack.objective(x, PIDS[:1], guides)
        point = x.clone().requires_grad_(True)
        torch.manual_seed(seed)
        objective(point).backward()
        return point.grad

    def hand_gradient(signs):
        point = x.clone().requires_grad_(True)
        f = point.flatten(1) @ A2.T
        (sum(sq(s * f, g) - sq(s * f, c) for s in signs) / len(signs)).sum().backward()
        return point.grad

    torch.manual_seed(seed)  # the signs the model will draw, in order (LinearReid's sign_flip)
    signs = [int(torch.randint(0, 2, (1, 1)) * 2 - 1) for _ in range(n)]
    assert sum(signs) not in (-n, 0, n)  # mixed, not balanced: the mean is neither one draw nor 0
    attack = build_attack("FNA", extractor, eps=8, steps=1)
    eot = EOTAttack(attack, n)
    assert attack.eot_samples == 1 and eot.eot_samples == n
    assert torch.allclose(attack_gradient(attack), hand_gradient(signs[:1]), rtol=1e-6)
    assert torch.allclose(attack_gradient(eot), hand_gradient(signs), rtol=1e-6)
    assert not torch.allclose(hand_gradient(signs), hand_gradient(signs[:1]))
    adv = eot.perturb(x, PIDS[:1], guides)
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6


def test_eot_on_a_deterministic_model_is_one_draw_and_its_probe_draws_no_random_number():
    """EOT over N draws of a model without randomness is N copies of one forward: the attack runs
    one (same images as EOT 1, a tenth of the forwards); a stochastic model keeps its N draws; the
    probe that tells them apart leaves torch's generator where it was."""
    guides = GuideSet(GUIDE_FEATURES, GUIDE_PIDS)
    forwards = {}
    for sign_flip in (False, True):
        for n in (1, 10):
            model = LinearReid(A2, W2, sign_flip=sign_flip)
            attack = EOTAttack(build_attack("FNA", ReidFeatureExtractor(model), eps=8, steps=3), n)
            torch.manual_seed(0)
            adv = attack.perturb(X, PIDS, guides, SAMPLE_INDEX)
            if not sign_flip:  # EOT 10 = EOT 1, image for image, generator left alike
                first = forwards.setdefault("first", (adv, torch.get_rng_state()))
                assert torch.equal(adv, first[0]) and torch.equal(torch.get_rng_state(), first[1])
            forwards[sign_flip, n] = len(model.inputs)
    # the probe: one forward of one image, a second one when the first drew no random number
    assert forwards[False, 10] == forwards[False, 1] + 2
    assert forwards[True, 10] == 10 * forwards[True, 1] + 1


# --- defenses and BPDA -----------------------------------------------------------------------------
def test_bit_squeezing_gradient_is_zero_without_bpda_and_identity_with():
    x = torch.rand(2, 3, 8, 4)
    for use_bpda, expected_grad in ((False, 0.0), (True, 1.0)):
        point = x.clone().requires_grad_(True)
        out = build_defense("BitSqueezing", bpda=use_bpda, bit_depth=3)(point)
        assert torch.equal(out, BitSqueezing(3, vmin=0.0, vmax=1.0)(x))
        out.sum().backward()
        assert torch.equal(point.grad, torch.full_like(x, expected_grad))


def test_median_smoothing_gradient_is_distorted_without_bpda():
    torch.manual_seed(0)
    x, weights = torch.rand(2, 3, 8, 4), torch.randn(2, 3, 8, 4)
    grads = {}
    for use_bpda in (False, True):
        point = x.clone().requires_grad_(True)
        defense = build_defense("MedianSmoothing2D", bpda=use_bpda, kernel_size=3)
        (defense(point) * weights).sum().backward()
        grads[use_bpda] = point.grad
    assert torch.equal(grads[True], weights)
    assert (grads[False] == 0).float().mean() > 0.2  # pixels no window picked get no gradient
    assert not torch.allclose(grads[False], weights)


def test_naive_attack_through_bit_squeezing_is_masked_and_bpda_is_not():
    guides = GuideSet(GUIDE_FEATURES, GUIDE_PIDS)
    results = {}
    for use_bpda in (False, True):
        extractor = ReidFeatureExtractor(LinearReid(A2, W2),
                                         defense=build_defense("BitSqueezing+MedianSmoothing2D",
                                                               bpda=use_bpda, kernel_size=1))
        attack = build_attack("IFGSM", extractor, eps=8, steps=4)
        results[use_bpda] = attack.perturb(X, PIDS, guides, SAMPLE_INDEX)
    assert torch.equal(results[False], X)
    assert (results[True] != X).any() and (results[True] - X).abs().max() <= 8 / 255 + 1e-6


def test_defense_errors():
    with pytest.raises(AttackConfigError, match="BitSqueezing"):
        build_defense("JPEG")
    with pytest.raises(AttackConfigError, match="kernel_size"):
        build_defense("BitSqueezing", kernel_size=3)


# --- a real fastreid model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fastreid_model(tmp_path_factory):
    from fastreid.modeling import build_model

    torch.manual_seed(0)
    cfg = make_tiny_cfg(tmp_path_factory.mktemp("attacks"), "MODEL.HEADS.NUM_CLASSES", "10")
    return build_model(cfg)


def test_extractor_equals_the_eval_model_and_leaves_inputs_alone(fastreid_model):
    model = fastreid_model.train()
    x = torch.rand(4, 3, 64, 32, requires_grad=True)
    x_before = x.detach().clone()
    extractor = ReidFeatureExtractor(model)
    features = extractor(x)
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = model({"images": x_before.clone() * 255})
    model.train()
    assert features.shape == (4, 512)
    # BN folded into the convolutions (robustreid.attacks.folding): equal up to float rounding
    assert torch.allclose(features.detach(), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(ReidFeatureExtractor(model, fold_bn=False)(x_before).detach(), expected)
    assert torch.equal(x.detach(), x_before)
    features.pow(2).sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in model.parameters())
    logits = extractor.logits(x_before)
    assert torch.allclose(logits, expected @ model.heads.weight.T * model.heads.cls_layer.s,
                          rtol=1e-4, atol=1e-4)


def test_fna_raises_its_objective_on_a_real_model(fastreid_model):
    torch.manual_seed(0)
    extractor = ReidFeatureExtractor(fastreid_model)
    x, pids = torch.rand(4, 3, 64, 32), torch.tensor([0, 0, 1, 1])
    attack = build_attack("FNA", extractor, eps=8, steps=3, rand_init=False)
    adv = attack.perturb(x, pids)
    objective = attack.objective(x, pids)
    with torch.no_grad():
        assert objective(adv) > objective(x)
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6


@pytest.mark.parametrize("rand_init", [False, True])
def test_pgd_equals_advertorch_linf_pgd(fastreid_model, rand_init):
    extractor = ReidFeatureExtractor(fastreid_model)
    x, labels = torch.rand(4, 3, 64, 32), torch.tensor([0, 3, 7, 9])
    ours = build_attack("PGD", extractor, eps=8, steps=3, step_size=2, rand_init=rand_init)
    theirs = LinfPGDAttack(extractor.logits, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                           eps=8 / 255, nb_iter=3, eps_iter=2 / 255, rand_init=rand_init,
                           clip_min=0.0, clip_max=1.0)
    torch.manual_seed(3)
    adv_ours = ours.perturb(x, labels)
    torch.manual_seed(3)
    adv_theirs = theirs.perturb(x, labels)
    assert torch.equal(adv_ours, adv_theirs)


def test_surrogate_extractor_loads_config_and_weights(fastreid_model, tmp_path):
    import os

    from robustreid.engine import RobustCheckpointer, build_surrogate_extractor

    RobustCheckpointer(fastreid_model, save_dir=str(tmp_path)).save("surrogate")
    surrogate = build_surrogate_extractor(
        os.path.join(REPO, "configs/SynthReID/bagtricks_R18.yml"), str(tmp_path / "surrogate.pth"),
        opts=["MODEL.HEADS.NUM_CLASSES", "10"])
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.allclose(surrogate(x), ReidFeatureExtractor(fastreid_model)(x), atol=1e-5)



# --- tools/bench_attack.py ------------------------------------------------------------------------
BENCH_ARGS = ["--batch", "4", "--ids", "2", "--steps", "2", "--repeats", "1",
              "INPUT.SIZE_TEST", "[64,32]"]


def load_bench_attack():
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("bench_attack",
                                                  os.path.join(REPO, "tools", "bench_attack.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_bench_attack_times_the_steps_of_the_module_the_attack_runs(capsys):
    import re

    assert load_bench_attack().main(BENCH_ARGS) == 0
    out = capsys.readouterr().out
    step_ms = float(re.search(r"inside FNA's 2 steps: ([0-9.]+) ms", out).group(1))
    fna_ms = float(re.search(r"FNA: +([0-9.]+) ms", out).group(1))
    share = float(re.search(r"overhead_share=([0-9.]+)$", out.strip()).group(1))
    assert 0 < step_ms < fna_ms and 0 < share < 1, out


def test_bench_attack_fails_loudly_when_its_timers_measure_nothing(capsys, monkeypatch):
    import copy

    # The timers end up on a module the attack never runs (as when they wrapped the live model
    # while attacks ran its BN-folded copy): no share can be computed.
    monkeypatch.setattr(ReidFeatureExtractor, "eval_model",
                        lambda self: copy.deepcopy(self.model).eval())
    assert load_bench_attack().main(BENCH_ARGS) == 1
    captured = capsys.readouterr()
    assert "overhead_share" not in captured.out
    # the last line: logging handlers other tests left on closed streams may print before it
    assert captured.err.strip().splitlines()[-1].startswith(
        "error: the model timers saw 0 gradient forwards")

"""Randomized smoothing (robustreid.evaluation.smoothing) against closed forms: a linear
classifier's exact radius, Clopper-Pearson's defining property, ties, the Voronoi cell of a retrieval decision,
and a PGD-L2 attack on the smoothed decision that no certificate may contradict."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, norm

from robustreid.config import ConfigError
from robustreid.evaluation.smoothing import (ABSTAIN, RetrievalDecision, SmoothedDecision,
                                             certify_images, CertifySettings,
                                             clopper_pearson_lower, noise_generator)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (3, 4, 4)  # a tiny "image": 48 pixels


def flat(x):
    return x.flatten(1)


def linear_classifier(weight, bias):
    return lambda x01: (flat(x01) @ weight.T + bias).argmax(dim=1)


@pytest.mark.parametrize("sigma, distance", [(0.25, 0.3), (0.5, 0.5), (1.0, 0.6)])
def test_linear_classifier_radius_approaches_the_distance_to_its_boundary(sigma, distance):
    """f(x) = argmax(Wx + b), 2 classes: under N(0, sigma^2 I) class 0 has probability
    pA = Phi(margin / (sigma ||w0 - w1||)), so the certified radius tends to sigma PhiInv(pA), the
    distance margin / ||w0 - w1|| of x to the decision boundary."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 48, generator=gen, dtype=torch.float64)
    bias = torch.randn(2, generator=gen, dtype=torch.float64)
    w = weight[0] - weight[1]
    x = torch.rand(48, generator=gen, dtype=torch.float64)
    # move x along w so that its distance to the boundary w.x + (b0 - b1) = 0 is `distance`
    x += (distance - (w @ x + bias[0] - bias[1]) / w.norm()) * w / w.norm()
    x = x.reshape(SHAPE)
    margin = float((weight @ x.flatten() + bias) @ torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert margin / float(w.norm()) == pytest.approx(distance)
    p_true = norm.cdf(distance / sigma)

    smoothed = SmoothedDecision(linear_classifier(weight, bias), sigma, batch_size=50_000)
    n = 200_000
    cert = smoothed.certify(x, 100, n, 0.001, noise_generator(0, 0, "cpu"))
    assert cert.label == 0
    assert abs(cert.count / n - p_true) < 4 * math.sqrt(p_true * (1 - p_true) / n)
    # the radius comes from the count's lower bound, not from the estimate count / n
    assert cert.p_lower == pytest.approx(beta.ppf(0.001, cert.count, n - cert.count + 1))
    assert cert.radius == pytest.approx(sigma * norm.ppf(cert.p_lower))
    assert cert.p_lower < p_true and cert.p_lower == pytest.approx(p_true, abs=0.004)
    assert cert.radius < distance
    assert cert.radius == pytest.approx(distance, rel=0.03)


@pytest.mark.parametrize("successes, trials, alpha", [
    (990, 1000, 0.001), (500, 1000, 0.05), (1, 10, 0.01), (73, 100, 0.001),
    (99_990, 100_000, 0.001)])
def test_clopper_pearson_lower_bound_is_the_beta_quantile(successes, trials, alpha):
    bound = clopper_pearson_lower(successes, trials, alpha)
    assert bound == pytest.approx(beta.ppf(alpha, successes, trials - successes + 1), rel=1e-12)
    # Clopper-Pearson's definition: the p at which seeing >= successes has probability alpha
    assert binom.sf(successes - 1, trials, bound) == pytest.approx(alpha, rel=1e-6)
    assert bound < successes / trials


def test_clopper_pearson_edge_counts():
    assert clopper_pearson_lower(0, 100, 0.001) == 0.0
    # all successes: P(Binomial(n, p) = n) = p^n = alpha
    assert clopper_pearson_lower(1000, 1000, 0.001) == pytest.approx(0.001 ** (1 / 1000))


def first_pixel_sign(x01):
    return (flat(x01)[:, 0] > 0).long()


def test_abstains_when_two_identities_tie():
    """On the boundary of a half-space classifier both classes have probability 1/2 exactly."""
    on_boundary = torch.zeros(SHAPE)
    smoothed = SmoothedDecision(first_pixel_sign, 0.25, batch_size=500)
    cert = smoothed.certify(on_boundary, 100, 10_000, 0.001, noise_generator(0, 0, "cpu"))
    assert cert.label == ABSTAIN and cert.abstained and cert.radius == 0.0
    assert 0.45 < cert.p_lower < 0.5
    assert smoothed.predict(on_boundary, 10_000, 0.001, noise_generator(0, 1, "cpu")) == ABSTAIN
    # one sigma inside class 1: both answer, CERTIFY with a radius
    inside = on_boundary.clone()
    inside[0, 0, 0] = 0.25
    assert smoothed.predict(inside, 10_000, 0.001, noise_generator(0, 1, "cpu")) == 1
    cert = smoothed.certify(inside, 100, 10_000, 0.001, noise_generator(0, 0, "cpu"))
    assert cert.label == 1 and 0.2 < cert.radius < 0.25


def gallery_decision(points, pids, camids, metric="euclidean"):
    return RetrievalDecision(flat, torch.stack([p.flatten() for p in points]), pids, camids, metric)


def test_retrieval_tie_between_two_identities_abstains():
    a, b = torch.zeros(SHAPE), torch.ones(SHAPE)
    decision = gallery_decision([a, b], [1, 2], [1, 1]).for_query(1, 0)
    midway = (a + b) / 2
    cert = SmoothedDecision(decision, 0.25, 500).certify(midway, 100, 10_000, 0.001,
                                                          noise_generator(0, 0, "cpu"))
    assert cert.label == ABSTAIN


def voronoi_distance(x, own, others):
    """Distance from x (inside own's Voronoi cell) to the cell's boundary: the nearest bisector."""
    return min(float(((x - g).norm() ** 2 - (x - own).norm() ** 2) / (2 * (g - own).norm()))
               for g in others)


def test_retrieval_certifies_the_nearest_identity_within_its_voronoi_cell():
    """Nearest-neighbour retrieval with one gallery item per identity: the cell of identity A is
    convex, inside the half-space of its nearest bisector, so pA <= Phi(d / sigma) and the radius
    is below d, the distance to the cell's boundary; near one bisector it approaches d."""
    gen = torch.Generator().manual_seed(1)
    g_a = torch.rand(SHAPE, generator=gen)
    direction = torch.randn(SHAPE, generator=gen)
    direction /= direction.norm()
    g_b = g_a + 1.2 * direction       # the near neighbour: its bisector is 0.6 from g_a
    g_c = g_a - 5.0 * direction       # far away
    x = g_a + 0.1 * direction         # 0.5 from the A|B bisector
    d = voronoi_distance(x, g_a, [g_b, g_c])
    assert d == pytest.approx(0.5)
    decision = gallery_decision([g_b, g_a, g_c], [7, 3, 9], [1, 1, 1]).for_query(3, 0)
    cert = SmoothedDecision(decision, 0.25, 10_000).certify(x, 100, 100_000, 0.001,
                                                            noise_generator(0, 0, "cpu"))
    assert cert.label == 3
    assert cert.radius < d
    assert cert.radius == pytest.approx(d, rel=0.03)


def test_retrieval_leaves_out_the_querys_junk():
    """Gallery items with the query's pid AND camera are junk (Market-1501 protocol)."""
    x = torch.zeros(SHAPE)
    near, far = torch.full(SHAPE, 0.05), torch.full(SHAPE, 0.5)
    # pid 4 camera 0 sits on the query: junk for a pid-4 query from camera 0, a match otherwise
    decision = gallery_decision([x, near, far], [4, 5, 4], [0, 1, 1])
    assert int(decision.for_query(4, 0)(x.unsqueeze(0))) == 5
    assert int(decision.for_query(4, 2)(x.unsqueeze(0))) == 4
    assert int(decision.for_query(6, 0)(x.unsqueeze(0))) == 4


def test_retrieval_distance_follows_the_metric():
    g1, g2 = torch.zeros(8), torch.zeros(8)
    g1[0], g2[0], g2[1] = 1.0, 10.0, 10.0
    query = torch.zeros(1, 8)
    query[0, 0], query[0, 1] = 5.0, 4.0  # closer to g1 in L2, closer to g2 in angle
    for metric, expected in (("euclidean", 1), ("cosine", 2)):
        decision = RetrievalDecision(lambda x: x, torch.stack([g1, g2]), [1, 2], [1, 1], metric)
        assert int(decision.for_query(0, 0)(query)) == expected


def test_noise_is_seeded_per_image_and_shared_across_sigmas():
    draws = [[] for _ in range(3)]

    def recording(slot):
        def decide(x01):
            draws[slot].append(x01.clone())
            return torch.zeros(len(x01), dtype=torch.long)
        return decide

    x = torch.rand(SHAPE)
    for slot, sigma in ((0, 0.25), (1, 0.5), (2, 0.25)):
        SmoothedDecision(recording(slot), sigma, 7).certify(x, 5, 20, 0.001,
                                                            noise_generator(3, 11, "cpu"))
    noise = [torch.cat(d) - x for d in draws]
    assert [len(n) for n in noise] == [25, 25, 25]  # n0 + n, in batches of at most 7
    assert torch.equal(noise[0], noise[2])
    torch.testing.assert_close(noise[1], 2 * noise[0])
    assert noise[0].std().item() == pytest.approx(0.25, rel=0.1)
    other_image = torch.randn(SHAPE, generator=noise_generator(3, 12, "cpu"))
    assert not torch.equal(other_image, torch.randn(SHAPE, generator=noise_generator(3, 11, "cpu")))
    first_batch = torch.randn((7, *SHAPE), generator=noise_generator(3, 11, "cpu"))
    torch.testing.assert_close(noise[0][:7], 0.25 * first_batch)


def test_certify_images_records_each_sigma():
    weight = torch.zeros(2, 48)
    weight[1, 0] = 1.0  # class 1 iff the first pixel is positive
    images = [torch.full(SHAPE, v) for v in (0.5, -0.5, 0.0)]
    settings = CertifySettings("classifier", (0.25, 0.5), 20, 200, 0.001, 64)
    results = certify_images(images.__getitem__, [1, 0, 1], lambda i: linear_classifier(
        weight, torch.zeros(2)), settings, progress=False)
    assert list(results) == [0.25, 0.5]
    for sigma, records in results.items():
        assert [r["index"] for r in records] == [0, 1, 2]
        assert [r["base"] for r in records] == [1, 0, 0]
        assert [r["prediction"] for r in records[:2]] == [1, 0]
        assert records[0]["correct"] and records[1]["correct"] and not records[2]["correct"]
        assert records[2]["prediction"] == ABSTAIN
        for r in records[:2]:  # radius from the count, capped at sigma PhiInv(alpha ** (1 / n))
            assert r["radius"] == pytest.approx(sigma * norm.ppf(clopper_pearson_lower(
                r["count"], 200, 0.001)))
            assert r["radius"] <= sigma * norm.ppf(0.001 ** (1 / 200)) + 1e-12


@pytest.mark.parametrize("given, message", [
    ({"sigmas": (64.0,)}, "looks like 0-255 units"),
    ({"sigmas": ()}, "--sigmas is empty"),
    ({"sigmas": (0.0,)}, "--sigmas must be a noise level"),
    ({"alpha": 0.5}, "--alpha must be in (0, 0.5)"),
    ({"n": 0}, "--n must be an integer >= 1"),
    ({"decision": "ranking"}, "--decision must be one of retrieval, classifier"),
])
def test_settings_name_the_option_at_fault(given, message, tiny_cfg):
    names = {k: f"--{k}" for k in ("decision", "sigmas", "n0", "n", "alpha", "batch")}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CertifySettings.from_config(tiny_cfg, names, **given)
    cfg = tiny_cfg.clone()
    cfg.defrost()
    cfg.CERTIFY.N0 = 0
    with pytest.raises(ConfigError, match="CERTIFY.N0 must be an integer >= 1"):
        CertifySettings.from_config(cfg, names)
    assert CertifySettings.from_config(tiny_cfg, names, n=50).n == 50


# --------------------------------------------------------------------------- PGD-L2 vs certificates

def smoothed_log_probs(net, sigma, draws):
    """log E_e softmax(net(x + e)): the smoothed soft classifier (EOT over ``draws`` noise draws per
    call, fresh each call), the objective of Salman et al.'s attack on smoothed classifiers."""
    def predict(x):
        noisy = x.unsqueeze(1) + sigma * torch.randn(len(x), draws, *x.shape[1:])
        probs = net(noisy.flatten(0, 1)).softmax(dim=1).view(len(x), draws, -1).mean(dim=1)
        return probs.clamp_min(1e-12).log()
    return predict


def smallest_flipping_l2(net, x, label, sigma, decide, high=3.0, steps=7):
    """The smallest L2 budget (bisection in [0, high]) at which PGD-L2 on the smoothed decision
    finds a perturbation whose smoothed decision (majority of 4000 draws) is not ``label``;
    inf if even ``high`` does not flip it."""
    from advertorch.attacks import L2PGDAttack

    def flips(eps):
        torch.manual_seed(0)
        attack = L2PGDAttack(smoothed_log_probs(net, sigma, 64), eps=eps, nb_iter=30,
                             eps_iter=2.5 * eps / 30, rand_init=False, clip_min=-10.0,
                             clip_max=10.0)
        adv = attack.perturb(x.unsqueeze(0), torch.tensor([label]))[0].detach()
        assert float((adv - x).norm()) <= eps * (1 + 1e-4)
        counts = SmoothedDecision(decide, sigma, 4000).sample_counts(
            adv, 4000, noise_generator(1, 0, "cpu"))
        return counts.most_common(1)[0][0] != label

    if not flips(high):
        return math.inf
    low = 0.0
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (low, middle) if flips(middle) else (middle, high)
    return high


def test_no_certificate_exceeds_the_smallest_flip_pgd_l2_finds():
    """A certified radius is a lower bound on every perturbation that changes the smoothed decision,
    so a strong attack on the smoothed decision (PGD-L2 with EOT) never flips it within the radius.
    A small nonlinear classifier with 3 classes; sigma 0.25."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 3)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    decide = lambda x01: net(x01).argmax(dim=1)  # noqa: E731
    sigma = 0.25
    smoothed = SmoothedDecision(decide, sigma, 5000)
    points = torch.rand(8, *SHAPE, generator=torch.Generator().manual_seed(2))
    pairs = []
    for i, x in enumerate(points):
        cert = smoothed.certify(x, 100, 5000, 0.001, noise_generator(0, i, "cpu"))
        if not cert.abstained:
            pairs.append((cert.radius, smallest_flipping_l2(net, x, cert.label, sigma, decide)))
    found = [(r, flip) for r, flip in pairs if math.isfinite(flip)]
    assert len(found) >= 4, pairs  # the attack must have something to say
    assert all(r <= flip for r, flip in pairs), pairs
    # and the bound is not vacuous: certificates reach a good part of the way to the flips
    assert np.mean([r / flip for r, flip in found]) > 0.5, found

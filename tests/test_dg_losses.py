"""BAU and ADIN losses (robustreid.modeling.losses) against hand-computed values.

Expected numbers are worked out by hand (in the comments) or by a small independent numpy/set
computation in this file, never by calling the function under test.
"""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustreid.modeling.losses import (
    NuisanceHead, PrototypeMemory, alignment_loss, bau_loss, calibrated_negative_entropy_loss,
    domain_uniformity_loss, focal_entropy_loss, joint_nuisance_labels,
    kreciprocal_jaccard_weights, negative_entropy_loss, nuisance_class_prior, reverse_gradient,
    reverse_gradient_loss, two_view_uniformity_loss, uniformity_loss,
)

torch.set_num_threads(1)


def line(*xs):
    """Points on the x axis of R^2."""
    return torch.tensor([[x, 0.0] for x in xs], dtype=torch.float64)


# ---------------------------------------------------------------- BAU: k-reciprocal weights (eq. 4)

def test_jaccard_weights_chain_and_tight_pair():
    # x = 0, 1, 2.5, 4.5 (a chain) and 30, 31 (a tight pair); top-3 lists include the point itself:
    #   top(0)={0,1,2} top(1)={1,0,2} top(2)={2,1,3} top(3)={3,2,1} top(4)={4,5,3} top(5)={5,4,3}
    # mutual ones: R(0)={0,1} R(1)={0,1,2} R(2)={1,2,3} R(3)={2,3} R(4)=R(5)={4,5}
    w = kreciprocal_jaccard_weights(line(0, 1, 2.5, 4.5, 30, 31), k=3)
    expected = torch.tensor([
        [1, 2 / 3, 1 / 4, 0, 0, 0],     # R(0)&R(1)={0,1} of {0,1,2}; R(0)&R(2)={1} of {0,1,2,3}
        [2 / 3, 1, 2 / 4, 1 / 4, 0, 0],  # R(1)&R(2)={1,2} of {0,1,2,3}; R(1)&R(3)={2} of 4
        [1 / 4, 2 / 4, 1, 2 / 3, 0, 0],  # R(2)&R(3)={2,3} of {1,2,3}
        [0, 1 / 4, 2 / 3, 1, 0, 0],
        [0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 1, 1],
    ], dtype=torch.float64)
    torch.testing.assert_close(w, expected)


def test_jaccard_weights_two_clusters_and_outlier():
    # clusters A={0,1,2} near (0,0), B={3,4,5} near (10,0), outlier 6 at (5,8); k=3: A's and B's
    # top-3 lists are their own cluster, the outlier's top-3 holds two cluster points that do not
    # list it back, so R(6)={6}: weight 1 inside a cluster, 0 across, outlier only with itself
    f = torch.tensor([[0, 0], [0.1, 0], [0, 0.1], [10, 0], [10.1, 0], [10, 0.1], [5, 8.0]],
                     dtype=torch.float64)
    w = kreciprocal_jaccard_weights(f, k=3)
    expected = torch.zeros(7, 7, dtype=torch.float64)
    expected[:3, :3] = 1
    expected[3:6, 3:6] = 1
    expected[6, 6] = 1
    torch.testing.assert_close(w, expected)
    # k >= n: every set is everything, every weight 1
    torch.testing.assert_close(kreciprocal_jaccard_weights(f, k=50), torch.ones(7, 7).double())


def reference_jaccard(x, k):
    """Independent set-based computation (numpy distances, Python sets)."""
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, -1)
    top = [set(np.argsort(row, kind="stable")[:k].tolist()) for row in d]
    recip = [{j for j in top[i] if i in top[j]} for i in range(len(x))]
    return np.array([[len(a & b) / len(a | b) for b in recip] for a in recip])


def test_jaccard_weights_match_set_reference_on_random_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w = kreciprocal_jaccard_weights(torch.from_numpy(x), k=6)
    np.testing.assert_allclose(w.numpy(), reference_jaccard(x, 6), atol=1e-12)
    assert not w.requires_grad


# ---------------------------------------------------------------- BAU: alignment (eq. 3-5)

def test_alignment_loss_hand_value_and_gradient():
    # weak f = (0, 1), strong f~ = (0.4, 3) on a line, both ID 0. Over [w0, w1, s0, s1], k=3:
    #   top(w0)={w0,s0,w1} top(w1)={w1,s0,w0} top(s0)={s0,w0,w1} top(s1)={s1,w1,s0}
    #   R(w0)=R(w1)=R(s0)={w0,w1,s0}, R(s1)={s1} (nobody lists s1 back)
    # so w(s0,w0)=w(s0,w1)=1, w(s1,*)=0: the corrupted strong view s1 is ignored.
    weak = line(0, 1).requires_grad_()
    strong = line(0.4, 3).requires_grad_()
    pids = torch.tensor([0, 0])
    loss = alignment_loss(strong, weak, pids, k=3)
    assert loss.item() == pytest.approx((0.4 ** 2 + 0.6 ** 2) / 2)  # 0.26
    loss.backward()
    # d/ds0 [((s0-w0)^2 + (s0-w1)^2) / 2] = (0.8 - 1.2) / 2; s1 has weight 0
    torch.testing.assert_close(strong.grad[:, 0], torch.tensor([-0.2, 0.0]).double())
    torch.testing.assert_close(weak.grad[:, 0], torch.tensor([-0.4, 0.6]).double())
    # unweighted eq. (3): mean over all four positive pairs (.16 + .36 + 9 + 4) / 4
    assert alignment_loss(line(0.4, 3), line(0, 1), pids, k=3, weighted=False).item() == \
        pytest.approx(3.38)
    # different IDs: only the i = j pairs are positive; w(s1,w1)=0 leaves (s0,w0) alone
    other = torch.tensor([0, 1])
    assert alignment_loss(line(0.4, 3), line(0, 1), other, k=3).item() == pytest.approx(0.16)
    assert alignment_loss(line(0.4, 3), line(0, 1), other, weighted=False).item() == \
        pytest.approx((0.16 + 4) / 2)


def test_alignment_loss_matches_numpy_reference():
    rng = np.random.default_rng(1)
    weak = rng.normal(size=(8, 4))
    strong = weak + 0.3 * rng.normal(size=(8, 4))
    weak /= np.linalg.norm(weak, axis=1, keepdims=True)
    strong /= np.linalg.norm(strong, axis=1, keepdims=True)
    pids = np.repeat(np.arange(4), 2)
    jac = reference_jaccard(np.concatenate([weak, strong]), 5)[8:, :8]  # rows strong, cols weak
    num = den = 0.0
    for i in range(8):
        for j in range(8):
            if pids[i] == pids[j]:
                num += jac[i, j] * ((strong[i] - weak[j]) ** 2).sum()
                den += jac[i, j]
    loss = alignment_loss(torch.from_numpy(strong), torch.from_numpy(weak),
                          torch.from_numpy(pids), k=5)
    assert loss.item() == pytest.approx(num / den, rel=1e-10)


# ---------------------------------------------------------------- BAU: uniformity (eq. 2, 6)

def test_uniformity_hand_value():
    # (1,0), (0,1), (-1,0): squared distances 2, 4, 2
    f = torch.tensor([[1.0, 0], [0, 1], [-1, 0]], dtype=torch.float64)
    expected = math.log((2 * math.exp(-4) + math.exp(-8)) / 3)
    assert uniformity_loss(f).item() == pytest.approx(expected)
    assert uniformity_loss(f, t=1).item() == pytest.approx(
        math.log((2 * math.exp(-2) + math.exp(-4)) / 3))
    # eq. (6): original-view term + augmented-view term; the code's variant averages them
    g = torch.tensor([[1.0, 0], [-1, 0]], dtype=torch.float64)  # one pair at squared distance 4
    assert two_view_uniformity_loss(f, g).item() == pytest.approx(expected - 8)
    assert two_view_uniformity_loss(f, g, view_reduction="mean").item() == \
        pytest.approx((expected - 8) / 2)
    with pytest.raises(ValueError):
        two_view_uniformity_loss(f, g, view_reduction="max")


def test_uniformity_gradient_is_finite_for_coincident_points():
    f = torch.tensor([[1.0, 0], [1.0, 0], [0, 1]], requires_grad=True)
    uniformity_loss(f).backward()
    assert torch.isfinite(f.grad).all()


# ---------------------------------------------------------------- BAU: prototype memory (eq. 7)

def test_memory_initialize_centroids_and_domains():
    f = torch.tensor([[3.0, 4], [3, 4], [0, 2], [1, 0], [0, 1]])
    memory = PrototypeMemory(num_classes=3, dim=2)
    assert memory.momentum == 0.1  # the paper's mu, the weight of the old prototype
    memory.initialize(f, pids=[0, 0, 1, 2, 2], domains=[0, 0, 0, 1, 1])
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(memory.prototypes, torch.tensor([[0.6, 0.8], [0, 1], [s, s]]))
    assert memory.domains.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="without samples"):
        PrototypeMemory(4, 2).initialize(f, [0, 0, 1, 2, 2], [0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="single domain"):
        PrototypeMemory(3, 2).initialize(f, [0, 0, 1, 2, 2], [0, 1, 0, 1, 1])


def test_memory_momentum_update_matches_eq7_sample_by_sample():
    rng = np.random.default_rng(2)
    protos = rng.normal(size=(4, 3))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    batch = rng.normal(size=(5, 3))
    pids = [2, 0, 2, 2, 1]  # class 2 three times, class 3 absent
    memory = PrototypeMemory(4, 3).double()
    memory.initialize(torch.from_numpy(protos), torch.arange(4), torch.zeros(4))
    before = memory.prototypes.clone()
    memory.update(torch.from_numpy(batch), torch.tensor(pids))
    expected = protos.copy()
    for f, y in zip(batch, pids):  # c <- 0.1 c + 0.9 f, then back onto the sphere
        c = 0.1 * expected[y] + 0.9 * f
        expected[y] = c / np.linalg.norm(c)
    np.testing.assert_allclose(memory.prototypes.numpy(), expected, rtol=1e-12)
    assert not torch.equal(memory.prototypes[0], before[0])  # class 0 moved
    assert torch.equal(memory.prototypes[3], before[3])  # class 3 was not in the batch
    # without renormalisation one step is exactly mu c + (1 - mu) f
    raw = PrototypeMemory(2, 3, momentum=0.25, normalize=False).double()
    raw.initialize(torch.from_numpy(protos[:2]), torch.arange(2), torch.zeros(2))
    raw.update(torch.from_numpy(batch[:1]), torch.tensor([1]))
    np.testing.assert_allclose(raw.prototypes[1].numpy(), 0.25 * protos[1] + 0.75 * batch[0])


def test_memory_state_dict_round_trip():
    memory = PrototypeMemory(5, 4)
    memory.initialize(torch.randn(10, 4), torch.arange(10) % 5, torch.tensor([0, 0, 1, 1, 2] * 2))
    memory.update(torch.randn(3, 4), torch.tensor([1, 1, 4]))
    model = torch.nn.Module()
    model.memory = memory
    assert set(model.state_dict()) == {"memory.prototypes", "memory.domains"}
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = torch.nn.Module()
    restored.memory = PrototypeMemory(5, 4)
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(restored.memory.prototypes, memory.prototypes)
    assert torch.equal(restored.memory.domains, memory.domains)


# ---------------------------------------------------------------- BAU: domain uniformity (eq. 8)

@pytest.fixture
def five_prototypes():
    # c0=(1,0) c1=(0,1) c2=(-1,0) in domain 0; c3=(0,-1) c4=(-0.6,-0.8) in domain 1
    memory = PrototypeMemory(5, 2).double()
    c = torch.tensor([[1, 0], [0, 1], [-1, 0], [0, -1], [-0.6, -0.8]], dtype=torch.float64)
    memory.initialize(c, torch.arange(5), torch.tensor([0, 0, 0, 1, 1]))
    return memory


def test_domain_uniformity_hand_value(five_prototypes):
    # fa=(1,0) ID 0 domain 0 -> same domain, other class: c1 (d^2=2), c2 (d^2=4)
    # fb=(0,-1) ID 3 domain 1 -> only c4 (d^2 = .36 + .04 = .4); c0..c2 are another domain
    f = torch.tensor([[1.0, 0], [0, -1]], dtype=torch.float64, requires_grad=True)
    pids, domains = torch.tensor([0, 3]), torch.tensor([0, 1])
    loss = domain_uniformity_loss(f, pids, domains, five_prototypes)  # k = batch size = 2
    expected = math.log((math.exp(-4) + math.exp(-8) + math.exp(-0.8)) / 3)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert five_prototypes.prototypes.grad is None and torch.isfinite(f.grad).all()
    k1 = domain_uniformity_loss(f, pids, domains, five_prototypes, k=1)  # nearest only
    assert k1.item() == pytest.approx(math.log((math.exp(-4) + math.exp(-0.8)) / 2))


def test_domain_uniformity_excludes_own_class_not_nearest(five_prototypes):
    # f=(0,1) with ID 0 sits on c1: the paper drops c0 (own class) and keeps c1 (0), c2 (2);
    # the code's variant drops the nearest (c1) and keeps c0 (2), c2 (2)
    f = torch.tensor([[0.0, 1]], dtype=torch.float64)
    pid, dom = torch.tensor([0]), torch.tensor([0])
    paper = domain_uniformity_loss(f, pid, dom, five_prototypes, k=2)
    code = domain_uniformity_loss(f, pid, dom, five_prototypes, k=2, exclude_own_class=False)
    assert paper.item() == pytest.approx(math.log((1 + math.exp(-4)) / 2))
    assert code.item() == pytest.approx(-4.0)


def test_bau_loss_is_eq9(five_prototypes):
    torch.manual_seed(0)
    weak = F.normalize(torch.randn(4, 2, dtype=torch.float64), dim=1)
    strong = F.normalize(weak + 0.2 * torch.randn(4, 2, dtype=torch.float64), dim=1)
    pids, domains = torch.tensor([0, 0, 3, 3]), torch.tensor([0, 0, 1, 1])
    total, terms = bau_loss(strong, weak, pids, domains, five_prototypes, k=4,
                            ce_loss=torch.tensor(0.5), triplet_loss=torch.tensor(0.25),
                            return_terms=True)
    align = alignment_loss(strong, weak, pids, k=4)
    uniform = uniformity_loss(weak) + uniformity_loss(strong)
    domain = (domain_uniformity_loss(weak, pids, domains, five_prototypes)
              + domain_uniformity_loss(strong, pids, domains, five_prototypes))
    torch.testing.assert_close(terms["align"], align)
    torch.testing.assert_close(terms["uniform"], uniform)
    torch.testing.assert_close(terms["domain"], domain)
    # lambda = 1.5 multiplies the alignment term only
    torch.testing.assert_close(total, 0.5 + 0.25 + 1.5 * align + uniform + domain)
    mean_views = bau_loss(strong, weak, pids, domains, five_prototypes, k=4, lam=2.0,
                          view_reduction="mean")
    torch.testing.assert_close(mean_views, 2.0 * align + uniform / 2 + domain / 2)
    # no memory: no domain term
    torch.testing.assert_close(bau_loss(strong, weak, pids, k=4), 1.5 * align + uniform)


# ---------------------------------------------------------------- ADIN (eq. 4-6)

def test_reverse_gradient_flips_the_gradient_exactly():
    x = torch.randn(4, 3, requires_grad=True)
    g = torch.randn(4, 3)
    y = reverse_gradient(x, scale=0.5)
    assert torch.equal(y, x)
    (y * g).sum().backward()
    assert torch.equal(x.grad, -0.5 * g)
    # through a head: features get minus the plain gradient, the head's own gradient is unchanged
    torch.manual_seed(0)
    head = torch.nn.Linear(3, 2)
    labels = torch.tensor([0, 1, 1, 0])
    plain = x.detach().clone().requires_grad_()
    F.cross_entropy(head(plain), labels).backward()
    head_grad = head.weight.grad.clone()
    head.zero_grad()
    rev = x.detach().clone().requires_grad_()
    F.cross_entropy(head(reverse_gradient(rev)), labels).backward()
    assert torch.equal(rev.grad, -plain.grad)
    assert torch.equal(head.weight.grad, head_grad)


def test_reverse_gradient_loss_is_minus_cross_entropy():
    # c = softmax(0, log 3) = (1/4, 3/4); eq. (4) picks log c_{Y*}
    logits = torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)]])
    labels = torch.tensor([0, 1])
    assert reverse_gradient_loss(logits, labels).item() == pytest.approx(
        (math.log(1 / 4) + math.log(3 / 4)) / 2)


def test_negative_entropy_and_cane_hand_values():
    logits = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]])  # c = (1/4, 3/4) and (1/2, 1/2)
    ne = [0.25 * math.log(0.25) + 0.75 * math.log(0.75), math.log(0.5)]
    assert negative_entropy_loss(logits).item() == pytest.approx(sum(ne) / 2)
    p = torch.tensor([0.2, 0.8])
    cane = [0.2 * 0.25 * math.log(0.25) + 0.8 * 0.75 * math.log(0.75),
            (0.2 + 0.8) * 0.5 * math.log(0.5)]
    assert calibrated_negative_entropy_loss(logits, p).item() == pytest.approx(sum(cane) / 2)
    # the code's "focal entropy": w_{y_i} * (sum c log c + log K)
    labels = torch.tensor([1, 0])
    focal = [0.8 * (ne[0] + math.log(2)), 0.2 * (ne[1] + math.log(2))]
    assert focal_entropy_loss(logits, labels, p).item() == pytest.approx(sum(focal) / 2)
    with pytest.raises(ValueError):
        calibrated_negative_entropy_loss(logits, torch.tensor([0.2, 0.3, 0.5]))


def test_nuisance_class_prior_from_labels():
    prior = nuisance_class_prior(np.array([0, 0, 1, 2, 2, 2]), num_classes=4)
    torch.testing.assert_close(prior, torch.tensor([2 / 6, 1 / 6, 3 / 6, 0.0]))
    with pytest.raises(ValueError):
        nuisance_class_prior([0, 4], num_classes=4)


def minimise_over_logits(loss_fn, k):
    z = torch.zeros(1, k, dtype=torch.float64)
    z[0, 0] = 1.0  # start away from uniform
    z.requires_grad_()
    opt = torch.optim.LBFGS([z], lr=1, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(z)
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(z.detach(), 1)[0].numpy()


def test_cane_optimum_follows_the_prior_while_ne_is_uniform():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    prior = torch.from_numpy(p)
    ne_opt = minimise_over_logits(negative_entropy_loss, 4)
    np.testing.assert_allclose(ne_opt, np.full(4, 0.25), atol=1e-6)
    # CaNE: stationarity p_k (log c_k + 1) = lam on the simplex -> c_k = exp(lam / p_k - 1);
    # solve sum_k c_k = 1 for lam by bisection
    lo, hi = -10.0, 0.0
    for _ in range(200):
        lam = (lo + hi) / 2
        lo, hi = (lam, hi) if np.exp(lam / p - 1).sum() < 1 else (lo, lam)
    expected = np.exp(lam / p - 1)
    cane_opt = minimise_over_logits(lambda z: calibrated_negative_entropy_loss(z, prior), 4)
    np.testing.assert_allclose(cane_opt, expected, atol=1e-6)
    assert np.all(np.diff(cane_opt) > 0)  # more frequent nuisance class, larger optimal c_k
    assert not np.allclose(cane_opt, p, atol=1e-2)  # ordered like p, but not equal to p


def test_cane_gradient_at_uniform_is_weighted_by_the_prior():
    # dL/dc_k = p_k (log c_k + 1); at c = 1/K through the softmax:
    # dL/dz_j = c_j (g_j - sum_k c_k g_k) = (1 - log K) (p_j - 1/K) / K
    k, p = 4, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    z = torch.zeros(1, k, dtype=torch.float64, requires_grad=True)
    calibrated_negative_entropy_loss(z, p).backward()
    torch.testing.assert_close(z.grad[0], (1 - math.log(k)) * (p - 1 / k) / k)
    # plain NE is stationary there
    z.grad = None
    negative_entropy_loss(z).backward()
    torch.testing.assert_close(z.grad[0], torch.zeros(k, dtype=torch.float64))


def test_joint_nuisance_labels_and_head():
    labels = joint_nuisance_labels(torch.tensor([0, 1, 14]), torch.tensor([0, 2, 1]), num_times=3)
    assert labels.tolist() == [0, 5, 43]  # MSMT17: 15 cameras x 3 periods -> labels 0..44
    with pytest.raises(ValueError):
        joint_nuisance_labels([0], [3], num_times=3)
    head = NuisanceHead(num_classes=45)
    layers = [head.fc1, head.bn, head.act, head.drop, head.fc2]
    assert [type(m) for m in layers] == [torch.nn.Linear, torch.nn.BatchNorm1d,
                                         torch.nn.LeakyReLU, torch.nn.Dropout, torch.nn.Linear]
    assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features) == (2048, 512, 45)
    assert head.act.negative_slope == 0.1 and head.drop.p == 0.5
    head.eval()
    assert head(torch.randn(3, 2048)).shape == (3, 45)

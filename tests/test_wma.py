"""WMA (thesis ch. 4, Algorithm 1): the projected-Sinkhorn projection checked against exact optimal
transport (scipy's linprog) on tiny images, its fixed points, the attack's budget and [0, 1] range,
its effect on a tiny model's retrieval, settings errors and the robust evaluation's budget checks.

Budgets are transport costs per unit of the clean image's mass (all channels together), with mass
moving inside its channel and a k x k window, ground cost the Euclidean pixel distance
(robustreid.attacks.wasserstein's module doc)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from robustreid.attacks import AttackConfigError, GuideSet, ReidFeatureExtractor, build_attack
from robustreid.attacks.base import ReidAttack
from robustreid.attacks.wasserstein import (DEFAULT_EPS, WMA, _lambert_w_exp, _window_logsumexp,
                                             _window_logsumexp_conv, _window_logsumexp_shifted,
                                             project_wasserstein, window_costs)

from conftest import make_tiny_cfg
from test_attacks import (LinearReid, fastreid_model,  # noqa: F401  (fastreid_model: a fixture)
                          saturated_batch)


pytestmark = pytest.mark.usefixtures("one_thread")


# --- an independent exact solver ------------------------------------------------------------------
def exact_local_cost(a, b, kernel_size):
    """The exact minimum cost of moving the mass of ``a`` onto ``b`` ((H, W) arrays of equal sums)
    with moves inside a kernel_size x kernel_size window, cost = Euclidean pixel distance (an LP)."""
    h, w = a.shape
    r = kernel_size // 2
    src, dst, cost = [], [], []
    for i in range(h):
        for j in range(w):
            for di in range(-r, r + 1):
                for dj in range(-r, r + 1):
                    if 0 <= i + di < h and 0 <= j + dj < w:
                        src.append(i * w + j)
                        dst.append((i + di) * w + j + dj)
                        cost.append(math.hypot(di, dj))
    m, n = len(cost), h * w
    rows = np.concatenate([src, np.asarray(dst) + n])
    equalities = coo_matrix((np.ones(2 * m), (rows, np.tile(np.arange(m), 2))), shape=(2 * n, m))
    # HiGHS's presolve calls some of these (feasible, equal-mass) problems infeasible: off.
    result = linprog(np.asarray(cost), A_eq=equalities, b_eq=np.concatenate([a.ravel(), b.ravel()]),
                     bounds=(0, None), method="highs", options={"presolve": False})
    assert result.status == 0, result.message
    return result.fun


def exact_budget_used(x, w, kernel_size=7):
    """Per image: the exact local transport cost from x to w over all channels, divided by x's total
    mass (the normalisation of the WMA budget). w's channels are rescaled to x's channel masses
    first, which changes nothing for a mass-preserving w (and absorbs a clip's tiny loss)."""
    x, w = x.double().numpy(), w.double().numpy()
    used = []
    for xb, wb in zip(x, w):
        total = sum(exact_local_cost(xc, wc * xc.sum() / wc.sum(), kernel_size)
                    for xc, wc in zip(xb, wb) if xc.sum() > 0)
        used.append(total / xb.sum() if xb.sum() > 0 else 0.0)
    return np.array(used)


def shifted(x, fraction):
    """x with ``fraction`` of every pixel's mass (but the last column's) moved one pixel right, and
    that plan's normalised cost (an upper bound of the image's distance to x)."""
    moved = torch.zeros_like(x)
    moved[..., :-1] = fraction * x[..., :-1]
    v = x - moved
    v[..., 1:] += moved[..., :-1]
    return v, moved.sum((1, 2, 3)) / x.sum((1, 2, 3))


# --- the projection's pieces ----------------------------------------------------------------------
def direct_window_logsumexp(t, log_kernel, cost, moments):
    """Every window offset's shifted copy of t (-inf outside the image), logsumexp over them."""
    n, h, w = t.shape
    size = math.isqrt(log_kernel.shape[1])
    r = size // 2
    padded = F.pad(t, (r, r, r, r), value=-math.inf)
    shifted = torch.stack([padded[:, dy:dy + h, dx:dx + w] for dy in range(size)
                           for dx in range(size)])
    terms = shifted + log_kernel.T.reshape(-1, n, 1, 1)
    return [torch.logsumexp(terms + (p * cost.log().view(-1, 1, 1, 1) if p else 0), 0)
            for p in range(moments + 1)]


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_window_sums_by_convolution_and_by_shifts_match_a_direct_logsumexp(dtype, rtol):
    torch.manual_seed(0)
    t = (8 * torch.randn(4, 9, 7)).to(dtype)
    t[0, :4, :4] = -math.inf  # black pixels: the corner pixel's window holds no mass
    t[1] = -math.inf  # a black channel
    cost = window_costs(7, dtype)
    log_kernel = -3 * torch.rand(4, 1, dtype=dtype) * cost - 1  # -z C - 1 with z in [0, 3]
    direct = direct_window_logsumexp(t, log_kernel, cost, 2)
    conv = _window_logsumexp_conv(t, log_kernel, cost, 2)
    assert conv is not None  # a spread of ~40: the fast path is exact enough
    for by_conv, by_shifts, expected in zip(conv, _window_logsumexp_shifted(t, log_kernel, cost, 2),
                                            direct):
        torch.testing.assert_close(by_conv, expected, rtol=rtol, atol=rtol)
        torch.testing.assert_close(by_shifts, expected, rtol=rtol, atol=rtol)
    assert torch.isneginf(conv[0][0, 0, 0]) and torch.isneginf(conv[0][1]).all()
    # One pixel far above the rest: one shift per row would lose its neighbours, so the convolution
    # declines and the exact path answers.
    t[2, 4, 3] = 2000.0
    assert _window_logsumexp_conv(t, log_kernel, cost, 0) is None
    torch.testing.assert_close(_window_logsumexp(t, log_kernel)[0],
                               direct_window_logsumexp(t, log_kernel, cost, 0)[0], rtol=rtol,
                               atol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lambert_w_solves_its_equation_to_rounding(dtype):
    u = torch.cat([torch.linspace(-50, 5, 500), torch.linspace(5, 5000, 500)]).to(dtype)
    w = _lambert_w_exp(u)
    # W(e^u) = w  <=>  w e^w = e^u  <=>  log w + w = u
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(w.log() + w, u, rtol=8 * eps, atol=8 * eps)


# --- the projection -------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel_size", [7, 3])
@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_projection_is_within_eps_by_an_exact_transport_solve(kernel_size, eps):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    v = x + 0.3 * torch.randn_like(x)  # far outside the ball
    w, cost, _ = project_wasserstein(x, v, eps, kernel_size=kernel_size)
    exact = exact_budget_used(x, w, kernel_size)
    assert np.all(exact <= eps * (1 + 1e-7))
    assert np.all(exact <= cost.numpy() + 1e-9)  # the solver's plan is one feasible plan
    assert np.all(exact >= 0.9 * eps)  # the budget binds: the check is not vacuous
    assert torch.allclose(w.sum((2, 3)), x.sum((2, 3)), rtol=1e-9)  # mass kept per channel
    assert w.min() >= 0
    assert ((w - v).flatten(1).norm(dim=1) < (x - v).flatten(1).norm(dim=1)).all()  # moved to v


@pytest.mark.parametrize("lam, iters, tolerance", [(3000.0, 50, 1 / 255), (3e5, 200, 1e-4)])
def test_an_image_inside_the_ball_is_unchanged(lam, iters, tolerance):
    # Entropic projection: exact only as lam -> infinity; the thesis's lam = 3000 stays within
    # 1/255 of the point (measured 1.6e-3), lam = 3e5 within 1e-4 (measured 7e-6).
    torch.manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(2, 3, 8, 8, dtype=torch.float64)
    v, plan_cost = shifted(x, 0.3)
    assert np.all(exact_budget_used(x, v) <= plan_cost.numpy() + 1e-9)
    eps = 3 * plan_cost  # inside, with room to spare
    w, _, _ = project_wasserstein(x, v, eps, lam=lam, iters=iters)
    assert (w - v).abs().max() < tolerance < (v - x).abs().max()
    w, _, _ = project_wasserstein(x, x, eps, lam=lam, iters=iters)
    assert (w - x).abs().max() < tolerance


def test_projection_keeps_pixels_below_upper_and_handles_black_and_zero_budgets():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 8, 4, dtype=torch.float64)
    x[0] = 0.0  # no mass at all
    x[1] = 1.0  # saturated: no pixel may gain mass
    x[2, 1] = 0.0  # one black channel
    v = x + 0.2 * torch.randn_like(x)
    eps = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.0], dtype=torch.float64)
    w, cost, _ = project_wasserstein(x, v, eps, upper=1.0)
    assert torch.isfinite(w).all() and w.min() >= 0
    assert w.max() <= 1 + 0.02  # Sinkhorn's residual, left to the attack's clip
    assert (w[1] - 1).abs().max() < 0.02
    assert torch.equal(w[0], x[0]) and torch.equal(w[2, 1], x[2, 1])
    assert torch.equal(w[4], x[4]) and cost[4] == 0 and cost[0] == 0
    assert (cost <= eps * (1 + 1e-7)).all()
    assert torch.allclose(w.sum((2, 3)), x.sum((2, 3)), rtol=1e-9)


def test_warm_start_continues_from_the_previous_duals():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    v = x + 0.3 * torch.randn_like(x)
    _, _, state = project_wasserstein(x, v, 0.05, iters=20)
    resumed, _, _ = project_wasserstein(x, v, 0.05, iters=30, warm_start=state)
    straight, _, _ = project_wasserstein(x, v, 0.05, iters=50)
    assert torch.allclose(resumed, straight, rtol=0, atol=1e-12)


# --- the attack -----------------------------------------------------------------------------------
def test_attack_keeps_its_budget_the_box_and_its_inputs():
    model, extractor, x, pids = saturated_batch()
    x_before = x.clone()
    attack = build_attack("WMA", extractor, eps=DEFAULT_EPS, steps=3, step_size=4)
    with torch.no_grad():  # attacks enable gradients themselves
        adv = attack.perturb(x, pids)
    assert adv.shape == x.shape and not adv.requires_grad
    assert adv.min() >= 0 and adv.max() <= 1
    assert all(seen.min() >= 0 and seen.max() <= 1 for seen in model.inputs)
    assert torch.equal(x, x_before) and model.training
    assert all(p.grad is None for p in model.parameters())
    assert (adv[2:] - x[2:]).abs().amax((1, 2, 3)).min() > 1 / 255  # every image with room moved
    assert torch.equal(adv[0], x[0]) and (adv[1] - x[1]).abs().max() < 0.02
    assert (attack.plan_cost <= DEFAULT_EPS * (1 + 1e-6)).all()
    assert attack.clipped_mass.abs().max() < 1e-3
    assert attack.budget_used(x, adv) == pytest.approx(float(attack.plan_cost.max()))
    exact = exact_budget_used(x, adv)
    assert np.all(exact <= DEFAULT_EPS * (1 + 1e-3)), exact
    zero = build_attack("WMA", extractor, eps=0, steps=3)
    assert torch.equal(zero.perturb(x, pids), x) and zero.budget_used(x, x) == 0


def retrieval(features, gallery, pids):
    """(Rank-1, mAP) of every query against the gallery, each query's pid known in both."""
    order = torch.cdist(features, gallery).argsort(1)
    match = (pids[order] == pids.view(-1, 1)).float()
    precision = match.cumsum(1) / torch.arange(1, match.shape[1] + 1)
    return float(match[:, 0].mean()), float(((precision * match).sum(1) / match.sum(1)).mean())


def test_wma_at_its_default_budget_breaks_a_tiny_models_retrieval():
    # 4 identities x 2 views: near-identical bases, small view noise, a random linear model; the
    # queries are attacked with the same-ID gallery features as guides (thesis eq. 4.3).
    torch.manual_seed(0)
    ids, shape = 4, (3, 16, 8)
    base = (0.5 + 0.05 * torch.randn(1, *shape) + 0.05 * torch.randn(ids, *shape)).clamp(0.05, 0.95)

    def views():
        return (base.repeat_interleave(2, 0) + 0.02 * torch.randn(2 * ids, *shape)).clamp(0, 1)

    queries, gallery = views(), views()
    pids = torch.arange(ids).repeat_interleave(2)
    extractor = ReidFeatureExtractor(LinearReid(torch.randn(16, math.prod(shape)) / 20,
                                                torch.randn(ids, 16)))
    with torch.no_grad():
        clean, gallery_features = extractor(queries), extractor(gallery)
    guides = GuideSet(gallery_features, pids)
    attack = build_attack("WMA", extractor, eps=DEFAULT_EPS, steps=10)
    adv = attack.perturb(queries, pids, guides)
    objective = attack.objective(queries, pids, guides)
    with torch.no_grad():
        attacked = extractor(adv)
        assert retrieval(clean, gallery_features, pids) == (1.0, 1.0)
        rank1, mean_ap = retrieval(attacked, gallery_features, pids)
        assert rank1 <= 0.5 and mean_ap <= 0.75  # measured 0.25 / 0.50
        assert objective(adv) > 10 * objective(queries)  # measured 0.21 -> 8.1
        assert ((attacked - clean).norm(dim=1) > 0.1 * clean.norm(dim=1)).all()  # measured ~0.3x
    assert (attack.plan_cost <= DEFAULT_EPS * (1 + 1e-6)).all()


def test_wma_raises_its_objective_on_a_real_model(fastreid_model):  # noqa: F811
    torch.manual_seed(0)
    extractor = ReidFeatureExtractor(fastreid_model)
    x, pids = torch.rand(4, 3, 64, 32), torch.tensor([0, 0, 1, 1])
    attack = build_attack("WMA", extractor, eps=DEFAULT_EPS, steps=2, step_size=2)
    adv = attack.perturb(x, pids)
    with torch.no_grad():
        objective = attack.objective(x, pids)
        assert objective(adv) > objective(x)
    assert adv.min() >= 0 and adv.max() <= 1
    assert (attack.plan_cost <= DEFAULT_EPS * (1 + 1e-6)).all()


# --- settings -------------------------------------------------------------------------------------
def test_build_attack_and_its_settings():
    extractor = ReidFeatureExtractor(LinearReid(torch.randn(2, 2), torch.randn(3, 2)))
    attack = build_attack("WMA", extractor, eps=0.05, steps=4, loss="ama", kernel_size=5, lam=1e3,
                          sinkhorn_iters=20, step_size=2)
    assert isinstance(attack, WMA) and isinstance(attack, ReidAttack)
    assert (attack.eps, attack.steps, attack.step_size, attack.loss_name) == (0.05, 4, 2.0, "ama")
    assert (attack.kernel_size, attack.lam, attack.sinkhorn_iters) == (5, 1e3, 20)
    assert attack._eps01 == 0.05 and attack._step01 == 2 / 255  # eps is not rescaled by 255
    assert "transport" in repr(attack)
    default = build_attack("WMA", extractor, eps=DEFAULT_EPS, steps=1)
    assert (default.kernel_size, default.lam, default.step_size, default.loss_name) == (
        7, 3000.0, 1.0, "push")
    assert WMA.check_eps(0.1) == 0.1 and ReidAttack.check_eps(8) == 8 / 255


@pytest.mark.parametrize("options, named", [
    (dict(eps=8), "eps=8"), (dict(eps=-0.1), "-0.1"), (dict(eps=float("nan")), "nan"),
    (dict(eps="0.1"), "'0.1'"), (dict(eps=True), "True"),
    (dict(kernel_size=4), "kernel_size"), (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=2.5), "kernel_size"), (dict(lam=0), "lam"), (dict(lam=float("inf")), "lam"),
    (dict(sinkhorn_iters=0), "sinkhorn_iters"), (dict(loss="l2"), "loss"),
    (dict(rand_init=True), "rand_init"), (dict(decay=1.0), "decay"), (dict(step_size=0), "step_size"),
    (dict(steps=0), "steps"), (dict(distance="l1"), "distance"),
])
def test_bad_settings_raise_naming_the_value(options, named):
    extractor = ReidFeatureExtractor(LinearReid(torch.randn(2, 2), torch.randn(3, 2)))
    settings = dict(eps=0.1, steps=2) | options
    with pytest.raises(AttackConfigError, match=named.replace("(", r"\(")):
        build_attack("WMA", extractor, **settings)


def test_robust_evaluation_checks_budgets_in_each_attacks_units():
    from robustreid.config import ConfigError
    from robustreid.evaluation.attack_grid import ROBUST_CONFIG_NAMES, check_attack_settings

    check_attack_settings(["WMA"], [0.01, 0.1], [4], "euclidean", 1, ROBUST_CONFIG_NAMES)
    check_attack_settings(["FNA"], [8], [4], "euclidean", 1, ROBUST_CONFIG_NAMES)
    with pytest.raises(ConfigError, match=r"TEST.ROBUST.EPS: eps=8 is not a Wasserstein budget"):
        check_attack_settings(["WMA"], [8], [4], "euclidean", 1, ROBUST_CONFIG_NAMES)
    with pytest.raises(ConfigError, match=r"TEST.ROBUST.EPS: eps=0.1 looks like \[0, 1\] units"):
        check_attack_settings(["FNA", "WMA"], [0.1], [4], "euclidean", 1, ROBUST_CONFIG_NAMES)


def test_robust_evaluator_checks_each_attack_in_its_own_units(tmp_path, datasets_root):
    from fastreid.modeling import build_model
    from robustreid.evaluation.attack_grid import AttackCell
    from robustreid.evaluation.robust import BudgetViolation, RobustEvaluator

    torch.manual_seed(0)
    cfg = make_tiny_cfg(tmp_path / "out", "MODEL.HEADS.NUM_CLASSES", "12")
    evaluator = RobustEvaluator(cfg, build_model(cfg).eval(), "SynthReIDTiny", max_queries=4,
                                progress=False)
    wma = evaluator.evaluate_cell(AttackCell("WMA", 0.1, 2), sinkhorn_iters=10)
    assert wma["within_budget"] and wma["pixels_in_range"]
    assert 0 < wma["max_budget_used"] <= 0.1 + 1e-6 and wma["max_linf_255"] > 1  # not an L-inf ball
    fna = evaluator.evaluate_cell(AttackCell("FNA", 8, 2))  # L-inf attacks: as before
    assert fna["within_budget"] and fna["max_budget_used"] == fna["max_linf_255"] <= 8 + 1e-3

    class Cheater:  # no budget_used: measured as L-inf
        def perturb(self, x01, pids, guides=None, sample_index=None):
            return (x01 + 16 / 255).clamp(0, 1)

    with pytest.raises(BudgetViolation, match="8/255"):
        evaluator.evaluate_attack(Cheater(), AttackCell("CHEAT", 8, 1))

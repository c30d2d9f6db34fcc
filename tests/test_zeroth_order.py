"""Zeroth-order gradient estimates (thesis eq. 6.16, 6.19) against the true gradient of a quadratic,
and the black-box wrapper every query goes through."""
import pytest
import torch

from robustreid.attacks.black_box import BlackBox, QueryBudgetExceeded
from robustreid.attacks.zeroth_order import cge, estimator_evaluations, rge, sphere_directions

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 6


def quadratic():
    """f(x) = 1/2 x^T A x + b^T x per row (A symmetric positive definite), its gradient, and A."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
    a = m @ m.T / DIM + torch.eye(DIM, dtype=torch.float64)
    b = torch.randn(DIM, generator=g, dtype=torch.float64)
    x = torch.randn(3, DIM, generator=g, dtype=torch.float64)
    return (lambda z: 0.5 * ((z @ a) * z).sum(1) + z @ b), x, x @ a + b, a


class Counting:
    """f with a count of the rows it was evaluated on."""

    def __init__(self, f):
        self.f, self.rows, self.calls = f, 0, 0

    def __call__(self, z):
        self.rows += len(z)
        self.calls += 1
        return self.f(z)


def errors(estimate, true):
    relative = ((estimate - true).norm(dim=1) / true.norm(dim=1)).max().item()
    cosine = torch.nn.functional.cosine_similarity(estimate, true, dim=1).min().item()
    return relative, cosine


@pytest.mark.parametrize("difference", ["forward", "central"])
def test_rge_converges_to_the_true_gradient_as_q_grows(difference):
    f, x, true, _ = quadratic()
    results = [errors(rge(f, x, q, 0.005, difference, generator=torch.Generator().manual_seed(1)),
                      true) for q in (4, 64, 1024, 8192)]
    relative = [r for r, _ in results]
    cosine = [c for _, c in results]
    assert relative == sorted(relative, reverse=True)  # error shrinks like sqrt(d / q)
    assert relative[0] > 0.4 and relative[-1] < 0.05
    assert cosine[-1] > 0.998 and cosine[0] < 0.95


def test_rge_is_unbiased_on_a_quadratic():
    """The mean of many one-direction estimates is the gradient (d/xi scaling of eq. 6.16)."""
    f, x, true, _ = quadratic()
    copies = 20000  # one-direction estimates per sample, as rows of one batch
    estimates = rge(f, x.repeat(copies, 1), 1, 0.005, generator=torch.Generator().manual_seed(2))
    assert errors(estimates.view(copies, *x.shape).mean(0), true)[0] < 0.05


def test_cge_matches_the_true_gradient_and_its_forward_bias_in_closed_form():
    f, x, true, a = quadratic()
    xi = 0.005
    # central differences are exact for a quadratic (Algorithm 5's +-xi, divided by 2 xi)
    torch.testing.assert_close(cge(f, x, xi, "central"), true, rtol=0, atol=1e-9)
    # forward differences: [f(x + xi e_k) - f(x)] / xi = grad_k + xi/2 A_kk
    torch.testing.assert_close(cge(f, x, xi, "forward"), true + xi / 2 * torch.diagonal(a),
                               rtol=0, atol=1e-9)
    # and their error shrinks with xi
    assert (cge(f, x, xi / 10, "forward") - true).abs().max() < (cge(f, x, xi, "forward") - true
                                                                 ).abs().max() / 9


@pytest.mark.parametrize("method,difference,evaluations", [
    ("rge", "forward", 5), ("rge", "central", 10), ("cge", "forward", DIM), ("cge", "central", 2 * DIM)])
def test_estimators_evaluate_f_exactly_as_often_as_stated(method, difference, evaluations):
    f, x, _, _ = quadratic()
    counting = Counting(f)
    if method == "rge":
        rge(counting, x, 5, 0.005, difference, f_x=f(x))
    else:
        cge(counting, x, 0.005, difference, f_x=f(x))
    assert estimator_evaluations(method, difference, q=5, dim=DIM) == evaluations
    assert counting.calls == evaluations and counting.rows == evaluations * len(x)
    # without f(x) given, forward differences query it once more
    counting = Counting(f)
    (rge(counting, x, 5, 0.005, difference) if method == "rge" else cge(counting, x, 0.005, difference))
    assert counting.calls == estimator_evaluations(method, difference, q=5, dim=DIM, with_f_x=False)


def test_sphere_directions_are_unit_vectors_per_row():
    u = sphere_directions(torch.zeros(4, 3, 5, 2), torch.Generator().manual_seed(0))
    torch.testing.assert_close(u.flatten(1).norm(dim=1), torch.ones(4))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def test_black_box_blocks_every_gradient_path():
    model = _model()
    box = BlackBox(model)
    x = torch.randn(5, 4, requires_grad=True)
    out = box(x)
    torch.testing.assert_close(out, model(x).detach())
    assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(RuntimeError):  # nothing to differentiate
        out.sum().backward()
    # a caller that makes the outputs a leaf and back-propagates reaches neither the model nor x
    out.requires_grad_()
    (out ** 2).sum().backward()
    assert x.grad is None
    assert all(p.grad is None for p in model.parameters())
    assert not hasattr(box, "parameters")  # not an nn.Module: no parameters to hand an optimizer


def test_black_box_counts_rows_exactly_and_enforces_its_budget():
    model = _model()
    calls = []
    box = BlackBox(lambda z: calls.append(len(z)) or model(z), budget=12, chunk=2)
    box(torch.randn(5, 4))
    assert box.queries == 5 and calls == [2, 2, 1] and box.remaining == 7
    box(torch.randn(7, 4))
    assert box.queries == 12 and box.remaining == 0
    with pytest.raises(QueryBudgetExceeded, match="12 of 12 queries used, a batch of 1 more"):
        box(torch.randn(1, 4))
    assert box.queries == 12  # the refused batch was not run
    assert sum(calls) == 12


def test_estimates_through_the_black_box_count_queries():
    """RGE through the wrapper: q + 1 queries per sample (forward differences, f(x) queried too)."""
    model = _model()
    box = BlackBox(model)
    x = torch.randn(3, 4)
    rge(lambda z: box(z)[:, 0], x, 7, 0.005)
    assert box.queries == 3 * (7 + 1)

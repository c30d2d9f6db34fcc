"""Query-based black-box attacks (NES score-based, HSJA decision-based) on the retrieval output:
they lower an undefended model's mAP within their query budget, never run a backward pass, and
the budgets hold per image; robust_eval --protocol query."""
import json
import os

import pytest
import torch

from conftest import REPO, load_tool

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")
TINY_OPTS = ["DATASETS.TESTS", "('SynthReIDTiny',)", "INPUT.SIZE_TEST", "[64,32]",
             "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "32"]
BUDGET = 200  # queries per image: ~10 s per attack on the 16 tiny queries


@pytest.fixture
def no_backward(monkeypatch):
    """Every way to run autograd backwards raises inside the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a backward pass was run")

    monkeypatch.setattr(torch.Tensor, "backward", refuse)
    monkeypatch.setattr(torch.autograd, "backward", refuse)
    monkeypatch.setattr(torch.autograd, "grad", refuse)


@pytest.fixture(scope="module")
def evaluator(trained_tiny):
    from robustreid.evaluation.query_attack_evaluator import QueryAttackEvaluator

    cfg, model, _, _ = trained_tiny(0)
    ev = QueryAttackEvaluator(cfg, model, "SynthReIDTiny", progress=False)
    ev.evaluate_clean()
    return ev


@pytest.fixture(scope="module")
def noise_map(evaluator):
    return evaluator.evaluate_noise(8)["mAP"]


# HSJA (decision-based) needs more queries than NES for the same effect: at 200 its mAP varied from
# 50.4 to 61.7 with the random stream alone (clean 66.2).
@pytest.mark.parametrize("attack, budget", [("NES", BUDGET), ("HSJA", 3 * BUDGET)])
def test_query_attack_lowers_map_within_budget_without_backward(attack, budget, evaluator,
                                                                 noise_map, no_backward):
    from robustreid.evaluation.query_attack_evaluator import QueryCell

    model = evaluator.model
    model.zero_grad(set_to_none=True)  # training left gradients behind; none may appear now
    result = evaluator.evaluate_cell(QueryCell(attack, 8.0, budget))
    clean = evaluator.clean["mAP"]
    # Measured (seed 0, clean 66.2, noise of the same budget 66.0): NES 45.0 at 200 queries, HSJA
    # 48.7 at 600 (same-camera matches junk to the attacks, as to the evaluation)
    assert result["mAP"] < clean - 8 and result["mAP"] < noise_map - 5, (clean, noise_map, result)
    assert result["within_budget"] and result["max_linf_255"] <= 8 + 1e-3
    assert result["query_budget"] == budget and 0 < result["queries_max"] <= budget
    assert result["images"] == len(evaluator.query.items)
    assert all(p.grad is None for p in model.parameters())


class LinearModel(torch.nn.Module):
    """A fixed random projection standing in for a ReID model (features of [0, 1] images)."""

    def __init__(self, dim=8):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(dim, 3 * 16 * 8))

    def forward(self, x01):
        return x01.flatten(1) @ self.weight.T


def toy_system(generator_seed=0):
    from robustreid.attacks.query_based import RetrievalSystem

    torch.manual_seed(generator_seed)
    model = LinearModel()
    gallery = torch.rand(12, 3, 16, 8)
    with torch.no_grad():
        features = model(gallery)
    pids = torch.arange(12) // 2  # two images per identity
    return model, RetrievalSystem(model, features, pids, "euclidean"), gallery, pids


@pytest.mark.parametrize("attack, budget", [("NES", 37), ("HSJA", 37), ("NES", 1), ("HSJA", 3)])
def test_budgets_hold_per_image_and_eps_bounds_the_change(attack, budget, no_backward):
    from robustreid.attacks.query_based import QUERY_ATTACKS

    _, system, gallery, pids = toy_system()
    queries = (gallery[::2] + 0.05 * torch.randn_like(gallery[::2])).clamp(0, 1)
    attacker = QUERY_ATTACKS[attack](system, eps=8, queries=budget, tile=2)
    adv = attacker.perturb(queries, pids[::2])
    assert (adv - queries).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    stats = attacker.query_stats()
    assert stats["images"] == 6 and stats["queries_max"] <= budget
    assert not queries.requires_grad and adv.grad_fn is None


def test_eps_zero_returns_the_images_without_a_query():
    from robustreid.attacks.query_based import HSJAttack, NESAttack

    _, system, gallery, pids = toy_system()
    for cls in (NESAttack, HSJAttack):
        attacker = cls(system, eps=0, queries=10)
        assert attacker.perturb(gallery[:3], pids[:3]).equal(gallery[:3])
        assert attacker.query_stats()["queries_max"] == 0


def test_per_image_queries_refuse_a_row_past_its_budget():
    from robustreid.attacks.black_box import QueryBudgetExceeded
    from robustreid.attacks.query_based import PerImageQueries

    box = PerImageQueries(lambda x: x.sum(1, keepdim=True), rows=3, budget=2)
    box(torch.ones(3, 2), torch.arange(3))
    box(torch.ones(1, 2), torch.tensor([0]))
    assert box.used.tolist() == [2, 1, 1] and box.remaining(torch.tensor([1, 2])) == 1
    with pytest.raises(QueryBudgetExceeded):
        box(torch.ones(1, 2), torch.tensor([0]))
    assert box.used.tolist() == [2, 1, 1]


def test_nes_margin_reads_same_id_and_nearest_other_distances():
    from robustreid.attacks.query_based import NESAttack

    _, system, _, _ = toy_system()
    attacker = NESAttack(system, eps=8, queries=10, negatives=2)
    distances = torch.tensor([[1.0, 3.0, 2.0, 6.0, 5.0]])
    same_id = torch.tensor([[True, True, False, False, False]])
    # same-ID mean 2, the 2 nearest others (2, 5) mean 3.5
    assert attacker.margin(distances, same_id).item() == pytest.approx(-1.5)
    # image 1 from the query's own camera is junk: in neither term (positive 1, others 2 and 5)
    positives = torch.tensor([[True, False, False, False, False]])
    junk = torch.tensor([[False, True, False, False, False]])
    assert attacker.margin(distances, positives, junk).item() == pytest.approx(-2.5)


def test_same_camera_matches_are_junk_to_the_attacks():
    from robustreid.attacks.query_based import HSJAttack, RetrievalSystem

    # features: an image's first two pixels. Query (0, 0) of identity 0, camera 0; gallery: its
    # own camera's copy (junk), a far identity-0 image from camera 1 and a near identity-1 image.
    gallery = torch.tensor([[0.0, 0.0], [0.9, 0.9], [0.1, 0.0]])
    system = RetrievalSystem(lambda x01: x01.flatten(1)[:, :2], gallery, torch.tensor([0, 0, 1]),
                             "euclidean", gallery_camids=torch.tensor([0, 1, 0]))
    positives, junk = system.match_masks(torch.tensor([0]), torch.tensor([0]))
    assert positives.tolist() == [[False, True, False]] and junk.tolist() == [[True, False, False]]
    query = torch.zeros(1, 3, 4, 4)
    # With the cameras, the top-1 without the junk is identity 1: already unmatched, one query
    attacker = HSJAttack(system, eps=8, queries=50)
    assert attacker.perturb(query, torch.tensor([0]), camids=torch.tensor([0])).equal(query)
    assert attacker.query_stats()["queries_max"] == 1
    # Without them, the junk copy is a match: the attack has work to do
    attacker = HSJAttack(system, eps=8, queries=50)
    attacker.perturb(query, torch.tensor([0]))
    assert attacker.query_stats()["queries_max"] > 1
    assert system.match_masks(torch.tensor([0]))[1].sum() == 0


def test_hsja_leaves_an_unmatched_query_unchanged():
    from robustreid.attacks.query_based import HSJAttack

    model, system, gallery, pids = toy_system()
    wrong = torch.tensor([5])  # image 0 (identity 0) asked as identity 5: top-1 is not identity 5
    attacker = HSJAttack(system, eps=8, queries=50)
    assert attacker.perturb(gallery[:1], wrong).equal(gallery[:1])
    assert attacker.query_stats()["queries_max"] == 1  # the check itself


def test_cli_query_protocol_reports_queries(trained_tiny, tmp_path, capsys):
    weights = trained_tiny(0)[2]
    out = tmp_path / "report"
    code = load_tool("robust_eval").main([
        "--config-file", CONFIG, "--protocol", "query", "--attacks", "HSJA", "--eps", "8",
        "--query-budget", "30", "--max-queries", "4", "--output", str(out),
        "MODEL.WEIGHTS", weights, *TINY_OPTS])
    assert code == 0, capsys.readouterr().err[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["query_budgets"] == [30] and report["settings"]["attacks"] == ["HSJA"]
    (cell,) = report["datasets"][0]["cells"]
    assert cell["label"] == "HSJA 8/255 q30" and cell["queries_max"] <= 30 and cell["images"] == 4
    (noise,) = report["datasets"][0]["noise_baselines"]  # the control of the attack's budget
    assert (noise["label"], noise["eps"], noise["within_budget"]) == ("uniform noise 8/255", 8.0, True)
    table = (out / "results.md").read_text()
    assert "| SynthReIDTiny | HSJA 8/255 q30 | 30 |" in table
    assert f"| SynthReIDTiny | uniform noise 8/255 | {noise['Rank-1']:.1f} |" in table
    assert (out / "mAP_vs_eps.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--protocol", "query", "--attacks", "FNA"], "FNA"),
    (["--protocol", "query", "--steps", "4"], "--steps"),
    (["--protocol", "query", "--query-budget", "0"], "--query-budget"),
    (["--protocol", "query", "--eps", "0.03"], "--eps"),
    (["--query-budget", "100"], "--query-budget applies to --protocol query only"),
])
def test_cli_bad_query_options_exit_2_with_one_line(args, message, tmp_path, capsys):
    code = load_tool("robust_eval").main(["--config-file", CONFIG, *args, "--output",
                                          str(tmp_path / "out"), "MODEL.WEIGHTS", "w.pth"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err

"""Robust evaluation: eps 0 = clean, budgets, monotonicity, attacks vs noise, reports, CLI input checks,
TEST.ROBUST inside RobustTrainer.test. One tiny model is trained once for the module."""
import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO, make_tiny_cfg

ROBUST_EVAL = os.path.join(REPO, "tools", "robust_eval.py")
CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")
TINY_OPTS = ["DATASETS.TESTS", "('SynthReIDTiny',)", "INPUT.SIZE_TEST", "[64,32]",
             "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "32"]
STEPS = 16  # the papers' iteration count (a cell costs ~1 s on the tiny set)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, datasets_root):
    """A ResNet-18 trained on SynthReIDTiny (~15 s; 34-48 mAP over seeds, chance 17):
    (cfg, model, clean results of the trainer)."""
    from fastreid.utils.env import seed_all_rng
    from robustreid.engine import RobustTrainer

    seed_all_rng(0)
    out = tmp_path_factory.mktemp("robust_model")
    cfg = make_tiny_cfg(out, "SOLVER.MAX_EPOCH", "30", "SOLVER.BASE_LR", "0.002",
                        "SOLVER.STEPS", "[100]", "TEST.EVAL_PERIOD", "30",
                        "SOLVER.CHECKPOINT_PERIOD", "30")
    trainer = RobustTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    model = trainer.model.eval()
    return cfg, model, results


@pytest.fixture(scope="module")
def evaluator(trained):
    from robustreid.evaluation.robust import RobustEvaluator

    cfg, model, _ = trained
    ev = RobustEvaluator(cfg, model, "SynthReIDTiny", progress=False)
    ev.evaluate_clean()
    return ev


def cell(attack, eps, steps=STEPS):
    from robustreid.evaluation.attack_grid import AttackCell

    return AttackCell(attack, float(eps), steps)


def numbers(result):
    from robustreid.evaluation.attack_grid import METRICS

    return [result[m] for m in METRICS], result["per_identity_mAP"]["values"]


def test_clean_metrics_match_the_trainers_evaluation(evaluator, trained):
    clean = evaluator.clean
    for key in ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"):
        assert clean[key] == pytest.approx(float(trained[2][key]), abs=1e-6)
    assert clean["mAP"] > evaluator.run([])["chance"]["mAP"] + 10  # the model has skill to lose


@pytest.mark.parametrize("attack", ["FNA", "SMA", "IFGSM"])
def test_eps_zero_reproduces_clean_exactly(evaluator, attack):
    result = evaluator.evaluate_cell(cell(attack, 0))
    assert numbers(result) == numbers(evaluator.clean)
    assert result["max_linf_255"] == 0 and result["within_budget"]


def test_budgets_hold_and_map_does_not_increase_with_eps(evaluator):
    maps = [evaluator.clean["mAP"]]
    for eps in (8, 32):
        result = evaluator.evaluate_cell(cell("FNA", eps))
        assert result["within_budget"] and result["pixels_in_range"]
        assert result["max_linf_255"] <= eps + 1e-3
        # FNA starts from a uniform draw of the ball, UniformNoise's draw: its steps must beat it
        noise = evaluator.evaluate_noise(eps)
        assert result["mAP"] < noise["mAP"]
        maps.append(result["mAP"])
    assert maps[1] <= maps[0] + 0.5 and maps[2] <= maps[1] + 0.5, maps


def test_fna_cuts_map_and_beats_random_noise_of_the_same_budget(evaluator):
    fna = evaluator.evaluate_cell(cell("FNA", 8))
    noise = evaluator.evaluate_noise(8)
    assert noise["within_budget"] and noise["max_linf_255"] <= 8 + 1e-3
    assert noise["label"] == "uniform noise 8/255" and noise["attack"] == "NOISE"
    clean, chance = evaluator.clean["mAP"], evaluator.run([])["chance"]["mAP"]
    print(f"FNA 8/255-{STEPS}: mAP {fna['mAP']:.1f}, noise {noise['mAP']:.1f}, clean {clean:.1f}, "
          f"chance {chance:.1f}")
    assert fna["mAP"] < clean - 0.25 * (clean - chance)  # a quarter of the skill is gone
    assert fna["mAP"] < noise["mAP"]


def test_attacking_the_gallery_keeps_the_queries_clean(trained):
    from robustreid.evaluation.robust import RobustEvaluator

    cfg, model, _ = trained
    ev = RobustEvaluator(cfg, model, "SynthReIDTiny", attack_gallery=True, progress=False)
    result = ev.run([cell("FNA", 0), cell("FNA", 8)])
    assert result["attacked"] == "gallery"
    zero, fna = result["cells"]
    assert numbers(zero) == numbers(result["clean"])
    assert fna["within_budget"] and fna["mAP"] < result["clean"]["mAP"]


def test_transfer_attack_from_a_surrogate(trained, evaluator):
    from fastreid.modeling.meta_arch import build_model

    from robustreid.attacks import ReidFeatureExtractor
    from robustreid.evaluation.robust import RobustEvaluator

    cfg, model, _ = trained
    white_box = evaluator.evaluate_cell(cell("FNA", 8))
    # The target itself as the surrogate: exactly the white-box attack.
    same = RobustEvaluator(cfg, model, "SynthReIDTiny", progress=False,
                           surrogate=ReidFeatureExtractor(model))
    transferred = same.evaluate_cell(cell("FNA", 8))
    assert transferred["transfer"] and numbers(transferred) == numbers(white_box)
    # An untrained surrogate's examples transfer far worse than the white-box ones.
    torch.manual_seed(1)
    stranger = build_model(cfg).eval()
    other = RobustEvaluator(cfg, model, "SynthReIDTiny", progress=False,
                            surrogate=ReidFeatureExtractor(stranger))
    black_box = other.evaluate_cell(cell("FNA", 8))
    assert black_box["within_budget"] and black_box["mAP"] > white_box["mAP"]


def test_defended_model_with_eot_and_bpda(trained, evaluator):
    from advertorch.defenses import MedianSmoothing2D

    from robustreid.attacks import ReidFeatureExtractor, build_defense
    from robustreid.evaluation.robust import RobustEvaluator

    cfg, model, _ = trained
    defense = build_defense("MedianSmoothing2D", bpda=True)  # advertorch's 2x2 median, BPDA
    ev = RobustEvaluator(cfg, model, "SynthReIDTiny", defense=defense, eot_samples=2, progress=False)
    ev.evaluate_clean()
    x = ev._x01(next(iter(ev._loader(ev.query))))
    smooth, undefended = MedianSmoothing2D(kernel_size=2), ReidFeatureExtractor(model)
    # The defense is part of the model: clean features are those of the smoothed images.
    with torch.no_grad():
        assert torch.allclose(ev.query.features[:len(x)], undefended(smooth(x)), atol=1e-5)
    assert not torch.allclose(ev.query.features, evaluator.query.features, atol=1e-2)
    # BPDA: the attack's gradient is the model's gradient at the smoothed images, passed straight
    # through the filter (its own derivative would reach only each window's median pixel).
    weights = torch.randn(len(x), 512, generator=torch.Generator().manual_seed(0))
    point = x.clone().requires_grad_(True)
    (ev.attack_extractor(point) * weights).sum().backward()
    smoothed = smooth(x).requires_grad_(True)
    (undefended(smoothed) * weights).sum().backward()
    assert torch.allclose(point.grad, smoothed.grad, rtol=1e-4, atol=1e-7)
    # EOT 2 through a deterministic defense: two draws would be the same forward, so each attack
    # step forwards the queries once (after a probe of one image, twice).
    passes = []
    defense.register_forward_hook(lambda module, args, out: passes.append(len(args[0])))
    # Metric I-FGSM (gallery guides): it lowers this tiny model's mAP in 2 steps through the defense,
    # where FNA (from x, query guides) need not.
    result = ev.run([cell("IFGSM", 0, 2), cell("IFGSM", 8, 2)])
    zero, fna = result["cells"]
    num_query = len(ev.query.items)
    # eps 0: only the adversarial features' pass; eps 8: the probe, 2 steps x 1 draw, that pass
    assert passes == [num_query, 1, 1, num_query, num_query, num_query]
    assert numbers(zero) == numbers(result["clean"])
    assert fna["eot_samples"] == 2 and fna["within_budget"]
    assert fna["mAP"] < result["clean"]["mAP"]


def test_a_budget_violation_stops_the_evaluation(evaluator):
    from robustreid.evaluation.robust import BudgetViolation

    class Cheater:  # ignores its budget
        def perturb(self, x01, pids, guides=None, sample_index=None):
            return (x01 + 16 / 255).clamp(0, 1)

    with pytest.raises(BudgetViolation, match="8/255"):
        evaluator.evaluate_attack(Cheater(), cell("CHEAT", 8, 1))


def test_sanity_checks_pass_on_a_trained_model(evaluator):
    from robustreid.evaluation.attack_grid import attack_grid
    from robustreid.evaluation.robust_sanity import sanity_checks

    result = evaluator.run(attack_grid(["FNA"], [8], [STEPS]))
    checks, extra = sanity_checks(evaluator, result)
    assert all(c.passed for c in checks), "\n".join(c.line() for c in checks)
    assert {c["purpose"] for c in extra} >= {"eps 0", "large eps", "random noise baseline"}


def test_valid_query_mask_and_per_identity_map():
    from robustreid.evaluation.ranking import evaluate_rank_from_features, valid_query_mask
    from robustreid.evaluation.robust import per_identity_map

    rng = np.random.default_rng(0)
    q_pids, q_cams = rng.integers(0, 12, 60), rng.integers(0, 3, 60)
    g_pids, g_cams = rng.integers(0, 10, 80), rng.integers(0, 3, 80)
    expected = np.array([np.any((g_pids == p) & (g_cams != c)) for p, c in zip(q_pids, q_cams)])
    mask = valid_query_mask(q_pids, q_cams, g_pids, g_cams)
    np.testing.assert_array_equal(mask, expected)
    _, all_ap, _ = evaluate_rank_from_features(rng.standard_normal((60, 8)),
                                               rng.standard_normal((80, 8)), q_pids, g_pids,
                                               q_cams, g_cams)
    assert len(all_ap) == mask.sum()

    per_id = per_identity_map([1.0, 0.5, 0.2, 0.4], [7, 7, 3, 3])
    assert per_id["values"] == pytest.approx({"3": 30.0, "7": 75.0})
    assert per_id["mean"] == pytest.approx(52.5) and per_id["std"] == pytest.approx(22.5)


def load_tool():
    spec = importlib.util.spec_from_file_location("robust_eval_tool", ROBUST_EVAL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture(scope="module")
def weights(trained):
    return os.path.join(trained[0].OUTPUT_DIR, "model_final.pth")


def robust_eval(*args, datasets_root):
    env = dict(os.environ, FASTREID_DATASETS=datasets_root, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, ROBUST_EVAL, "--config-file", CONFIG, *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_cli_writes_every_report_file(weights, datasets_root, tmp_path):
    out = tmp_path / "report"
    result = robust_eval("--attacks", "FNA,SMA", "--eps", "8,16", "--steps", "2", "--output",
                         str(out), "MODEL.WEIGHTS", weights, *TINY_OPTS, datasets_root=datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    settings = report["settings"]
    assert settings["eps"] == [8.0, 16.0] and settings["steps"] == [2]
    assert len(settings["weights_sha256"]) == 64 and report["environment"]["torch"] == torch.__version__
    (dataset,) = report["datasets"]
    assert [c["label"] for c in dataset["cells"]] == ["FNA 8/255-2", "FNA 16/255-2",
                                                       "SMA 8/255-2", "SMA 16/255-2"]
    assert all(c["within_budget"] and c["step_size_255"] == 1.0 for c in dataset["cells"])
    table = (out / "results.md").read_text()
    assert "mAP/Rank-1" in table and "| Clean | FNA 8/255-2 | FNA 16/255-2 |" in table
    clean = dataset["clean"]
    assert f"| {clean['mAP']:.1f}/{clean['Rank-1']:.1f} |" in table
    fna16 = dataset["cells"][1]  # the budget column, in the attack's unit
    assert f"| {fna16['max_budget_used']:.4g}/255 of 16/255 |" in table
    for png in ("mAP_vs_eps.png", "per_identity_map.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| FNA 16/255-2 |" in result.stdout  # the table is printed too


def mismatched_checkpoint(weights, path):
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state["model"]["backbone.conv1.weight"] = torch.zeros(32, 3, 7, 7)
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("args, opts, message", [
    (["--eps", "0.03"], [], "0.03"),
    (["--eps", "8,abc"], [], "--eps"),
    (["--steps", "two"], [], "--steps"),
    (["--attacks", "FNA,NOPE"], [], "NOPE"),
    ([], ["MODEL.NO_SUCH_KEY", "1"], "MODEL.NO_SUCH_KEY"),
    ([], ["MODEL.WEIGHTS", "/nonexistent/model.pth"], "/nonexistent/model.pth"),
    ([], ["MODEL.WEIGHTS", "MISMATCHED"], "backbone.conv1.weight"),
    ([], ["--eps", "8"], "put the options before the KEY VALUE pairs: --eps"),
])
def test_cli_bad_input_exits_2_with_one_clear_line(args, opts, message, weights, tmp_path, capsys):
    opts = [mismatched_checkpoint(weights, tmp_path / "other.pth") if o == "MISMATCHED" else o
            for o in opts]
    code = load_tool().main(["--config-file", CONFIG, *args, "--output", str(tmp_path / "out"),
                             "MODEL.WEIGHTS", weights, *TINY_OPTS, *opts])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and message in err[0], err
    if "registered" in err[0]:
        assert "FNA" in err[0] and "SMA" in err[0]
    assert not (tmp_path / "out").exists()  # stopped before any work


def test_cli_process_exit_code_and_single_line(weights, datasets_root, tmp_path):
    result = robust_eval("--eps", "0.03", "MODEL.WEIGHTS", weights, *TINY_OPTS,
                         datasets_root=datasets_root)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "looks like [0, 1] units" in result.stderr and "Traceback" not in result.stderr


def test_cli_prints_the_written_report_and_exits_1_on_a_failed_check(tmp_path, capsys):
    """The launching process prints the report rank 0 wrote: table, path, sanity checks."""
    checks = [{"name": "eps 0 = clean", "passed": True, "detail": "same numbers"},
              {"name": "beats noise", "passed": False, "detail": "mAP 30.0 vs 29.0"}]
    report = {"settings": {"output_dir": str(tmp_path)},
              "datasets": [{"dataset": "SynthReIDTiny", "sanity": {"checks": checks}}]}
    (tmp_path / "results.json").write_text(json.dumps(report))
    (tmp_path / "results.md").write_text("| Clean | FNA 8/255-2 |\n")
    assert load_tool().print_report(str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "| Clean | FNA 8/255-2 |" in out and f"report: {tmp_path}" in out
    assert "[SynthReIDTiny] PASS  eps 0 = clean: same numbers" in out
    assert "[SynthReIDTiny] FAIL  beats noise: mAP 30.0 vs 29.0" in out
    report["datasets"][0]["sanity"]["checks"] = checks[:1]
    (tmp_path / "results.json").write_text(json.dumps(report))
    assert load_tool().print_report(str(tmp_path)) == 0


def test_trainer_test_adds_flat_robust_keys(trained):
    from robustreid.engine import RobustTrainer

    cfg, model, _ = trained
    cfg = cfg.clone()
    cfg.defrost()
    cfg.TEST.ROBUST.ENABLED = True
    cfg.TEST.ROBUST.ATTACKS = ("FNA", "IFGSM")
    cfg.TEST.ROBUST.STEPS = (2,)
    results = RobustTrainer.test(cfg, model)
    for key in ("FNA_8_2/mAP", "FNA_8_2/Rank-1", "IFGSM_8_2/mINP", "FNA_8_2/mAP_id_std"):
        assert isinstance(results[key], float), key
    assert results["FNA_8_2/mAP"] < results["mAP"]
    assert "FNA_8_2/mAP" not in RobustTrainer.test(cfg, model, robust=False)


def test_training_runs_the_robust_evaluation_at_the_end_only(tmp_path, datasets_root, monkeypatch):
    import robustreid.evaluation.robust as robust
    from robustreid.engine import RobustTrainer

    calls = []
    monkeypatch.setattr(robust, "robust_test", lambda cfg, model: calls.append(1) or
                        {"SynthReIDTiny": {"FNA_8_2/mAP": 1.0}})
    cfg = make_tiny_cfg(tmp_path / "out", "TEST.EVAL_PERIOD", "1", "TEST.ROBUST.ENABLED", "True",
                        "TEST.ROBUST.ATTACKS", "('FNA',)", "TEST.ROBUST.STEPS", "(2,)")
    trainer = RobustTrainer(cfg)
    results = trainer.train()  # 2 epochs, clean evaluation after each, robust (PERIOD 0) at the end
    assert calls == [1] and results["FNA_8_2/mAP"] == 1.0 and "mAP" in results


@pytest.mark.parametrize("epoch, period, due", [(3, 0, False), (9, 0, True), (3, 4, True),
                                                (4, 4, False), (9, 4, True)])
def test_robust_period(epoch, period, due):
    from robustreid.engine import RobustTrainer

    test = SimpleNamespace(ROBUST=SimpleNamespace(PERIOD=period))
    trainer = SimpleNamespace(epoch=epoch, max_epoch=10, cfg=SimpleNamespace(TEST=test))
    assert RobustTrainer._robust_due(trainer) is due


@pytest.mark.parametrize("key, value, message", [
    ("EPS", (0.03,), "TEST.ROBUST.EPS"), ("ATTACKS", ("FNA", "NOPE"), "NOPE"),
    ("STEPS", (0,), "TEST.ROBUST.STEPS"), ("DISTANCE", "manhattan", "TEST.ROBUST.DISTANCE"),
])
def test_preflight_rejects_bad_robust_settings(tiny_cfg, key, value, message):
    from robustreid.config import ConfigError
    from robustreid.engine import preflight

    tiny_cfg.TEST.ROBUST.ENABLED = True
    tiny_cfg.TEST.ROBUST[key] = value
    with pytest.raises(ConfigError, match=message):
        preflight(tiny_cfg)


def test_tables_mark_eot_columns_and_noise_draws_average_features(tiny_cfg):
    from robustreid.evaluation.robust import RobustEvaluator
    from robustreid.evaluation.robust_report import papers_table

    cell = {"label": "FNA 8/255-16", "mAP": 10.0, "Rank-1": 20.0}
    report = {"settings": {"model": "m"}, "datasets": [
        {"dataset": "D", "clean": {"mAP": 50.0, "Rank-1": 60.0},
         "cells": [dict(cell, eot_samples=1), dict(cell, eot_samples=10)]}]}
    header = papers_table([report])[0]
    assert "| FNA 8/255-16 |" in header and "| FNA 8/255-16 EOT 10 |" in header

    cfg = tiny_cfg.clone()
    cfg.TEST.NOISE_DRAWS = 4
    evaluator = RobustEvaluator.__new__(RobustEvaluator)  # only the feature helper is exercised
    evaluator.cfg = cfg
    x = torch.zeros(2, 3)
    torch.manual_seed(0)
    averaged = evaluator._retrieval_features(lambda x01: x01 + torch.randn_like(x01), x)
    torch.manual_seed(0)
    draws = torch.stack([torch.randn(2, 3) for _ in range(4)])
    assert torch.allclose(averaged, draws.mean(0))


def test_step_size_reaches_every_attack(tiny_cfg):
    from robustreid.evaluation.attack_grid import AttackCell
    from robustreid.evaluation.robust import RobustEvaluator

    evaluator = RobustEvaluator.__new__(RobustEvaluator)  # only the attack factory is exercised
    evaluator.attack_extractor, evaluator.distance, evaluator.eot_samples = object(), "euclidean", 1
    evaluator.step_size, evaluator.attack_options = 2.0, {}
    assert evaluator.build_cell_attack(AttackCell("FNA", 8.0, 4)).step_size == 2.0
    assert evaluator.build_cell_attack(AttackCell("IFGSM", 8.0, 4), step_size=3.0).step_size == 3.0
    evaluator.step_size = None
    assert evaluator.build_cell_attack(AttackCell("FNA", 8.0, 4)).step_size == 1.0  # its default


def test_query_subsets_keep_identities_whole():
    from robustreid.evaluation.robust import select_queries

    items = [(f"q{i}.jpg", i // 3, 0) for i in range(30)]  # 10 identities x 3 queries, sorted
    subset = select_queries(items, 9, seed=0)
    assert len(subset) == 9 and subset == sorted(subset, key=items.index)  # dataset order
    assert sorted({pid for _, pid, _ in subset}) != [0, 1, 2]  # not simply the first identities
    assert all(sum(p == pid for _, p, _ in subset) == 3 for _, pid, _ in subset)  # whole ids
    assert select_queries(items, 9, seed=0) == subset and select_queries(items, 0, 0) == items


def test_attack_options_reach_their_attack_only(tiny_cfg, monkeypatch):
    import robustreid.evaluation.robust as robust
    from robustreid.evaluation.attack_grid import (ROBUST_CONFIG_NAMES, AttackCell,
                                                   check_robust_config, parse_attack_options)
    from robustreid.evaluation.robust import RobustEvaluator

    entries = ["WMA:loss=fna", "WMA: sinkhorn_iters = 30", "FNA:rand_init=False"]
    options = parse_attack_options(entries, ["FNA", "WMA", "IFGSM"], ROBUST_CONFIG_NAMES)
    assert options == {"WMA": {"loss": "fna", "sinkhorn_iters": 30}, "FNA": {"rand_init": False}}
    evaluator = RobustEvaluator.__new__(RobustEvaluator)  # only the attack factory is exercised
    evaluator.attack_extractor, evaluator.distance, evaluator.eot_samples = object(), "euclidean", 1
    evaluator.step_size, evaluator.attack_options = None, options
    wma = evaluator.build_cell_attack(AttackCell("WMA", 0.1, 4))
    assert (wma.loss_name, wma.sinkhorn_iters, wma.kernel_size) == ("fna", 30, 7)
    assert evaluator.build_cell_attack(AttackCell("FNA", 8.0, 4)).rand_init is False  # default True
    assert evaluator.build_cell_attack(AttackCell("SMA", 8.0, 4)).rand_init is True  # untouched

    # TEST.ROBUST.ATTACK_OPTIONS reaches the evaluators of RobustTrainer.test's robust evaluation.
    built = []

    class Recorder:
        def __init__(self, *args, **kwargs):
            built.append(kwargs["attack_options"])

        def run(self, cells):
            return {"cells": []}

    monkeypatch.setattr(robust, "RobustEvaluator", Recorder)
    tiny_cfg.TEST.ROBUST.ATTACKS, tiny_cfg.TEST.ROBUST.EPS = ("WMA",), (0.1,)
    tiny_cfg.TEST.ROBUST.ATTACK_OPTIONS = ("WMA:loss=ama", "WMA:lam=1e3")
    check_robust_config(tiny_cfg)
    robust.robust_test(tiny_cfg, model=None)
    assert built == [{"WMA": {"loss": "ama", "lam": 1000.0}}]


@pytest.mark.parametrize("option, message", [
    ("NOPE:loss=fna", "--attack-option: 'NOPE:loss=fna': attack 'NOPE' is not evaluated"),
    ("WMA:lossy=fna", "--attack-option: WMA: attack WMA does not accept ['lossy']"),
    ("WMA:kernel_size=4", "--attack-option: WMA: kernel_size must be odd"),
    ("WMA:loss=l2", "loss must be one of ['push', 'ama', 'fna'], got 'l2'"),
    ("WMA:eps=0.2", "'WMA:eps=0.2': eps is set for every attack by --eps"),
    ("WMA=fna", "'WMA=fna' is not NAME:key=value"),
])
def test_cli_bad_attack_option_exits_2_with_one_clear_line(option, message, tmp_path, capsys):
    code = load_tool().main(["--config-file", CONFIG, "--attacks", "WMA", "--eps", "0.1",
                             "--attack-option", "WMA:loss=fna", "--attack-option", option,
                             "--output", str(tmp_path / "out"), *TINY_OPTS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_preflight_rejects_a_bad_attack_option(tiny_cfg):
    from robustreid.config import ConfigError
    from robustreid.engine import preflight

    robust = tiny_cfg.TEST.ROBUST
    robust.ENABLED, robust.ATTACKS, robust.EPS = True, ("WMA",), (0.1,)
    robust.ATTACK_OPTIONS = ("WMA:sinkhorn_iters=0",)
    with pytest.raises(ConfigError, match="TEST.ROBUST.ATTACK_OPTIONS: WMA: sinkhorn_iters must"):
        preflight(tiny_cfg)

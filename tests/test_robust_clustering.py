"""robust_eval's clustering protocol (issue 14, EAT's threat model): every test sample attacked by
PGD on L(F(x_adv), F(x)), NMI/F1/R@k clean and attacked, the mean-embedding surrogate of a voting
ensemble, the ERS-style summary, the ensemble's clustering inference, and the tool's options.
Random-init tiny models: on SynthReIDTiny they already cluster far above chance (R@1 ~80, chance
~12), which is the skill an attack must take away."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import REPO, load_tool, make_tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")
EAT_CONFIG = os.path.join(REPO, "configs", "SynthReID", "eat_R18.yml")
KS = ("TEST.CLUSTERING.RECALL_KS", "(1, 2)")
ENSEMBLE = ("MODEL.META_ARCHITECTURE", "EnsembleReID", "EAT.ENABLED", "True",
            "MODEL.HEADS.NUM_CLASSES", "4")
TINY_OPTS = ["DATASETS.TESTS", "('SynthReIDTiny',)", "INPUT.SIZE_TEST", "[64,32]",
             "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "32", *KS]


def build(cfg, seed=0):
    from fastreid.modeling.meta_arch import build_model

    torch.manual_seed(seed)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def single(tmp_path_factory, datasets_root):
    cfg = make_tiny_cfg(tmp_path_factory.mktemp("single"), *KS)
    return cfg, build(cfg)


def evaluator_for(cfg, model, **kwargs):
    from robustreid.evaluation.robust_clustering import ClusteringRobustEvaluator

    return ClusteringRobustEvaluator(cfg, model, "SynthReIDTiny", progress=False, **kwargs)


def clustering_evaluator_results(cfg, model):
    """What RobustTrainer.test reports with TEST.EVALUATOR ClusteringEvaluator."""
    from robustreid.engine import RobustTrainer

    cfg = cfg.clone()
    cfg.defrost()
    cfg.TEST.EVALUATOR = "ClusteringEvaluator"
    return RobustTrainer.test(cfg, model)


def test_clean_row_is_the_clustering_evaluators(single):
    cfg, model = single
    expected = clustering_evaluator_results(cfg, model)
    clean = evaluator_for(cfg, model).evaluate_clean()
    assert list(clean) == ["NMI", "F1", "R@1", "R@2"]
    assert clean == {k: expected[k] for k in clean}


def test_pooled_items_keep_each_image_once_in_stream_order():
    from robustreid.evaluation.robust_clustering import pooled_items

    query = [("q1.jpg", 1, 0), ("g2.jpg", 2, 0)]
    gallery = [("g1.jpg", 1, 1), ("g2.jpg", 2, 0), ("g3.jpg", 3, 1)]
    assert [i[0] for i in pooled_items(query, gallery)] == ["q1.jpg", "g2.jpg", "g1.jpg", "g3.jpg"]


def test_pgd_attacks_every_sample_within_eps_and_takes_recall_away(single, monkeypatch):
    from robustreid.evaluation.robust_clustering import PGDCell, ers

    cfg, model = single
    ev = evaluator_for(cfg, model)
    clean = ev.evaluate_clean()
    changes = []  # per sample: the largest |adv - x| in 1/255
    build_attack = ev.build_attack

    def recording(cell):
        attack = build_attack(cell)
        perturb = attack.perturb

        def perturb_and_record(x01, pids):
            adv = perturb(x01, pids)
            changes.append((adv - x01).abs().flatten(1).max(1).values * 255)
            return adv
        attack.perturb = perturb_and_record
        return attack

    monkeypatch.setattr(ev, "build_attack", recording)
    result = ev.evaluate_cell(PGDCell(8.0, 5, 4.0))
    changes = torch.cat(changes)
    assert len(changes) == len(ev.items) == 56  # the whole pooled test set, query and gallery
    assert changes.max() <= 8 + 1e-3
    assert result["max_linf_255"] == pytest.approx(float(changes.max()))
    assert changes.min() > 7  # every sample was pushed out to (nearly) the budget
    assert result["within_budget"] and result["attack"] == "SMA" and result["rand_init"]
    assert result["step_size_255"] == 4.0 and result["label"] == "PGD-5 8/255"
    print(f"clean {clean}, PGD-5 8/255 {result}")
    assert clean["R@1"] > 60  # skill to lose (chance ~12)
    assert result["R@1"] < clean["R@1"] - 25 and result["NMI"] < clean["NMI"] - 5
    assert result["ERS"] == pytest.approx(ers(clean, result, ["NMI", "F1", "R@1", "R@2"]))


def test_a_budget_violation_stops_the_evaluation(single, monkeypatch):
    from robustreid.evaluation.robust import BudgetViolation
    from robustreid.evaluation.robust_clustering import PGDCell

    cfg, model = single
    ev = evaluator_for(cfg, model, max_samples=10)
    attack = ev.build_attack(PGDCell(2.0, 1, 1.0))
    attack.perturb = lambda x01, pids: (x01 + 3 / 255).clamp(0, 1)
    monkeypatch.setattr(ev, "build_attack", lambda cell: attack)
    with pytest.raises(BudgetViolation, match="PGD-1 2/255: max .* of 2/255"):
        ev.evaluate_cell(PGDCell(2.0, 1, 1.0))


def test_ers_by_hand():
    from robustreid.evaluation.robust_clustering import ers

    clean = {"NMI": 60.0, "F1": 20.0, "R@1": 50.0}
    attacked = {"NMI": 30.0, "F1": 5.0, "R@1": 40.0}
    # (30/60 + 5/20 + 40/50) / 3 = (0.5 + 0.25 + 0.8) / 3
    assert ers(clean, attacked, ["NMI", "F1", "R@1"]) == pytest.approx(100 * 1.55 / 3)
    assert ers(clean, attacked, ["NMI"]) == pytest.approx(50.0)
    assert ers({"F1": 0.0, "NMI": 10.0}, {"F1": 0.0, "NMI": 12.0}, ["F1", "NMI"]) == \
        pytest.approx(120.0)  # a clean 0 is left out; not clipped at 100
    assert ers({"F1": 0.0}, {"F1": 0.0}, ["F1"]) is None


# --- ensembles -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def voting(tmp_path_factory, datasets_root):
    cfg = make_tiny_cfg(tmp_path_factory.mktemp("voting"), *ENSEMBLE, *KS)
    return cfg, build(cfg)


def test_voting_ensemble_is_attacked_through_its_mean_embedding_and_scored_by_vote(voting,
                                                                                 monkeypatch):
    from robustreid.evaluation import robust_clustering
    from robustreid.evaluation.robust_clustering import SURROGATE, PGDCell
    from robustreid.modeling.meta_arch.ensemble import EnsembleEmbedding

    cfg, model = voting
    calls = []  # (reduction, gradient enabled) of every EnsembleEmbedding forward
    forward = EnsembleEmbedding.forward

    def counting(self, batched_inputs):
        calls.append((self.reduction, torch.is_grad_enabled()))
        return forward(self, batched_inputs)

    scored = []
    score = robust_clustering.score_clustering

    def scoring(cfg, features, labels):
        scored.append(features.shape)
        return score(cfg, features, labels)

    monkeypatch.setattr(EnsembleEmbedding, "forward", counting)
    monkeypatch.setattr(robust_clustering, "score_clustering", scoring)
    ev = evaluator_for(cfg, model, max_samples=20)
    assert (ev.members, ev.inference) == (3, "vote")  # from EAT.*, TEST.CLUSTERING at defaults
    result = ev.run([PGDCell(8.0, 2, 10.0)])
    # one batch of 20: the attack's clean reference and its 2 gradient steps went through the mean
    # of the members, and nothing else did
    assert sorted(calls) == [("mean", False), ("mean", True), ("mean", True)]
    assert result["attack_target"] == SURROGATE == result["cells"][0]["attack_target"]
    # clean and attacked sets scored on the model's own output, 3 member blocks, voted over
    with torch.no_grad():
        images = torch.rand(1, 3, 64, 32) * 255
        width, member_width = model({"images": images.clone()}).shape[1], \
            model.members[0]({"images": images.clone()}).shape[1]
    assert width == 3 * member_width
    assert scored == [(result["num_samples"], width)] * 2
    assert result["num_samples"] <= 20 and result["members"] == 3 and result["inference"] == "vote"
    assert result["cells"][0]["max_linf_255"] <= 8 + 1e-3


def test_voting_ensembles_clean_row_is_the_clustering_evaluators(voting):
    from robustreid.evaluation.clustering import clustering_report

    cfg, model = voting
    expected = clustering_evaluator_results(cfg, model)  # TEST.CLUSTERING at its defaults
    ev = evaluator_for(cfg, model)
    clean = ev.evaluate_clean()
    assert clean == {k: expected[k] for k in clean}
    with ev.embedder.frozen_eval():
        features = torch.cat([ev._embed(ev._x01(batch)) for batch in ev._loader()])
    # both vote over EAT.MEMBERS blocks; TEST.CLUSTERING.MEMBERS 1 would score the concatenation
    assert clean == clustering_report(features, ev.labels, ks=(1, 2), members=3, inference="vote")
    assert clean != clustering_report(features, ev.labels, ks=(1, 2), members=1, inference="vote")


@pytest.mark.parametrize("inference, target", [("vote", "surrogate: mean embedding"),
                                               ("concat", "model output"),
                                               ("mean", "model output")])
def test_attack_target_per_inference(tmp_path, inference, target):
    from robustreid.attacks.feature_extractor import ReidFeatureExtractor
    from robustreid.evaluation.robust_clustering import attack_extractor
    from robustreid.modeling.meta_arch.ensemble import EnsembleEmbedding

    model = build(make_tiny_cfg(tmp_path, *ENSEMBLE, "EAT.INFERENCE", inference))
    extractor, name = attack_extractor(model)
    assert isinstance(extractor, ReidFeatureExtractor) and name == target
    if inference == "vote":
        assert isinstance(extractor.model, EnsembleEmbedding)
        assert extractor.model.reduction == "mean"
        assert all(a is b for a, b in zip(extractor.model.members, model.members))
    else:  # differentiable as it is: the whole ensemble's own output
        assert extractor.model is model


# --- the ensemble's clustering inference (TEST.CLUSTERING vs EAT.*) -------------------------------
@pytest.mark.parametrize("opts, expected", [
    ((), (1, "vote")),                                             # a single model: TEST.CLUSTERING
    (("TEST.CLUSTERING.MEMBERS", "2", "TEST.CLUSTERING.INFERENCE", "concat"), (2, "concat")),
    (ENSEMBLE, (3, "vote")),                                       # derived from EAT.*
    ((*ENSEMBLE, "EAT.MEMBERS", "4", "EAT.INFERENCE", "concat"), (4, "concat")),
    ((*ENSEMBLE, "EAT.INFERENCE", "mean"), (1, "mean")),           # one mean embedding
    ((*ENSEMBLE, "TEST.CLUSTERING.MEMBERS", "3", "TEST.CLUSTERING.INFERENCE", "vote"), (3, "vote")),
])
def test_clustering_inference_follows_the_ensemble(opts, expected):
    from robustreid.config import load_config
    from robustreid.evaluation.clustering_evaluator import (check_clustering_config,
                                                            clustering_inference)

    cfg = load_config("", list(opts))
    check_clustering_config(cfg)
    assert clustering_inference(cfg) == expected


@pytest.mark.parametrize("opts, message", [
    (("TEST.CLUSTERING.MEMBERS", "2"), "TEST.CLUSTERING.MEMBERS 2 contradicts the ensemble's "
                                       "EAT.MEMBERS 3"),
    (("EAT.INFERENCE", "mean", "TEST.CLUSTERING.MEMBERS", "3"), "TEST.CLUSTERING.MEMBERS 3 "
                                                                "contradicts .*EAT.INFERENCE mean"),
    (("TEST.CLUSTERING.INFERENCE", "concat"), "TEST.CLUSTERING.INFERENCE concat contradicts the "
                                              "ensemble's EAT.INFERENCE vote"),
])
def test_a_contradicting_clustering_key_is_a_config_error_naming_both(opts, message):
    from robustreid.config import ConfigError, load_config
    from robustreid.evaluation import build_reid_evaluator

    cfg = load_config("", ["TEST.EVALUATOR", "ClusteringEvaluator", *ENSEMBLE, *opts])
    with pytest.raises(ConfigError, match=message):
        build_reid_evaluator(cfg, num_query=0)


# --- tools/robust_eval.py --protocol clustering --------------------------------------------------


@pytest.fixture(scope="module")
def weights(single, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save({"model": single[1].state_dict()}, path)
    return str(path)


def test_cli_writes_the_papers_rows_with_ers(weights, tmp_path, capsys):
    out = tmp_path / "report"
    code = load_tool("robust_eval").main([
        "--config-file", CONFIG, "--protocol", "clustering", "--steps", "2", "--max-queries", "20",
        "--output", str(out), "MODEL.WEIGHTS", weights, *TINY_OPTS])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    settings = report["settings"]
    assert (settings["protocol"], settings["attacks"], settings["eps"], settings["steps"]) == \
        ("clustering", ["SMA"], [8.0], [2])
    (d,) = report["datasets"]
    (cell,) = d["cells"]
    assert d["num_samples"] <= 20 and d["metrics"] == ["NMI", "F1", "R@1", "R@2"]
    assert cell["label"] == "PGD-2 8/255" and cell["step_size_255"] == 10.0  # 2.5 * 8 / 2
    assert cell["within_budget"] and cell["attack_target"] == "model output"
    table = (out / "results.md").read_text()
    assert "| Model | Dataset | Setting | NMI | F1 | R@1 | R@2 | ERS* |" in table
    clean = d["clean"]
    assert (f"| bagtricks_R18 | SynthReIDTiny | Clean | {clean['NMI']:.2f} | {clean['F1']:.2f} | "
            f"{clean['R@1']:.2f} | {clean['R@2']:.2f} |  |") in table
    assert f"ERS-style SynthReIDTiny PGD-2 8/255: {cell['ERS']:.2f}" in table
    assert "| PGD-2 8/255 |" in capsys.readouterr().out
    # what tools/evidence.py aggregates of it
    assert load_tool("evidence").run_metrics(report) == {
        **{f"Clean {m}": clean[m] for m in d["metrics"]},
        **{f"PGD-2 8/255 {m}": cell[m] for m in [*d["metrics"], "ERS"]}}


@pytest.mark.parametrize("args, message", [
    (["--protocol", "clustering", "--attack-gallery"], "error: --attack-gallery applies to "
                                                      "--protocol retrieval only"),
    (["--protocol", "clustering", "--eot", "4"], "error: --eot applies to --protocol retrieval"),
    (["--protocol", "clustering", "--attacks", "FNA"], "error: --attacks 'FNA': --protocol "
                                                      "clustering runs PGD"),
    (["--protocol", "clustering", "--eps", "0.03"], "0.03"),
    (["--protocol", "clustering", "--steps", "0"], "error: --steps"),
    (["--protocol", "clustering", "--max-queries", "-1"], "error: --max-queries must be >= 0"),
    (["--protocol", "clustering", "--max-queries", "2"], "error: SynthReIDTiny: 2 test samples "
     "(--max-queries 2) are too few for Recall@2 (TEST.CLUSTERING.RECALL_KS)"),
    (["--protocol", "ranking"], "error: argument --protocol: invalid choice: 'ranking'"),
])
def test_cli_bad_clustering_options_are_one_error_line(args, message, weights, tmp_path, capsys):
    argv = ["--config-file", CONFIG, *args, "--output", str(tmp_path / "out"), "MODEL.WEIGHTS",
            weights, *TINY_OPTS]
    try:
        code = load_tool("robust_eval").main(argv)
    except SystemExit as e:  # argparse's own errors (OneLineParser: one line, exit 2)
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()

"""Guide sets of the robust evaluation: Bai et al.'s gallery guides for the metric I-FGSM family (the
default), the earlier query guides as an option, FNA's own-row option; hand-checked on tiny sets."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from robustreid.attacks import GuideSet, ReidFeatureExtractor, build_attack

from conftest import REPO, make_tiny_cfg

ROBUST_EVAL = os.path.join(REPO, "tools", "robust_eval.py")
CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")


class Diagonal(nn.Module):
    """A fastreid-shaped toy: features diag(2, 1) @ x of (1, 1, 2) images (fastreid passes [0, 255])."""

    def forward(self, batched):
        return batched["images"].flatten(1) / 255.0 * torch.tensor([2.0, 1.0])


def toy_extractor():
    return ReidFeatureExtractor(Diagonal())


def fake_evaluator(guides="", attack_gallery=False):
    """A RobustEvaluator with hand-made clean features and nothing else (its guide logic only).

    Queries: pids 1, 3, 2 (cameras 1, 1, 2); gallery: pids 1, 2, 1, 3, 1, 0 (cameras 1, 1, 2, 2, 3, 1).
    """
    from robustreid.evaluation.robust import RobustEvaluator, Split

    evaluator = RobustEvaluator.__new__(RobustEvaluator)
    evaluator.guides, evaluator.attack_gallery = guides, attack_gallery
    evaluator.surrogate, evaluator._guide_features, evaluator.device = None, {}, torch.device("cpu")
    evaluator.query = Split("query", [("q0", 1, 1), ("q1", 3, 1), ("q2", 2, 2)])
    evaluator.gallery = Split("gallery", [("g0", 1, 1), ("g1", 2, 1), ("g2", 1, 2), ("g3", 3, 2),
                                          ("g4", 1, 3), ("g5", 0, 1)])
    evaluator.query.features = torch.arange(6.0).view(3, 2)
    evaluator.gallery.features = torch.arange(12.0).view(6, 2) * 10
    return evaluator


def test_gallery_guides_of_a_query_are_exactly_its_same_id_gallery_features():
    evaluator = fake_evaluator()
    g = evaluator.gallery.features
    for name in ("IFGSM", "FGSM", "MIFGSM", "NIFGSM", "SINIFGSM", "WMA"):
        attack = build_attack(name, toy_extractor(), eps=0.1 if name == "WMA" else 8, steps=1)
        guides, own_rows = evaluator.guide_set(attack)
        assert torch.equal(guides.features, g) and not own_rows  # no query is a gallery row
        same = guides.same_id(torch.tensor([1, 3, 2]))
        # query 0 (pid 1, camera 1): gallery rows 0, 2, 4; the same-camera row 0 (junk to the
        # ranking) is kept, as Bai et al. and the thesis take every same-ID image
        assert same.count.tolist() == [3, 1, 1]
        assert torch.equal(same.total, torch.stack([g[0] + g[2] + g[4], g[3], g[1]]))
        assert torch.equal(same.sq_norm_total, torch.stack([
            g[0] @ g[0] + g[2] @ g[2] + g[4] @ g[4], g[3] @ g[3], g[1] @ g[1]]))


def test_fna_and_the_query_option_keep_the_query_set_with_own_rows():
    query_features = fake_evaluator().query.features
    for evaluator, name in [(fake_evaluator(), "FNA"), (fake_evaluator(), "FNA_PULL"),
                            (fake_evaluator(guides="query"), "IFGSM"),
                            (fake_evaluator(guides="query"), "FNA")]:
        guides, own_rows = evaluator.guide_set(build_attack(name, toy_extractor(), eps=8, steps=1))
        assert torch.equal(guides.features, query_features) and own_rows, name
        assert guides.pids.tolist() == [1, 3, 2]
    # AMA protocol (gallery attacked): Bai et al.'s I-FGSM guides are the clean queries, FNA's the
    # attacked gallery itself; "gallery" by name keeps the gallery for I-FGSM too.
    ifgsm = build_attack("IFGSM", toy_extractor(), eps=8, steps=1)
    fna = build_attack("FNA", toy_extractor(), eps=8, steps=1)
    assert fake_evaluator(attack_gallery=True).guide_split(ifgsm).name == "query"
    assert fake_evaluator(attack_gallery=True).guide_split(fna).name == "gallery"
    assert fake_evaluator("gallery", attack_gallery=True).guide_split(ifgsm).name == "gallery"


def test_ama_loss_with_gallery_guides_by_hand():
    # f(x) = diag(2, 1) x. Query 0 (pid 1) has gallery guides (1, 0) and (0, 2); query 1 (pid 2)
    # has (3, 4); pid 9 is another identity. AMA: sum_g |f^ - g^|^2 on unit vectors.
    gallery = GuideSet(torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 2.0], [5.0, 5.0]]),
                       torch.tensor([1, 2, 1, 9]))
    x = torch.tensor([[0.3, 0.4], [0.5, 0.1]]).view(2, 1, 1, 2)
    attack = build_attack("IFGSM", toy_extractor(), eps=8, steps=1)
    value = attack.objective(x, torch.tensor([1, 2]), gallery)(x).item()
    f0, f1 = np.array([0.6, 0.4]), np.array([1.0, 0.1])
    u0, u1 = f0 / np.hypot(*f0), f1 / np.hypot(*f1)
    hand = (((u0 - [1, 0]) ** 2).sum() + ((u0 - [0, 1]) ** 2).sum()
            + ((u1 - [0.6, 0.8]) ** 2).sum())
    assert value == pytest.approx(hand, rel=1e-6)
    # = 2 * sum_g (1 - cos): 2 * ((1 - .6/|f0|) + (1 - .4/|f0|) + (1 - (.6 + .08)/|f1|))
    assert value == pytest.approx(2 * (3 - 1.0 / np.hypot(*f0) - 0.68 / np.hypot(*f1)), rel=1e-6)


def test_fna_include_self_adds_the_own_clean_feature_as_push_guide():
    # Guide rows 0 and 2 are the attacked samples (clean f = (1, .5), (.5, .75)); row 1 the only
    # other pid-1 guide, row 3 the only other pid-2 guide; pid 3 is the farthest identity of both.
    rows = torch.tensor([[1.0, 0.5], [0.0, 1.0], [0.5, 0.75], [1.5, 0.75], [3.0, 0.5]])
    guides, pids = GuideSet(rows, torch.tensor([1, 1, 2, 2, 3])), torch.tensor([1, 2])
    x = torch.tensor([[0.5, 0.5], [0.25, 0.75]]).view(2, 1, 1, 2)
    point = x + torch.tensor([[0.01, -0.02], [-0.03, 0.015]]).view(2, 1, 1, 2)
    f = point.flatten(1) * torch.tensor([2.0, 1.0])

    def sq(a, b):
        return ((a - b) ** 2).sum().item()

    pull = -sq(f[0], rows[4]) - sq(f[1], rows[4])
    excluded = build_attack("FNA", toy_extractor(), eps=8, steps=1)
    included = build_attack("FNA", toy_extractor(), eps=8, steps=1, include_self=True)
    value = {a.include_self: a.objective(x, pids, guides, torch.tensor([0, 2]))(point).item()
             for a in (excluded, included)}
    assert value[False] == pytest.approx(sq(f[0], rows[1]) + sq(f[1], rows[3]) + pull, rel=1e-6)
    assert value[True] == pytest.approx(value[False] + sq(f[0], rows[0]) + sq(f[1], rows[2]),
                                        rel=1e-6)
    with pytest.raises(ValueError, match="include_self"):
        build_attack("FNA", toy_extractor(), eps=8, steps=1, include_self="yes")
    with pytest.raises(ValueError, match="FNA_PULL has no push guides"):
        build_attack("FNA_PULL", toy_extractor(), eps=8, steps=1, include_self=True)


def test_gallery_guided_ifgsm_respects_its_budget_and_raises_its_loss():
    gallery = GuideSet(torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 2.0]]), torch.tensor([1, 2, 1]))
    x = torch.tensor([[0.3, 0.4], [0.998, 0.002]]).view(2, 1, 1, 2)  # near the [0, 1] edges
    pids = torch.tensor([1, 2])
    attack = build_attack("IFGSM", toy_extractor(), eps=8, steps=20)
    adv = attack.perturb(x, pids, gallery)
    assert (adv - x).abs().max() <= 8 / 255 + 1e-7 and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() > 7 / 255  # it moved, as far as the budget allows
    objective = attack.objective(x, pids, gallery)
    assert objective(adv).item() > objective(x).item()


def test_defaults_are_bai_gallery_guides_and_bad_values_name_their_option(tiny_cfg):
    from robustreid.config import ConfigError
    from robustreid.evaluation.attack_grid import check_robust_config
    from robustreid.evaluation.robust import RobustEvaluator

    assert tiny_cfg.TEST.ROBUST.GUIDES == ""
    assert RobustEvaluator.__init__.__kwdefaults__["guides"] == ""
    ifgsm = build_attack("IFGSM", toy_extractor(), eps=8, steps=1)
    assert fake_evaluator().guide_split(ifgsm).name == "gallery"
    tiny_cfg.TEST.ROBUST.GUIDES = "probe"
    with pytest.raises(ConfigError, match=r"TEST.ROBUST.GUIDES must be one of \['gallery', "
                                          r"'query'\].*'probe'"):
        check_robust_config(tiny_cfg)


def test_cli_guides_flag_default_and_bad_value(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("robust_eval_tool", ROBUST_EVAL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    parse = tool.build_parser().parse_args
    assert tool.parse_settings(parse(["--config-file", CONFIG]))["guides"] == ""
    assert tool.parse_settings(parse(["--config-file", CONFIG, "--guides", "query"]))["guides"] == \
        "query"
    code = tool.main(["--config-file", CONFIG, "--guides", "queries", "--output",
                      str(tmp_path / "out"), "MODEL.WEIGHTS", "/nonexistent.pth"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --guides must be one of")
    assert not (tmp_path / "out").exists()


# Measured with the code before gallery guides (commit d977295, where the I-FGSM family took the query
# set as guides): IFGSM 8/255-4 on the seeded random-init tiny model below, 1 and 2 threads alike.
OLD_IFGSM_QUERY_GUIDES = {"mAP": 16.173143247729442, "Rank-1": 18.75, "mINP": 10.724154968785388}


@pytest.fixture(scope="module")
def random_model_evaluators(tmp_path_factory, datasets_root):
    from fastreid.modeling import build_model
    from robustreid.evaluation.robust import RobustEvaluator

    torch.manual_seed(0)
    cfg = make_tiny_cfg(tmp_path_factory.mktemp("guides"), "MODEL.HEADS.NUM_CLASSES", "12")
    model = build_model(cfg).eval()
    return {guides: RobustEvaluator(cfg, model, "SynthReIDTiny", progress=False, guides=guides)
            for guides in ("", "query")}


def test_query_option_reproduces_the_old_numbers(random_model_evaluators):
    from robustreid.evaluation.attack_grid import AttackCell

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        old = random_model_evaluators["query"].evaluate_cell(AttackCell("IFGSM", 8.0, 4))
        new = random_model_evaluators[""].evaluate_cell(AttackCell("IFGSM", 8.0, 4))
    finally:
        torch.set_num_threads(threads)
    assert old["guides"] == "query" and new["guides"] == "gallery"
    for metric, value in OLD_IFGSM_QUERY_GUIDES.items():
        assert old[metric] == pytest.approx(value, abs=1e-9), metric
    assert new["mAP"] != pytest.approx(OLD_IFGSM_QUERY_GUIDES["mAP"], abs=1e-9)  # another attack
    assert new["within_budget"] and old["within_budget"]


def test_each_cell_reports_its_guide_split(random_model_evaluators):
    from robustreid.evaluation.attack_grid import attack_grid
    from robustreid.evaluation.robust_report import build_report, robust_markdown

    result = random_model_evaluators[""].run(attack_grid(["FNA", "SMA", "IFGSM"], [8], [1]))
    assert {c["attack"]: c["guides"] for c in result["cells"]} == {
        "FNA": "query", "SMA": None, "IFGSM": "gallery"}
    table = robust_markdown(build_report({"distance": "euclidean"}, [result], 0.0))
    assert "queries attacked, gallery clean; guide sets: FNA query, IFGSM gallery;" in table


def test_robust_evaluation_runs_fna_as_bouniot_and_options_override_it():
    from robustreid.evaluation.attack_grid import AttackCell
    from robustreid.evaluation.robust import RobustEvaluator

    evaluator = RobustEvaluator.__new__(RobustEvaluator)  # only the attack factory is exercised
    evaluator.attack_extractor, evaluator.distance, evaluator.eot_samples = object(), "euclidean", 1
    evaluator.step_size, evaluator.attack_options = None, {}
    fna = evaluator.build_cell_attack(AttackCell("FNA", 8.0, 4))
    assert (fna.rand_init, fna.include_self) == (False, True)  # from x, own feature pushed
    trained = build_attack("FNA", object(), eps=8, steps=4)  # the training attack: DDDefense eq. 3
    assert (trained.rand_init, trained.include_self) == (True, False)
    evaluator.attack_options = {"FNA": {"rand_init": True, "include_self": False}}
    fna = evaluator.build_cell_attack(AttackCell("FNA", 8.0, 4))
    assert (fna.rand_init, fna.include_self) == (True, False)
    assert evaluator.build_cell_attack(AttackCell("FNA", 8.0, 4), rand_init=False).rand_init is False

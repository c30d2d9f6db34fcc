"""EAT's baselines in their DML form (issue 14 item 6; Ke et al., "Previous Defenses", eq. 4-8):
DML_DEFENSE.METHOD at / mixup / iat / trades (robustreid.engine.dml_defenses), and the Table 3
ablation configs."""
import os

import pytest
import torch
import torch.nn.functional as F
from fastreid.utils.events import EventStorage

from conftest import REPO, make_tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = os.path.join(REPO, "configs", "SynthReID")


def cosine_distance(a, b):
    """1 - cos, written out (the attack engine's "cosine")."""
    return 1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    return {"images": torch.rand(8, 3, 64, 32, generator=generator) * 255,
            "targets": torch.arange(4).repeat(2), "camids": torch.arange(8) % 3,
            "img_paths": [f"img{i}.jpg" for i in range(8)]}


@pytest.fixture
def model(tmp_path):
    from fastreid.modeling.meta_arch import build_model

    torch.manual_seed(0)
    return build_model(make_tiny_cfg(tmp_path, "MODEL.META_ARCHITECTURE", "RobustBaseline",
                                     "MODEL.HEADS.NUM_CLASSES", "4")).train()


def mixed_batch(size, adversarial, lam, partner):
    """The row marks MixUpBatch writes: clean, mixed (and mixed adversarial) blocks of ``size``."""
    rows = torch.arange((3 if adversarial else 2) * size)
    return {"is_mixed": rows >= size, "is_adversarial": rows >= 2 * size,
            "mix_lambda": torch.tensor(lam), "mix_partner": partner}


# --- the embedding-target terms, by hand ---------------------------------------------------------
def test_mixup_term_is_the_distance_to_the_mixed_detached_clean_embeddings():
    from robustreid.engine.dml_defenses import EmbeddingTargetTerms

    embeddings = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, -1.0]], requires_grad=True)
    batch = mixed_batch(2, False, 0.25, torch.tensor([1, 0]))
    terms = EmbeddingTargetTerms("mixup", "cosine")(
        {"neck_features": embeddings}, batch)
    assert set(terms) == {"loss_mixup"}
    # y~_0 = 0.25 (1, 0) + 0.75 (0, 2) = (0.25, 1.5); y~_1 = 0.25 (0, 2) + 0.75 (1, 0) = (0.75, 0.5)
    expected = ((1 - (0.25 + 1.5) / (2 ** 0.5 * (0.25 ** 2 + 1.5 ** 2) ** 0.5)) +
                (1 - (2.25 - 0.5) / (10 ** 0.5 * (0.75 ** 2 + 0.5 ** 2) ** 0.5))) / 2
    assert terms["loss_mixup"].item() == pytest.approx(expected, rel=1e-6)
    terms["loss_mixup"].backward()
    assert embeddings.grad[:2].abs().sum() == 0  # the targets are labels: no gradient
    assert embeddings.grad[2:].abs().sum() > 0
    squared = EmbeddingTargetTerms("mixup", "euclidean")({"neck_features": embeddings}, batch)
    assert squared["loss_mixup"].item() == pytest.approx(
        ((0.75 ** 2 + 0.5 ** 2) + (2.25 ** 2 + 1.5 ** 2)) / 2, rel=1e-6)


def test_iat_adds_the_same_term_on_the_mixed_adversarial_rows():
    from robustreid.engine.dml_defenses import EmbeddingTargetTerms

    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(12, 5, generator=generator)
    partner = torch.tensor([2, 0, 3, 1])
    terms = EmbeddingTargetTerms("iat", "cosine")(
        {"neck_features": embeddings}, mixed_batch(4, True, 0.7, partner))
    clean, mixed, mixed_adv = embeddings[:4], embeddings[4:8], embeddings[8:]
    targets = 0.7 * clean + 0.3 * clean[partner]
    assert set(terms) == {"loss_mixup", "loss_mixup_adv"}
    torch.testing.assert_close(terms["loss_mixup"], cosine_distance(mixed, targets).mean())
    torch.testing.assert_close(terms["loss_mixup_adv"], cosine_distance(mixed_adv, targets).mean())
    assert terms["loss_mixup"] != terms["loss_mixup_adv"]


def test_trades_term_is_lambda_times_the_distance_to_the_clean_embedding():
    from robustreid.engine.dml_defenses import EmbeddingTargetTerms

    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, -1.0]], requires_grad=True)
    batch = {"is_adversarial": torch.tensor([False, False, True, True])}
    terms = EmbeddingTargetTerms("trades", "euclidean", trades_lambda=6.0)(
        {"neck_features": embeddings}, batch)
    # d((1, 1), (1, 0)) = 1, d((0, -1), (0, 1)) = 4: 6 * (1 + 4) / 2
    assert set(terms) == {"loss_trades"}
    assert terms["loss_trades"].item() == pytest.approx(15.0)
    terms["loss_trades"].backward()
    assert embeddings.grad[:2].abs().sum() > 0  # F(x) is not detached (TRADES's code)


@pytest.mark.parametrize("method, include_clean, expected", [
    ("mixup", True, [True] * 4 + [False] * 4), ("mixup", False, [False] * 8),
    ("trades", False, [True] * 4 + [False] * 4)])  # eq. 8 always has the clean term
def test_model_losses_read_the_clean_rows_only(method, include_clean, expected):
    from robustreid.engine.dml_defenses import EmbeddingTargetTerms

    batch = (mixed_batch(4, False, 0.5, torch.arange(4)) if method == "mixup"
             else {"is_adversarial": torch.arange(8) >= 4})
    rows = EmbeddingTargetTerms(method, "cosine", include_clean).loss_rows(batch)
    assert rows.tolist() == expected


# --- the batch phases --------------------------------------------------------------------------
def test_mixup_batch_mixes_each_block_with_one_lambda_and_partner(batch):
    from robustreid.engine.dml_defenses import MixUpBatch

    x = batch["images"]
    adv = (x + 3).clamp(0, 255)
    with_adv = {**batch, "images": torch.cat([x, adv]), "is_adversarial": torch.arange(16) >= 8,
                "targets": batch["targets"].repeat(2), "camids": batch["camids"].repeat(2),
                "img_paths": batch["img_paths"] * 2}
    for source, blocks in ((batch, 2), (with_adv, 3)):
        torch.manual_seed(0)
        out = MixUpBatch(alpha=1.0)(None, source)
        lam, partner = out["mix_lambda"], out["mix_partner"]
        assert 0 < lam < 1 and sorted(partner.tolist()) == list(range(8))
        assert not torch.equal(partner, torch.arange(8))
        assert out["images"].shape == (8 * blocks, 3, 64, 32)
        assert torch.equal(out["images"][:8], x)
        torch.testing.assert_close(out["images"][8:16], lam * x + (1 - lam) * x[partner])
        assert out["is_mixed"].tolist() == [False] * 8 + [True] * 8 * (blocks - 1)
        assert out["is_adversarial"].tolist() == [False] * 16 + [True] * 8 * (blocks - 2)
        assert torch.equal(out["targets"], batch["targets"].repeat(blocks))
        assert out["img_paths"] == batch["img_paths"] * blocks
    torch.testing.assert_close(out["images"][16:], lam * adv + (1 - lam) * adv[partner])
    draws = []
    for seed in range(40):
        torch.manual_seed(seed)
        draws.append(float(MixUpBatch(alpha=1.0)(None, batch)["mix_lambda"]))
    assert 0.3 < sum(draws) / 40 < 0.7 and min(draws) < 0.2 and max(draws) > 0.8  # Beta(1, 1)


@pytest.mark.parametrize("method", ["at", "iat", "trades"])
def test_attacks_respect_the_budget(tmp_path, model, batch, method):
    from robustreid.engine.dml_defenses import build_dml_defense_phases

    cfg = make_tiny_cfg(tmp_path, "MODEL.META_ARCHITECTURE", "RobustBaseline",
                        "DML_DEFENSE.METHOD", method, "DML_DEFENSE.EPS", "4.0",
                        "DML_DEFENSE.STEPS", "2")
    phases = build_dml_defense_phases(cfg)
    assert phases[0].attack_name == "SMA" and phases[0].step_size == 2.5 * 4 / 2
    torch.manual_seed(0)
    out = batch
    for phase in phases:
        out = phase(model, out)
    x = batch["images"]
    assert torch.equal(out["images"][:8], x)
    crafted, reference = out["images"][8:], x
    if method == "iat":  # convex mixes of points of the ball around the mixed clean images
        crafted, reference = out["images"][16:], out["images"][8:16]
    assert crafted.shape == (8, 3, 64, 32)
    delta = (crafted - reference).abs()
    assert 1 < delta.max() <= 4 + 1e-3  # 4/255 of [0, 1] is 4 in the model's [0, 255] input
    assert crafted.min() >= 0 and crafted.max() <= 255


# --- wiring ------------------------------------------------------------------------------------
def test_objective_adds_the_terms_to_the_models_losses_on_the_clean_rows(model, batch):
    from robustreid.engine.dml_defenses import EmbeddingTargetTerms, MixUpBatch
    from robustreid.engine.train_steps import TrainingObjective

    torch.manual_seed(0)
    data = MixUpBatch(1.0)(model, batch)
    objective = TrainingObjective(defense=EmbeddingTargetTerms("mixup", "cosine"))
    assert not objective.is_plain
    with EventStorage(0):
        losses = objective(model, {**data, "images": data["images"].clone()}, None)
        _, outputs = model({**data, "images": data["images"].clone()}, return_outputs=True)
        clean = ~data["is_mixed"]
        expected = model.losses({k: v[clean] for k, v in outputs.items()}, data["targets"][clean])
    assert set(losses) == {"loss_cls", "loss_triplet", "loss_mixup"}
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value)
    embeddings = outputs["neck_features"]
    lam, partner = data["mix_lambda"], data["mix_partner"]
    targets = lam * embeddings[:8] + (1 - lam) * embeddings[:8][partner]
    torch.testing.assert_close(losses["loss_mixup"],
                               cosine_distance(embeddings[8:], targets).mean())


def test_method_off_is_fastreids_step_bit_for_bit(tmp_path, datasets_root, batch):
    """DML_DEFENSE.METHOD "" (the default): no phase, a plain objective, and RobustTrainer's step
    equals fastreid's SimpleTrainer step on the same weights and batch."""
    import copy

    from fastreid.engine.train_loop import SimpleTrainer
    from fastreid.solver import build_optimizer

    from robustreid.engine import RobustTrainer
    from robustreid.engine.dml_defenses import build_dml_defense_phases, build_dml_defense_terms

    cfg = make_tiny_cfg(tmp_path, "MODEL.META_ARCHITECTURE", "RobustBaseline")
    assert cfg.DML_DEFENSE.METHOD == ""
    assert build_dml_defense_phases(cfg) == [] and build_dml_defense_terms(cfg) is None
    trainer = RobustTrainer(cfg)
    step = trainer._trainer
    assert step.batch_phases == [] and step.objective.is_plain
    initial = trainer.model.backbone.conv1.weight.detach().clone()
    reference_model = copy.deepcopy(trainer.model)
    optimizer, wrapper = build_optimizer(cfg, reference_model, contiguous=False)
    optimizer.load_state_dict(trainer.optimizer.state_dict())
    reference = SimpleTrainer(reference_model, iter([]), optimizer, wrapper)
    for runner in (step, reference):
        runner._data_loader_iter = iter([{**batch, "images": batch["images"].clone()}])
        with EventStorage(0):
            runner.run_step()
    trained, expected = trainer.model.state_dict(), reference_model.state_dict()
    for name, value in expected.items():
        assert torch.equal(trained[name], value), name
    assert not torch.equal(trained["backbone.conv1.weight"], initial)


@pytest.mark.parametrize("method, terms", [("iat", {"loss_mixup", "loss_mixup_adv"}),
                                           ("trades", {"loss_trades"})])
def test_one_training_step_runs_the_method(tmp_path, datasets_root, method, terms):
    from robustreid.engine import RobustTrainer

    trainer = RobustTrainer(make_tiny_cfg(tmp_path, "MODEL.META_ARCHITECTURE", "RobustBaseline",
                                          "DML_DEFENSE.METHOD", method, "DML_DEFENSE.STEPS", "1"))
    before = trainer.model.backbone.conv1.weight.detach().clone()
    trainer.iter = 0
    with EventStorage(0) as trainer.storage:
        trainer.run_step()
    assert not torch.equal(before, trainer.model.backbone.conv1.weight)
    history = set(trainer.storage.histories())
    assert terms | {"loss_cls", "loss_triplet", "time/adversarial"} <= history
    assert ("time/mixup" in history) == (method == "iat")


# --- configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("opts, key", [
    (("DML_DEFENSE.METHOD", "cutmix"), "DML_DEFENSE.METHOD"),
    (("DML_DEFENSE.EPS", "0.03"), "DML_DEFENSE.EPS"),
    (("DML_DEFENSE.STEPS", "0"), "DML_DEFENSE.STEPS"),
    (("DML_DEFENSE.STEP_SIZE", "-1.0"), "DML_DEFENSE.STEP_SIZE"),
    (("DML_DEFENSE.DISTANCE", "l1"), "DML_DEFENSE.DISTANCE"),
    (("DML_DEFENSE.ALPHA", "0.0"), "DML_DEFENSE.ALPHA"),
    (("DML_DEFENSE.LAMBDA", "-1.0"), "DML_DEFENSE.LAMBDA"),
    (("DML_DEFENSE.METHOD", "trades", "DML_DEFENSE.INCLUDE_CLEAN", "False"),
     "DML_DEFENSE.INCLUDE_CLEAN"),
    (("ADV_TRAIN.ENABLED", "True"), "ADV_TRAIN.ENABLED"),
    (("META_LEARNING.ENABLED", "True"), "META_LEARNING.ENABLED"),
    (("MODEL.META_ARCHITECTURE", "Baseline"), "MODEL.META_ARCHITECTURE"),
])
def test_bad_dml_defense_config_is_a_config_error_naming_the_key(tmp_path, opts, key):
    from robustreid.config import ConfigError
    from robustreid.engine.dml_defenses import check_dml_defense_config

    good = ("MODEL.META_ARCHITECTURE", "RobustBaseline", "DML_DEFENSE.METHOD", "iat")
    check_dml_defense_config(make_tiny_cfg(tmp_path, *good))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_dml_defense_config(make_tiny_cfg(tmp_path, *good, *opts))


def test_train_net_reports_a_bad_method_in_one_line(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_net_tool",
                                                  os.path.join(REPO, "tools", "train_net.py"))
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    out = tmp_path / "out"
    assert train_net.cli(["--config-file", os.path.join(CONFIGS, "mixup_R18.yml"),
                          "DML_DEFENSE.METHOD", "cutmix", "OUTPUT_DIR", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: DML_DEFENSE.METHOD must be one of ['', 'at', 'mixup', 'iat', "
                      "'trades'], got 'cutmix'"]
    assert not out.exists()


def test_baseline_configs_share_at_r18s_schedule_and_eats_training_attack():
    from robustreid.config import load_config
    from robustreid.engine.dml_defenses import check_dml_defense_config
    from robustreid.engine.eat import default_step_size
    from robustreid.engine.train_steps import check_training_config

    eat = load_config(os.path.join(CONFIGS, "eat_R18.yml"))
    single = load_config(os.path.join(CONFIGS, "at_R18.yml"))
    for method in ("at", "mixup", "iat", "trades"):
        cfg = load_config(os.path.join(CONFIGS, f"{method}_R18.yml"))
        check_training_config(cfg)
        check_dml_defense_config(cfg)
        d = cfg.DML_DEFENSE
        assert d.METHOD == method and d.INCLUDE_CLEAN and cfg.OUTPUT_DIR.endswith(f"{method}_R18")
        assert (d.EPS, d.STEPS) == (eat.EAT.EPS, eat.EAT.STEPS) == (16, 10)
        assert (d.STEP_SIZE or default_step_size(d.EPS, d.STEPS)) == 4
        assert d.DISTANCE == single.DML_DEFENSE.DISTANCE == "cosine"
        assert (d.ALPHA, d.LAMBDA) == (1.0, 6.0)
        for key in ("SOLVER.MAX_EPOCH", "SOLVER.BASE_LR", "SOLVER.IMS_PER_BATCH", "SOLVER.STEPS",
                    "SOLVER.WARMUP_ITERS", "TEST.METRIC", "TEST.EVAL_PERIOD", "INPUT.SIZE_TRAIN",
                    "MODEL.META_ARCHITECTURE"):
            section, name = key.split(".")
            assert cfg[section][name] == single[section][name], (method, key)


@pytest.mark.parametrize("name, data_split, self_transfer", [
    ("naive_ensemble_R18.yml", False, False), ("eat_no_split_R18.yml", False, True)])
def test_table3_configs_are_eat_with_its_switches(name, data_split, self_transfer):
    from robustreid.config import load_config
    from robustreid.engine.train_steps import check_training_config

    eat = load_config(os.path.join(CONFIGS, "eat_R18.yml"))
    cfg = load_config(os.path.join(CONFIGS, name))
    check_training_config(cfg)
    assert (cfg.EAT.DATA_SPLIT, cfg.EAT.SELF_TRANSFER) == (data_split, self_transfer)
    assert cfg.OUTPUT_DIR != eat.OUTPUT_DIR
    eat.defrost()
    eat.EAT.DATA_SPLIT, eat.EAT.SELF_TRANSFER, eat.OUTPUT_DIR = data_split, self_transfer, \
        cfg.OUTPUT_DIR
    assert cfg == eat  # nothing else differs

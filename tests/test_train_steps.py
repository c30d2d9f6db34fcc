"""Training-step phases: metric adversarial batches (ADV_TRAIN.*) inside RobustTrainer."""
import pytest
import torch

from conftest import make_tiny_cfg


@pytest.fixture
def model_and_batch(tiny_cfg):
    from fastreid.modeling.meta_arch import build_model

    cfg = tiny_cfg.clone()
    cfg.MODEL.HEADS.NUM_CLASSES = 4
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    batch = {"images": torch.rand(8, 3, 64, 32) * 255, "targets": torch.arange(4).repeat(2),
             "camids": torch.arange(8) % 3, "img_paths": [f"img{i}.jpg" for i in range(8)]}
    return model, batch


@pytest.mark.parametrize("include_clean", [True, False])
def test_adversarial_batch_respects_budget_and_labels(model_and_batch, include_clean):
    from robustreid.attacks import GuideSet, build_attack
    from robustreid.attacks.iterative import random_start
    from robustreid.engine.train_steps import MetricAdversarialBatch

    model, batch = model_and_batch
    original = batch["images"].clone()
    phase = MetricAdversarialBatch("FNA", eps=5, steps=3, step_size=0, distance="euclidean",
                                   include_clean=include_clean)
    torch.manual_seed(0)
    out = phase(model, batch)
    assert torch.equal(batch["images"], original)  # the loader's batch is left alone
    assert model.training  # crafting in eval mode does not leak out
    adv = out["images"][8:] if include_clean else out["images"]
    assert adv.shape == original.shape
    delta = (adv - original).abs().max().item()
    assert delta <= 5 + 1e-3  # 5/255 of [0,1] is 5 in fastreid's [0,255] input space
    assert adv.min() >= 0 and adv.max() <= 255
    # FNA's steps climbed its objective (the batch as its own guide set) above its seeded random
    # start, which alone would already move every image.
    x01, pids = original / 255, batch["targets"]
    torch.manual_seed(0)
    start = x01 + random_start(x01, 5 / 255)
    extractor = phase.extractor(model)
    with extractor.frozen_eval(), torch.no_grad():
        objective = build_attack("FNA", extractor, eps=5, steps=3).objective(
            x01, pids, GuideSet(extractor(x01), pids), torch.arange(8))
        assert objective(adv / 255) > objective(start)
    if include_clean:
        assert torch.equal(out["images"][:8], original)
        assert torch.equal(out["targets"], torch.cat([batch["targets"]] * 2))
        assert torch.equal(out["camids"], torch.cat([batch["camids"]] * 2))
        assert out["img_paths"] == batch["img_paths"] * 2
    else:
        assert torch.equal(out["targets"], batch["targets"])


def test_adversarial_training_runs_and_times_its_phase(tmp_path, datasets_root):
    from robustreid.engine import RobustTrainer
    from robustreid.engine.train_steps import MetricAdversarialBatch

    cfg = make_tiny_cfg(tmp_path, "ADV_TRAIN.ENABLED", "True", "ADV_TRAIN.STEPS", "2",
                        "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "1")
    trainer = RobustTrainer(cfg)
    assert [type(p) for p in trainer._trainer.batch_phases] == [MetricAdversarialBatch]
    before = trainer.model.backbone.conv1.weight.detach().clone()
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert results["mAP"] > 0
    assert not torch.equal(before, trainer.model.backbone.conv1.weight)
    assert "time/adversarial" in trainer.storage.histories()

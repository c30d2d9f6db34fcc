"""BAU and ADIN in training (issue 6): data pipeline, model terms, ADIN's adversary and schedule,
BAU's memory initialisation, the DG dataset classes, the dual-branch backbone, the tools."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastreid.utils.events import EventStorage

import robustreid  # noqa: F401  (registers the DG datasets, dual-branch backbone, MLP head)
from robustreid.data import fixtures
from robustreid.data.dg import (ReidRandAugment, build_dg_train_loader, build_dg_train_set,
                                split_validation, time_label)
from robustreid.engine import RobustTrainer
from robustreid.engine.dg_steps import ADINSchedule, IDENTITY_LOSSES, NuisanceAdversary
from robustreid.modeling.dg_config import check_dg_config

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DG_DATA = ("DATASETS.NAMES", "('SynthReIDTiny_D0', 'SynthReIDTiny_D1')",
           "DATASETS.TESTS", "('SynthReIDTiny_D2',)", "MODEL.META_ARCHITECTURE", "RobustBaseline")


def load_dg_config(config_file, opts=()):
    from robustreid.config import load_config

    return load_config(config_file, opts)


def make_dg_cfg(output_dir, *opts):
    """make_tiny_cfg's settings (ResNet-18, 64x32, batch 16) on SynthReIDTiny's domains."""
    from robustreid.engine import resolve_device

    cfg = load_dg_config(os.path.join(REPO, "configs/SynthReID/bagtricks_R18.yml"), [
        "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "16", "TEST.IMS_PER_BATCH", "32",
        "SOLVER.MAX_EPOCH", "1", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "[1]",
        "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.EVAL_PERIOD", "100", "OUTPUT_DIR", str(output_dir),
        *DG_DATA, *opts])
    return resolve_device(cfg)


def train(cfg, resume=False):
    from fastreid.utils.env import seed_all_rng

    seed_all_rng(0)
    trainer = RobustTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


# --- data ------------------------------------------------------------------------------------------
def test_two_view_loader_keeps_fastreids_labels_and_adds_domains(tmp_path, datasets_root):
    from fastreid.data import build_reid_train_loader

    cfg = make_dg_cfg(tmp_path, "DG.BAU.ENABLED", "True")
    dg_set = build_dg_train_set(cfg)
    plain = build_reid_train_loader(cfg).dataset
    assert [tuple(i) for i in dg_set.img_items] == [tuple(i) for i in plain.img_items]
    assert dg_set.pid_dict == plain.pid_dict and dg_set.cam_dict == plain.cam_dict
    assert dg_set.domain_names == ("SynthReIDTiny_D0", "SynthReIDTiny_D1")
    for (path, _, _), domain in zip(dg_set.img_items, dg_set.domains):
        assert f"SynthReIDTiny_D{domain}" in path
    # every identity lives in one domain
    class_domains = dg_set.class_domains()
    assert (class_domains >= 0).all() and set(class_domains.tolist()) == {0, 1}

    batch = next(iter(build_dg_train_loader(cfg)))
    assert batch["images"].shape == batch["images_strong"].shape == (16, 3, 64, 32)
    assert not torch.equal(batch["images"], batch["images_strong"])
    assert batch["domainids"].tolist() == [int("D1" in p) for p in batch["img_paths"]]
    # both views in fastreid's [0, 255] range (normalisation happens in the model)
    assert batch["images_strong"].max() > 1.5 and batch["images_strong"].min() >= 0


def test_strong_view_randaugment_has_no_colour_inverting_ops():
    ops = ReidRandAugment()._augmentation_space(31, (64, 32))
    assert "Posterize" not in ops and "Solarize" not in ops and "Invert" not in ops
    assert {"ShearX", "Rotate", "Brightness", "Color", "Contrast", "AutoContrast"} <= set(ops)


def test_time_labels_from_msmt17_names_and_synthreid_side_info(datasets_root, tmp_path):
    from robustreid.data import SynthReIDTiny_D0, side_info_for

    assert time_label("/x/0000_000_01_0303morning_0015_0.jpg") == 0
    assert time_label("/x/0000_000_01_0303afternoon_0015_0.jpg") == 2
    assert time_label(str(tmp_path / "0001_c1_f0001.jpg")) is None
    data = SynthReIDTiny_D0(root=datasets_root)
    for path, _, _ in data.train[:10]:
        assert time_label(path) == side_info_for(path)["time_id"]


def test_validation_split_holds_out_images_of_training_identities():
    items = [(f"{pid}_{k}.jpg", f"d_{pid}", "c") for pid in range(6) for k in range(pid + 1)]
    train, val = split_validation(items, per_id=1, max_images=10, seed=3)
    assert len(train) + len(val) == len(items) and not set(train) & set(val)
    counts = {pid: sum(i[1] == pid for i in train) for pid in {i[1] for i in items}}
    for _, pid, _ in val:
        assert counts[pid] >= 2  # the identity keeps positives for the identity sampler
    assert {i[1] for i in val} == {f"d_{p}" for p in range(2, 6)}  # ids with >= 3 images
    _, capped = split_validation(items, per_id=1, max_images=2, seed=3)
    assert len(capped) == 2


# --- model -----------------------------------------------------------------------------------------
def _dg_model_and_batch(tmp_path, *opts):
    from fastreid.modeling.meta_arch import build_model

    cfg = make_dg_cfg(tmp_path, *opts)
    loader = build_dg_train_loader(cfg)
    cfg.MODEL.HEADS.NUM_CLASSES = loader.dataset.num_classes
    torch.manual_seed(0)
    model = build_model(cfg).train()
    return cfg, model, loader, next(iter(loader))


def test_bau_terms_in_robust_baseline(tmp_path, datasets_root):
    from robustreid.modeling.losses import alignment_loss, uniformity_loss

    cfg, model, loader, batch = _dg_model_and_batch(tmp_path, "DG.BAU.ENABLED", "True")
    assert model.bau_memory.prototypes.shape == (loader.dataset.num_classes, 512)
    assert "bau_memory.prototypes" in model.state_dict()  # saved with the model
    with EventStorage():
        losses, outputs = model(dict(batch), return_outputs=True)
        assert set(losses) == {"loss_cls", "loss_triplet", "loss_bau_align", "loss_bau_uniform"}
        assert outputs["cls_outputs"].shape[0] == 16  # CE / triplet on the original view only
        # the terms are BAU's functions of the L2-normalised retrieval features of both views
        neck = {}
        handle = model.heads.bottleneck.register_forward_hook(
            lambda m, i, o: neck.update(f=o.flatten(1)))
        torch.manual_seed(1)
        again = model(dict(batch))
        handle.remove()
    f = F.normalize(neck["f"], dim=1)
    weak, strong = f[:16], f[16:]
    torch.testing.assert_close(again["loss_bau_align"],
                               1.5 * alignment_loss(strong, weak, batch["targets"], 10))
    torch.testing.assert_close(again["loss_bau_uniform"],
                               uniformity_loss(weak) + uniformity_loss(strong))
    grads = torch.autograd.grad(losses["loss_bau_uniform"], model.backbone.conv1.weight)
    assert grads[0].abs().sum() > 0

    # domain term once the memory holds centroids; memory then moves toward the batch (eq. 7)
    pids, _, domains = loader.dataset.labels()
    model.bau_memory.initialize(F.normalize(torch.randn(len(pids), 512), dim=1), pids, domains)
    before = model.bau_memory.prototypes.clone()
    with EventStorage():
        losses = model(dict(batch))
    assert "loss_bau_domain" in losses and torch.isfinite(losses["loss_bau_domain"])
    changed = (model.bau_memory.prototypes != before).any(1)
    assert set(torch.nonzero(changed).view(-1).tolist()) == set(batch["targets"].tolist())


def test_bau_terms_switch_alone(tmp_path, datasets_root):
    _, model, _, batch = _dg_model_and_batch(
        tmp_path, "DG.BAU.ENABLED", "True", "DG.BAU.ALIGN", "False", "DG.BAU.DOMAIN", "False")
    assert model.bau_memory is None
    with EventStorage():
        assert set(model(dict(batch))) == {"loss_cls", "loss_triplet", "loss_bau_uniform"}


def test_bau_on_adversarial_features(tmp_path, datasets_root):
    from robustreid.engine.train_steps import MetricAdversarialBatch

    cfg, model, _, batch = _dg_model_and_batch(
        tmp_path, "DG.BAU.ENABLED", "True", "DG.BAU.DOMAIN", "False", "ADV_TRAIN.ENABLED", "True",
        "ADV_TRAIN.INCLUDE_CLEAN", "True", "ADV_TRAIN.STEPS", "1", "DG.BAU.ADV_UNIFORM", "True",
        "DG.BAU.ADV_ALIGN", "True")
    adv_batch = MetricAdversarialBatch.from_config(cfg)(model, batch)
    assert len(adv_batch["images"]) == 32 and len(adv_batch["images_strong"]) == 16
    with EventStorage():
        losses, outputs = model(adv_batch, return_outputs=True)
    assert {"loss_bau_adv_uniform", "loss_bau_adv_align", "loss_bau_align"} <= set(losses)
    assert outputs["neck_features"].shape[0] == 32  # clean + adversarial rows, not the strong view


# --- ADIN ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, num_classes", [("camera", 8), ("time", 3), ("joint", 24)])
def test_nuisance_labels_and_prior_come_from_the_dataset(kind, num_classes, tmp_path,
                                                         datasets_root):
    from robustreid.data import side_info_for

    cfg = make_dg_cfg(tmp_path, "DG.ADIN.ENABLED", "True", "DG.ADIN.NUISANCE", kind)
    train_set = build_dg_train_set(cfg)
    adversary = NuisanceAdversary.from_config(cfg, train_set, torch.device("cpu"))
    assert adversary.num_classes == num_classes
    # p_k = frequency of each nuisance class among the training images, counted independently
    counts = np.zeros(num_classes)
    for path, _, camid in train_set.img_items:
        cam, time_id = train_set.cam_dict[camid], side_info_for(path)["time_id"]
        counts[{"camera": cam, "time": time_id, "joint": cam * 3 + time_id}[kind]] += 1
    np.testing.assert_allclose(adversary.prior.numpy(), counts / counts.sum(), rtol=1e-6)
    # labels of a doubled (clean + adversarial) batch repeat per row
    batch = {"camids": torch.tensor([1, 2]), "img_paths": [p for p, _, _ in train_set.img_items[:2]]}
    assert len(adversary.labels(batch, 4)) == 4


def test_nuisance_adversary_trains_f_n_and_spares_it_in_the_encoder_loss(tmp_path,
                                                                          datasets_root):
    cfg = make_dg_cfg(tmp_path, "DG.ADIN.ENABLED", "True", "DG.ADIN.SCHEDULE.ENABLED", "False")
    adversary = NuisanceAdversary.from_config(cfg, build_dg_train_set(cfg), torch.device("cpu"))
    assert adversary.state.stage == "joint"
    torch.manual_seed(0)
    features = torch.randn(32, 512)
    labels = torch.arange(32) % 8
    features[torch.arange(32), labels] += 4.0  # separable: f_N can learn it
    first, _ = adversary.update(features, labels)
    for _ in range(30):
        last, acc = adversary.update(features, labels)
    assert last < first and acc > 0.9
    feats = features.clone().requires_grad_(True)
    loss = adversary.encoder_loss(feats, labels)
    loss.backward()
    assert feats.grad.abs().sum() > 0
    grads_before = [p.grad.clone() for p in adversary.head.parameters()]
    adversary.encoder_loss(feats, labels).backward()
    for before, p in zip(grads_before, adversary.head.parameters()):
        assert torch.equal(before, p.grad)  # f_N untouched by the encoder's backward


def test_adversarial_stage_drops_identity_losses(tmp_path, datasets_root):
    cfg = make_dg_cfg(tmp_path, "DG.ADIN.ENABLED", "True")
    adversary = NuisanceAdversary.from_config(cfg, build_dg_train_set(cfg), torch.device("cpu"))
    losses = {"loss_cls": torch.tensor(1.0), "loss_triplet": torch.tensor(2.0),
              "loss_bau_uniform": torch.tensor(3.0)}
    outputs = {"neck_features": torch.randn(4, 512)}
    batch = {"camids": torch.tensor([0, 1, 2, 3]), "img_paths": ["a"] * 4}
    with EventStorage():
        assert adversary(dict(losses), outputs, batch) == losses  # pretrain stage: untouched
        adversary.state.stage = "adversarial"
        out = adversary(dict(losses), outputs, batch)
        assert set(out) == {"loss_bau_uniform", "loss_nuisance_adv"}
        adversary.state.stage = "identity"
        assert set(adversary(dict(losses), outputs, batch)) == set(losses)
    assert not set(out) & set(IDENTITY_LOSSES)


def test_schedule_alternates_on_identity_validation_error(tmp_path, datasets_root):
    cfg = make_dg_cfg(tmp_path, "DG.ADIN.ENABLED", "True")
    adversary = NuisanceAdversary.from_config(cfg, build_dg_train_set(cfg), torch.device("cpu"))
    schedule = ADINSchedule(adversary, [], pretrain_epochs=1, nuisance_pretrain_iters=0,
                            threshold_target=0.2, threshold_trigger=0.4, val_period=1)
    errors = iter([0.1, 0.3, 0.5, 0.35, 0.25, 0.15, 0.45])
    schedule.validation_error = lambda model: next(errors)
    schedule.trainer = type("T", (), {"model": None, "epoch": 0, "iter": 0})()
    schedule.after_step()
    assert adversary.state.stage == "pretrain"  # nothing before the pre-training ends
    schedule.after_epoch()  # epoch 1 ends: f_N pre-trained, alternation starts (error 0.1)
    stages = [adversary.state.stage]
    for _ in range(6):
        schedule.after_step()
        stages.append(adversary.state.stage)
    # trigger 0.4 ends the adversarial sub-problem, target 0.2 ends the identity one
    assert stages == ["adversarial", "adversarial", "identity", "identity", "identity",
                      "adversarial", "identity"]
    assert adversary.state.rounds == 1
    restored = NuisanceAdversary.from_config(cfg, build_dg_train_set(cfg), torch.device("cpu"))
    restored.state.load_state_dict(adversary.state.state_dict())
    assert restored.state.stage == "identity" and restored.state.last_val_error == 0.45


def test_identity_validation_error_of_the_model(tmp_path, datasets_root):
    cfg, model, loader, _ = _dg_model_and_batch(tmp_path, "DG.ADIN.ENABLED", "True")
    adversary = NuisanceAdversary.from_config(cfg, loader.dataset, torch.device("cpu"))
    schedule = ADINSchedule.from_config(cfg, adversary, loader.dataset)
    val = loader.dataset.val_items
    assert val and {pid for _, pid, _ in val} <= set(loader.dataset.pid_dict)
    error = schedule.validation_error(model)
    assert 0.0 <= error <= 1.0 and model.training
    # independent count: argmax of the classifier over eval-mode features
    from robustreid.data.test_loader import plain_test_loader
    from robustreid.engine.dg_steps import identity_logits

    items = [(p, loader.dataset.pid_dict[pid], 0) for p, pid, _ in val]
    model.eval()
    with torch.no_grad():
        wrong = sum(int((identity_logits(model, model(b)).argmax(1) != b["targets"]).sum())
                    for b in plain_test_loader(cfg, items, 7))
    model.train()
    assert error == pytest.approx(wrong / len(val))


# --- end to end (through the wiring) ----------------------------------------------------------------
def test_bau_trains_and_initialises_memory(tmp_path, datasets_root):
    cfg = make_dg_cfg(tmp_path, "DG.BAU.ENABLED", "True")
    trainer = train(cfg)
    history = trainer.storage.histories()
    for key in ("loss_bau_align", "loss_bau_uniform", "loss_bau_domain", "loss_cls"):
        assert key in history, key
    memory = trainer.model.bau_memory
    assert (memory.domains >= 0).all()
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)
    torch.testing.assert_close(saved["model"]["bau_memory.prototypes"], memory.prototypes)
    # a resumed run keeps the checkpoint's memory and continues exactly: test_resume.py


def test_prototype_memory_init_is_the_class_centroids(tmp_path, datasets_root):
    from robustreid.data.test_loader import plain_test_loader
    from robustreid.engine.dg_steps import PrototypeMemoryInit

    cfg, model, loader, _ = _dg_model_and_batch(tmp_path, "DG.BAU.ENABLED", "True")
    hook = PrototypeMemoryInit(cfg, loader.dataset)
    hook.trainer = type("T", (), {"model": model})()
    hook.before_train()
    pids, _, domains = loader.dataset.labels()
    items = [(p, int(pid), 0) for (p, _, _), pid in zip(loader.dataset.img_items, pids)]
    model.eval()
    with torch.no_grad():
        feats = torch.cat([F.normalize(model(b), dim=1) for b in plain_test_loader(cfg, items, 9)])
    model.train()
    for c in (0, 5, int(pids.max())):
        expected = F.normalize(feats[pids == c].mean(0), dim=0)
        torch.testing.assert_close(model.bau_memory.prototypes[c], expected, rtol=1e-4,
                                   atol=1e-5)
        assert model.bau_memory.domains[c] == domains[pids == c][0]


def test_adin_trains_through_its_schedule(tmp_path, datasets_root):
    opts = ("DG.ADIN.ENABLED", "True", "DG.ADIN.NUISANCE", "joint", "SOLVER.MAX_EPOCH", "2",
            "DG.ADIN.SCHEDULE.NUISANCE_PRETRAIN_ITERS", "3", "DG.ADIN.SCHEDULE.VAL_PERIOD", "2",
            "DG.ADIN.SCHEDULE.THRESHOLD_I_TRIGGER", "1.0")
    trainer = train(make_dg_cfg(tmp_path, *opts))
    history = trainer.storage.histories()
    for key in ("loss_nuisance", "adin/val_id_error", "nuisance_accuracy", "loss_cls"):
        assert key in history, key
    # fastreid logs a step's losses one by one only when there are several: the adversarial
    # sub-problem's single loss_nuisance_adv shows as total_loss
    assert history["adin/adversarial_stage"].latest() == 1.0
    assert trainer.objective.nuisance.state.stage == "adversarial"  # trigger 1.0: never leaves
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert {"nuisance_head", "nuisance_optimizer", "nuisance_scheduler",
            "nuisance_schedule"} <= set(saved)
    assert saved["nuisance_schedule"]["stage"] == "adversarial"
    assert saved["nuisance_scheduler"]["last_epoch"] == 2
    # a resumed run continues f_N, its optimizer and the schedule exactly: test_resume.py


def test_bau_adin_and_adversarial_training_compose(tmp_path, datasets_root):
    opts = ("DG.BAU.ENABLED", "True", "DG.BAU.ADV_UNIFORM", "True", "DG.ADIN.ENABLED", "True",
            "DG.ADIN.SCHEDULE.ENABLED", "False", "ADV_TRAIN.ENABLED", "True",
            "ADV_TRAIN.INCLUDE_CLEAN", "True", "ADV_TRAIN.STEPS", "1",
            "ADV_TRAIN.DISCRIMINATOR.ENABLED", "True", "SOLVER.MAX_EPOCH", "1")
    trainer = train(make_dg_cfg(tmp_path, *opts))
    history = trainer.storage.histories()
    for key in ("loss_bau_adv_uniform", "loss_bau_domain", "loss_nuisance_adv",
                "loss_adv_encoder", "loss_discriminator", "time/adversarial"):
        assert key in history, key


# --- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts, message", [
    (("MODEL.META_ARCHITECTURE", "Baseline", "DG.BAU.ENABLED", "True"), "RobustBaseline"),
    (("DG.BAU.ENABLED", "True", "DG.BAU.ADV_UNIFORM", "True"), "ADV_TRAIN.ENABLED"),
    (("DG.ADIN.ENABLED", "True", "DG.ADIN.NUISANCE", "weather"), "NUISANCE"),
    (("DG.ADIN.ENABLED", "True", "DG.ADIN.SCHEDULE.THRESHOLD_I_TARGET", "0.5",
      "DG.ADIN.SCHEDULE.THRESHOLD_I_TRIGGER", "0.3"), "THRESHOLD_I_TARGET"),
    (("DG.ADIN.ENABLED", "True", "DG.ADIN.SCHEDULE.PRETRAIN_EPOCHS", "1"), "PRETRAIN_EPOCHS"),
    (("DG.BAU.ENABLED", "True", "MPSNN.ENABLED", "True"), "MPSNN"),
])
def test_impossible_dg_settings_are_config_errors(opts, message, tmp_path):
    from robustreid.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        check_dg_config(make_dg_cfg(tmp_path, *opts))


def test_time_nuisance_on_a_dataset_without_timestamps_is_a_dataset_error(tmp_path, datasets_root):
    from robustreid.data.validation import DatasetError

    fixtures.write_dukemtmc(datasets_root)
    cfg = make_dg_cfg(tmp_path, "DATASETS.NAMES", "('DukeMTMC',)", "DG.ADIN.ENABLED", "True",
                      "DG.ADIN.NUISANCE", "time", "DG.ADIN.SCHEDULE.VAL_IMAGES_PER_ID", "1")
    with pytest.raises(DatasetError, match="time-of-day"):
        build_dg_train_set(cfg)


@pytest.mark.parametrize("config", ["BAU_Protocol1_R50-ibn.yml", "BAU_Protocol2_to_C3.yml",
                                    "BAU_Protocol3_to_M.yml", "ADIN_MSMT17_to_Market_Duke.yml",
                                    "ADIN_Duke_to_Market.yml", "SynthReID/plain_R18_D01_to_D2.yml",
                                    "SynthReID/bau_R18_D01_to_D2.yml",
                                    "SynthReID/adin_R18_D01_to_D2.yml"])
def test_dg_configs_load_and_pass_the_checks(config):
    cfg = load_dg_config(os.path.join(REPO, "configs/DG", config))
    check_dg_config(cfg)
    assert cfg.DATASETS.TESTS


# --- model parts -----------------------------------------------------------------------------------
def test_dual_branch_backbone_and_mlp_head(tmp_path, datasets_root):
    from fastreid.modeling.meta_arch import build_model

    from robustreid.modeling.backbones.dual_branch import dual_branch_feat_dim

    opts = ("MODEL.BACKBONE.NAME", "build_dual_branch_backbone", "MODEL.HEADS.NAME",
            "MLPClassifierHead", "MODEL.BACKBONE.DUAL_BRANCH.NUM_PARTS", "2",
            "MODEL.BACKBONE.DUAL_BRANCH.PART_DIM", "32", "MODEL.HEADS.NUM_CLASSES", "5")
    cfg = make_dg_cfg(tmp_path, *opts, "MODEL.BACKBONE.FEAT_DIM", "576")
    assert dual_branch_feat_dim(cfg) == 576
    torch.manual_seed(0)
    model = build_model(cfg)
    backbone = model.backbone
    for (name, a), b in zip(backbone.layer4.state_dict().items(),
                            backbone.part_layer4.state_dict().values()):
        assert torch.equal(a, b), name  # part branch starts from the same (pretrained) layer4
    x = torch.rand(4, 3, 64, 32) * 255
    assert backbone(x).shape == (4, 576, 1, 1)
    assert backbone.part_layer4(torch.randn(1, 256, 4, 2)).shape[-2:] == (4, 2)  # stride 1
    model.eval()
    assert model({"images": x.clone()}).shape == (4, 576)
    model.train()
    with EventStorage():
        losses = model({"images": x.clone(), "targets": torch.tensor([0, 0, 1, 1])})
    assert set(losses) == {"loss_cls", "loss_triplet"}
    logits = model.heads.identity_logits(torch.randn(4, 576))
    assert logits.shape == (4, 5)
    with pytest.raises(ValueError, match="FEAT_DIM"):
        build_model(make_dg_cfg(tmp_path, *opts, "MODEL.BACKBONE.FEAT_DIM", "512"))


# --- datasets --------------------------------------------------------------------------------------
@pytest.fixture
def small_protocols(monkeypatch):
    from robustreid.data import dg_datasets as D

    monkeypatch.setattr(D.PRID_DG, "num_test_ids", 3)
    monkeypatch.setattr(D.PRID_DG, "num_shared_ids", 6)
    for cls in (D.GRID_DG, D.VIPeR_DG, D.iLIDS_DG):
        monkeypatch.setattr(cls, "num_test_ids", 3)
    return D


def test_small_target_sets_follow_the_protocols(tmp_path, small_protocols):
    D, root = small_protocols, str(tmp_path)
    fixtures.write_prid(root, num_shared=6, num_a_only=2, num_b_only=4)
    fixtures.write_grid(root, num_paired=6, num_distractors=3)
    fixtures.write_viper(root, num_ids=6)
    fixtures.write_ilids(root, num_ids=6, imgs_per_id=3)
    expected_gallery = {"PRID_DG": 3 + 4, "GRID_DG": 3 + 3, "VIPeR_DG": 3, "iLIDS_DG": 3}
    for name, gallery_size in expected_gallery.items():
        cls = getattr(D, name)
        splits = [cls(root=root, split_id=s) for s in range(4)]
        for data in splits:
            q_ids = {pid for _, pid, _ in data.query}
            assert len(data.query) == len(q_ids) == 3, name
            assert len(data.gallery) == gallery_size, name
            assert q_ids <= {pid for _, pid, _ in data.gallery}
            assert not {c for _, _, c in data.query} & {c for _, _, c in data.gallery} or \
                name == "GRID_DG"
        assert cls(root=root, split_id=2).query == splits[2].query  # reproducible
        assert len({tuple(sorted(p for _, p, _ in d.query)) for d in splits}) > 1, name
    prid = D.PRID_DG(root=root)  # distractors: the cam_b-only persons (numbers 7..10)
    assert {pid for _, pid, _ in prid.gallery} - {pid for _, pid, _ in prid.query} >= {7, 8, 9, 10}


def test_cuhk02_and_cuhksysu(tmp_path):
    from fastreid.data.datasets.cuhk_sysu import cuhkSYSU

    from robustreid.data import dg_datasets as D

    counts = fixtures.write_cuhk02(str(tmp_path))
    data = D.CUHK02(root=str(tmp_path))
    assert (len(data.train), len(data.query), len(data.gallery)) == \
        (counts.train_images, counts.query_images, counts.gallery_images)
    assert len({c for _, _, c in data.train}) == counts.train_cams == 8
    assert len(D.CUHK02(root=str(tmp_path), combineall=True).train) == 40
    counts = fixtures.write_cuhksysu(str(tmp_path), num_unlabelled=2)
    assert len(D.CUHKSYSU(root=str(tmp_path)).train) == counts.train_images
    assert len(cuhkSYSU(root=str(tmp_path)).train) == counts.train_images + 2  # fastreid keeps -1


# --- tools -----------------------------------------------------------------------------------------
def test_dg_eval_averages_splits_and_prints_the_table(tmp_path, datasets_root, small_protocols,
                                                     monkeypatch):
    # the evaluator reports Rank-10, so the gallery needs >= 10 images
    monkeypatch.setattr(small_protocols.VIPeR_DG, "num_test_ids", 10)
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import dg_eval
    finally:
        sys.path.pop(0)
    from fastreid.modeling.meta_arch import build_model

    fixtures.write_viper(datasets_root, num_ids=12)
    cfg = make_dg_cfg(tmp_path, "DATASETS.TESTS", "('VIPeR_DG', 'SynthReIDTiny_D2')",
                      "MODEL.HEADS.NUM_CLASSES", "4")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    results = dg_eval.evaluate_targets(cfg, model, cfg.DATASETS.TESTS, num_splits=3)
    assert results["VIPeR_DG"]["splits"] == 3 and results["SynthReIDTiny_D2"]["splits"] == 1
    per_split = [dg_eval.evaluate_dataset(cfg, model, small_protocols.VIPeR_DG(
        root=datasets_root, split_id=s), {}) for s in range(3)]
    assert results["VIPeR_DG"]["mAP"] == pytest.approx(np.mean([r["mAP"] for r in per_split]))
    table = dg_eval.format_table(results, "bau", "D0+D1")
    assert "VIPeR_DG" in table and "Average" in table
    table = dg_eval.format_table(results, "adin", "D0+D1")
    assert "top5" in table


def test_bench_dg_step_prints_the_ratio(tmp_path, datasets_root):
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTREID_DATASETS=datasets_root)
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools/bench_dg_step.py"),
                          "--steps", "1", "--warmup", "1", "--batch", "8", "--size", "64", "32",
                          "--datasets", "SynthReIDTiny_D0", "SynthReIDTiny_D1"],
                         capture_output=True, text=True, env=env, timeout=300, check=True)
    assert re.fullmatch(r"bau_vs_plain=\d+\.\d+", out.stdout.strip().splitlines()[-1])


def test_dg_eval_main_trains_once_and_evaluates_every_target(tmp_path, datasets_root,
                                                             small_protocols, monkeypatch,
                                                             capsys):
    monkeypatch.setattr(small_protocols.VIPeR_DG, "num_test_ids", 10)
    fixtures.write_viper(datasets_root, num_ids=12)
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import dg_eval
    finally:
        sys.path.pop(0)
    rc = dg_eval.main([
        "--config-file", os.path.join(REPO, "configs/SynthReID/bagtricks_R18.yml"),
        "--splits", "2", "DATASETS.NAMES", "('SynthReIDTiny_D0',)",
        "DATASETS.TESTS", "('SynthReIDTiny_D2', 'VIPeR_DG')", "INPUT.SIZE_TRAIN", "[64, 32]",
        "INPUT.SIZE_TEST", "[64, 32]", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH",
        "16", "SOLVER.MAX_EPOCH", "1", "SOLVER.WARMUP_ITERS", "1", "TEST.EVAL_PERIOD", "1",
        "OUTPUT_DIR", str(tmp_path)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "SynthReIDTiny_D2 mAP" in table and "VIPeR_DG R1" in table
    assert "{'VIPeR_DG': 2}" in table  # averaged over the 2 splits asked for
    assert (tmp_path / "model_final.pth").is_file()

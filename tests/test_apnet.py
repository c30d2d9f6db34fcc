"""APNet backbone (robustreid.modeling.backbones.apnet): registry, shapes, attention, weights, step."""
import math

import pytest
import torch

import robustreid.modeling  # noqa: F401  (registers build_apnet_backbone)
from robustreid.config import load_config
from robustreid.modeling.backbones.apnet import APNet, add_apnet_config

torch.set_num_threads(1)


def _cfg(*opts, depth="18x", last_stride=2):
    """fastreid/RobustReID defaults + APNet keys, a random-init trunk, then KEY VALUE overrides."""
    cfg = load_config()
    cfg.defrost()
    add_apnet_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_apnet_backbone"
    cfg.MODEL.BACKBONE.DEPTH = depth
    cfg.MODEL.BACKBONE.LAST_STRIDE = last_stride
    cfg.MODEL.BACKBONE.PRETRAIN = False
    cfg.merge_from_list(list(opts))
    return cfg


def _build(cfg, seed=0):
    from fastreid.modeling.backbones import build_backbone

    torch.manual_seed(seed)
    return build_backbone(cfg)


def _resnet_like(apnet_model, cfg):
    """fastreid's ResNet for the same cfg, carrying the APNet's trunk weights (i.e. the trunk alone)."""
    from fastreid.modeling.backbones.resnet import build_resnet_backbone

    resnet = build_resnet_backbone(cfg)
    incompatible = resnet.load_state_dict(apnet_model.state_dict(), strict=False)
    assert not incompatible.missing_keys  # every ResNet tensor exists under the same name in APNet
    assert incompatible.unexpected_keys and all(k.startswith("apnet.") for k in incompatible.unexpected_keys)
    return resnet


def test_registry_builds_apnet_with_paper_defaults():
    from fastreid.modeling.backbones.build import BACKBONE_REGISTRY

    assert "build_apnet_backbone" in BACKBONE_REGISTRY._obj_map
    cfg = _cfg()
    ap = cfg.MODEL.BACKBONE.APNET
    assert (ap.LEVELS, ap.REDUCTION, tuple(ap.STAGES), ap.ATTENTION) == (2, 16, (0, 1, 2, 3, 4), "channel")
    assert add_apnet_config(cfg) is cfg and cfg.MODEL.BACKBONE.APNET.LEVELS == 2  # idempotent

    model = _build(cfg)
    assert isinstance(model, APNet)
    assert list(model.apnet.keys()) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    # Level l splits the channels into 2**(l-1) parts.
    assert [lvl.parts for lvl in model.apnet["layer4"].levels] == [1, 2]

    with pytest.raises(ValueError, match="LEVELS"):  # level 8 would split the 64-channel stem into 128 parts
        _build(_cfg("MODEL.BACKBONE.APNET.LEVELS", "8"))
    with pytest.raises(ValueError, match="STAGES"):
        _build(_cfg("MODEL.BACKBONE.APNET.STAGES", "(0, 5)"))
    with pytest.raises(ValueError, match="ATTENTION"):
        _build(_cfg("MODEL.BACKBONE.APNET.ATTENTION", "'temporal'"))


@pytest.mark.parametrize("depth", ["18x", "50x"])
@pytest.mark.parametrize("last_stride", [1, 2])
def test_output_shape_matches_fastreid_resnet(depth, last_stride):
    from fastreid.modeling.backbones.resnet import build_resnet_backbone

    cfg = _cfg(depth=depth, last_stride=last_stride)
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        ours = _build(cfg).eval()(x)
        ref = build_resnet_backbone(cfg).eval()(x)
    assert ours.shape == ref.shape
    assert ours.shape[1] == {"18x": 512, "50x": 2048}[depth]
    # 64x32 input: /4 stem, /2 layer2, /2 layer3, /LAST_STRIDE layer4.
    assert ours.shape[2:] == ((2, 1) if last_stride == 2 else (4, 2))


def test_trunk_options_ibn_se_nonlocal_run_like_fastreid_resnet():
    """WITH_IBN/SE/NL come from fastreid's ResNet; APNet re-runs its stages, non-local blocks included."""
    from fastreid.modeling.backbones.resnet import build_resnet_backbone

    opts = ("MODEL.BACKBONE.WITH_IBN", "True", "MODEL.BACKBONE.WITH_SE", "True",
            "MODEL.BACKBONE.WITH_NL", "True")
    cfg = _cfg(*opts, depth="50x", last_stride=1)
    torch.manual_seed(0)
    resnet = build_resnet_backbone(cfg).eval()
    bare = _build(_cfg(*opts, "MODEL.BACKBONE.APNET.LEVELS", "0", depth="50x", last_stride=1)).eval()
    bare.load_state_dict(resnet.state_dict())  # strict: identical parameter names, NL_* included
    assert sum(len(bare._nl_idx[k]) for k in range(1, 5)) == 5  # 50x: 2 non-local in layer2, 3 in layer3
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(bare(x), resnet(x))
        assert _build(cfg).eval()(x).shape == resnet(x).shape


@pytest.mark.parametrize("attention", ["channel", "spatial", "channel_spatial"])
def test_attention_in_unit_interval_and_changes_features(attention):
    cfg = _cfg("MODEL.BACKBONE.APNET.ATTENTION", attention)
    model = _build(cfg).eval()
    trunk = _resnet_like(model, cfg).eval()
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        feats, maps = model(x, return_attention=True)
        plain = trunk(x)
    assert set(maps) == {"stem", "layer1", "layer2", "layer3", "layer4"}
    for site, levels in maps.items():
        assert len(levels) == 2
        for att in levels:
            assert ((att > 0) & (att < 1)).all(), site
            assert att.shape[:2] == (2, model.apnet[site].levels[0].channels)
            if attention != "channel":
                assert att.shape[2:] != (1, 1)  # a spatial map, not only a channel gate
            assert att.std() > 0  # input-dependent weights, not a constant scale
    # Same trunk weights, so any difference comes from the pyramid: it is not an identity.
    assert feats.shape == plain.shape
    assert not torch.allclose(feats, plain, rtol=1e-3, atol=1e-3)
    rel = (feats / feats.norm() - plain / plain.norm()).norm()
    assert rel > 1e-2  # the feature direction changes, not just its scale

    # LEVELS 0 is the plain trunk (the paper's baseline): output identical to fastreid's ResNet.
    bare = _build(_cfg("MODEL.BACKBONE.APNET.LEVELS", "0")).eval()
    assert len(bare.apnet) == 0
    bare.load_state_dict(trunk.state_dict())
    with torch.no_grad():
        assert torch.equal(bare(x), plain)


def test_pretrain_path_checkpoint_loads_into_trunk(tmp_path):
    from fastreid.modeling.backbones.resnet import build_resnet_backbone

    cfg = _cfg(depth="50x", last_stride=1)
    torch.manual_seed(123)
    source = build_resnet_backbone(cfg)  # stands in for a user's ImageNet resnet50 file
    state = source.state_dict()
    # torchvision's resnet50 files carry the classifier too; fastreid ignores it (strict=False), so must we.
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)

    cfg.MODEL.BACKBONE.PRETRAIN = True
    cfg.MODEL.BACKBONE.PRETRAIN_PATH = str(path)
    fresh = _build(cfg, seed=7)
    loaded = fresh.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert any(k.startswith("apnet.") for k in loaded)
    assert "fc.weight" not in loaded

    cfg.MODEL.BACKBONE.PRETRAIN_PATH = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError):  # same failure as build_resnet_backbone
        _build(cfg)


def test_one_baseline_training_step_reaches_attention():
    from fastreid.engine import DefaultTrainer
    from fastreid.modeling.meta_arch import build_model
    from fastreid.utils.events import EventStorage

    cfg = _cfg(
        "MODEL.BACKBONE.APNET.ATTENTION", "channel_spatial",
        "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.FEAT_DIM", "512", "MODEL.HEADS.NUM_CLASSES", "4",
        "MODEL.LOSSES.NAME", "('CrossEntropyLoss', 'TripletLoss')", "SOLVER.OPT", "Adam",
        "SOLVER.BASE_LR", "0.001", "SOLVER.WEIGHT_DECAY", "0.001",
    )
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert isinstance(model.backbone, APNet)
    optimizer, _ = DefaultTrainer.build_optimizer(cfg, model)
    batch = {"images": torch.rand(8, 3, 64, 32) * 255, "targets": torch.arange(4).repeat(2)}
    att_params = dict(model.backbone.apnet.named_parameters())
    before = {k: p.detach().clone() for k, p in att_params.items()}

    with EventStorage(0):
        losses = model(batch)
    total = sum(losses.values())
    assert {"loss_cls", "loss_triplet"} <= set(losses) and math.isfinite(total.item())
    optimizer.zero_grad()
    total.backward()
    for name, p in att_params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for site, pyramid in model.backbone.apnet.items():  # every site and gate gets a training signal
        for i, level in enumerate(pyramid.levels):
            for gate in (level.channel_gate, level.spatial_gate):
                assert sum(p.grad.abs().sum() for p in gate.parameters()) > 0, (site, i)
    optimizer.step()
    assert any(not torch.equal(p.detach(), before[k]) for k, p in att_params.items())

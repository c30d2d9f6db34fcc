"""EAT's backbones (issue 14): BN-Inception (ours, robustreid/modeling/backbones/bninception.py) and
fastreid's MobileNetV2 with ImageNet weights from MODEL.BACKBONE.PRETRAIN_PATH (compat patch
mobilenetv2_pretrain; loader robustreid/modeling/backbones/pretrained.py)."""
import pytest
import torch

from robustreid import compat

pytestmark = pytest.mark.usefixtures("one_thread")

BNI = ["MODEL.BACKBONE.NAME", "build_bninception_backbone"]
MNV2 = ["MODEL.BACKBONE.NAME", "build_mobilenetv2_backbone", "MODEL.BACKBONE.DEPTH", "1.0x"]


def backbone(*opts):
    from fastreid.modeling.backbones import build_backbone

    from robustreid.config import load_config

    return build_backbone(load_config("", list(opts))).eval()


def pretrained(path, *opts):
    return ["MODEL.BACKBONE.PRETRAIN", "True", "MODEL.BACKBONE.PRETRAIN_PATH", str(path), *opts]


# --- BN-Inception ---------------------------------------------------------------------------------
def test_bninception_gives_1024_channels_at_stride_32_and_builds_offline():
    model = backbone(*BNI, "MODEL.BACKBONE.PRETRAIN", "False")
    with torch.no_grad():
        assert model(torch.rand(2, 3, 224, 224)).shape == (2, 1024, 7, 7)
    # BN-Inception has ~11.3 M parameters with its 1000-way classifier (1024 x 1000 + 1000)
    assert 10.0e6 < sum(p.numel() for p in model.parameters()) < 10.6e6


def test_bninception_modules_have_the_papers_widths():
    """Each module's input is the previous one's output size in the BN paper's Figure 5 table."""
    state = backbone(*BNI, "MODEL.BACKBONE.PRETRAIN", "False").state_dict()
    paper_inputs = {"3a": 192, "3b": 256, "3c": 320, "4a": 576, "4b": 576, "4c": 576, "4d": 608,
                    "4e": 608, "5a": 1056, "5b": 1024}
    for name, channels in paper_inputs.items():
        assert state[f"inception_{name}_3x3_reduce.weight"].shape[1] == channels, name
        assert state[f"inception_{name}_double_3x3_reduce.weight"].shape[1] == channels, name
    assert state["conv1_7x7_s2.weight"].shape == (64, 3, 7, 7)
    assert state["inception_5b_pool_proj.weight"].shape == (128, 1024, 1, 1)
    assert state["inception_4e_double_3x3_2.weight"].shape == (256, 256, 3, 3)
    assert "inception_3c_1x1.weight" not in state and "inception_4e_pool_proj.weight" not in state


def test_bninception_loads_a_state_dict_with_its_classifier_and_flips_bgr(tmp_path):
    torch.manual_seed(1)
    source = backbone(*BNI, "MODEL.BACKBONE.PRETRAIN", "False")
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["last_linear.weight"], state["last_linear.bias"] = torch.rand(1000, 1024), torch.rand(1000)
    torch.save(state, tmp_path / "bn_inception.pth")
    torch.manual_seed(2)
    loaded = backbone(*BNI, *pretrained(tmp_path / "bn_inception.pth")).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("last_"))
    bgr = backbone(*BNI, *pretrained(tmp_path / "bn_inception.pth",
                                     "MODEL.BACKBONE.BNINCEPTION.BGR_WEIGHTS", "True")).state_dict()
    assert torch.equal(bgr["conv1_7x7_s2.weight"], state["conv1_7x7_s2.weight"][:, [2, 1, 0]])


def test_pretrain_without_a_path_or_with_a_foreign_file_is_a_config_error(tmp_path):
    from robustreid.config import ConfigError

    for opts in (BNI, MNV2):  # fastreid's MobileNetV2 raises FileNotFoundError('')
        with pytest.raises(ConfigError, match="PRETRAIN True needs MODEL.BACKBONE.PRETRAIN_PATH"):
            backbone(*opts, "MODEL.BACKBONE.PRETRAIN", "True")
    torch.save(backbone(*MNV2, "MODEL.BACKBONE.PRETRAIN", "False").state_dict(), tmp_path / "m.pth")
    with pytest.raises(ConfigError, match=rf"PRETRAIN_PATH {tmp_path}/m.pth does not fit "
                                          r"BNInception: conv1_7x7_s2.weight is missing"):
        backbone(*BNI, *pretrained(tmp_path / "m.pth"))


# --- MobileNetV2 ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2().eval()
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_mobilenetv2_takes_torchvisions_imagenet_file(torchvision_file):
    """fastreid's builder crashes on torchvision's layout (before the patch); with it the backbone
    computes torchvision's features exactly."""
    from robustreid.config import load_config

    reference, path = torchvision_file
    with pytest.raises(RuntimeError, match="size mismatch for features.1.conv.1.weight"):
        compat.original("mobilenetv2_pretrain")(load_config("", [*MNV2, *pretrained(path)]))
    model = backbone(*MNV2, *pretrained(path))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference.features(x))


def test_mobilenetv2_takes_its_own_layout_and_refuses_a_foreign_file(tmp_path):
    from robustreid.config import ConfigError, load_config

    torch.manual_seed(3)
    own = backbone(*MNV2, "MODEL.BACKBONE.PRETRAIN", "False").state_dict()
    torch.save(own, tmp_path / "own.pth")
    loaded = backbone(*MNV2, *pretrained(tmp_path / "own.pth")).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in own.items())
    # a whole checkpoint instead of the weights: fastreid logs and trains a random backbone
    torch.save({"model": own, "epoch": 3}, tmp_path / "checkpoint.pth")
    random = compat.original("mobilenetv2_pretrain")(
        load_config("", [*MNV2, *pretrained(tmp_path / "checkpoint.pth")])).state_dict()
    assert not torch.equal(random["conv.0.weight"], own["conv.0.weight"])
    with pytest.raises(ConfigError, match=r"checkpoint.pth is not a state dict of tensors "
                                          r"\(found \['model', 'epoch'\]\)"):
        backbone(*MNV2, *pretrained(tmp_path / "checkpoint.pth"))

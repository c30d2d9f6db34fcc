"""IPES-GAN's networks (issue 16, item 1): AdaIN, encoder / decoder / discriminator shapes, and the
IPESGAN meta-architecture (identity encoder = a fastreid ReID model, generator, D, frozen teacher)."""
import pytest
import torch

from robustreid.modeling.ipes.networks import (AdaINDecoder, PatchDiscriminator, PoseEncoder,
                                               StyleEncoder, adain)

from ipes_support import make_ipes_cfg, write_source_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_adain_gives_each_channel_the_styles_mean_and_std():
    # hand case: channel [0, 2] has mean 1, std 1 -> normalised [-1, 1] -> std 3, mean 5: [2, 8]
    x = torch.tensor([[[[0.0, 2.0]], [[4.0, 4.0 + 1e-3]]]])  # (1, 2, 1, 2)
    out = adain(x, mean=torch.tensor([[5.0, -1.0]]), std=torch.tensor([[3.0, 0.5]]), eps=0.0)
    assert out[0, 0, 0].tolist() == pytest.approx([2.0, 8.0])
    assert out[0, 1, 0].tolist() == pytest.approx([-1.5, -0.5], rel=1e-3)
    # any input: per sample and channel, the output's spatial mean / std are the style's
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 5) * 7 + 2
    mean, std = torch.randn(3, 4), torch.rand(3, 4) + 0.5
    out = adain(x, mean, std)
    torch.testing.assert_close(out.mean(dim=(2, 3)), mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(2, 3), unbiased=False), std, atol=1e-4, rtol=0)


def test_encoder_decoder_and_discriminator_shapes():
    torch.manual_seed(0)
    images, heatmaps = torch.rand(2, 3, 32, 16) * 2 - 1, torch.rand(2, 18, 32, 16)
    pose = PoseEncoder(dim=4, res_blocks=1, aspp_rates=(1, 2, 6))(images, heatmaps)
    assert pose.shape == (2, 16, 8, 4)
    style, cams = StyleEncoder(dim=4, style_dim=5, num_cameras=3)(images)
    assert style.shape == (2, 5) and cams.shape == (2, 3)
    decoder = AdaINDecoder(16, code_dim=9, res_blocks=2, mlp_dim=8)
    code = torch.randn(2, 9)
    out = decoder(pose, code)
    assert out.shape == (2, 3, 32, 16) and out.abs().max() <= 1
    # the code reaches the image through AdaIN: another code, another image; the same, the same
    assert not torch.allclose(decoder(pose, code.flip(0)), out)
    torch.testing.assert_close(decoder(pose, code), out)
    assert PatchDiscriminator(dim=4, layers=3)(images).shape == (2, 1, 4, 2)


def tiny_model(tmp_path):
    from fastreid.modeling.meta_arch import build_model

    cfg = make_ipes_cfg(tmp_path, "MODEL.HEADS.NUM_CLASSES", "12", "IPES.SOURCE_CAMERAS", "4",
                        "IPES.TARGET_CAMERAS", "3")
    return cfg, build_model(cfg)


def fake_batch(n, classes, cameras, seed):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.rand(n, 3, 64, 32, generator=g) * 255,
            "heatmaps": torch.rand(n, 18, 64, 32, generator=g),
            "targets": torch.randint(classes, (n,), generator=g),
            "camids": torch.randint(cameras, (n,), generator=g)}


def test_ipesgan_translates_both_ways_and_is_a_reid_model_in_eval(tmp_path):
    torch.manual_seed(0)
    cfg, model = tiny_model(tmp_path)
    model.train()
    source, target = fake_batch(2, 12, 4, 1), fake_batch(2, 12, 3, 2)
    views = model.translate(source, target)
    for key in ("x_sg", "x_tg", "x_s_cyc", "x_t_cyc"):
        assert views[key].shape == (2, 3, 64, 32)
    assert views["cam_s"].shape == (2, 4) and views["cam_t_of_sg"].shape == (2, 3)
    assert views["logits_sg"].shape == (2, 12) and views["id_s"].shape == (2, 512)
    terms = model.generator_terms(views, source, target)
    assert set(terms) == {"loss_cyc", "loss_con", "loss_cam", "loss_adv", "loss_ce",
                          "loss_soft_ce", "loss_kl"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in terms.values())
    assert torch.isfinite(model.discriminator_loss(views))
    # the teacher is frozen and stays in eval mode; the generator and D keep no running stats
    assert model.teacher.training is False and not any(p.requires_grad
                                                       for p in model.teacher.parameters())
    assert not list(model.generator.buffers()) and not list(model.discriminator.buffers())
    model.start_teacher()
    torch.testing.assert_close(model.teacher.heads.weight, model.heads.weight)
    model.eval()
    features = model({"images": source["images"].clone()})
    assert features.shape == (2, 512)


def test_a_source_reid_checkpoint_is_valid_model_weights_for_ipes(tmp_path):
    from robustreid.config import ConfigError
    from robustreid.engine import check_weights_fit

    cfg = make_ipes_cfg(tmp_path, "MODEL.WEIGHTS",
                        write_source_checkpoint(tmp_path / "source.pth", make_ipes_cfg(tmp_path)))
    check_weights_fit(cfg, training=True)  # generator, D and teacher start from their own init
    with pytest.raises(ConfigError, match="teacher"):  # but it is no trained IPES model
        check_weights_fit(cfg, training=False)

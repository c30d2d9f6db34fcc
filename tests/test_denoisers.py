"""Denoisers of denoised smoothing (thesis 6.3.1): the registry, RDUNet's structure, the
autoencoder of ZO-AE-RUDS and the front end certification puts in front of a model."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from robustreid.modeling.denoisers import (DENOISER_REGISTRY, Autoencoder, DenoisingFrontEnd,
                                           UNetDenoiser, build_denoiser, build_front_end)

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(arch="RDUNet", width=4, size=(64, 32), latent=16):
    ae = SimpleNamespace(LATENT_DIM=latent, WIDTH=4, LEVELS=4)
    return SimpleNamespace(DENOISER=SimpleNamespace(ARCH=arch, WIDTH=width, AE=ae),
                           INPUT=SimpleNamespace(SIZE_TRAIN=list(size)))


def test_registry_builds_the_configured_architectures():
    assert {"RDUNet", "SmallUNet"} <= set(DENOISER_REGISTRY._obj_map)
    rdunet, small = build_denoiser(_cfg("RDUNet")), build_denoiser(_cfg("SmallUNet"))
    # RDUNet: DConv + four max-pool + DConv blocks forward, four fusion modules back (Figure 6.2)
    assert len(rdunet.down) == 4 and len(rdunet.up) == 4
    assert len(small.down) == 2 and len(small.up) == 2
    assert sum(isinstance(m, nn.MaxPool2d) for m in rdunet.modules()) == 4
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in rdunet.modules()) == 4
    assert rdunet.residual.kernel_size == (1, 1)
    with pytest.raises(KeyError):
        build_denoiser(_cfg("NoSuchDenoiser"))


@pytest.mark.parametrize("size", [(64, 32), (128, 64), (37, 21)])
def test_unet_keeps_the_image_shape_any_size(size):
    x = torch.rand(2, 3, *size)
    assert build_denoiser(_cfg()).eval()(x).shape == x.shape


def test_rdunet_output_is_the_noisy_input_minus_the_residual_map():
    """x_hat = x* + (-dx_hat): with the 1x1 residual convolution zeroed the denoiser is the identity."""
    denoiser = UNetDenoiser(depth=4, width=4).eval()
    nn.init.zeros_(denoiser.residual.weight)
    nn.init.zeros_(denoiser.residual.bias)
    x = torch.rand(2, 3, 64, 32) * 2 - 0.5  # noisy inputs leave [0, 1]: nothing clips them
    torch.testing.assert_close(denoiser(x), x)
    nn.init.constant_(denoiser.residual.bias, 0.25)
    torch.testing.assert_close(denoiser(x), x - 0.25)


def test_unet_channels_double_per_level():
    denoiser = UNetDenoiser(depth=4, width=8)
    assert [block[1][1][0].out_channels for block in denoiser.down] == [16, 32, 64, 128]


def test_autoencoder_latent_size_and_reconstruction_shape():
    ae = Autoencoder((64, 32), latent_dim=16, width=4, levels=4)
    x = torch.rand(3, 3, 64, 32)
    assert ae.encoder(x).shape == (3, 16)
    assert ae.decoder(ae.encoder(x)).shape == x.shape
    with pytest.raises(ValueError, match="not a multiple of 16"):
        Autoencoder((60, 32), latent_dim=16, levels=4)


def test_front_end_runs_denoiser_then_encoder_then_decoder():
    front = build_front_end(_cfg(), with_autoencoder=True).eval()
    x = torch.rand(2, 3, 64, 32)
    expected = front.autoencoder.decoder(front.autoencoder.encoder(front.denoiser(x)))
    torch.testing.assert_close(front(x), expected)
    plain = build_front_end(_cfg(), with_autoencoder=False).eval()
    assert plain.autoencoder is None
    torch.testing.assert_close(plain(x), plain.denoiser(x))
    assert isinstance(front, DenoisingFrontEnd)


def test_denoiser_config_defaults_are_the_thesis_values():
    from robustreid.config import add_robustreid_config
    from fastreid.config import get_cfg

    d = add_robustreid_config(get_cfg()).DENOISER
    assert (d.ARCH, d.MODE, d.SIGMA, d.Q, d.XI) == ("RDUNet", "rge", 0.25, 192, 0.005)
    assert (d.LOSS.MATCH, d.LOSS.CS, d.LOSS.MMD, d.LOSS.MSE) == (1.0, 1.0, 4.0, 0.0)
    assert (d.LR, d.IMS_PER_BATCH, d.GAMMA, d.ITERS / d.DECAY_EVERY) == (1e-4, 256, 0.1, 6)
    assert d.AE.LATENT_DIM == 192

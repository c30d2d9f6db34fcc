"""Denoisers for denoised smoothing (thesis chapter 6) and the autoencoder of ZO-AE-RUDS.

Every module here maps [0, 1] images (B, 3, H, W) to [0, 1] images, the convention of the attacks'
input transformations (:mod:`robustreid.attacks.defenses`): give the front end to
``ReidFeatureExtractor(model, defense=...)`` and it runs in front of the model (which takes 0-255).
Outputs are not clipped, so gradients reach every pixel.

* DENOISER_REGISTRY (fastreid's Registry, DENOISER.ARCH names one): a builder ``f(cfg)`` returning an
  nn.Module. "RDUNet" is the thesis's robust U-Net denoiser (section 6.3.1, Figure 6.2);
  "SmallUNet" the same design two levels deep, for CPU runs and tests. Register your own with
  ``@DENOISER_REGISTRY.register()`` on a builder.
* :class:`Autoencoder`: encoder to a latent vector of DENOISER.AE.LATENT_DIM, decoder back to the
  image (ZO-AE-RUDS: the encoder follows the denoiser, the decoder becomes part of the black box).
* :class:`DenoisingFrontEnd`: what certification puts in front of the model, the denoiser followed by
  the autoencoder when the training mode used one.
"""
import torch
from fastreid.utils.registry import Registry
from torch import nn

__all__ = ["DENOISER_REGISTRY", "Autoencoder", "DenoisingFrontEnd", "UNetDenoiser",
           "build_autoencoder", "build_denoiser", "build_front_end"]

DENOISER_REGISTRY = Registry("DENOISER")
DENOISER_REGISTRY.__doc__ = "Denoisers on [0, 1] images, built from the config (DENOISER.ARCH)."


def conv_bn_relu(in_channels, out_channels, stride=1):
    """The thesis's "Conv": 3x3 convolution (padding 1), batch normalisation, ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def double_conv(in_channels, out_channels):
    """The thesis's "DConv": two consecutive Conv layers."""
    return nn.Sequential(conv_bn_relu(in_channels, out_channels),
                         conv_bn_relu(out_channels, out_channels))


class Fusion(nn.Module):
    """Fusion module of the feedback path: the feedback input upsampled by a stride-2
    ConvTranspose2d to the lateral input's size, concatenated with it, then DConv."""

    def __init__(self, feedback_channels, lateral_channels):
        super().__init__()
        self.up = nn.ConvTranspose2d(feedback_channels, lateral_channels, 2, stride=2)
        self.conv = double_conv(2 * lateral_channels, lateral_channels)

    def forward(self, feedback, lateral):
        # output_size: odd sizes, floored by the max-pooling, come back exactly
        up = self.up(feedback, output_size=lateral.shape[-2:])
        return self.conv(torch.cat([lateral, up], dim=1))


class UNetDenoiser(nn.Module):
    """Residual U-Net denoiser (thesis section 6.3.1, Figure 6.2).

    Feedforward path: DConv, then ``depth`` blocks of 2x2 max-pooling + DConv, doubling the channels
    from ``width``. Feedback path: ``depth`` fusion modules, then a 1x1 convolution giving the residual
    map dx; the output is ``x* - dx`` for the noisy input x*. RDUNet is ``depth`` 4 (five feedforward
    blocks). The thesis's figure does not give the widths legibly: ``width`` 64 is Ronneberger et al.'s
    U-Net, the design RDUNet follows.
    """

    def __init__(self, depth=4, width=64, channels=3):
        super().__init__()
        widths = [width * 2 ** level for level in range(depth + 1)]
        self.inc = double_conv(channels, widths[0])
        self.down = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), double_conv(a, b))
                                  for a, b in zip(widths, widths[1:]))
        self.up = nn.ModuleList(Fusion(b, a) for a, b in reversed(list(zip(widths, widths[1:]))))
        self.residual = nn.Conv2d(widths[0], channels, 1)

    def forward(self, noisy):
        features = [self.inc(noisy)]
        for block in self.down:
            features.append(block(features[-1]))
        x = features.pop()
        for fusion in self.up:
            x = fusion(x, features.pop())
        return noisy - self.residual(x)


@DENOISER_REGISTRY.register()
def RDUNet(cfg):
    """The thesis's RDUNet: four pooling levels."""
    return UNetDenoiser(depth=4, width=cfg.DENOISER.WIDTH)


@DENOISER_REGISTRY.register()
def SmallUNet(cfg):
    """RDUNet's design with two pooling levels (1/16 of RDUNet's parameters at one width)."""
    return UNetDenoiser(depth=2, width=cfg.DENOISER.WIDTH)


def build_denoiser(cfg):
    """The DENOISER.ARCH denoiser (KeyError for an unregistered name: check the config first)."""
    return DENOISER_REGISTRY.get(cfg.DENOISER.ARCH)(cfg)


class Autoencoder(nn.Module):
    """Convolutional autoencoder with a vector latent (ZO-AE-RUDS, thesis Figure 6.3).

    Encoder: ``levels`` stride-2 Conv layers (channels ``width``, 2 ``width``, ...), flattened, then a
    linear map to ``latent_dim``. Decoder: the mirror image (linear map, stride-2 ConvTranspose2d +
    BN + ReLU per level, 3x3 convolution to the image). Height and width must be multiples of
    2^``levels`` (the latent is a vector, so one image size only). The thesis does not describe the
    autoencoder beyond its latent; this is the usual small design (Zhang et al. 2022's has a
    convolutional latent).
    """

    def __init__(self, image_size, latent_dim=192, width=32, levels=4, channels=3):
        super().__init__()
        height, width_px = image_size
        scale = 2 ** levels
        if height % scale or width_px % scale:
            raise ValueError(f"autoencoder: image size {height}x{width_px} is not a multiple of "
                             f"{scale} (2^{levels})")
        widths = [width * 2 ** level for level in range(levels)]
        self.map_shape = (widths[-1], height // scale, width_px // scale)
        flat = widths[-1] * (height // scale) * (width_px // scale)
        self.encoder = nn.Sequential(
            *(conv_bn_relu(a, b, stride=2) for a, b in zip([channels] + widths, widths)),
            nn.Flatten(), nn.Linear(flat, latent_dim))
        ups = []
        for a, b in zip(reversed(widths), list(reversed(widths))[1:] + [widths[0]]):
            ups += [nn.ConvTranspose2d(a, b, 2, stride=2, bias=False), nn.BatchNorm2d(b),
                    nn.ReLU(inplace=True)]
        self.decoder = nn.Sequential(nn.Linear(latent_dim, flat), nn.Unflatten(1, self.map_shape),
                                     *ups, nn.Conv2d(widths[0], channels, 3, padding=1))

    def forward(self, x):
        return self.decoder(self.encoder(x))


def build_autoencoder(cfg):
    """DENOISER.AE's autoencoder for INPUT.SIZE_TRAIN images."""
    ae = cfg.DENOISER.AE
    return Autoencoder(tuple(cfg.INPUT.SIZE_TRAIN), latent_dim=ae.LATENT_DIM, width=ae.WIDTH,
                       levels=ae.LEVELS)


class DenoisingFrontEnd(nn.Module):
    """The denoiser, followed by the autoencoder (encoder, then decoder) when there is one: the
    input transformation the smoothed model runs noisy images through."""

    def __init__(self, denoiser, autoencoder=None):
        super().__init__()
        self.denoiser = denoiser
        self.autoencoder = autoencoder

    def forward(self, noisy):
        denoised = self.denoiser(noisy)
        return denoised if self.autoencoder is None else self.autoencoder(denoised)


def build_front_end(cfg, with_autoencoder):
    """A :class:`DenoisingFrontEnd` of DENOISER.ARCH (and DENOISER.AE when ``with_autoencoder``)."""
    return DenoisingFrontEnd(build_denoiser(cfg), build_autoencoder(cfg) if with_autoencoder else None)

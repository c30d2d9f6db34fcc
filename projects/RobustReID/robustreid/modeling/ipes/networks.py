"""IPES-GAN's generator and discriminator networks (thesis sec. 3.2.1, 3.3.2).

* :class:`PoseEncoder` (E_p): image + 18-channel keypoint heatmaps -> a spatial pose map; "two
  downsampling layers, four residual layers and atrous spatial pyramid pooling (ASPP)".
* :class:`StyleEncoder` (E_s): "a 6-layer convolution network" -> a style vector (camera style and
  background) and, from it, the image's camera logits (the style encoder is the camera classifier
  of eq. 3.7-3.10).
* :class:`AdaINDecoder` (G): "similar architecture as the pose encoders", mirrored: residual blocks
  whose normalisation is adaptive instance normalisation (AdaIN, Huang & Belongie 2017) driven by
  the (style, identity) code through an MLP, then two upsamplings to an RGB image in [-1, 1].
* :class:`PatchDiscriminator` (D): LSGAN's (Mao et al. 2017) least-squares critic, a map of scores.

Widths and the exact layers are not given in the thesis [INF]; they follow MUNIT-style generators
(instance norm in the encoders, layer norm in the upsampling, no norm in the style encoder and D),
configured by IPES.GEN / IPES.DIS. None of these networks keeps running statistics (no buffers):
their output depends on their input and weights alone, in train and eval mode.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["adain", "PoseEncoder", "StyleEncoder", "AdaINDecoder", "PatchDiscriminator"]


def adain(x, mean, std, eps=1e-5):
    """AdaIN: each channel of each sample of ``x`` (B, C, H, W) normalised to zero mean and unit
    std over its positions, then scaled by ``std`` (B, C) and shifted by ``mean`` (B, C)."""
    mu = x.mean(dim=(2, 3), keepdim=True)
    sigma = (x.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt()
    return (x - mu) / sigma * std[:, :, None, None] + mean[:, :, None, None]


def _conv(in_dim, out_dim, kernel, stride=1, dilation=1, norm="in"):
    """conv -> norm -> ReLU; norm "in" (instance), "ln" (layer) or "none". Reflection padding,
    except for atrous convs (zeros: their padding may exceed a small map's size)."""
    pad = dilation * (kernel - 1) // 2
    if dilation == 1:
        layers = [nn.ReflectionPad2d(pad), nn.Conv2d(in_dim, out_dim, kernel, stride)]
    else:
        layers = [nn.Conv2d(in_dim, out_dim, kernel, stride, padding=pad, dilation=dilation)]
    if norm == "in":
        layers.append(nn.InstanceNorm2d(out_dim, affine=True))
    elif norm == "ln":
        layers.append(nn.GroupNorm(1, out_dim))  # one group: normalise over C, H, W
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


class _ResBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.body = nn.Sequential(_conv(dim, dim, 3), nn.ReflectionPad2d(1),
                                  nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim, affine=True))

    def forward(self, x):
        return x + self.body(x)


class _ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al. 2018): parallel 3x3 convs at several dilation
    rates (rate 1: a 1x1 conv) and an image-level pooling branch, fused by a 1x1 conv."""

    def __init__(self, dim, rates):
        super().__init__()
        self.branches = nn.ModuleList(
            _conv(dim, dim, 1) if rate == 1 else _conv(dim, dim, 3, dilation=rate)
            for rate in rates)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim, 1),
                                        nn.ReLU(inplace=True))
        self.fuse = _conv(dim * (len(rates) + 1), dim, 1)

    def forward(self, x):
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[2:])
        return self.fuse(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class PoseEncoder(nn.Module):
    """(image (B, 3, H, W) in [-1, 1], heatmaps (B, 18, H, W)) -> pose map (B, 4 dim, H/4, W/4)."""

    def __init__(self, dim=64, num_keypoints=18, res_blocks=4, aspp_rates=(1, 2, 4, 6)):
        super().__init__()
        self.net = nn.Sequential(
            _conv(3 + num_keypoints, dim, 7),
            _conv(dim, 2 * dim, 4, stride=2), _conv(2 * dim, 4 * dim, 4, stride=2),
            *[_ResBlock(4 * dim) for _ in range(res_blocks)],
            _ASPP(4 * dim, aspp_rates))
        self.out_dim = 4 * dim

    def forward(self, image, heatmaps):
        return self.net(torch.cat([image, heatmaps], dim=1))


class StyleEncoder(nn.Module):
    """image (B, 3, H, W) -> (style (B, style_dim), camera logits (B, num_cameras)).

    Six convolutions: 7x7, four 4x4 stride-2 (the last three at 4 dim), then global average pooling
    and a 1x1 convolution to the style vector; the camera classifier is linear on it."""

    def __init__(self, dim=64, style_dim=64, num_cameras=0):
        super().__init__()
        widths = [dim, 2 * dim, 4 * dim, 4 * dim, 4 * dim]
        layers = [_conv(3, dim, 7, norm="none")]
        for a, b in zip(widths[:-1], widths[1:]):
            layers.append(_conv(a, b, 4, stride=2, norm="none"))
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Conv2d(widths[-1], style_dim, 1))
        self.camera = nn.Linear(style_dim, num_cameras)

    def forward(self, image):
        style = self.net(image).flatten(1)
        return style, self.camera(style)


class _AdaINResBlock(nn.Module):
    """Residual block whose two normalisations are AdaIN with externally given parameters."""

    def __init__(self, dim):
        super().__init__()
        self.conv1 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3))
        self.conv2 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3))
        self.num_params = 4 * dim  # (mean, std) of two AdaIN layers

    def forward(self, x, params):
        m1, s1, m2, s2 = params.chunk(4, dim=1)
        y = F.relu(adain(self.conv1(x), m1, s1))
        return x + adain(self.conv2(y), m2, s2)


class AdaINDecoder(nn.Module):
    """(pose map (B, C, h, w), code (B, code_dim)) -> image (B, 3, 4h, 4w) in [-1, 1].

    ``code`` is the concatenated style and identity features; an MLP turns it into every AdaIN
    layer's per-channel mean and std."""

    def __init__(self, in_dim, code_dim, res_blocks=4, mlp_dim=256):
        super().__init__()
        self.blocks = nn.ModuleList(_AdaINResBlock(in_dim) for _ in range(res_blocks))
        num_params = sum(block.num_params for block in self.blocks)
        self.mlp = nn.Sequential(nn.Linear(code_dim, mlp_dim), nn.ReLU(inplace=True),
                                 nn.Linear(mlp_dim, mlp_dim), nn.ReLU(inplace=True),
                                 nn.Linear(mlp_dim, num_params))
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2), _conv(in_dim, in_dim // 2, 5, norm="ln"),
            nn.Upsample(scale_factor=2), _conv(in_dim // 2, in_dim // 4, 5, norm="ln"),
            nn.ReflectionPad2d(3), nn.Conv2d(in_dim // 4, 3, 7), nn.Tanh())

    def forward(self, pose, code):
        params = self.mlp(code).split([block.num_params for block in self.blocks], dim=1)
        x = pose
        for block, p in zip(self.blocks, params):
            x = block(x, p)
        return self.up(x)


class PatchDiscriminator(nn.Module):
    """image (B, 3, H, W) in [-1, 1] -> least-squares scores (B, 1, H / 2^layers, W / 2^layers)."""

    def __init__(self, dim=64, layers=4):
        super().__init__()
        blocks, width = [], 3
        for i in range(layers):
            out = dim * 2 ** min(i, 3)
            blocks += [nn.Conv2d(width, out, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            width = out
        self.net = nn.Sequential(*blocks, nn.Conv2d(width, 1, 1))

    def forward(self, image):
        return self.net(image)

"""Input-transformation defenses on [0, 1] images (feature squeezing, Xu et al. 2018, on advertorch's
defenses) and BPDA (Athalye et al. 2018) to attack them honestly.

Give a defense to :class:`ReidFeatureExtractor` (``defense=``): it runs inside the model, so a naive
attack differentiates through it, and ``bpda=True`` replaces its backward pass by the identity.

* "BitSqueezing" (``bit_depth``, default 5): rounding to 2^bit_depth levels. Its true derivative is
  zero almost everywhere, which is what a naive attack gets (advertorch's own op has no backward and
  would raise instead).
* "MedianSmoothing2D" (``kernel_size``, default 2): median filter; its naive gradient reaches only the
  pixel each window selected.
* "BitSqueezing+MedianSmoothing2D": both, squeezing first.

Defaults follow Xu et al.'s ImageNet settings (5-bit depth, 2x2 median).
"""
import torch
import torch.nn as nn
from advertorch.defenses import BitSqueezing, MedianSmoothing2D

from .validation import AttackConfigError, check_kwargs, keyword_options, positive_int


class StraightThrough(nn.Module):
    """``transform(x)`` forward; backward ``gradient_scale`` times the identity (1: BPDA; 0: the zero
    derivative of a piecewise-constant transform). The output equals ``transform(x)`` exactly."""

    def __init__(self, transform, gradient_scale=1.0):
        super().__init__()
        self.transform = transform
        self.gradient_scale = gradient_scale

    def forward(self, x):
        with torch.no_grad():
            y = self.transform(x)
        return y + self.gradient_scale * (x - x.detach())  # the added term is exactly zero

    def extra_repr(self):
        return f"gradient_scale={self.gradient_scale}"


def bpda(defense):
    """``defense`` with a straight-through (identity) backward pass (BPDA, Athalye et al. 2018)."""
    return StraightThrough(defense, gradient_scale=1.0)


_bpda = bpda  # build_defense's ``bpda`` flag shadows the function


def bit_squeezing(*, bit_depth=5):
    return StraightThrough(BitSqueezing(positive_int(bit_depth, "bit_depth"), vmin=0.0, vmax=1.0),
                           gradient_scale=0.0)


def median_smoothing(*, kernel_size=2):
    return MedianSmoothing2D(kernel_size=positive_int(kernel_size, "kernel_size"))


def squeeze_then_median(*, bit_depth=5, kernel_size=2):
    return nn.Sequential(bit_squeezing(bit_depth=bit_depth), median_smoothing(kernel_size=kernel_size))


DEFENSES = {
    "BitSqueezing": bit_squeezing,
    "MedianSmoothing2D": median_smoothing,
    "BitSqueezing+MedianSmoothing2D": squeeze_then_median,
}


def build_defense(name, bpda=False, **kwargs):
    """The defense ``name`` (see the module doc) as an nn.Module on [0, 1] images; ``bpda=True``
    wraps it with an identity backward pass."""
    if name not in DEFENSES:
        raise AttackConfigError(f"unknown defense {name!r}; defenses: {sorted(DEFENSES)}")
    factory = DEFENSES[name]
    check_kwargs(kwargs, keyword_options(factory), f"defense {name}")
    defense = factory(**kwargs)
    return _bpda(defense) if bpda else defense

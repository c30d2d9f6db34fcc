"""Registered models: meta-architectures, backbones and heads for fastreid's registries, and the
denoisers of denoised smoothing (DENOISER_REGISTRY)."""
from . import backbones, denoisers, heads, meta_arch  # noqa: F401  (registration side effects)

"""Registered models: meta-architectures, backbones and heads for fastreid's registries."""
from . import backbones, heads, meta_arch  # noqa: F401  (registration side effects)

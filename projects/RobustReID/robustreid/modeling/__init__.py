"""Registered models: meta-architectures (and, by import, backbones) for fastreid's registries."""
from . import meta_arch  # noqa: F401  (registration side effects)
from . import backbones  # noqa: F401

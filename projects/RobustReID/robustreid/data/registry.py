"""Registering RobustReID's dataset classes in fastreid's DATASET_REGISTRY."""
from fastreid.data.datasets import DATASET_REGISTRY


def register_dataset(cls):
    """Register once (re-importing a module must not trip the registry's duplicate assert)."""
    try:
        DATASET_REGISTRY.get(cls.__name__)
    except KeyError:
        DATASET_REGISTRY.register(cls)
    return cls

"""RobustReID data: the built-in SynthReID datasets (registered on import) and test fixtures.

``import robustreid`` imports this package, which registers ``SynthReID``, ``SynthReIDTiny``,
``SynthReID_D{0,1,2}`` and ``SynthReIDTiny_D{0,1,2}`` in fastreid's ``DATASET_REGISTRY``, and
``Balanced`` (a balanced copy written by tools/balance_data.py, DATASETS.BALANCED), the DG protocol
datasets (dg_datasets) and the DML datasets ``CUB200``, ``CARS196``, ``InShop``, ``InShopQuery`` and
``SOP`` (dml_datasets; their test copies: dml_fixtures).
"""
from . import (  # noqa: F401  (register "Balanced", the DG and DML sets)
    balancing, dg_datasets, dml_datasets, dml_fixtures, fixtures)
from .synth_reid import (  # noqa: F401  (importing registers the datasets)
    DOMAIN_NAMES,
    TIME_LABELS,
    SynthReID,
    SynthReID_D0,
    SynthReID_D1,
    SynthReID_D2,
    SynthReIDTiny,
    SynthReIDTiny_D0,
    SynthReIDTiny_D1,
    SynthReIDTiny_D2,
    SynthSpec,
    ensure_synth_dataset,
    load_side_info,
    side_info_for,
)

__all__ = [
    "DOMAIN_NAMES", "TIME_LABELS", "SynthSpec", "ensure_synth_dataset", "load_side_info",
    "side_info_for", "fixtures",
    "SynthReID", "SynthReIDTiny", "SynthReID_D0", "SynthReID_D1", "SynthReID_D2",
    "SynthReIDTiny_D0", "SynthReIDTiny_D1", "SynthReIDTiny_D2",
]

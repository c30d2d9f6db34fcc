"""DDDefense phase 1: ID- and camera-conditional diffusion data balancing (paper eq. 1-2).

Importing this package registers the ``Balanced`` dataset in fastreid's DATASET_REGISTRY. It does not
import diffusers (slow to import): the diffusion model lives in
:mod:`robustreid.data.balancing.diffusion`, imported by tools/balance_data.py.

    config.py    add_balancing_config(cfg): DATASETS.BALANCED.* and BALANCE.*
    plan.py      eq. 1 / eq. 2: how many pseudo samples per (identity, camera)
    diffusion.py EDM model on diffusers (UNet2DModel + EDM schedulers + EMAModel): train, sample, resume
    generate.py  resumable writing of the balanced copy + manifest, real-vs-generated grid (Fig. 5)
    stats.py     images per identity and camera shares before/after (Fig. 1), JSON + PNG
    dataset.py   the ``Balanced`` fastreid dataset; apply_balanced_config(cfg) for trainers
"""
from .config import add_balancing_config
from .dataset import (BALANCED_NAME, Balanced, apply_balanced_config, is_synthetic,
                      set_balanced_path, synthetic_mask)
from .manifest import BalancedSetError, read_manifest
from .plan import BalancePlan, plan_balancing

__all__ = ["add_balancing_config", "apply_balanced_config", "Balanced", "BALANCED_NAME",
           "is_synthetic", "synthetic_mask", "set_balanced_path", "BalancedSetError",
           "read_manifest", "BalancePlan", "plan_balancing"]

"""``Balanced``: a fastreid dataset (DATASET_REGISTRY) over a balanced set written by
tools/balance_data.py, so any config can train on it.

How a config gets there: fastreid builds training sets by name (DATASETS.NAMES) with only ``root``
as argument, so the directory comes from a module-level setting. :func:`apply_balanced_config`,
called once on the config before it is frozen and before anything is built, does both steps when
DATASETS.BALANCED.ENABLED is True: it points ``Balanced`` at DATASETS.BALANCED.PATH and replaces
DATASETS.NAMES by ("Balanced",). Test sets (DATASETS.TESTS) are untouched.

Items are fastreid's 3-tuples (img_path, pid, camid) with the source dataset's own training labels
(pid "market1501_2", ...), read from manifest.json, so a model trained on the balanced set has the
same classes as one trained on the source. A 4th tuple field would break fastreid's
BalancedIdentitySampler (it unpacks 3), so synthetic samples are marked by path instead:
``Balanced.synthetic_paths`` / :func:`is_synthetic` / :func:`synthetic_mask` (batch["img_paths"]).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Iterable, Optional

from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.data.datasets.bases import ImageDataset

from ..registry import register_dataset

from .manifest import MANIFEST_FILE, BalancedSetError, read_manifest

logger = logging.getLogger(__name__)

__all__ = ["Balanced", "BALANCED_NAME", "apply_balanced_config", "set_balanced_path",
           "balanced_path", "is_synthetic", "synthetic_mask"]

BALANCED_NAME = "Balanced"
_SETTINGS = {"path": None}


def set_balanced_path(path: Optional[str]) -> None:
    """Directory the ``Balanced`` dataset reads (None: unset)."""
    _SETTINGS["path"] = os.path.abspath(path) if path else None


def balanced_path() -> Optional[str]:
    return _SETTINGS["path"]


def apply_balanced_config(cfg):
    """If DATASETS.BALANCED.ENABLED: check the set at DATASETS.BALANCED.PATH is complete and was
    made from DATASETS.NAMES, point ``Balanced`` at it and set DATASETS.NAMES = ("Balanced",).

    Idempotent; keeps the config's frozen state; a no-op when disabled. Raises
    robustreid.config.ConfigError with the reason otherwise.
    """
    from ...config import ConfigError

    if "BALANCED" not in cfg.DATASETS or not cfg.DATASETS.BALANCED.ENABLED:
        return cfg
    path = cfg.DATASETS.BALANCED.PATH
    if not path:
        raise ConfigError("DATASETS.BALANCED.ENABLED needs DATASETS.BALANCED.PATH (the --output of "
                          "tools/balance_data.py)")
    try:
        manifest = read_manifest(path)
    except BalancedSetError as e:
        raise ConfigError(f"DATASETS.BALANCED.PATH: {e}") from None
    names = tuple(cfg.DATASETS.NAMES)
    source = tuple(manifest.get("source", {}).get("datasets", ()))
    if names != (BALANCED_NAME,) and names != source:
        raise ConfigError(f"DATASETS.BALANCED.PATH {path!r} balances {source}, but DATASETS.NAMES is "
                          f"{names}: point PATH at a set made from {names} (tools/balance_data.py)")
    set_balanced_path(path)
    frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.DATASETS.NAMES = (BALANCED_NAME,)
    if frozen:
        cfg.freeze()
    logger.info("Training on the balanced set %s (%d real + %d synthetic images of %s)", path,
                len(manifest["real"]), len(manifest["synthetic"]), ", ".join(source))
    return cfg


@functools.lru_cache(maxsize=16)
def _synthetic_files(directory: str, mtime_ns: int) -> frozenset:
    try:
        manifest = read_manifest(directory, require_complete=False)
    except BalancedSetError:  # another dataset's manifest.json (e.g. SynthReID's own)
        return frozenset()
    return frozenset(os.path.normpath(os.path.join(directory, e["file"])) for e in manifest["synthetic"])


def is_synthetic(img_path: str) -> bool:
    """True if ``img_path`` (as in fastreid items / batch["img_paths"]) is a synthetic image of a
    balanced set; real images of any dataset give False."""
    img_path = os.path.normpath(os.path.abspath(img_path))
    directory = os.path.dirname(os.path.dirname(img_path))
    manifest = os.path.join(directory, MANIFEST_FILE)
    try:
        mtime = os.stat(manifest).st_mtime_ns
    except OSError:
        return False
    return img_path in _synthetic_files(directory, mtime)


def synthetic_mask(img_paths: Iterable[str]):
    """Bool tensor, True where the batch image is synthetic (for losses/samplers that weight them)."""
    import torch

    return torch.tensor([is_synthetic(p) for p in img_paths], dtype=torch.bool)


@register_dataset
class Balanced(ImageDataset):
    """Training split = real + synthetic images of a balanced set (no query / gallery).

    ``path`` defaults to the directory set by :func:`apply_balanced_config` / :func:`set_balanced_path`.
    """
    dataset_name = "balanced"

    def __init__(self, root="datasets", path: Optional[str] = None, **kwargs):
        path = path or balanced_path()
        if not path:
            raise RuntimeError("the Balanced dataset has no directory: set DATASETS.BALANCED.ENABLED True "
                               "and DATASETS.BALANCED.PATH, and call "
                               "robustreid.data.balancing.apply_balanced_config(cfg)")
        try:
            self.manifest = read_manifest(path)
        except BalancedSetError as e:
            raise RuntimeError(str(e)) from None
        self.root = root
        self.dataset_dir = os.path.abspath(path)
        real, syn = [], []
        for entries, out in ((self.manifest["real"], real), (self.manifest["synthetic"], syn)):
            for e in entries:
                out.append((os.path.normpath(os.path.join(self.dataset_dir, e["file"])), e["pid"], e["camid"]))
        missing = [p for p, _, _ in real + syn if not os.path.isfile(p)]
        if missing:
            raise RuntimeError(f"{len(missing)} image(s) listed in {path}/{MANIFEST_FILE} are missing, "
                               f"e.g. {missing[0]}")
        self.real_items = real
        self.synthetic_items = syn
        self.synthetic_paths = frozenset(p for p, _, _ in syn)
        self.source_datasets = tuple(self.manifest.get("source", {}).get("datasets", ()))
        super().__init__(real + syn, [], [], **kwargs)

    def is_synthetic(self, img_path: str) -> bool:
        return os.path.normpath(os.path.abspath(img_path)) in self.synthetic_paths

    def show_test(self):
        logger.info("Balanced has no query/gallery: evaluate on DATASETS.TESTS")

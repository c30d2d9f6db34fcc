"""The on-disk format of a balanced training set (written by tools/balance_data.py).

    <dir>/manifest.json                 what is in the set (authoritative labels), see below
    <dir>/bounding_box_train/*.jpg      real images (hard links, or copies across file systems)
                                        + synthetic images
    <dir>/diffusion/last.pt             the diffusion model's resumable checkpoint
    <dir>/stats/balance_stats.{json,png}, <dir>/real_vs_generated.png

manifest.json::

    {"format": "robustreid-balanced-v1", "complete": bool, "source": {...}, "plan": {...},
     "plan_digest": sha256 of the requests + seed, "checkpoint": {"path", "sha256", "step"},
     "sampler": {...}, "image_size": [h, w],
     "real": [{"file", "pid", "camid", "source"}],
     "synthetic": [{"file", "index", "pid", "camid", "identity", "camera", "rule", "seed",
                    "checkpoint_sha256"}]}

``pid`` / ``camid`` are the source dataset's fastreid training labels (e.g. "market1501_2",
"market1501_0"). Synthetic files use Market-1501's naming, ``{identity:04d}_c{camera}s0_{index:06d}_00.jpg``
(camera 1-based): fastreid's Market1501/DukeMTMC parsers read the same pid and camera from them, and
"s0" / "_00" never occur in real Market-1501 or DukeMTMC names.

Other writers use the same format for other "synthetic" images: tools/make_adversarial_set.py (AMD)
stores adversarial copies of the real images, losslessly as ``..._00.png``, and adds ``"tool"`` (the
command that writes and resumes the set, named in errors) and its own ``plan`` / per-image fields
(see :mod:`robustreid.data.adversarial_set`). Readers rely only on ``file``, ``pid`` and ``camid``.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Hashable, Tuple

__all__ = ["MANIFEST_FORMAT", "MANIFEST_FILE", "TRAIN_DIR", "SYNTHETIC_NAME", "label_int",
           "synthetic_file_name", "read_manifest", "write_manifest", "BalancedSetError"]

MANIFEST_FORMAT = "robustreid-balanced-v1"
MANIFEST_FILE = "manifest.json"
TRAIN_DIR = "bounding_box_train"
SYNTHETIC_NAME = re.compile(r"^(\d+)_c(\d+)s0_(\d{6,})_00\.(?:jpg|png)$")
DEFAULT_TOOL = "tools/balance_data.py"  # the writer of sets whose manifest names none


class BalancedSetError(RuntimeError):
    """A balanced set is missing, incomplete, or does not match what is being asked of it."""


def label_int(label: Hashable) -> int:
    """Integer behind a fastreid train label: "market1501_12" -> 12, 7 -> 7."""
    if isinstance(label, int):
        return label
    tail = str(label).rsplit("_", 1)[-1]
    if not tail.lstrip("-").isdigit():
        raise BalancedSetError(f"cannot read an integer id from the label {label!r}")
    return int(tail)


def synthetic_file_name(pid: Hashable, camid: Hashable, index: int, ext: str = "jpg") -> str:
    """Market-1501-style name of the index-th synthetic image (camera written 1-based)."""
    return "{:04d}_c{}s0_{:06d}_00.{}".format(label_int(pid), label_int(camid) + 1, int(index), ext)


def read_manifest(path: str, require_complete: bool = True) -> Dict:
    """The manifest of the balanced set in directory ``path``."""
    file = os.path.join(path, MANIFEST_FILE)
    try:
        with open(file) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise BalancedSetError(f"no balanced set at {path!r} ({MANIFEST_FILE} missing): "
                               f"run {DEFAULT_TOOL} (or tools/make_adversarial_set.py) first") from None
    except ValueError as e:
        raise BalancedSetError(f"{file} is not valid JSON: {e}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise BalancedSetError(f"{file}: unknown format {manifest.get('format')!r}")
    if require_complete and not manifest.get("complete"):
        done, planned = len(manifest.get("synthetic", [])), manifest.get("plan", {}).get("num_synthetic")
        raise BalancedSetError(f"the balanced set at {path!r} is incomplete ({done}/{planned} synthetic "
                               f"images): rerun {manifest.get('tool', DEFAULT_TOOL)} to finish it")
    return manifest


def write_manifest(path: str, manifest: Dict) -> None:
    """Atomic: a reader (or a rerun after a kill) sees the old or the new manifest, never a mix."""
    file = os.path.join(path, MANIFEST_FILE)
    tmp = "{}.tmp-{}".format(file, os.getpid())
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=0, separators=(",", ":"))
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


def split_synthetic_name(name: str) -> Tuple[int, int, int]:
    """(identity, camera 1-based, index) of a synthetic file name; ValueError otherwise."""
    m = SYNTHETIC_NAME.match(name)
    if not m:
        raise ValueError(name)
    return int(m.group(1)), int(m.group(2)), int(m.group(3))

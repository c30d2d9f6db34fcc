"""AMD's training set (Bai et al. 2020, offline adversarial training): the training images plus one
adversarial copy of each, crafted once by an already-trained model, written in the balanced-set
format so that ``DATASETS.BALANCED.ENABLED True DATASETS.BALANCED.PATH DIR`` trains on it.

    <dir>/manifest.json              robustreid-balanced-v1 (see balancing/manifest.py), plus
                                     "tool", "generator": "adversarial", "checkpoint" {path, sha256},
                                     "plan" (attack settings, batch size, seed, image size, transform)
    <dir>/bounding_box_train/*.jpg   the real images (hard links)
    <dir>/bounding_box_train/{identity:04d}_c{camera}s0_{index:06d}_00.png
                                     the adversarial copy of the index-th training image: its pid and
                                     camid; manifest entry {"of": the real file, "attack", "eps",
                                     "steps", "linf" (/255), "checkpoint_sha256"}

What is attacked: each image as the model sees it at training resolution, i.e. fastreid's test-time
transform (bicubic resize, no augmentation) at INPUT.SIZE_TRAIN. The copy is saved at that size, so
the training transform's resize leaves it untouched and the perturbation reaches the model exactly
(random flips/crops/erasing then apply to it like to any image). PNG keeps it lossless; the attack's
output is rounded to 8 bits and clipped to within floor(eps) of the clean 8-bit image, so the saved
file is within eps/255 in L-inf of the resized clean image.

Guides: batches are whole identities (:func:`identity_batches`), so every image is attacked with all
other images of its identity as same-ID guides and other identities as negatives, the guide set the
online Metric AT step uses (engine/train_steps.MetricAdversarialBatch, which the crafter in
engine/offline_crafting.py reuses). Batches depend only on the training list and the batch size, and
each batch's random start is seeded, so a copy does not depend on which run made it.

Resumable: files are written to a temporary name and renamed; the manifest is rewritten atomically
after each batch and lists only finished files; a rerun checks the settings and the checkpoint's
sha256, then crafts only the batches with unlisted images and rewrites nothing else.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

from .balancing.generate import link_real_images, remove_partial_files
from .balancing.manifest import (MANIFEST_FILE, MANIFEST_FORMAT, TRAIN_DIR,
                                 BalancedSetError, label_int, read_manifest, synthetic_file_name,
                                 write_manifest)
from .validation import DatasetError

__all__ = ["TOOL", "identity_batches", "clean_transform", "load_clean_batch", "quantise_within_budget",
           "AdversarialSetWriter"]

TOOL = "tools/make_adversarial_set.py"
TRANSFORM = "fastreid test transform at INPUT.SIZE_TRAIN (bicubic resize, no augmentation)"


def identity_batches(pids: Sequence, batch_size: int) -> List[List[int]]:
    """Item indices in batches of whole identities (sorted ids, items in list order).

    A batch closes before the identity that would take it past ``batch_size`` images, but only once
    it holds two identities (every image then has negatives); an identity is never split (its images
    keep each other as same-ID guides), so a batch may exceed ``batch_size`` to honour both.
    """
    by_pid: Dict = {}
    for index, pid in enumerate(pids):
        by_pid.setdefault(pid, []).append(index)
    batches, current, ids = [], [], 0
    for pid in sorted(by_pid):
        group = by_pid[pid]
        if current and ids >= 2 and len(current) + len(group) > batch_size:
            batches.append(current)
            current, ids = [], 0
        current = current + group
        ids += 1
    if current:
        batches.append(current)
    return batches


def clean_transform(cfg):
    """The images the model trains on, without augmentation: fastreid's test transform at
    INPUT.SIZE_TRAIN (uint8-valued float tensors in [0, 255])."""
    from fastreid.data.transforms import build_transforms

    cfg = cfg.clone()
    cfg.defrost()
    cfg.INPUT.SIZE_TEST = cfg.INPUT.SIZE_TRAIN
    cfg.INPUT.CROP.ENABLED = False
    return build_transforms(cfg, is_train=False)


def load_clean_batch(paths: Sequence[str], transform) -> torch.Tensor:
    """(B, 3, H, W) float images in [0, 255] as the transform gives them."""
    from fastreid.data.data_utils import read_image

    images = []
    for path in paths:
        try:
            images.append(transform(read_image(path)))
        except Exception as e:  # PIL raises several types for unreadable files
            raise DatasetError(f"{path}: {e}") from None
    return torch.stack(images)


def quantise_within_budget(adv255: torch.Tensor, clean255: torch.Tensor, eps: float) -> torch.Tensor:
    """uint8 adversarial images within floor(eps) levels of the (integer-valued) clean images.

    Rounding alone could step past a fractional budget; clipping to whole levels cannot.
    """
    levels = math.floor(float(eps) + 1e-6)
    low, high = clean255 - levels, clean255 + levels
    return torch.maximum(torch.minimum(adv255.round(), high), low).clamp(0, 255).to(torch.uint8)


def _save_png(image_chw: np.ndarray, path: str) -> None:
    from PIL import Image

    tmp = os.path.join(os.path.dirname(path), ".{}.tmp".format(os.path.basename(path)))
    Image.fromarray(np.ascontiguousarray(image_chw.transpose(1, 2, 0))).save(tmp, format="PNG")
    os.replace(tmp, path)


class AdversarialSetWriter:
    """Writes ``<out_dir>`` for ``items`` (fastreid train items of ``source["datasets"]``).

    ``plan``: the settings that define the copies (attack, eps, steps, step_size, distance,
    batch_size, seed, image_size); a rerun with other settings or another ``checkpoint``
    ({"path", "sha256"}) is refused.
    """

    def __init__(self, out_dir: str, items: Sequence, plan: Dict, checkpoint: Dict, source: Dict):
        self.out_dir = out_dir
        self.train_dir = os.path.join(out_dir, TRAIN_DIR)
        self.items = [tuple(item[:3]) for item in items]
        self.plan = {**plan, "num_synthetic": len(self.items), "transform": TRANSFORM}
        self.checkpoint = dict(checkpoint)
        self.source = dict(source)
        self.batches = identity_batches([pid for _, pid, _ in self.items], int(plan["batch_size"]))
        self.manifest: Dict = {}
        self.done: Dict[int, Dict] = {}

    def _real_file(self, index: int) -> str:
        return "{}/{}".format(TRAIN_DIR, os.path.basename(self.items[index][0]))

    def _entry(self, index: int, linf: int) -> Dict:
        _, pid, camid = self.items[index]
        return {"file": "{}/{}".format(TRAIN_DIR, synthetic_file_name(pid, camid, index, ext="png")),
                "index": index, "pid": str(pid), "camid": str(camid), "identity": label_int(pid),
                "camera": label_int(camid) + 1, "of": self._real_file(index),
                "attack": self.plan["attack"], "eps": self.plan["eps"], "steps": self.plan["steps"],
                "linf": int(linf), "checkpoint_sha256": self.checkpoint["sha256"]}

    def _write(self, complete: bool) -> None:
        self.manifest["synthetic"] = [self.done[i] for i in sorted(self.done)]
        self.manifest["complete"] = bool(complete)
        write_manifest(self.out_dir, self.manifest)

    def _check_old(self, old: Dict) -> None:
        if old.get("generator") != "adversarial":
            raise BalancedSetError(f"{self.out_dir} holds a set not written by {TOOL}: "
                                   "choose another --output")
        changed = sorted(k for k in set(old.get("plan", {})) | set(self.plan)
                         if old.get("plan", {}).get(k) != self.plan.get(k))
        if changed:
            raise BalancedSetError(f"{self.out_dir} holds an adversarial set made with other settings "
                                   f"({', '.join(changed)} differ): choose another --output or delete it")
        old_sha = str(old.get("checkpoint", {}).get("sha256"))
        if old_sha != self.checkpoint["sha256"]:
            raise BalancedSetError(f"{self.out_dir} was made by another checkpoint (sha256 {old_sha[:12]} "
                                   f"!= {self.checkpoint['sha256'][:12]}): choose another --output or "
                                   "delete it")
        if old.get("source", {}).get("datasets") != self.source.get("datasets"):
            raise BalancedSetError(f"{self.out_dir} holds an adversarial set of {old['source']['datasets']}, "
                                   f"not {self.source['datasets']}: choose another --output")

    def prepare(self) -> List[List[int]]:
        """Create or resume the set; returns the batches that still have images to craft."""
        os.makedirs(self.train_dir, exist_ok=True)
        old = None
        if os.path.exists(os.path.join(self.out_dir, MANIFEST_FILE)):
            old = read_manifest(self.out_dir, require_complete=False)
            self._check_old(old)
        remove_partial_files(self.train_dir)
        real = link_real_images(self.items, self.train_dir)

        expected = {self._entry(i, 0)["file"]: i for i in range(len(self.items))}
        self.done = {}
        for e in (old or {}).get("synthetic", []):
            index = expected.get(e["file"])
            if index is not None and os.path.isfile(os.path.join(self.out_dir, e["file"])):
                self.done[index] = e
        complete = len(self.done) == len(self.items)
        self.manifest = {
            "format": MANIFEST_FORMAT, "tool": TOOL, "generator": "adversarial", "complete": complete,
            "source": self.source, "plan": self.plan, "checkpoint": self.checkpoint,
            "image_size": self.plan["image_size"], "real": real,
            "synthetic": [self.done[i] for i in sorted(self.done)],
        }
        if self.manifest != old:  # a finished set is left byte for byte as it is
            self._write(complete)
        return [b for b in self.batches if any(i not in self.done for i in b)]

    def run(self, craft: Callable, transform, pending: List[List[int]], progress: bool = True) -> Dict:
        """Craft ``pending`` batches (from :meth:`prepare`); ``craft(images255, pids)`` returns uint8
        images. Returns {"crafted", "seconds", "complete"}."""
        from tqdm import tqdm

        pid_index = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in self.items}))}
        batch_number = {tuple(b): n for n, b in enumerate(self.batches)}
        crafted, start = 0, time.perf_counter()
        bar = tqdm(total=len(self.items), initial=len(self.done), desc="adversarial set", unit="img",
                   disable=not progress, dynamic_ncols=True, mininterval=1.0)
        for batch in pending:
            clean = load_clean_batch([self.items[i][0] for i in batch], transform)
            # class indices in fastreid's relabelling order (sorted pids), as classification attacks need
            pids = torch.tensor([pid_index[self.items[i][1]] for i in batch])
            torch.manual_seed(int(self.plan["seed"]) + batch_number[tuple(batch)])  # random starts
            adv = craft(clean, pids)
            linf = (adv.float() - clean).abs().flatten(1).amax(1)
            new = [(row, index) for row, index in enumerate(batch) if index not in self.done]
            for row, index in new:  # listed files of a batch recrafted for a lost one stay as they are
                entry = self._entry(index, linf[row].item())
                _save_png(adv[row].numpy(), os.path.join(self.out_dir, entry["file"]))
                self.done[index] = entry
            self._write(complete=False)
            crafted += len(new)
            bar.update(len(new))
        bar.close()
        complete = len(self.done) == len(self.items)
        if complete and not self.manifest["complete"]:
            self._write(complete=True)
        return {"crafted": crafted, "seconds": time.perf_counter() - start, "complete": complete}

"""Writing the balanced copy of a training split, resumably.

Why it cannot duplicate or lose images when killed at any point:

* every pseudo sample is a job of the plan with a fixed index, seed and file name
  (:func:`~robustreid.data.balancing.manifest.synthetic_file_name`), so regenerating a job rewrites the
  same file instead of adding one;
* an image is written to a hidden temporary file and renamed into place (a reader never sees half a
  JPEG); ``manifest.json`` is rewritten atomically after each chunk and lists only images whose file
  was complete before that rewrite;
* a rerun checks the manifest against the plan (digest) and the model (checkpoint sha256), drops
  temporary files, treats listed images with a missing file and unlisted files as not done, and
  generates exactly the jobs that are not done. The set is marked ``complete`` only at the end.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .manifest import (MANIFEST_FILE, MANIFEST_FORMAT, SYNTHETIC_NAME, TRAIN_DIR, BalancedSetError,
                       label_int, read_manifest, synthetic_file_name, write_manifest)
from .plan import BalancePlan, SyntheticJob, sort_key

__all__ = ["SimulatedKill", "BalancedSetWriter", "make_grid", "balanced_items"]

JPEG_QUALITY = 95


def remove_partial_files(train_dir: str) -> None:
    """Delete the half-written temporary files a killed run leaves in ``train_dir``."""
    for name in os.listdir(train_dir):
        if name.startswith(".") and name.endswith(".tmp"):
            os.remove(os.path.join(train_dir, name))


def link_real_images(items, train_dir: str) -> list:
    """Link each real training image (``items``: (path, pid, camid, ...)) into ``train_dir`` under its
    own name; returns their manifest entries. Two images with one name, or a real image named like a
    synthetic one, would be read back wrongly: BalancedSetError."""
    real, seen = [], {}
    for path, pid, camid in (item[:3] for item in items):
        name = os.path.basename(path)
        if name in seen:
            raise BalancedSetError(f"two training images share the file name {name}: "
                                   f"{seen[name]} and {path}")
        if SYNTHETIC_NAME.match(name):
            raise BalancedSetError(f"real image {path} is named like a synthetic one")
        seen[name] = path
        link_or_copy(path, os.path.join(train_dir, name))
        real.append({"file": f"{TRAIN_DIR}/{name}", "pid": str(pid), "camid": str(camid),
                     "source": os.path.abspath(path)})
    return real


class SimulatedKill(RuntimeError):
    """Raised by ``BalancedSetWriter.run(kill_after=N)``: stops right after the N-th image file is
    written and before the manifest records it, the worst moment for a real kill."""


def link_or_copy(src: str, dst: str) -> None:
    """Hard link ``src`` at ``dst`` (copy across file systems); atomic, idempotent."""
    if os.path.exists(dst):
        try:
            if os.path.samefile(src, dst) or os.path.getsize(src) == os.path.getsize(dst):
                return
        except OSError:
            pass
    tmp = os.path.join(os.path.dirname(dst), ".{}.tmp".format(os.path.basename(dst)))
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _save_jpeg(image: np.ndarray, path: str) -> None:
    from PIL import Image

    tmp = os.path.join(os.path.dirname(path), ".{}.tmp".format(os.path.basename(path)))
    img = Image.fromarray(image if image.shape[2] == 3 else image[:, :, 0])
    # 4:4:4 chroma: clothing colour is most of the identity signal
    img.save(tmp, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    os.replace(tmp, path)


def balanced_items(out_dir: str, manifest: Dict):
    """(real, synthetic) fastreid items [(abs path, pid, camid)] listed by a manifest."""
    real = [(os.path.join(out_dir, e["file"]), e["pid"], e["camid"]) for e in manifest["real"]]
    syn = [(os.path.join(out_dir, e["file"]), e["pid"], e["camid"]) for e in manifest["synthetic"]]
    return real, syn


class BalancedSetWriter:
    """Writes ``<out_dir>/bounding_box_train`` + ``manifest.json`` for ``plan`` over ``real_items``.

    ``checkpoint`` = {"path", "sha256", "step"} of the model the images come from; ``sampler`` and
    ``source`` are recorded as they are.
    """

    def __init__(self, out_dir: str, real_items: Sequence, plan: BalancePlan, seed: int,
                 checkpoint: Dict, sampler: Dict, source: Dict, image_size):
        self.out_dir = out_dir
        self.train_dir = os.path.join(out_dir, TRAIN_DIR)
        self.real_items = list(real_items)
        self.plan = plan
        self.seed = int(seed)
        self.jobs: List[SyntheticJob] = plan.jobs(self.seed)
        self.digest = plan.digest(self.seed)
        self.checkpoint = dict(checkpoint)
        self.sampler = dict(sampler)
        self.source = dict(source)
        self.image_size = [int(v) for v in image_size]
        self.manifest: Optional[Dict] = None
        self.done: Dict[int, Dict] = {}

    # ------------------------------------------------------------------------------------------
    def _entry(self, job: SyntheticJob) -> Dict:
        return {"file": "{}/{}".format(TRAIN_DIR, synthetic_file_name(job.pid, job.camid, job.index)),
                "index": job.index, "pid": str(job.pid), "camid": str(job.camid),
                "identity": label_int(job.pid), "camera": label_int(job.camid) + 1,
                "rule": job.rule, "seed": job.seed, "checkpoint_sha256": self.checkpoint["sha256"]}

    def _write(self, complete: bool = False) -> None:
        self.manifest["synthetic"] = [self.done[i] for i in sorted(self.done)]
        self.manifest["complete"] = bool(complete)
        write_manifest(self.out_dir, self.manifest)

    def prepare(self, restart: bool = False) -> List[SyntheticJob]:
        """Create or resume the set; returns the jobs still to generate."""
        os.makedirs(self.train_dir, exist_ok=True)
        manifest_path = os.path.join(self.out_dir, MANIFEST_FILE)
        old = None
        if os.path.exists(manifest_path):
            old = read_manifest(self.out_dir, require_complete=False)
            if restart:
                self._remove_synthetic(keep=set())
                old = None
            elif old.get("plan_digest") != self.digest:
                raise BalancedSetError(
                    f"{self.out_dir} holds a balanced set of another plan (dataset, delta1/delta2 or "
                    "seed differ): choose another --output or pass --restart to replace it")
            elif old.get("checkpoint", {}).get("sha256") != self.checkpoint["sha256"]:
                raise BalancedSetError(
                    f"{self.out_dir} was generated with another diffusion checkpoint "
                    f"(sha256 {old['checkpoint']['sha256'][:12]} != {self.checkpoint['sha256'][:12]}): "
                    "choose another --output or pass --restart to regenerate it")
        remove_partial_files(self.train_dir)
        real = link_real_images(self.real_items, self.train_dir)

        by_file = {self._entry(j)["file"]: j for j in self.jobs}
        self.done = {}
        if old is not None:
            for e in old.get("synthetic", []):
                job = by_file.get(e["file"])
                if job is not None and os.path.isfile(os.path.join(self.out_dir, e["file"])):
                    self.done[job.index] = e
        self.manifest = {
            "format": MANIFEST_FORMAT, "complete": False, "source": self.source,
            "plan": self.plan.to_json(), "plan_digest": self.digest, "seed": self.seed,
            "checkpoint": self.checkpoint, "sampler": self.sampler, "image_size": self.image_size,
            "real": real, "synthetic": [],
        }
        # a finished set stays "complete" while a rerun checks it (trainers may be reading it)
        self._write(complete=len(self.done) == len(self.jobs))
        return [j for j in self.jobs if j.index not in self.done]

    def _remove_synthetic(self, keep) -> int:
        removed = 0
        for name in os.listdir(self.train_dir):
            if SYNTHETIC_NAME.match(name) and f"{TRAIN_DIR}/{name}" not in keep:
                os.remove(os.path.join(self.train_dir, name))
                removed += 1
        return removed

    def run(self, sample_fn: Callable[[List[SyntheticJob]], np.ndarray], batch_size: int,
            max_new: Optional[int] = None, kill_after: Optional[int] = None,
            progress: bool = True) -> Dict:
        """Generate the pending jobs in chunks of ``batch_size``; the manifest is rewritten after
        each chunk. ``sample_fn(jobs)`` returns uint8 images (B, C, H, W).

        ``max_new``: stop cleanly after that many new images (manifest up to date, set incomplete).
        ``kill_after``: raise :class:`SimulatedKill` right after that many image files are written,
        before the manifest lists them (tests of resumption).
        """
        from tqdm import tqdm

        if self.manifest is None:
            raise RuntimeError("call prepare() first")
        pending = [j for j in self.jobs if j.index not in self.done]
        if max_new is not None:
            pending = pending[:max(0, int(max_new))]
        written, sample_seconds, wall_start = 0, 0.0, time.perf_counter()
        bar = tqdm(total=len(self.jobs), initial=len(self.done), desc="generate", unit="img",
                   disable=not progress, dynamic_ncols=True, mininterval=1.0)
        for start in range(0, len(pending), max(1, int(batch_size))):
            chunk = pending[start:start + int(batch_size)]
            t0 = time.perf_counter()
            images = np.asarray(sample_fn(chunk))
            sample_seconds += time.perf_counter() - t0
            for job, img in zip(chunk, images):
                entry = self._entry(job)
                _save_jpeg(np.ascontiguousarray(img.transpose(1, 2, 0)),
                           os.path.join(self.out_dir, entry["file"]))
                written += 1
                if kill_after is not None and written >= kill_after:
                    bar.close()
                    raise SimulatedKill(f"simulated kill after {written} images")
                self.done[job.index] = entry
            self._write(complete=False)
            bar.update(len(chunk))
        bar.close()
        complete = len(self.done) == len(self.jobs)
        if complete:
            keep = {e["file"] for e in self.done.values()}
            self._remove_synthetic(keep)  # files of jobs no longer planned (only after --restart)
            self._write(complete=True)
        # seconds: wall clock of the whole loop (sampling, JPEG writing, manifest updates)
        return {"generated": written, "seconds": time.perf_counter() - wall_start,
                "sample_seconds": sample_seconds, "complete": complete,
                "done": len(self.done), "planned": len(self.jobs)}


def make_grid(out_dir: str, manifest: Dict, png_path: str, num_ids: int = 8, per_row: int = 6,
              size=(128, 64)) -> List[str]:
    """Real (green border) vs generated (orange border) images per identity, like DDDefense Fig. 5.

    Shows identities filled by eq. 1 (fewest real images first) and diversified by eq. 2 (largest
    camera share first), half each when both exist. Returns the identities shown.
    """
    from PIL import Image, ImageDraw

    real, syn = {}, {}
    for e in manifest["real"]:
        real.setdefault(e["pid"], []).append(e)
    rules = {}
    for e in manifest["synthetic"]:
        syn.setdefault(e["pid"], []).append(e)
        rules.setdefault(e["pid"], set()).add(e["rule"])
    eq1 = sorted((p for p in syn if "eq1" in rules[p]), key=lambda p: (len(real.get(p, [])), sort_key(p)))
    eq2 = sorted((p for p in syn if "eq2" in rules[p] and p not in eq1),
                 key=lambda p: (len(real.get(p, [])), sort_key(p)), reverse=True)
    half = num_ids // 2
    chosen = eq1[:max(half, num_ids - len(eq2))]
    chosen += eq2[:num_ids - len(chosen)]
    # small (CPU) images are enlarged to ~128 px high with nearest-neighbour, so pixels stay honest
    scale = max(1, int(round(128 / int(size[0]))))
    h, w = int(size[0]) * scale, int(size[1]) * scale
    border, gap, label_w, sep = 3, 3, 80, 12
    cell_w, cell_h = w + 2 * border + gap, h + 2 * border + gap
    canvas = Image.new("RGB", (label_w + 2 * per_row * cell_w + sep, max(1, len(chosen)) * cell_h + gap), "white")
    draw = ImageDraw.Draw(canvas)

    def paste(path, col, row, colour):
        x = label_w + col * cell_w + (sep if col >= per_row else 0)
        y = gap + row * cell_h
        draw.rectangle([x, y, x + w + 2 * border - 1, y + h + 2 * border - 1], fill=colour)
        with Image.open(path) as img:
            img = img.convert("RGB").resize((int(size[1]), int(size[0])), Image.BICUBIC)
            canvas.paste(img.resize((w, h), Image.NEAREST), (x + border, y + border))

    for row, pid in enumerate(chosen):
        draw.text((4, gap + row * cell_h + h // 2 - 18), "id {}\n{} real\n+{} synthetic".format(
            label_int(pid), len(real.get(pid, [])), len(syn[pid])), fill="black")
        reals = sorted(real.get(pid, []), key=lambda e: e["file"])[:per_row]
        for col, e in enumerate(reals):
            paste(os.path.join(out_dir, e["file"]), col, row, (40, 170, 60))
        # generated: spread over the cameras asked for
        gens = sorted(syn[pid], key=lambda e: (e["index"] % 997, e["index"]))
        by_cam = {}
        for e in gens:
            by_cam.setdefault(e["camid"], []).append(e)
        picked = []
        while len(picked) < per_row and any(by_cam.values()):
            for cam in sorted(by_cam, key=sort_key):
                if by_cam[cam] and len(picked) < per_row:
                    picked.append(by_cam[cam].pop(0))
        for col, e in enumerate(picked):
            paste(os.path.join(out_dir, e["file"]), per_row + col, row, (245, 140, 20))
    tmp = png_path + ".tmp.png"
    canvas.save(tmp)
    os.replace(tmp, png_path)
    return chosen

"""SynthReID: a procedurally generated, pedestrian-like ReID dataset that needs no download.

Why it exists: the demo, the tests and the robustness / domain-generalization experiments need a
dataset that (a) exists on every machine, (b) is small enough to train on 2 CPU cores in minutes,
and (c) has *known* nuisance factors (camera, domain, time of day) to study.

What an image is: a figure (head, hair, torso, arms, legs, shoes, optional bag) drawn with numpy on
a camera-specific background. Identity = clothing colours / patterns / body shape / bag; nuisance =
camera background, illumination gain and colour cast, viewpoint (mirror, back view, shift, scale,
walking pose), blur, sensor noise and a time-of-day tint (morning / noon / afternoon).

On-disk format: Market-1501's (``bounding_box_train``, ``bounding_box_test``, ``query``, names like
``0002_c1s2_000451_01.jpg``; the ``s`` field is ``time_id + 1``), written on first use under
``<root>/<spec.dir_name>`` and read back with fastreid's own Market1501 parser. Per-image side
information (split, pid, camid, domain, time of day, identity, viewpoint, and the figure's 18 2D
joints in COCO-18 / OpenPose order: ``keypoints``, see robustreid.data.keypoints) is stored in
``meta.json`` (see :func:`load_side_info`). Generation is deterministic (same spec -> same bytes)
and atomic (a temp dir is renamed into place, ``manifest.json`` with the spec hash is written last),
so an interrupted run never leaves a dataset that is later trusted.

Registered datasets (``DATASET_REGISTRY``):
    ``SynthReID``       demo default: 6 cameras (2 per domain), ~1000 train / 100 query / ~500 gallery
    ``SynthReIDTiny``   64x32 images, ~100 images in total, for tests
    ``SynthReID_D{k}``  domain k only (4 cameras of that domain's style), own train/query/gallery
    ``SynthReIDTiny_D{k}`` tiny per-domain variants, for fast domain-generalization tests
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import os.path as osp
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.data.datasets.bases import ImageDataset

from .registry import register_dataset
from fastreid.data.datasets.market1501 import Market1501

from .synth_render import (_TAG_DISTRACTOR, _TAG_IMAGE, _TAG_PLAN, DOMAIN_NAMES, TIME_LABELS,
                           CameraStyle, Identity, _rng, draw_framing, figure_keypoints,
                           make_camera_style, make_identity, render_image)

logger = logging.getLogger(__name__)

__all__ = [
    "GENERATOR_VERSION", "TIME_LABELS", "DOMAIN_NAMES", "SIDE_INFO_FILE", "MANIFEST_FILE",
    "SynthSpec", "Identity", "CameraStyle", "ImageRecord",
    "make_identity", "make_camera_style", "render_image", "plan_dataset", "spec_hash",
    "generate_dataset", "ensure_synth_dataset", "record_keypoints", "is_trusted", "load_side_info",
    "side_info_for",
    "SynthReID", "SynthReIDTiny", "SynthReID_D0", "SynthReID_D1", "SynthReID_D2",
    "SynthReIDTiny_D0", "SynthReIDTiny_D1", "SynthReIDTiny_D2",
]

# Bump whenever drawing / planning code changes the images: it is part of the spec hash, so datasets
# written by older code are regenerated instead of silently reused. Not bumped for the keypoints in
# meta.json (same pixels): datasets generated before them get them added (ensure_synth_dataset).
GENERATOR_VERSION = 1

SIDE_INFO_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


# ----------------------------------------------------------------------------------------------
# Specs and planned images
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthSpec:
    """Everything that determines a generated dataset (hashed into the manifest)."""
    dir_name: str
    seed: int = 0
    num_train_ids: int = 100
    num_test_ids: int = 50
    mean_train_imgs: float = 10.0      # long-tailed per-identity counts with this mean
    mean_test_imgs: float = 12.0
    min_imgs: int = 2
    max_imgs: int = 40
    zipf_exponent: float = 0.9
    queries_per_id: int = 2            # from distinct cameras
    num_distractors: int = 20          # pid 0 gallery images (one-off people, as Market's "junk")
    height: int = 128
    width: int = 64
    # Market camera c{i+1} = cameras[i] = (domain index, style index within that domain).
    cameras: Tuple[Tuple[int, int], ...] = ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1))
    # P(an identity is seen by 1, 2, 3, ... cameras); truncated to the number of cameras.
    cams_per_id_probs: Tuple[float, ...] = (0.20, 0.30, 0.20, 0.15, 0.10, 0.05)
    id_offset: int = 0                 # global identity = id_offset + pid (disjoint across variants)
    jpeg_quality: int = 95

    def __post_init__(self):
        # Limits of fastreid's Market-1501 parser (cameras c1-c6, pids <= 1501) and of the protocol
        # (a query needs its identity in the gallery under another camera).
        if not 2 <= len(self.cameras) <= 6:
            raise ValueError("SynthSpec needs 2 to 6 cameras, got {}".format(len(self.cameras)))
        if self.num_train_ids + self.num_test_ids > 1501:
            raise ValueError("SynthSpec supports at most 1501 identities")
        if self.queries_per_id < 1 or self.min_imgs < 1 or self.max_imgs < self.min_imgs:
            raise ValueError("SynthSpec: need queries_per_id >= 1 and 1 <= min_imgs <= max_imgs")

    @property
    def num_cams(self) -> int:
        return len(self.cameras)


@dataclass(frozen=True)
class ImageRecord:
    """One planned image: where it goes and what it shows."""
    split: str            # train | query | gallery
    pid: int              # 0 = distractor
    cam: int              # 1-based Market camera number
    frame: int            # unique running index (also the render seed)
    time_id: int

    @property
    def file_name(self) -> str:
        return "{:04d}_c{}s{}_{:06d}_01.jpg".format(self.pid, self.cam, self.time_id + 1, self.frame)

    @property
    def rel_path(self) -> str:
        return SPLIT_DIRS[self.split] + "/" + self.file_name


# ----------------------------------------------------------------------------------------------
# Planning: who is seen by which camera how often
# ----------------------------------------------------------------------------------------------
def _zipf_counts(n: int, mean: float, exponent: float, lo: int, hi: int) -> np.ndarray:
    """Long-tailed counts ``clip(round(s * rank^-a), lo, hi)`` with ``s`` chosen to hit ``mean``."""
    ranks = np.arange(1, n + 1, dtype=np.float64)

    def counts(s):
        return np.clip(np.round(s * ranks ** -exponent), lo, hi).astype(np.int64)

    s_lo, s_hi = 0.0, float(hi) * n ** exponent + hi
    for _ in range(60):  # bisection on the monotone mean(s)
        mid = (s_lo + s_hi) / 2
        s_lo, s_hi = (mid, s_hi) if counts(mid).mean() < mean else (s_lo, mid)
    return counts(s_hi)


def _pick_cameras(rng, spec: SynthSpec, count: int, min_cams: int) -> np.ndarray:
    probs = np.asarray(spec.cams_per_id_probs[:spec.num_cams], np.float64)
    k = int(rng.choice(len(probs), p=probs / probs.sum())) + 1
    k = max(min_cams, min(k, count))
    return np.sort(rng.choice(spec.num_cams, size=k, replace=False)) + 1


def plan_dataset(spec: SynthSpec) -> List[ImageRecord]:
    """Deterministic list of every image of ``spec`` (no drawing; cheap)."""
    rng = _rng(spec.seed, _TAG_PLAN, spec.id_offset)
    cameras = [make_camera_style(spec.seed, d, i) for d, i in spec.cameras]
    records: List[ImageRecord] = []

    def add(split, pid, cam):
        probs = np.asarray(cameras[cam - 1].time_probs)
        time_id = int(rng.choice(len(TIME_LABELS), p=probs / probs.sum()))
        records.append(ImageRecord(split, pid, int(cam), len(records) + 1, time_id))

    train_counts = rng.permutation(_zipf_counts(spec.num_train_ids, spec.mean_train_imgs,
                                                spec.zipf_exponent, spec.min_imgs, spec.max_imgs))
    for pid, count in enumerate(train_counts, start=1):
        cams = _pick_cameras(rng, spec, int(count), min_cams=1)
        # every chosen camera sees the person at least once, the rest is random among them
        for cam in rng.permutation(np.concatenate([cams, rng.choice(cams, int(count) - len(cams))])):
            add("train", pid, cam)

    test_counts = rng.permutation(_zipf_counts(spec.num_test_ids, spec.mean_test_imgs,
                                               spec.zipf_exponent, spec.min_imgs, spec.max_imgs))
    for pid, count in enumerate(test_counts, start=spec.num_train_ids + 1):
        # >= 2 cameras and >= 2 images per camera: every query keeps a cross-camera match in the
        # gallery, as fastreid's evaluation requires.
        cams = _pick_cameras(rng, spec, int(count), min_cams=min(2, spec.num_cams))
        count = max(int(count), 2 * len(cams))
        query_cams = set(rng.choice(cams, size=min(spec.queries_per_id, len(cams)), replace=False).tolist())
        cam_list = rng.permutation(np.concatenate([cams, cams, rng.choice(cams, count - 2 * len(cams))]))
        for cam in cam_list:
            split = "query" if int(cam) in query_cams else "gallery"
            query_cams.discard(int(cam))
            add(split, pid, cam)

    for _ in range(spec.num_distractors):
        add("gallery", 0, int(rng.integers(spec.num_cams)) + 1)
    return records


def spec_hash(spec: SynthSpec) -> str:
    payload = json.dumps({"generator_version": GENERATOR_VERSION, "spec": dataclasses.asdict(spec)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Writing (deterministic, atomic)
# ----------------------------------------------------------------------------------------------
def _save_jpeg(image: np.ndarray, path: str, quality: int) -> None:
    # 4:4:4 chroma: clothing colours are the identity signal, don't smear them.
    Image.fromarray(image).save(path, format="JPEG", quality=quality, subsampling=0)


def _record_identity(spec: SynthSpec, record: ImageRecord):
    """The image's random stream and the person it shows (its first draw, for a distractor)."""
    rng = _rng(spec.seed, _TAG_IMAGE, spec.id_offset, record.frame)
    if record.pid == 0:  # distractor: a one-off person, or empty background (a false detection)
        identity = None if rng.random() < 0.3 else make_identity(
            spec.seed, spec.id_offset * 1000 + record.frame, tag=_TAG_DISTRACTOR)
    else:
        identity = make_identity(spec.seed, spec.id_offset + record.pid)
    return rng, identity


def _render_record(spec: SynthSpec, record: ImageRecord, cameras: Sequence[CameraStyle]):
    rng, identity = _record_identity(spec, record)
    return render_image(identity, cameras[record.cam - 1], record.time_id, rng, spec.height, spec.width)


def record_keypoints(spec: SynthSpec, record: ImageRecord, cameras: Sequence[CameraStyle]):
    """The joints :func:`_render_record` reports for ``record``, from its draws alone (no drawing)."""
    rng, identity = _record_identity(spec, record)
    framing = draw_framing(identity, cameras[record.cam - 1], rng, spec.height, spec.width)
    return figure_keypoints(identity, framing.figure, spec.height, spec.width)


def _side_info(spec: SynthSpec, record: ImageRecord, view: Dict) -> Dict:
    domain = spec.cameras[record.cam - 1][0]
    return {
        "split": record.split, "pid": record.pid, "camid": record.cam - 1,
        "identity": spec.id_offset + record.pid if record.pid > 0 else -1,
        "domain": domain, "domain_name": DOMAIN_NAMES[domain],
        "time_id": record.time_id, "time": TIME_LABELS[record.time_id],
        "flipped": bool(view["flipped"]), "back_view": bool(view["back_view"]),
        "keypoints": view["keypoints"],
    }


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def _add_missing_keypoints(dataset_dir: str, spec: SynthSpec) -> None:
    """A dataset generated before meta.json held keypoints gets them, replayed from each image's
    draws (the pixels are those of today's renderer). The new meta.json replaces the old one in one
    rename: a reader sees either file whole."""
    path = osp.join(dataset_dir, SIDE_INFO_FILE)
    with open(path) as f:
        meta = json.load(f)
    if all("keypoints" in info for info in meta.values()):
        return
    cameras = [make_camera_style(spec.seed, d, i) for d, i in spec.cameras]
    for record in plan_dataset(spec):
        meta[record.rel_path]["keypoints"] = record_keypoints(spec, record, cameras)
    tmp = "{}.tmp-{}".format(path, uuid.uuid4().hex[:8])
    _write_json(tmp, meta)
    os.replace(tmp, path)


def generate_dataset(out_dir: str, spec: SynthSpec) -> Dict[str, int]:
    """Write ``spec`` into ``out_dir`` (not atomic by itself: see :func:`ensure_synth_dataset`).

    ``manifest.json`` is written last, so its presence marks a complete dataset.
    Returns the number of images per split directory.
    """
    records = plan_dataset(spec)
    cameras = [make_camera_style(spec.seed, d, i) for d, i in spec.cameras]
    for sub in SPLIT_DIRS.values():
        os.makedirs(osp.join(out_dir, sub), exist_ok=True)
    meta = {}
    for record in records:
        image, view = _render_record(spec, record, cameras)
        _save_jpeg(image, osp.join(out_dir, record.rel_path), spec.jpeg_quality)
        meta[record.rel_path] = _side_info(spec, record, view)
    _write_json(osp.join(out_dir, SIDE_INFO_FILE), meta)
    counts = {sub: sum(r.split == split for r in records) for split, sub in SPLIT_DIRS.items()}
    _write_json(osp.join(out_dir, MANIFEST_FILE), {
        "generator_version": GENERATOR_VERSION, "spec": dataclasses.asdict(spec),
        "spec_hash": spec_hash(spec), "counts": counts,
        "domains": list(DOMAIN_NAMES), "time_labels": list(TIME_LABELS),
    })
    return counts


def is_trusted(dataset_dir: str, spec: SynthSpec) -> bool:
    """True if ``dataset_dir`` holds a complete dataset generated from exactly ``spec``."""
    try:
        with open(osp.join(dataset_dir, MANIFEST_FILE)) as f:
            manifest = json.load(f)
        if manifest.get("spec_hash") != spec_hash(spec):
            return False
        if not osp.isfile(osp.join(dataset_dir, SIDE_INFO_FILE)):
            return False
        # cheap completeness check: the number of images per split matches the manifest
        return all(
            sum(name.endswith(".jpg") for name in os.listdir(osp.join(dataset_dir, sub))) == n
            for sub, n in manifest["counts"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _install(tmp_dir: str, target: str, spec: SynthSpec) -> None:
    """Move a finished ``tmp_dir`` to ``target``; an untrusted old ``target`` is moved aside first.

    Tolerates a concurrent generator (another rank / process) that wins the race.
    """
    stale = None
    if osp.lexists(target):
        if is_trusted(target, spec):
            shutil.rmtree(tmp_dir, ignore_errors=True)
            return
        stale = "{}.stale-{}".format(target, uuid.uuid4().hex[:8])
        try:
            os.rename(target, stale)
        except FileNotFoundError:
            stale = None
    try:
        os.rename(tmp_dir, target)
    except OSError:
        if not is_trusted(target, spec):
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if stale is not None:
        if osp.isdir(stale) and not osp.islink(stale):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.remove(stale)


def ensure_synth_dataset(root: str, spec: SynthSpec, verbose: bool = True) -> str:
    """Return ``<root>/<spec.dir_name>``, generating it first unless a trusted copy exists."""
    target = osp.join(root, spec.dir_name)
    if is_trusted(target, spec):
        _add_missing_keypoints(target, spec)
        return target
    os.makedirs(root, exist_ok=True)
    num_images = len(plan_dataset(spec))
    if verbose:
        print("[SynthReID] generating {} images under {} ...".format(num_images, target), flush=True)
    start = time.perf_counter()
    tmp_dir = tempfile.mkdtemp(prefix=".{}.tmp-".format(spec.dir_name), dir=root)
    try:
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; the dataset should be shared-readable
        generate_dataset(tmp_dir, spec)
        _install(tmp_dir, target, spec)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("SynthReID %s: %d images in %.1fs", spec.dir_name, num_images, time.perf_counter() - start)
    return target


# ----------------------------------------------------------------------------------------------
# Side information
# ----------------------------------------------------------------------------------------------
def load_side_info(dataset_dir: str) -> Dict[str, Dict]:
    """``{"bounding_box_train/0001_c1s1_000001_01.jpg": {split, pid, camid, identity, domain,
    domain_name, time_id, time, flipped, back_view, keypoints}, ...}`` for a generated dataset
    (``keypoints``: 18 ``[x, y, v]``, robustreid.data.keypoints)."""
    with open(osp.join(dataset_dir, SIDE_INFO_FILE)) as f:
        return json.load(f)


@functools.lru_cache(maxsize=32)
def _side_info_cached(dataset_dir: str, mtime_ns: int) -> Dict[str, Dict]:
    return load_side_info(dataset_dir)


def _cached_side_info(dataset_dir: str) -> Dict[str, Dict]:
    # keyed on the file's mtime so a regenerated dataset is never answered from a stale cache
    return _side_info_cached(dataset_dir, os.stat(osp.join(dataset_dir, SIDE_INFO_FILE)).st_mtime_ns)


def side_info_for(img_path: str) -> Dict:
    """Side information of one image path as found in fastreid items / batches (``img_paths``)."""
    split_dir = osp.dirname(osp.abspath(img_path))
    info = _cached_side_info(osp.dirname(split_dir))
    return info[osp.basename(split_dir) + "/" + osp.basename(img_path)]


# ----------------------------------------------------------------------------------------------
# fastreid datasets
# ----------------------------------------------------------------------------------------------
class _SynthReIDBase(Market1501):
    """Generates ``spec`` under ``root`` if needed, then parses it as Market-1501."""
    spec: SynthSpec = None
    dataset_name = "synthreid"

    def __init__(self, root="datasets", **kwargs):
        self.root = root
        self.dataset_dir = ensure_synth_dataset(root, self.spec)
        self.data_dir = self.dataset_dir
        self.train_dir = osp.join(self.dataset_dir, SPLIT_DIRS["train"])
        self.query_dir = osp.join(self.dataset_dir, SPLIT_DIRS["query"])
        self.gallery_dir = osp.join(self.dataset_dir, SPLIT_DIRS["gallery"])
        self.market1501_500k = False
        self.check_before_run([self.data_dir, self.train_dir, self.query_dir, self.gallery_dir])

        train = lambda: self.process_dir(self.train_dir)  # noqa: E731
        query = lambda: self.process_dir(self.query_dir, is_train=False)  # noqa: E731
        gallery = lambda: self.process_dir(self.gallery_dir, is_train=False)  # noqa: E731
        # Skip Market1501.__init__ (it looks for Market's own folder names); keep its process_dir.
        ImageDataset.__init__(self, train, query, gallery, **kwargs)

    def process_dir(self, dir_path, is_train=True):
        # glob order is file-system dependent; sort for reproducible training.
        return sorted(super().process_dir(dir_path, is_train=is_train), key=lambda item: item[0])

    @property
    def side_info(self) -> Dict[str, Dict]:
        """All per-image side information (see :func:`load_side_info`)."""
        return _cached_side_info(self.dataset_dir)

    def side_info_for(self, img_path: str) -> Dict:
        return side_info_for(img_path)


_TINY = dict(num_train_ids=12, num_test_ids=8, mean_train_imgs=5.0, mean_test_imgs=5.0,
             max_imgs=12, num_distractors=2, height=64, width=32)
_DOMAIN_ONLY = dict(num_train_ids=60, num_test_ids=30, mean_train_imgs=8.0, mean_test_imgs=10.0,
                    num_distractors=10, cams_per_id_probs=(0.25, 0.35, 0.25, 0.15))


def _domain_cameras(domain: int) -> Tuple[Tuple[int, int], ...]:
    return tuple((domain, i) for i in range(4))


@register_dataset
class SynthReID(_SynthReIDBase):
    """Demo default: 100 train ids (~1000 imgs), 50 test ids (100 queries, ~500 gallery), 6 cameras
    from 3 domains (c1-c2 indoor_mall, c3-c4 city_street, c5-c6 park_dusk), 128x64."""
    spec = SynthSpec(dir_name="SynthReID")
    dataset_name = "synthreid"


@register_dataset
class SynthReIDTiny(_SynthReIDBase):
    """Test-sized: 12 train ids, 8 test ids, 6 cameras / 3 domains, 64x32, ~110 images."""
    spec = SynthSpec(dir_name="SynthReIDTiny", id_offset=900000, **_TINY)
    dataset_name = "synthreidtiny"


@register_dataset
class SynthReID_D0(_SynthReIDBase):
    """Domain 0 (indoor_mall) only: 4 cameras, 60 train ids, 30 test ids."""
    spec = SynthSpec(dir_name="SynthReID_D0", id_offset=100000, cameras=_domain_cameras(0), **_DOMAIN_ONLY)
    dataset_name = "synthreid_d0"


@register_dataset
class SynthReID_D1(_SynthReIDBase):
    """Domain 1 (city_street) only: 4 cameras, 60 train ids, 30 test ids."""
    spec = SynthSpec(dir_name="SynthReID_D1", id_offset=200000, cameras=_domain_cameras(1), **_DOMAIN_ONLY)
    dataset_name = "synthreid_d1"


@register_dataset
class SynthReID_D2(_SynthReIDBase):
    """Domain 2 (park_dusk) only: 4 cameras, 60 train ids, 30 test ids."""
    spec = SynthSpec(dir_name="SynthReID_D2", id_offset=300000, cameras=_domain_cameras(2), **_DOMAIN_ONLY)
    dataset_name = "synthreid_d2"


def _tiny_domain_spec(domain: int) -> SynthSpec:
    return SynthSpec(dir_name="SynthReIDTiny_D{}".format(domain), id_offset=910000 + 1000 * domain,
                     cameras=_domain_cameras(domain), cams_per_id_probs=(0.25, 0.35, 0.25, 0.15),
                     **_TINY)


@register_dataset
class SynthReIDTiny_D0(_SynthReIDBase):
    """Tiny, domain 0 only (for fast domain-generalization tests)."""
    spec = _tiny_domain_spec(0)
    dataset_name = "synthreidtiny_d0"


@register_dataset
class SynthReIDTiny_D1(_SynthReIDBase):
    """Tiny, domain 1 only."""
    spec = _tiny_domain_spec(1)
    dataset_name = "synthreidtiny_d1"


@register_dataset
class SynthReIDTiny_D2(_SynthReIDBase):
    """Tiny, domain 2 only."""
    spec = _tiny_domain_spec(2)
    dataset_name = "synthreidtiny_d2"

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
information (split, pid, camid, domain, time of day, identity, viewpoint) is stored in
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

import colorsys
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
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.data.datasets.bases import ImageDataset
from fastreid.data.datasets.market1501 import Market1501

logger = logging.getLogger(__name__)

__all__ = [
    "GENERATOR_VERSION", "TIME_LABELS", "DOMAIN_NAMES", "SIDE_INFO_FILE", "MANIFEST_FILE",
    "SynthSpec", "Identity", "CameraStyle", "ImageRecord",
    "make_identity", "make_camera_style", "render_image", "plan_dataset", "spec_hash",
    "generate_dataset", "ensure_synth_dataset", "is_trusted", "load_side_info", "side_info_for",
    "SynthReID", "SynthReIDTiny", "SynthReID_D0", "SynthReID_D1", "SynthReID_D2",
    "SynthReIDTiny_D0", "SynthReIDTiny_D1", "SynthReIDTiny_D2",
]

# Bump whenever drawing / planning code changes: it is part of the spec hash, so datasets written
# by older code are regenerated instead of silently reused.
GENERATOR_VERSION = 1

TIME_LABELS = ("morning", "noon", "afternoon")
SIDE_INFO_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

# Time of day acts on the whole frame: (global gain, RGB tint).
_TIME_LIGHT = (
    (0.85, (0.92, 0.98, 1.10)),  # morning: dimmer, bluish
    (1.10, (1.00, 1.00, 1.00)),  # noon: bright, neutral
    (0.95, (1.12, 0.98, 0.82)),  # afternoon: warm, orange
)

# Domain = a family of camera styles. Cameras of one domain share texture type, palette and optics
# (each camera jitters them); different domains differ strongly, which is what DG methods must bridge.
_DOMAINS = (
    dict(name="indoor_mall", texture="tiles", colour_a=(0.78, 0.72, 0.62), colour_b=(0.52, 0.47, 0.42),
         gain=1.00, cast=(1.08, 1.00, 0.86), contrast=0.90, blur=0.6, noise=0.020, scale=0.90,
         p_flip=0.3, p_back=0.3),
    dict(name="city_street", texture="street", colour_a=(0.55, 0.60, 0.68), colour_b=(0.36, 0.36, 0.39),
         gain=1.20, cast=(0.88, 0.98, 1.15), contrast=1.15, blur=0.0, noise=0.015, scale=0.80,
         p_flip=0.7, p_back=0.4),
    dict(name="park_dusk", texture="foliage", colour_a=(0.20, 0.36, 0.18), colour_b=(0.38, 0.32, 0.26),
         gain=0.72, cast=(0.95, 1.08, 0.90), contrast=0.85, blur=1.2, noise=0.040, scale=0.95,
         p_flip=0.5, p_back=0.5),
)
DOMAIN_NAMES = tuple(d["name"] for d in _DOMAINS)

# Seed-stream tags: every random draw comes from SeedSequence([seed, tag, ...]) so that e.g. adding
# an image never changes another identity's clothes.
_TAG_IDENTITY, _TAG_CAMERA, _TAG_IMAGE, _TAG_PLAN, _TAG_DISTRACTOR = 1, 2, 3, 4, 5


# ----------------------------------------------------------------------------------------------
# Specs, identities, cameras
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
class Identity:
    """Appearance of one person (the learnable signal)."""
    top: Tuple[float, float, float]
    top_alt: Tuple[float, float, float]
    top_pattern: str                   # plain | hstripes | vstripes | checks | twotone
    stripe_period: float               # fraction of person height
    bottom: Tuple[float, float, float]
    bottom_style: str                  # trousers | shorts | skirt
    skin: Tuple[float, float, float]
    hair: Tuple[float, float, float]
    long_hair: bool
    shoes: Tuple[float, float, float]
    long_sleeves: bool
    bag: str                           # none | backpack | shoulder
    bag_colour: Tuple[float, float, float]
    bag_side: int                      # +1 right / -1 left (mirrors with the view)
    height_frac: float                 # person height / frame height
    width_frac: float                  # body width multiplier


@dataclass(frozen=True)
class CameraStyle:
    """Nuisance parameters of one camera (fixed background, optics, viewing habits)."""
    domain: int
    index: int
    texture: str
    colour_a: Tuple[float, float, float]
    colour_b: Tuple[float, float, float]
    horizon: float
    texture_period: float
    gain: float
    cast: Tuple[float, float, float]
    contrast: float
    blur: float
    noise: float
    scale: float
    p_flip: float
    p_back: float
    time_probs: Tuple[float, float, float]
    bg_seed: int


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


def _rng(*keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in keys])))


def _round3(values) -> Tuple[float, ...]:
    # Rounded so specs / identities are stable, readable and hash the same everywhere.
    return tuple(round(float(v), 4) for v in values)


def _sample_colour(rng: np.random.Generator) -> Tuple[float, float, float]:
    """Clothing colour: mostly saturated hues, a quarter greys / black / white (as in real crowds)."""
    if rng.random() < 0.25:
        v = float(np.clip(rng.choice([0.10, 0.35, 0.62, 0.90]) + rng.uniform(-0.05, 0.05), 0, 1))
        return _round3((v, v, v))
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.45, 0.95), rng.uniform(0.35, 0.95))
    return _round3(rgb)


_SKIN_TONES = ((0.96, 0.80, 0.69), (0.88, 0.67, 0.52), (0.76, 0.55, 0.40), (0.55, 0.38, 0.26),
               (0.36, 0.24, 0.16))
_HAIR_TONES = ((0.08, 0.06, 0.05), (0.25, 0.16, 0.09), (0.45, 0.30, 0.15), (0.80, 0.68, 0.45),
               (0.55, 0.55, 0.55))


def make_identity(seed: int, global_id: int, tag: int = _TAG_IDENTITY) -> Identity:
    """Deterministic appearance of identity ``global_id`` (shared by all dataset variants).

    ``tag`` selects an independent stream (distractors use their own, so they never repeat a
    labelled identity).
    """
    rng = _rng(seed, tag, global_id)
    skin = np.array(_SKIN_TONES[rng.integers(len(_SKIN_TONES))]) * rng.uniform(0.95, 1.05)
    hair = np.array(_HAIR_TONES[rng.integers(len(_HAIR_TONES))]) * rng.uniform(0.9, 1.1)
    shoes = _sample_colour(rng) if rng.random() < 0.3 else _round3([rng.uniform(0.05, 0.3)] * 3)
    return Identity(
        top=_sample_colour(rng),
        top_alt=_sample_colour(rng),
        top_pattern=str(rng.choice(["plain", "plain", "hstripes", "vstripes", "checks", "twotone"])),
        stripe_period=round(float(rng.uniform(0.035, 0.07)), 4),
        bottom=_sample_colour(rng),
        bottom_style=str(rng.choice(["trousers", "trousers", "trousers", "shorts", "skirt"])),
        skin=_round3(np.clip(skin, 0, 1)),
        hair=_round3(np.clip(hair, 0, 1)),
        long_hair=bool(rng.random() < 0.3),
        shoes=shoes,
        long_sleeves=bool(rng.random() < 0.6),
        bag=str(rng.choice(["none", "none", "backpack", "shoulder"])),
        bag_colour=_sample_colour(rng),
        bag_side=int(rng.choice([-1, 1])),
        height_frac=round(float(rng.uniform(0.80, 0.96)), 4),
        width_frac=round(float(rng.uniform(0.80, 1.20)), 4),
    )


def make_camera_style(seed: int, domain: int, index: int) -> CameraStyle:
    """Camera ``index`` of ``domain``: the domain's style with per-camera jitter."""
    base = _DOMAINS[domain]
    rng = _rng(seed, _TAG_CAMERA, domain, index)

    def jitter_colour(c):
        return _round3(np.clip(np.asarray(c) + rng.uniform(-0.07, 0.07, 3), 0, 1))

    return CameraStyle(
        domain=domain, index=index, texture=base["texture"],
        colour_a=jitter_colour(base["colour_a"]), colour_b=jitter_colour(base["colour_b"]),
        horizon=round(float(rng.uniform(0.5, 0.68)), 4),
        texture_period=round(float(rng.uniform(0.08, 0.14)), 4),
        gain=round(base["gain"] * float(rng.uniform(0.9, 1.1)), 4),
        cast=_round3(np.asarray(base["cast"]) * rng.uniform(0.95, 1.05, 3)),
        contrast=round(base["contrast"] * float(rng.uniform(0.95, 1.05)), 4),
        blur=round(max(0.0, base["blur"] + float(rng.uniform(-0.2, 0.2))), 4),
        noise=round(base["noise"] * float(rng.uniform(0.8, 1.2)), 4),
        scale=round(base["scale"] * float(rng.uniform(0.95, 1.05)), 4),
        p_flip=round(float(np.clip(base["p_flip"] + rng.uniform(-0.2, 0.2), 0.05, 0.95)), 4),
        p_back=round(float(np.clip(base["p_back"] + rng.uniform(-0.1, 0.1), 0.0, 0.9)), 4),
        time_probs=_round3(rng.dirichlet([2.0, 2.0, 2.0])),
        bg_seed=int(rng.integers(2 ** 31)),
    )


# ----------------------------------------------------------------------------------------------
# Drawing (vectorised numpy, float32 in [0, 1])
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _grid(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy + 0.5, xx + 0.5  # pixel centres


def _soft(dist: np.ndarray) -> np.ndarray:
    """Signed distance inside a shape (px) -> anti-aliased coverage in [0, 1]."""
    return np.clip(dist + 0.5, 0.0, 1.0)


def _rect(yy, xx, y0, y1, x0, x1):
    return _soft(np.minimum(np.minimum(yy - y0, y1 - yy), np.minimum(xx - x0, x1 - xx)))


def _ellipse(yy, xx, cy, cx, ry, rx):
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return _soft((1.0 - d) * min(ry, rx))


def _limb(yy, xx, y0, y1, x_top, x_bottom, half_w):
    """A (possibly slanted) vertical bar from (y0, x_top) to (y1, x_bottom)."""
    xc = x_top + (x_bottom - x_top) * np.clip((yy - y0) / max(y1 - y0, 1e-3), 0, 1)
    return _soft(np.minimum(np.minimum(yy - y0, y1 - yy), half_w - np.abs(xx - xc)))


def _trapezoid(yy, xx, y0, y1, cx, half_top, half_bottom):
    half = half_top + (half_bottom - half_top) * np.clip((yy - y0) / max(y1 - y0, 1e-3), 0, 1)
    return _soft(np.minimum(np.minimum(yy - y0, y1 - yy), half - np.abs(xx - cx)))


def _paint(canvas: np.ndarray, mask: np.ndarray, colour) -> None:
    """Alpha-blend ``colour`` (RGB triple or HxWx3 image) into ``canvas`` in place."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return
    band = slice(rows[0], rows[-1] + 1)  # parts are short: blend only the rows they cover
    colour = np.asarray(colour, dtype=np.float32)
    if colour.ndim == 3:
        colour = colour[band]
    target = canvas[band]
    target += mask[band, :, None] * (colour - target)


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the first two axes (edge padding)."""
    if sigma < 0.3:
        return img
    r = int(np.ceil(2 * sigma))
    taps = np.exp(-np.arange(-r, r + 1) ** 2 / (2.0 * sigma ** 2)).astype(np.float32)
    taps /= taps.sum()
    h, w = img.shape[:2]
    extra = [(0, 0)] * (img.ndim - 2)
    padded = np.pad(img, [(r, r), (0, 0)] + extra, mode="edge")
    out = sum(t * padded[i:i + h] for i, t in enumerate(taps))
    padded = np.pad(out, [(0, 0), (r, r)] + extra, mode="edge")
    return sum(t * padded[:, i:i + w] for i, t in enumerate(taps))


def _smooth_noise(rng, h, w, cell):
    low = rng.random((h // cell + 2, w // cell + 2)).astype(np.float32)
    up = np.kron(low, np.ones((cell, cell), np.float32))[:h, :w]
    return _gaussian_blur(up, cell / 2.0)


@functools.lru_cache(maxsize=64)
def _camera_background(camera: CameraStyle, h: int, w: int) -> np.ndarray:
    """The camera's fixed scene, rendered larger than the frame so images can crop at an offset."""
    pad = max(2, w // 8)
    ph, pw = h + 2 * pad, w + 2 * pad
    rng = _rng(camera.bg_seed)
    yy, xx = _grid(ph, pw)
    a, b = np.asarray(camera.colour_a, np.float32), np.asarray(camera.colour_b, np.float32)
    horizon = camera.horizon * ph
    period = max(2.0, camera.texture_period * ph)
    ground = (yy >= horizon)[..., None]
    if camera.texture == "tiles":  # wall with door frames above a checkered floor
        panels = ((xx // (period * 2.5)) % 2).astype(np.float32)[..., None]
        wall = a * (1.0 - 0.10 * panels)
        checks = (((yy // period) + (xx // period)) % 2)[..., None]
        floor = b * (1.0 + 0.12 * (checks - 0.5))
        bg = np.where(ground, floor, wall)
    elif camera.texture == "street":  # facades with windows above asphalt with a lane marking
        edges = np.cumsum(rng.uniform(0.6, 1.6, 16) * period * 2)
        band = np.searchsorted(edges, xx).astype(np.int64)
        shades = rng.uniform(0.75, 1.15, 17).astype(np.float32)[band][..., None]
        windows = ((yy % period < period * 0.5) & (xx % period < period * 0.5))[..., None]
        facade = a * shades * np.where(windows, 1.25, 1.0)
        lane = (np.abs(yy - (horizon + ph) / 2) < max(0.6, ph * 0.01))[..., None]
        asphalt = np.where(lane, np.float32(0.85), b)
        bg = np.where(ground, asphalt, facade)
    else:  # foliage: blotchy greens over a path
        blotch = _smooth_noise(rng, ph, pw, max(2, int(period)))[..., None]
        leaves = a * (0.6 + 0.8 * blotch)
        bg = np.where(ground, b * (0.9 + 0.2 * blotch), leaves)
    bg = bg + rng.normal(0, 0.02, bg.shape).astype(np.float32)  # fixed fine texture of the scene
    return np.clip(bg, 0, 1).astype(np.float32)


def _torso_fill(identity: Identity, yy, xx, top, bottom, cx, hp) -> np.ndarray:
    """Top garment as an HxWx3 image (pattern in the identity's two colours)."""
    period = max(1.5, identity.stripe_period * hp)
    if identity.top_pattern == "hstripes":
        alt = ((yy - top) // period) % 2
    elif identity.top_pattern == "vstripes":
        alt = ((xx - cx) // period) % 2
    elif identity.top_pattern == "checks":
        alt = (((yy - top) // period) + ((xx - cx) // period)) % 2
    elif identity.top_pattern == "twotone":
        alt = (yy > (top + bottom) / 2).astype(np.float32)
    else:
        alt = np.zeros_like(yy)
    alt = alt[..., None]
    return np.asarray(identity.top, np.float32) * (1 - alt) + np.asarray(identity.top_alt, np.float32) * alt


def _draw_person(canvas, identity: Identity, yy, xx, top, cx, hp, facing, back_view, swing):
    """Paint a standing / walking person of height ``hp`` px whose head top is at ``top``."""
    sw = 0.13 * hp * identity.width_frac          # shoulder half width
    y = lambda f: top + f * hp                     # noqa: E731  (fraction of height -> row)
    side = identity.bag_side * facing              # bag side mirrors with the view
    body = np.zeros_like(yy)

    def paint(mask, colour):
        nonlocal body
        _paint(canvas, mask, colour)
        body = np.maximum(body, mask)

    if identity.long_hair:                        # hair falling behind the shoulders
        paint(_rect(yy, xx, y(0.05), y(0.26), cx - 0.07 * hp, cx + 0.07 * hp), identity.hair)
    if identity.bag == "backpack" and not back_view:  # strap-side sliver peeking out
        paint(_rect(yy, xx, y(0.17), y(0.44), cx + side * sw * 0.8 - 0.045 * hp,
                    cx + side * sw * 0.8 + 0.045 * hp), identity.bag_colour)

    # Legs (walking: feet swing apart), shoes, optional skirt / shorts.
    leg_w, hip, knee, ankle = 0.055 * hp * identity.width_frac, y(0.50), y(0.70), y(0.95)
    for sgn in (-1, 1):
        x_hip = cx + sgn * 0.055 * hp
        x_foot = x_hip + sgn * swing
        leg = _limb(yy, xx, hip, ankle, x_hip, x_foot, leg_w)
        if identity.bottom_style == "trousers":
            paint(leg, identity.bottom)
        else:
            paint(leg, identity.skin)
            if identity.bottom_style == "shorts":
                paint(leg * (yy < knee - 0.06 * hp), identity.bottom)
        paint(_rect(yy, xx, ankle - 1, y(1.0), x_foot - leg_w * 1.2, x_foot + leg_w * 1.3),
              identity.shoes)
    if identity.bottom_style == "skirt":
        paint(_trapezoid(yy, xx, hip - 1, knee, cx, sw * 0.85, sw * 1.05), identity.bottom)

    # Torso with the garment pattern, slightly tapered towards the hips.
    torso = _trapezoid(yy, xx, y(0.14), hip + 1, cx, sw, sw * 0.85)
    paint(torso, _torso_fill(identity, yy, xx, y(0.14), hip, cx, hp))
    if identity.bag == "backpack" and back_view:
        paint(_rect(yy, xx, y(0.17), y(0.43), cx - sw * 0.7, cx + sw * 0.7), identity.bag_colour)
    if identity.bag == "shoulder":
        strap = _limb(yy, xx, y(0.15), y(0.46), cx - side * sw * 0.8, cx + side * sw * 0.9,
                      max(0.6, 0.012 * hp))
        paint(strap, identity.bag_colour)
        near, far = cx + side * sw * 0.55, cx + side * (sw * 0.55 + 0.12 * hp)
        paint(_rect(yy, xx, y(0.44), y(0.56), min(near, far), max(near, far)), identity.bag_colour)

    # Arms swing opposite to the legs; sleeves in the top colour, hands (or forearms) in skin.
    arm_w = 0.045 * hp * identity.width_frac
    sleeve_end = y(0.47) if identity.long_sleeves else y(0.29)
    for sgn in (-1, 1):
        x_sh = cx + sgn * (sw + arm_w * 0.6)
        x_hand = x_sh + sgn * 0.02 * hp - sgn * swing * 0.6
        arm = _limb(yy, xx, y(0.15), y(0.52), x_sh, x_hand, arm_w)
        paint(arm, identity.skin)
        paint(arm * (yy < sleeve_end), identity.top)

    # Head: face (front) or hair (back view), hair cap on top.
    head_cy, head_ry, head_rx = y(0.075), 0.07 * hp, 0.055 * hp
    head = _ellipse(yy, xx, head_cy, cx + facing * 0.006 * hp, head_ry, head_rx)
    paint(head, identity.hair if back_view else identity.skin)
    paint(head * (yy < head_cy - 0.25 * head_ry), identity.hair)

    # Cheap volume: darken towards the silhouette's left/right edges.
    shade = 1.0 - 0.22 * np.clip(np.abs(xx - cx) / (sw * 1.6), 0, 1) ** 2
    canvas *= (1.0 - body + body * shade)[..., None]


def render_image(identity: Optional[Identity], camera: CameraStyle, time_id: int,
                 rng: np.random.Generator, height: int, width: int) -> Tuple[np.ndarray, Dict]:
    """Render one frame; ``identity=None`` gives a background-only crop (a false detection).

    Returns the uint8 HxWx3 image and the viewpoint facts drawn for it.
    """
    yy, xx = _grid(height, width)
    bg = _camera_background(camera, height, width)
    pad = (bg.shape[1] - width) // 2
    oy, ox = rng.integers(0, 2 * pad + 1, size=2)
    canvas = bg[oy:oy + height, ox:ox + width].copy()
    canvas *= np.float32(rng.uniform(0.92, 1.08))  # per-frame exposure flicker

    facing = -1 if rng.random() < camera.p_flip else 1
    back_view = bool(rng.random() < camera.p_back)
    if identity is not None:
        hp = height * identity.height_frac * camera.scale * rng.uniform(0.94, 1.06)
        top = (height - hp) / 2 + rng.uniform(-0.04, 0.04) * height
        cx = width / 2 + rng.uniform(-0.08, 0.08) * width
        swing = rng.uniform(-0.06, 0.06) * hp
        _draw_person(canvas, identity, yy, xx, top, cx, hp, facing, back_view, swing)

    gain, tint = _TIME_LIGHT[time_id]
    canvas *= np.asarray(camera.cast, np.float32) * np.float32(camera.gain * gain)
    canvas *= np.asarray(tint, np.float32)
    canvas = (canvas - 0.5) * np.float32(camera.contrast) + 0.5
    canvas = _gaussian_blur(canvas, camera.blur)
    canvas += rng.normal(0.0, camera.noise, canvas.shape).astype(np.float32)
    image = (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return image, {"flipped": facing < 0, "back_view": back_view}


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


def _render_record(spec: SynthSpec, record: ImageRecord, cameras: Sequence[CameraStyle]):
    rng = _rng(spec.seed, _TAG_IMAGE, spec.id_offset, record.frame)
    if record.pid == 0:  # distractor: a one-off person, or empty background (a false detection)
        identity = None if rng.random() < 0.3 else make_identity(
            spec.seed, spec.id_offset * 1000 + record.frame, tag=_TAG_DISTRACTOR)
    else:
        identity = make_identity(spec.seed, spec.id_offset + record.pid)
    return render_image(identity, cameras[record.cam - 1], record.time_id, rng, spec.height, spec.width)


def _side_info(spec: SynthSpec, record: ImageRecord, view: Dict) -> Dict:
    domain = spec.cameras[record.cam - 1][0]
    return {
        "split": record.split, "pid": record.pid, "camid": record.cam - 1,
        "identity": spec.id_offset + record.pid if record.pid > 0 else -1,
        "domain": domain, "domain_name": DOMAIN_NAMES[domain],
        "time_id": record.time_id, "time": TIME_LABELS[record.time_id],
        "flipped": bool(view["flipped"]), "back_view": bool(view["back_view"]),
    }


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


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
    domain_name, time_id, time, flipped, back_view}, ...}`` for a generated dataset."""
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


def _register(cls):
    """Register once (re-importing this module must not trip the registry's duplicate assert)."""
    try:
        DATASET_REGISTRY.get(cls.__name__)
    except KeyError:
        DATASET_REGISTRY.register(cls)
    return cls


@_register
class SynthReID(_SynthReIDBase):
    """Demo default: 100 train ids (~1000 imgs), 50 test ids (100 queries, ~500 gallery), 6 cameras
    from 3 domains (c1-c2 indoor_mall, c3-c4 city_street, c5-c6 park_dusk), 128x64."""
    spec = SynthSpec(dir_name="SynthReID")
    dataset_name = "synthreid"


@_register
class SynthReIDTiny(_SynthReIDBase):
    """Test-sized: 12 train ids, 8 test ids, 6 cameras / 3 domains, 64x32, ~110 images."""
    spec = SynthSpec(dir_name="SynthReIDTiny", id_offset=900000, **_TINY)
    dataset_name = "synthreidtiny"


@_register
class SynthReID_D0(_SynthReIDBase):
    """Domain 0 (indoor_mall) only: 4 cameras, 60 train ids, 30 test ids."""
    spec = SynthSpec(dir_name="SynthReID_D0", id_offset=100000, cameras=_domain_cameras(0), **_DOMAIN_ONLY)
    dataset_name = "synthreid_d0"


@_register
class SynthReID_D1(_SynthReIDBase):
    """Domain 1 (city_street) only: 4 cameras, 60 train ids, 30 test ids."""
    spec = SynthSpec(dir_name="SynthReID_D1", id_offset=200000, cameras=_domain_cameras(1), **_DOMAIN_ONLY)
    dataset_name = "synthreid_d1"


@_register
class SynthReID_D2(_SynthReIDBase):
    """Domain 2 (park_dusk) only: 4 cameras, 60 train ids, 30 test ids."""
    spec = SynthSpec(dir_name="SynthReID_D2", id_offset=300000, cameras=_domain_cameras(2), **_DOMAIN_ONLY)
    dataset_name = "synthreid_d2"


def _tiny_domain_spec(domain: int) -> SynthSpec:
    return SynthSpec(dir_name="SynthReIDTiny_D{}".format(domain), id_offset=910000 + 1000 * domain,
                     cameras=_domain_cameras(domain), cams_per_id_probs=(0.25, 0.35, 0.25, 0.15),
                     **_TINY)


@_register
class SynthReIDTiny_D0(_SynthReIDBase):
    """Tiny, domain 0 only (for fast domain-generalization tests)."""
    spec = _tiny_domain_spec(0)
    dataset_name = "synthreidtiny_d0"


@_register
class SynthReIDTiny_D1(_SynthReIDBase):
    """Tiny, domain 1 only."""
    spec = _tiny_domain_spec(1)
    dataset_name = "synthreidtiny_d1"


@_register
class SynthReIDTiny_D2(_SynthReIDBase):
    """Tiny, domain 2 only."""
    spec = _tiny_domain_spec(2)
    dataset_name = "synthreidtiny_d2"

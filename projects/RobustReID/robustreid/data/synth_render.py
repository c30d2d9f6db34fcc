"""Drawing SynthReID images: identities (the signal), camera styles and time of day (nuisance).

Pure numpy; every random draw comes from a seed stream so the same spec renders the same bytes.
Change anything that alters pixels and bump ``synth_reid.GENERATOR_VERSION`` so cached datasets are
regenerated. The figures' 2D joints (:func:`figure_keypoints`) are derived from the draws, never drawn
themselves: they add no random number to any stream, so every image stays byte-identical
(tests/test_ipes_keypoints.py pins the pixels).
"""
from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from .keypoint_layout import ABSENT, JOINT, NUM_KEYPOINTS, OCCLUDED, VISIBLE

TIME_LABELS = ("morning", "noon", "afternoon")

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


def _background_pad(w: int) -> int:
    """Margin of the camera's scene on each side of the frame (images crop it at an offset)."""
    return max(2, w // 8)


@functools.lru_cache(maxsize=64)
def _camera_background(camera: CameraStyle, h: int, w: int) -> np.ndarray:
    """The camera's fixed scene, rendered larger than the frame so images can crop at an offset."""
    pad = _background_pad(w)
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


@dataclass(frozen=True)
class Figure:
    """Where a person is drawn: head top row, centre column, height (px), view and walking swing."""
    top: float
    cx: float
    hp: float
    facing: int          # -1: mirrored details (bag side, head offset)
    back_view: bool
    swing: float         # horizontal foot offset (px); arms swing opposite


@dataclass(frozen=True)
class Framing:
    """Every random draw of one frame before its sensor noise, in the order they are made."""
    oy: int
    ox: int
    exposure: float
    facing: int
    back_view: bool
    figure: Optional[Figure]


def draw_framing(identity: Optional[Identity], camera: CameraStyle, rng: np.random.Generator,
                 height: int, width: int) -> Framing:
    """Draw the frame's crop offset, exposure, view and (with ``identity``) the figure's placement.
    :func:`render_image` starts with exactly these draws, so replaying them on a fresh generator of
    the same seed gives an image's figure without drawing it."""
    pad = _background_pad(width)
    oy, ox = rng.integers(0, 2 * pad + 1, size=2)
    exposure = rng.uniform(0.92, 1.08)  # per-frame exposure flicker
    facing = -1 if rng.random() < camera.p_flip else 1
    back_view = bool(rng.random() < camera.p_back)
    figure = None
    if identity is not None:
        hp = height * identity.height_frac * camera.scale * rng.uniform(0.94, 1.06)
        top = (height - hp) / 2 + rng.uniform(-0.04, 0.04) * height
        cx = width / 2 + rng.uniform(-0.08, 0.08) * width
        swing = rng.uniform(-0.06, 0.06) * hp
        figure = Figure(top, cx, hp, facing, back_view, swing)
    return Framing(int(oy), int(ox), exposure, facing, back_view, figure)


def _along(y0, y1, x_top, x_bottom, y):
    """Column of :func:`_limb`'s centre line at row ``y``."""
    return x_top + (x_bottom - x_top) * min(max((y - y0) / max(y1 - y0, 1e-3), 0.0), 1.0)


def figure_keypoints(identity: Optional[Identity], figure: Optional[Figure], height: int,
                     width: int) -> List[List[float]]:
    """The 18 joints (COCO-18 / OpenPose order) of the figure :func:`_draw_person` draws, as
    ``[x, y, v]`` in pixel coordinates (origin at the image's top-left corner, pixel (i, j) covers
    [j, j + 1) x [i, i + 1)), rounded to 0.01 px. Each joint lies inside the drawn body part it
    names. v: 2 visible, 1 occluded (the face of a back view), 0 absent (no figure, or outside the
    frame). The person's right side is on the image's left in a front view, on its right in a back
    view; ``facing`` only mirrors the figure's asymmetric details."""
    points = [[0.0, 0.0, ABSENT] for _ in range(NUM_KEYPOINTS)]
    if identity is None or figure is None:
        return points
    top, cx, hp, swing = figure.top, figure.cx, figure.hp, figure.swing
    y = lambda f: top + f * hp                     # noqa: E731  (as in _draw_person)
    sw = 0.13 * hp * identity.width_frac
    arm_w = 0.045 * hp * identity.width_frac
    right = 1 if figure.back_view else -1          # image side of the person's right
    head_cx, head_cy = cx + figure.facing * 0.006 * hp, y(0.075)
    head_ry, head_rx = 0.07 * hp, 0.055 * hp
    face = OCCLUDED if figure.back_view else VISIBLE

    def put(joint, x, y_, v=VISIBLE):
        points[JOINT[joint]] = [x, y_, v]

    put("nose", head_cx, head_cy + 0.2 * head_ry, face)
    put("neck", cx, y(0.15))
    for prefix, side in (("r_", right), ("l_", -right)):
        x_sh = cx + side * (sw + arm_w * 0.6)
        x_hand = x_sh + side * 0.02 * hp - side * swing * 0.6
        for joint, f in (("shoulder", 0.17), ("elbow", 0.335), ("wrist", 0.50)):
            put(prefix + joint, _along(y(0.15), y(0.52), x_sh, x_hand, y(f)), y(f))
        x_hip = cx + side * 0.055 * hp
        x_foot = x_hip + side * swing
        for joint, f in (("hip", 0.52), ("knee", 0.70), ("ankle", 0.93)):
            put(prefix + joint, _along(y(0.50), y(0.95), x_hip, x_foot, y(f)), y(f))
        put(prefix + "eye", head_cx + side * 0.4 * head_rx, head_cy - 0.05 * head_ry, face)
        put(prefix + "ear", head_cx + side * 0.6 * head_rx, head_cy)
    for point in points:
        x, y_ = point[0], point[1]
        point[0], point[1] = round(float(x), 2), round(float(y_), 2)
        if not (0.0 <= x < width and 0.0 <= y_ < height):
            point[2] = ABSENT
    return points


def render_image(identity: Optional[Identity], camera: CameraStyle, time_id: int,
                 rng: np.random.Generator, height: int, width: int) -> Tuple[np.ndarray, Dict]:
    """Render one frame; ``identity=None`` gives a background-only crop (a false detection).

    Returns the uint8 HxWx3 image and the viewpoint facts drawn for it (``keypoints``: the
    figure's joints, :func:`figure_keypoints`).
    """
    yy, xx = _grid(height, width)
    bg = _camera_background(camera, height, width)
    framing = draw_framing(identity, camera, rng, height, width)
    canvas = bg[framing.oy:framing.oy + height, framing.ox:framing.ox + width].copy()
    canvas *= np.float32(framing.exposure)

    figure = framing.figure
    if figure is not None:
        _draw_person(canvas, identity, yy, xx, figure.top, figure.cx, figure.hp, figure.facing,
                     figure.back_view, figure.swing)

    gain, tint = _TIME_LIGHT[time_id]
    canvas *= np.asarray(camera.cast, np.float32) * np.float32(camera.gain * gain)
    canvas *= np.asarray(tint, np.float32)
    canvas = (canvas - 0.5) * np.float32(camera.contrast) + 0.5
    canvas = _gaussian_blur(canvas, camera.blur)
    canvas += rng.normal(0.0, camera.noise, canvas.shape).astype(np.float32)
    image = (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return image, {"flipped": framing.facing < 0, "back_view": framing.back_view,
                   "keypoints": figure_keypoints(identity, figure, height, width)}

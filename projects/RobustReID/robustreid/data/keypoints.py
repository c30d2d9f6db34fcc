"""Person keypoints for pose-guided generation (IPES-GAN): 18 joints in COCO-18 / OpenPose order.

No pose model can be downloaded here, so joints come from one of three sources
(``IPES.KEYPOINTS.SOURCE``, :func:`build_keypoint_source`):

``files``      one file per image, read from a tree that mirrors the datasets root (layout below);
``synthreid``  SynthReID's own ``meta.json`` (its renderer writes the joints of every figure it draws);
any other     the name of a callable registered in ``KEYPOINT_ESTIMATOR_REGISTRY``: your own pose
               model, called on each image (an RGB uint8 H x W x 3 array) and returning its joints.

Layout
------
A keypoint array is ``(18, 3)`` float: one ``x, y, v`` row per joint, in this order::

     0 nose        1 neck        2 r_shoulder   3 r_elbow    4 r_wrist    5 l_shoulder
     6 l_elbow     7 l_wrist     8 r_hip        9 r_knee    10 r_ankle   11 l_hip
    12 l_knee     13 l_ankle    14 r_eye       15 l_eye     16 r_ear     17 l_ear

``x, y``: pixels of the image the joints were found on, origin at its top-left corner, x to the
right, y down; pixel (i, j) covers [j, j + 1) x [i, i + 1), so its centre is (j + 0.5, i + 0.5).
"right" is the person's right. ``v`` (COCO's convention): 2 visible, 1 occluded (position
estimated), 0 absent (x, y are ignored).

Keypoint files: the joints of ``$FASTREID_DATASETS/<rel>/<name>.jpg`` are read from
``<IPES.KEYPOINTS.DIR>/<rel>/<name>.json`` (or ``.npy``), ``DIR`` defaulting to
``$FASTREID_DATASETS/keypoints``:

* JSON: ``{"keypoints": [[x, y, v], ... 18 rows], "width": W, "height": H}``; ``width`` / ``height``
  (optional) are the size of the image the coordinates refer to, so joints found on a resized copy
  are scaled to the image read; without them the coordinates are those of the image itself;
* ``.npy``: a float array of shape (18, 3), coordinates of the image itself.

OpenPose's COCO (18-part) body model writes exactly this order: keep its ``x, y`` and write
``v = 2`` where it found the joint (confidence > 0), ``v = 0`` where it did not.

Heatmaps (:func:`keypoint_heatmaps`): channel k is ``exp(-d^2 / (2 sigma^2))``, d the distance from
a pixel's centre to joint k, and all zeros for joints with ``v < min_visibility``.
tools/render_heatmaps.py renders them from keypoint files.
"""
import json
import os
import os.path as osp

import numpy as np
from fastreid.utils.registry import Registry

from ..config import ConfigError
from .keypoint_layout import (ABSENT, FLIP_ORDER, KEYPOINT_NAMES, NUM_KEYPOINTS,  # noqa: F401
                              OCCLUDED, VISIBLE)
from .validation import DatasetError, datasets_root

KEYPOINT_SUFFIXES = (".json", ".npy")

KEYPOINT_ESTIMATOR_REGISTRY = Registry("KEYPOINT_ESTIMATOR")
KEYPOINT_ESTIMATOR_REGISTRY.__doc__ = """Pose estimators for IPES.KEYPOINTS.SOURCE: a callable
``f(image) -> (18, 3) array`` (image: RGB uint8 H x W x 3; rows x, y, v in its pixels), registered
with ``@KEYPOINT_ESTIMATOR_REGISTRY.register()`` under its ``__name__``."""

FILE_SOURCE, SYNTHREID_SOURCE = "files", "synthreid"


def check_keypoints(points, where):
    """``points`` as a float32 (18, 3) array with v in {0, 1, 2}; DatasetError naming ``where``."""
    try:
        points = np.asarray(points, dtype=np.float32)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: keypoints are not numbers") from None
    if points.shape != (NUM_KEYPOINTS, 3):
        raise DatasetError(f"{where}: keypoints must be {NUM_KEYPOINTS} rows of [x, y, v] "
                           f"(COCO-18 / OpenPose order), got shape {points.shape}")
    if not np.isin(points[:, 2], (ABSENT, OCCLUDED, VISIBLE)).all():
        raise DatasetError(f"{where}: visibility v must be 0, 1 or 2, got "
                           f"{sorted(set(points[:, 2].tolist()))}")
    if not np.isfinite(points[:, :2]).all():
        raise DatasetError(f"{where}: keypoint coordinates must be finite")
    return points


def read_keypoint_file(path):
    """(points (18, 3), (height, width) or None) of a keypoint file (module docs' layout)."""
    try:
        if path.endswith(".npy"):
            return check_keypoints(np.load(path, allow_pickle=False), path), None
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"keypoint file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot be read as a keypoint file ({e})") from None
    if not isinstance(data, dict) or "keypoints" not in data:
        raise DatasetError(f'{path}: expected {{"keypoints": [[x, y, v], ...], "width": W, '
                           f'"height": H}}')
    size = None
    if "width" in data or "height" in data:
        try:
            size = (int(data["height"]), int(data["width"]))
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{path}: give both width and height (pixels), or neither") from None
        if min(size) <= 0:
            raise DatasetError(f"{path}: width and height must be positive, got {size[::-1]}")
    return check_keypoints(data["keypoints"], path), size


def write_keypoint_file(path, points, height=None, width=None):
    """Write ``points`` in the module docs' layout (JSON, or .npy by the suffix)."""
    points = check_keypoints(points, path)
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    if path.endswith(".npy"):
        np.save(path, points)
        return
    data = {"keypoints": [[float(x), float(y), int(v)] for x, y, v in points.tolist()]}
    if height is not None:
        data.update(height=int(height), width=int(width))
    with open(path, "w") as f:
        json.dump(data, f)


def resize_keypoints(points, from_size, to_size):
    """Coordinates of an image of ``from_size`` (height, width) on its resized copy ``to_size``."""
    out = np.array(points, dtype=np.float32)
    out[:, 0] *= to_size[1] / from_size[1]
    out[:, 1] *= to_size[0] / from_size[0]
    return out


def flip_keypoints(points, width):
    """The joints of the horizontally mirrored image (``width`` px wide): x mirrored, sides swapped."""
    out = np.array(points, dtype=np.float32)[list(FLIP_ORDER)]
    out[:, 0] = width - out[:, 0]
    return out


def keypoint_heatmaps(points, height, width, sigma, min_visibility=VISIBLE):
    """(18, height, width) float32 Gaussian heatmaps of ``points`` (coordinates of a ``height`` x
    ``width`` image), peak 1 at each joint with ``v >= min_visibility``, zeros for the others."""
    points = np.asarray(points, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32) + 0.5
    xs = np.arange(width, dtype=np.float32) + 0.5
    inv = np.float32(-0.5 / float(sigma) ** 2)
    gy = np.exp(inv * (ys[None, :] - points[:, 1:2]) ** 2)  # (18, H)
    gx = np.exp(inv * (xs[None, :] - points[:, 0:1]) ** 2)  # (18, W)
    maps = gy[:, :, None] * gx[:, None, :]
    maps[points[:, 2] < min_visibility] = 0.0
    return maps


class FileKeypoints:
    """Joints of an image from its keypoint file under ``directory`` (module docs' layout)."""

    def __init__(self, directory="", root=None):
        self.root = osp.abspath(datasets_root() if root is None else root)
        self.directory = osp.abspath(directory or osp.join(self.root, "keypoints"))

    def file_for(self, img_path):
        """The keypoint file of ``img_path``: .json if present, else .npy (the .json name when
        neither exists, for the error message)."""
        rel = osp.relpath(osp.abspath(img_path), self.root)
        if rel.startswith(os.pardir):
            raise DatasetError(f"{img_path} is not under the datasets root {self.root}: its "
                               f"keypoint file cannot be located")
        stem = osp.join(self.directory, osp.splitext(rel)[0])
        for suffix in KEYPOINT_SUFFIXES:
            if osp.isfile(stem + suffix):
                return stem + suffix
        return stem + KEYPOINT_SUFFIXES[0]

    def __call__(self, img_path, image):
        points, size = read_keypoint_file(self.file_for(img_path))
        if size is not None and size != image.shape[:2]:
            points = resize_keypoints(points, size, image.shape[:2])
        return points

    def check(self, img_paths):
        """Every image has a readable keypoint file (DatasetError naming the first that does not)."""
        missing = [p for p in img_paths if not osp.isfile(self.file_for(p))]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) have no keypoint file, e.g. "
                               f"{self.file_for(missing[0])} for {missing[0]} (IPES.KEYPOINTS.DIR "
                               f"{self.directory}; layout: robustreid/data/keypoints.py)")
        for path in img_paths:
            read_keypoint_file(self.file_for(path))


class SynthReIDKeypoints:
    """Joints SynthReID's renderer recorded in the dataset's meta.json."""

    def __call__(self, img_path, image):
        from .synth_reid import side_info_for

        try:
            info = side_info_for(img_path)
        except (OSError, KeyError):
            raise DatasetError(f"{img_path}: not an image of a generated SynthReID dataset "
                               f"(IPES.KEYPOINTS.SOURCE synthreid)") from None
        return check_keypoints(info["keypoints"], img_path)

    def check(self, img_paths):
        for path in img_paths:
            self(path, None)


class EstimatorKeypoints:
    """Joints from a registered pose estimator, run on each image when it is loaded."""

    def __init__(self, name):
        self.name = name
        self.estimator = KEYPOINT_ESTIMATOR_REGISTRY.get(name)

    def __call__(self, img_path, image):
        return check_keypoints(self.estimator(image), f"estimator {self.name!r} on {img_path}")

    def check(self, img_paths):
        pass  # the estimator runs when the images are read


def build_keypoint_source(source, directory=""):
    """IPES.KEYPOINTS.SOURCE as a callable ``(img_path, image) -> (18, 3)`` joints in the pixels of
    ``image`` (RGB uint8 H x W x 3), with ``check(img_paths)`` for pre-flight checks."""
    if source == FILE_SOURCE:
        return FileKeypoints(directory)
    if source == SYNTHREID_SOURCE:
        return SynthReIDKeypoints()
    try:
        return EstimatorKeypoints(source)
    except KeyError:
        known = ", ".join(sorted(KEYPOINT_ESTIMATOR_REGISTRY._obj_map)) or "none registered"
        raise ConfigError(f"IPES.KEYPOINTS.SOURCE {source!r}: not {FILE_SOURCE!r}, "
                          f"{SYNTHREID_SOURCE!r} or a registered estimator ({known})") from None

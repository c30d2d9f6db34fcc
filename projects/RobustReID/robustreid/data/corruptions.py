"""Common corruptions of test images, on the fly: the corruptions of the CIL-ReID benchmark (Chen et
al., "Benchmarks for Corruption Invariant Person Re-identification", NeurIPS 2021 Datasets and
Benchmarks: Market-1501-C, MSMT17-C, ...) as ImageNet-C's reference implementation, the
``imagecorruptions`` package (1.1.2, adapted to today's numpy / scikit-image by robustreid.compat),
computes them.

* :data:`CORRUPTIONS`: CIL-ReID's 20, each at severities 1-5: imagecorruptions' 19 (15 ImageNet-C
  + 4 validation ones) and CIL-ReID's rain (:func:`rain`: albumentations' RandomRain, its type and
  blur rising with severity, then a fixed darkening).
* As in CIL-ReID, an image is corrupted as read from disk, at its stored size, and only then goes
  through the test transforms (resize to INPUT.SIZE_TEST). imagecorruptions refuses images under
  32 pixels a side: smaller ones are enlarged (bicubic, aspect kept) to 32 first; rain, as
  CIL-ReID draws it, enlarges images up to 60 pixels high to 65 (its drops need the room).
* Seeded and order-free: each image's corruption draws from its own generator, seeded by (seed,
  split, corruption, severity, image index); numpy's global state, which imagecorruptions draws
  from, is restored afterwards. Nothing is written to disk.
* :data:`MIXED`: CIL-ReID's headline "corruption evaluation": each image gets a corruption and a
  severity drawn uniformly (from its own seeded generator).
"""
import contextlib
import os

import numpy as np
from fastreid.data.data_utils import read_image
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["CORRUPTIONS", "MIXED", "MIN_SIDE", "SEVERITIES", "CorruptedImages", "corrupt_image",
           "image_seed"]

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
               "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
               "elastic_transform", "pixelate", "jpeg_compression", "speckle_noise", "gaussian_blur",
               "spatter", "saturate", "rain")
SEVERITIES = (1, 2, 3, 4, 5)
MIXED = "mixed"  # a corruption and a severity drawn per image (CIL-ReID's corruption evaluation)
MIN_SIDE = 32  # imagecorruptions.corrupt refuses smaller images
# CIL-ReID's rain per severity 1-5: RandomRain's type, blur 2 + severity, then brightness shifted by
# -(0.05 + 0.05 severity) (albumentations' brightness_by_max: a fraction of 255).
RAIN_TYPES = {1: "drizzle", 2: "heavy", 3: "heavy", 4: "torrential", 5: "torrential"}
RAIN_MAX_SMALL_HEIGHT, RAIN_HEIGHT = 60, 65
SPLITS = ("query", "gallery", "train")


def image_seed(seed, split, corruption, severity, index):
    """The seed of one image's corruption: distinct per split, corruption, severity and image."""
    key = [int(seed), SPLITS.index(split), (CORRUPTIONS + (MIXED,)).index(corruption),
           int(severity), int(index)]
    return int(np.random.SeedSequence(key).generate_state(1)[0])


@contextlib.contextmanager
def numpy_global_seed(seed):
    """numpy's global generator seeded inside the block (imagecorruptions draws from it), its state
    restored on exit."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _at_least_min_side(image):
    width, height = image.size
    scale = MIN_SIDE / min(width, height)
    if scale <= 1:
        return image
    return image.resize((max(MIN_SIDE, round(width * scale)), max(MIN_SIDE, round(height * scale))),
                        Image.BICUBIC)


def rain(image, severity, seed):
    """CIL-ReID's rain corruption of ``image`` (PIL, RGB) at ``severity``, drawn from ``seed``."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import
    import albumentations

    width, height = image.size
    if height <= RAIN_MAX_SMALL_HEIGHT:
        image = image.resize((int(width * RAIN_HEIGHT / height), RAIN_HEIGHT))
    shift = -(0.05 + 0.05 * severity)
    transform = albumentations.Compose([
        albumentations.RandomRain(rain_type=RAIN_TYPES[severity], blur_value=2 + severity,
                                  brightness_coefficient=1, p=1),
        albumentations.RandomBrightnessContrast(brightness_limit=(shift, shift),
                                                contrast_limit=(0, 0), p=1)], seed=seed)
    return Image.fromarray(transform(image=np.asarray(image, dtype=np.uint8))["image"])


def corrupt_image(image, corruption, severity, seed):
    """``image`` (PIL, RGB) corrupted by ``corruption`` at ``severity`` (1-5) with numpy seeded by
    ``seed``; a PIL image (enlarged to :data:`MIN_SIDE` first when smaller, see :func:`rain`)."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if corruption == "rain":
        return rain(image.convert("RGB"), severity, seed)
    from imagecorruptions import corrupt  # robustreid.compat adapted it on import robustreid

    pixels = np.asarray(_at_least_min_side(image.convert("RGB")), dtype=np.uint8)
    with numpy_global_seed(seed):
        return Image.fromarray(corrupt(pixels, severity=severity, corruption_name=corruption))


def mixed_draw(seed):
    """(corruption, severity) of one image in the :data:`MIXED` evaluation, uniform over both."""
    rng = np.random.default_rng(seed)
    return CORRUPTIONS[rng.integers(len(CORRUPTIONS))], int(rng.integers(1, len(SEVERITIES) + 1))


class CorruptedImages(Dataset):
    """A split's items (path, pid, camid, ...) read, corrupted and transformed, as fastreid's
    CommDataset (relabel=False) returns them: dicts of images, targets, camids, img_paths.
    ``corruption`` is a name of :data:`CORRUPTIONS` (at ``severity``) or :data:`MIXED`; ``split``
    names the split in the per-image seeds."""

    def __init__(self, items, transform, corruption, severity, seed, split):
        self.items = list(items)
        self.transform = transform
        self.corruption = corruption
        self.severity = severity
        self.seed = seed
        self.split = split

    def __len__(self):
        return len(self.items)

    def corruption_of(self, index):
        """(corruption, severity, seed) applied to image ``index``."""
        seed = image_seed(self.seed, self.split, self.corruption, self.severity or 0, index)
        if self.corruption == MIXED:
            return (*mixed_draw(seed), seed)
        return self.corruption, self.severity, seed

    def __getitem__(self, index):
        path, pid, camid = self.items[index][:3]
        image = corrupt_image(read_image(path), *self.corruption_of(index))
        return {"images": self.transform(image), "targets": pid, "camids": camid,
                "img_paths": path}

"""Training data for the domain-generalization methods (BAU, ADIN).

fastreid concatenates the training sets named in ``DATASETS.NAMES`` into one ``CommDataset`` and
forgets where each image came from. :func:`build_dg_train_set` builds the same items (same order,
same pid / camera relabelling, so the sampler and the classifier see exactly what fastreid's loader
gives them) and keeps, per image:

* ``domainids``: the index of its source dataset in ``DATASETS.NAMES`` (BAU's domain label);
* ``images_strong`` (``DG.BAU.ENABLED``): a second, strongly augmented view of the same image,
  so both views reach the model in one batch. The first view (``images``) is fastreid's
  ``INPUT.*`` train transform (BAU's weak view: flip, pad, crop);
* its time-of-day label (``time_ids``; looked up by path, for ADIN's time / joint nuisance):
  MSMT17 file names carry it (``..._0303morning_...``), SynthReID stores it in ``meta.json``;

and, with ``DG.ADIN.SCHEDULE.ENABLED``, holds out a validation split of the training identities'
images (ADIN sec. 3.3: the schedule is driven by the identity-validation error).
"""
import logging
import os.path as osp
import re

import numpy as np
import torch
import torchvision.transforms as T
from fastreid.data.common import CommDataset
from fastreid.data.data_utils import read_image
from fastreid.data.transforms import ToTensor, build_transforms
from fastreid.utils import comm
from torchvision.transforms import InterpolationMode

from .synth_reid import SIDE_INFO_FILE, TIME_LABELS, side_info_for
from .train_stream import build_train_stream
from .validation import DatasetError, datasets_root

logger = logging.getLogger(__name__)

__all__ = ["ReidRandAugment", "build_strong_transforms", "time_label", "DGTrainSet",
           "build_dg_train_set", "build_dg_train_loader", "split_validation"]

_TIME_PATTERN = re.compile(r"(morning|noon|afternoon)")


class ReidRandAugment(T.RandAugment):
    """torchvision's RandAugment without the operations that distort colours severely.

    BAU (sec. 3.1 and appendix A) excludes Invert, Posterize, Solarize and SolarizeAdd from
    RandAugment's set; torchvision's set has no Invert / SolarizeAdd, so Posterize and Solarize go.
    """

    EXCLUDED = ("Posterize", "Solarize", "Invert", "SolarizeAdd")

    def _augmentation_space(self, num_bins, image_size):
        space = super()._augmentation_space(num_bins, image_size)
        return {name: meta for name, meta in space.items() if name not in self.EXCLUDED}


def build_strong_transforms(cfg):
    """BAU's strong view: flip, pad/crop, then RandAugment (without Invert/Solarize), colour jitter
    and random erasing, each applied with probability ``DG.BAU.AUG.PROB`` (0.5 in the code)."""
    aug = cfg.DG.BAU.AUG
    size = list(cfg.INPUT.SIZE_TRAIN)
    p = float(aug.PROB)
    brightness, contrast, saturation, hue = aug.CJ
    steps = [
        T.Resize(size, interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.Pad(int(aug.PADDING)),
        T.RandomCrop(size),
        T.RandomApply([ReidRandAugment(num_ops=int(aug.RANDAUG_OPS),
                                       magnitude=int(aug.RANDAUG_MAGNITUDE))], p=p),
        T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=p),
        ToTensor(),  # fastreid's: [0, 255] floats, normalised inside the model
        T.RandomErasing(p=p, value=list(aug.REA_VALUE)),
    ]
    return T.Compose(steps)


def time_label(img_path):
    """Time-of-day index (0 morning, 1 noon, 2 afternoon) of an image, or None if unknown.

    SynthReID: from its ``meta.json`` side information. MSMT17: from the file name, e.g.
    ``0000_000_01_0303morning_0015_0.jpg``.
    """
    dataset_dir = osp.dirname(osp.dirname(osp.abspath(img_path)))
    if osp.isfile(osp.join(dataset_dir, SIDE_INFO_FILE)):
        try:
            return int(side_info_for(img_path)["time_id"])
        except KeyError:
            pass
    match = _TIME_PATTERN.search(osp.basename(img_path))
    return TIME_LABELS.index(match.group(1)) if match else None


def split_validation(items, per_id, max_images, seed=0):
    """Hold out ``per_id`` images of identities that keep at least 2 training images.

    Returns (train_items, val_items); identities are taken in a seeded random order until
    ``max_images`` validation images are reached, so every validation identity is a training one.
    """
    by_pid = {}
    for index, item in enumerate(items):
        by_pid.setdefault(item[1], []).append(index)
    rng = np.random.default_rng(seed)
    pids = sorted(by_pid)
    held = set()
    for k in rng.permutation(len(pids)):
        indices = by_pid[pids[k]]
        if len(indices) < 2 + per_id:
            continue
        take = min(per_id, max_images - len(held))
        if take <= 0:
            break
        held.update(int(i) for i in rng.choice(indices, size=take, replace=False))
    train = [item for i, item in enumerate(items) if i not in held]
    val = [item for i, item in enumerate(items) if i in held]
    return train, val


class DGTrainSet(CommDataset):
    """fastreid's CommDataset plus a domain label per image and, optionally, a strong view.

    ``domains[i]`` is the source-dataset index of ``img_items[i]``; ``val_items`` are held-out
    (path, pid, camid) of training identities (labels as in ``img_items``, not relabelled).
    """

    def __init__(self, img_items, domains, transform=None, strong_transform=None,
                 domain_names=(), val_items=(), time_ids=None):
        super().__init__(img_items, transform, relabel=True)
        if len(domains) != len(img_items):
            raise ValueError("one domain label per image is needed")
        self.domains = [int(d) for d in domains]
        self.strong_transform = strong_transform
        self.domain_names = tuple(domain_names)
        self.val_items = list(val_items)
        self.time_of = {} if time_ids is None else dict(time_ids)

    def __getitem__(self, index):
        img_path, pid, camid = self.img_items[index][:3]
        img = read_image(img_path)
        out = {
            "images": self.transform(img) if self.transform is not None else img,
            "targets": self.pid_dict[pid],
            "camids": self.cam_dict[camid],
            "img_paths": img_path,
            "domainids": self.domains[index],
        }
        if self.strong_transform is not None:
            out["images_strong"] = self.strong_transform(img)
        return out

    @property
    def num_domains(self):
        return len(self.domain_names) or (max(self.domains) + 1 if self.domains else 0)

    def class_domains(self):
        """(num_classes,) long tensor: the domain of every (relabelled) identity."""
        out = torch.full((self.num_classes,), -1, dtype=torch.long)
        for (_, pid, _), domain in zip(self.img_items, self.domains):
            out[self.pid_dict[pid]] = domain
        return out

    def labels(self):
        """(pids, camids, domains) of every training image, relabelled as in the batches."""
        pids = torch.tensor([self.pid_dict[item[1]] for item in self.img_items])
        cams = torch.tensor([self.cam_dict[item[2]] for item in self.img_items])
        return pids, cams, torch.tensor(self.domains)

    def time_ids(self, paths):
        """Time labels of image paths (KeyError names a path without one)."""
        try:
            return torch.tensor([self.time_of[p] for p in paths], dtype=torch.long)
        except KeyError as e:
            raise KeyError(f"no time-of-day label for {e.args[0]}") from None


def _load(name, combineall):
    from fastreid.data.datasets import DATASET_REGISTRY

    try:
        dataset_cls = DATASET_REGISTRY.get(name)
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r} in DATASETS.NAMES") from None
    try:
        return dataset_cls(root=datasets_root(), combineall=combineall)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise DatasetError(f"dataset {name!r} cannot be read under root "
                           f"{osp.abspath(datasets_root())!r} (set $FASTREID_DATASETS): "
                           f"{e}") from None


def build_dg_train_set(cfg):
    """The DG training set of ``DATASETS.NAMES`` (see the module docstring)."""
    items, domains = [], []
    for index, name in enumerate(cfg.DATASETS.NAMES):
        data = _load(name, cfg.DATASETS.COMBINEALL)
        if comm.is_main_process():
            data.show_train()
        items.extend(data.train)
        domains.extend([index] * len(data.train))
    if not items:
        raise DatasetError(f"DATASETS.NAMES {tuple(cfg.DATASETS.NAMES)} hold no training images")

    adin = cfg.DG.ADIN
    val_items = []
    if adin.ENABLED and adin.SCHEDULE.ENABLED:
        seed = max(int(cfg.ROBUSTREID.SEED), 0) if "ROBUSTREID" in cfg else 0
        domain_of = {item[0]: d for item, d in zip(items, domains)}
        items, val_items = split_validation(items, adin.SCHEDULE.VAL_IMAGES_PER_ID,
                                            adin.SCHEDULE.VAL_MAX_IMAGES, seed)
        domains = [domain_of[item[0]] for item in items]
        if not val_items:
            raise DatasetError("DG.ADIN.SCHEDULE needs a validation split, but no training "
                               "identity has 2 + DG.ADIN.SCHEDULE.VAL_IMAGES_PER_ID images")
        logger.info("ADIN: %d training images held out for identity validation", len(val_items))

    time_ids = None
    if adin.ENABLED and adin.NUISANCE in ("time", "joint"):
        time_ids = {}
        for item in items:
            label = time_label(item[0])
            if label is None:
                raise DatasetError(f"DG.ADIN.NUISANCE {adin.NUISANCE!r} needs a time-of-day label "
                                   f"per image; {item[0]} has none (datasets with one: MSMT17, "
                                   f"SynthReID)")
            time_ids[item[0]] = label

    strong = build_strong_transforms(cfg) if cfg.DG.BAU.ENABLED else None
    return DGTrainSet(items, domains, build_transforms(cfg, is_train=True), strong,
                      domain_names=tuple(cfg.DATASETS.NAMES), val_items=val_items,
                      time_ids=time_ids)


def build_dg_train_loader(cfg):
    """fastreid's train loader (sampler, batch size, workers from the config) over the DG set, as
    the resumable stream of robustreid.data.train_stream."""
    return build_train_stream(cfg, build_dg_train_set(cfg))

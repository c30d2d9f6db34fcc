"""IPES-GAN's training data: a labelled source and an unlabelled target stream of images with their
18-channel keypoint heatmaps (thesis sec. 3.3.2).

Each item is resized to INPUT.SIZE_TRAIN and, with INPUT.FLIP.ENABLED, mirrored with probability
INPUT.FLIP.PROB; the joints follow both (robustreid.data.keypoints), so the heatmaps stay on the
person. fastreid's other training transforms (padding and cropping, random erasing, ...) are not
applied: the generator reconstructs these images pixel by pixel and the joints would not follow
them [INF]. Source batches are drawn identity-wise, DATALOADER.NUM_INSTANCE images per identity
("we chose a random ID and loaded these images from different cameras"), target batches at random;
each stream is a robustreid.data.train_stream stream, so a resumed run continues both exactly.
"""
import random
from typing import NamedTuple

import numpy as np
import torch
from fastreid.data.data_utils import read_image
from fastreid.data.samplers import NaiveIdentitySampler, TrainingSampler
from PIL import Image
from torch.utils.data import Dataset

from .keypoints import build_keypoint_source, flip_keypoints, keypoint_heatmaps, resize_keypoints
from .train_stream import ReplayableSampler, SeededItems, TrainBatchStream
from .validation import build_dataset

__all__ = ["PosedImages", "DomainStreams", "build_ipes_data", "ipes_train_items", "posed_images"]


class PosedImages(Dataset):
    """One domain's images with their keypoint heatmaps, identities and cameras relabelled 0..n-1
    (as fastreid's CommDataset): items ``{images (3, H, W) in [0, 255], heatmaps (18, H, W),
    targets, camids, img_paths}``."""

    def __init__(self, img_items, keypoints, size, sigma, min_visibility=2, flip_prob=0.0):
        self.img_items = list(img_items)
        self.keypoints = keypoints
        self.size = tuple(size)
        self.sigma = float(sigma)
        self.min_visibility = min_visibility
        self.flip_prob = float(flip_prob)
        self.pids = sorted({item[1] for item in self.img_items})
        self.cams = sorted({item[2] for item in self.img_items})
        self.pid_dict = {pid: i for i, pid in enumerate(self.pids)}
        self.cam_dict = {cam: i for i, cam in enumerate(self.cams)}

    @property
    def num_classes(self):
        return len(self.pids)

    @property
    def num_cameras(self):
        return len(self.cams)

    def __len__(self):
        return len(self.img_items)

    def __getitem__(self, index):
        path, pid, cam = self.img_items[index]
        image = read_image(path)
        points = self.keypoints(path, np.asarray(image))
        height, width = self.size
        points = resize_keypoints(points, (image.height, image.width), self.size)
        image = np.array(image.resize((width, height), Image.BICUBIC))  # fastreid's Resize
        if self.flip_prob and random.random() < self.flip_prob:  # seeded per item (SeededItems)
            image = np.ascontiguousarray(image[:, ::-1])
            points = flip_keypoints(points, width)
        heatmaps = keypoint_heatmaps(points, height, width, self.sigma, self.min_visibility)
        return {"images": torch.from_numpy(image).permute(2, 0, 1).float(),
                "heatmaps": torch.from_numpy(heatmaps), "targets": self.pid_dict[pid],
                "camids": self.cam_dict[cam], "img_paths": path}


def ipes_train_items(cfg):
    """(source items: DATASETS.NAMES' training splits, target items: IPES.TARGET's)."""
    source = [item for name in cfg.DATASETS.NAMES for item in build_dataset(name).train]
    return source, list(build_dataset(cfg.IPES.TARGET).train)


def posed_images(cfg, items, flip=True):
    """``items`` as PosedImages of the config's keypoints and input size (flipped as INPUT.FLIP
    says, or never)."""
    kp = cfg.IPES.KEYPOINTS
    return PosedImages(items, build_keypoint_source(kp.SOURCE, kp.DIR), cfg.INPUT.SIZE_TRAIN,
                       kp.SIGMA, kp.MIN_VISIBILITY,
                       cfg.INPUT.FLIP.PROB if flip and cfg.INPUT.FLIP.ENABLED else 0.0)


def _stream(dataset, sampler, batch_size, num_workers):
    from fastreid.data.build import build_reid_train_loader

    replayable = ReplayableSampler(sampler, batch_size)
    loader = build_reid_train_loader(train_set=SeededItems(dataset), sampler=replayable,
                                     total_batch_size=batch_size, num_workers=num_workers)
    return TrainBatchStream(loader, replayable, dataset)


class DomainStreams:
    """The source and target batch streams, advanced together: ``next()`` is one step's
    (source batch, target batch); ``state_dict`` / ``load_state_dict`` cover both (for
    robustreid.engine.training_state.TrainingState)."""

    def __init__(self, source, target):
        self.source, self.target = source, target

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.source), next(self.target)

    def state_dict(self):
        return {"source": self.source.state_dict(), "target": self.target.state_dict()}

    def load_state_dict(self, state):
        self.source.load_state_dict(state["source"])
        self.target.load_state_dict(state["target"])


class IPESData(NamedTuple):
    source: PosedImages
    target: PosedImages
    streams: DomainStreams


def build_ipes_data(cfg):
    """Both domains' datasets and their streams: SOLVER.IMS_PER_BATCH / 2 images each per step.
    The samplers draw their seeds from numpy's global generator (as fastreid's: ROBUSTREID.SEED)."""
    source_items, target_items = ipes_train_items(cfg)
    source, target = posed_images(cfg, source_items), posed_images(cfg, target_items)
    half, workers = cfg.SOLVER.IMS_PER_BATCH // 2, cfg.DATALOADER.NUM_WORKERS
    streams = DomainStreams(
        _stream(source, NaiveIdentitySampler(source.img_items, half, cfg.DATALOADER.NUM_INSTANCE),
                half, workers),
        _stream(target, TrainingSampler(len(target)), half, workers))
    return IPESData(source, target, streams)

"""Pre-flight checks on datasets and on the training batches drawn from them, run before any
training or evaluation starts.

A missing dataset directory or an image that cannot be decoded otherwise surfaces minutes into a run,
inside a data-loader worker, as a traceback that does not name the dataset. A batch size the
training sampler cannot fill makes fastreid's samplers loop forever without yielding: the run hangs
silently before its first iteration.
"""
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from ..config import ConfigError

logger = logging.getLogger(__name__)


class DatasetError(RuntimeError):
    """A dataset cannot be used; the message names the dataset and the directory or file at fault."""


def datasets_root():
    """The root fastreid's loaders read datasets from ($FASTREID_DATASETS when fastreid was imported)."""
    import fastreid.data.build as data_build
    return data_build._root


def build_dataset(name, root=None, **kwargs):
    """Instantiate a registered dataset (``kwargs``: e.g. ``combineall``), turning fastreid's
    failures into a :class:`DatasetError`."""
    from fastreid.data.datasets import DATASET_REGISTRY

    root = datasets_root() if root is None else root
    try:
        dataset_cls = DATASET_REGISTRY.get(name)
    except KeyError:
        known = ", ".join(sorted(DATASET_REGISTRY._obj_map))
        raise DatasetError(f"unknown dataset {name!r} (DATASETS.NAMES / DATASETS.TESTS); "
                           f"registered: {known}") from None
    try:
        return dataset_cls(root=root, **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise DatasetError(f"dataset {name!r} cannot be read under root {os.path.abspath(root)!r} "
                           f"(set $FASTREID_DATASETS): {e}") from None


def _decode_error(path):
    try:
        with Image.open(path) as img:
            img.load()
        return None
    except Exception as e:  # PIL raises several types for corrupt/truncated data
        return f"{path}: {e}"


def verify_images(paths, num_threads=4):
    """Decode every image once; raise :class:`DatasetError` listing the first undecodable files."""
    paths = list(paths)
    if len(paths) > 5000:
        logger.info("Verifying %d images can be decoded (DATALOADER.VERIFY_IMAGES False skips)",
                    len(paths))
    with ThreadPoolExecutor(num_threads) as pool:
        errors = [e for e in pool.map(_decode_error, paths, chunksize=64) if e]
    if errors:
        shown = "\n  ".join(errors[:5])
        more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise DatasetError(f"{len(errors)} image(s) cannot be decoded:\n  {shown}{more}")


def check_datasets(train_names, test_names, verify=True):
    """Build every configured dataset once and (optionally) decode every image it lists."""
    paths = []
    for name in train_names:
        paths += [item[0] for item in build_dataset(name).train]
    for name in test_names:
        dataset = build_dataset(name)
        for split, items in (("query", dataset.query), ("gallery", dataset.gallery)):
            if not items:  # fastreid's InferenceSampler asserts a non-empty set
                raise DatasetError(f"dataset {name!r} (DATASETS.TESTS) has no {split} images under "
                                   f"root {os.path.abspath(datasets_root())!r}")
        paths += [item[0] for item in dataset.query + dataset.gallery]
    if verify:
        verify_images(sorted(set(paths)))


# fastreid 1.4.0's training samplers (fastreid.data.build) that RobustReID can train with.
IDENTITY_SAMPLERS = ("NaiveIdentitySampler", "BalancedIdentitySampler")
TRAIN_SAMPLERS = ("TrainingSampler", "ImbalancedDatasetSampler") + IDENTITY_SAMPLERS


def check_train_batches(cfg, items, world_size=1):
    """Refuse a training set and batch settings from which fastreid's sampler cannot draw a batch.

    ``items``: the (path, pid, camid) list the training loader samples from; ``world_size``: the
    training processes, each drawing SOLVER.IMS_PER_BATCH / world_size images per step. Every
    sampler needs at least one full batch of images per epoch (else the epoch has no iteration).
    The identity samplers draw DATALOADER.NUM_INSTANCE images of each of IMS_PER_BATCH /
    NUM_INSTANCE identities; their loops only yield exactly full batches, so a per-process batch
    that is not a multiple of NUM_INSTANCE, or fewer identities than a batch needs, loops forever.
    """
    sampler, batch = cfg.DATALOADER.SAMPLER_TRAIN, cfg.SOLVER.IMS_PER_BATCH
    per_id, names = cfg.DATALOADER.NUM_INSTANCE, tuple(cfg.DATASETS.NAMES)
    if sampler == "SetReWeightSampler":
        # fastreid 1.4.0's looks cameras up as 0..n-1 (training camids are "<dataset>_<cam>": it
        # raises on its first draw), and yields only batches of exactly sum(SET_WEIGHT) x
        # NUM_INSTANCE images, which its own assertion forbids (checked: no batch, ever)
        raise ConfigError("DATALOADER.SAMPLER_TRAIN SetReWeightSampler cannot draw a batch in "
                          f"fastreid 1.4.0; use one of {', '.join(TRAIN_SAMPLERS)}")
    if sampler not in TRAIN_SAMPLERS:
        raise ConfigError(f"DATALOADER.SAMPLER_TRAIN must be one of {', '.join(TRAIN_SAMPLERS)}, "
                          f"got {sampler!r}")
    processes = f" / {world_size} processes" if world_size > 1 else ""
    if batch % world_size:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH {batch} is not divisible by the {world_size} "
                          f"training processes")
    if sampler in IDENTITY_SAMPLERS and (batch // world_size) % per_id:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH {batch}{processes} must be a multiple of "
                          f"DATALOADER.NUM_INSTANCE {per_id} ({sampler} draws {per_id} images per "
                          f"identity)")
    if not items:
        raise DatasetError(f"DATASETS.NAMES {names} hold no training images under root "
                           f"{os.path.abspath(datasets_root())!r}")
    if len(items) < batch:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH {batch} is more than the {len(items)} training "
                          f"images of DATASETS.NAMES {names}: an epoch would have no iteration")
    identities = len({item[1] for item in items})
    if sampler in IDENTITY_SAMPLERS and identities < batch // per_id:
        raise ConfigError(f"DATASETS.NAMES {names} have {identities} training identities; "
                          f"{sampler} needs SOLVER.IMS_PER_BATCH / DATALOADER.NUM_INSTANCE = "
                          f"{batch} / {per_id} = {batch // per_id} per batch: lower "
                          f"SOLVER.IMS_PER_BATCH")
    if cfg.META_LEARNING.ENABLED and sampler in IDENTITY_SAMPLERS and \
            batch // world_size // per_id < 2:
        raise ConfigError(f"META_LEARNING splits each batch by identity: SOLVER.IMS_PER_BATCH "
                          f"{batch}{processes} / DATALOADER.NUM_INSTANCE {per_id} must give at "
                          f"least 2 identities per batch")

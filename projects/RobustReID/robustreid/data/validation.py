"""Pre-flight checks on datasets, run before any training or evaluation starts.

A missing dataset directory or an image that cannot be decoded otherwise surfaces minutes into a run,
inside a data-loader worker, as a traceback that does not name the dataset.
"""
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

logger = logging.getLogger(__name__)


class DatasetError(RuntimeError):
    """A dataset cannot be used; the message names the dataset and the directory or file at fault."""


def datasets_root():
    """The root fastreid's loaders read datasets from ($FASTREID_DATASETS when fastreid was imported)."""
    import fastreid.data.build as data_build
    return data_build._root


def build_dataset(name, root=None):
    """Instantiate a registered dataset, turning fastreid's failures into a :class:`DatasetError`."""
    from fastreid.data.datasets import DATASET_REGISTRY

    root = datasets_root() if root is None else root
    try:
        dataset_cls = DATASET_REGISTRY.get(name)
    except KeyError:
        known = ", ".join(sorted(DATASET_REGISTRY._obj_map))
        raise DatasetError(f"unknown dataset {name!r} (DATASETS.NAMES / DATASETS.TESTS); "
                           f"registered: {known}") from None
    try:
        return dataset_cls(root=root)
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
        paths += [item[0] for item in dataset.query + dataset.gallery]
    if verify:
        verify_images(sorted(set(paths)))

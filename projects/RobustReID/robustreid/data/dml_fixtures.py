"""Tiny synthetic copies of the DML datasets (robustreid.data.dml_datasets) in their releases'
layouts, with the same index and label files, for tests and for trying the pipeline.

Each ``write_*`` draws a few classes of small square images (SynthReID's renderer: one class = one
synthetic person) into ``root`` and returns the :class:`~robustreid.data.fixtures.FixtureCounts` the
registered dataset should report (one training camera; one camera per test image):

============  ==========================================================================
CUB200        ``CUB_200_2011/images/<NNN.Name>/<Name>_<k>.jpg``, ``images.txt``,
              ``image_class_labels.txt``, ``classes.txt``
CARS196       ``CARS196/car_ims/<n:06d>.jpg``, ``CARS196/cars_annos.mat`` (``annotations``
              with relative_im_path, bbox_x1..bbox_y2, class, test; ``class_names``)
InShop        ``InShop/img/<GENDER>/<Category>/id_<item:08d>/<nn>_<k>_<view>.jpg``,
              ``InShop/Eval/list_eval_partition.txt``; training items are the odd item
              numbers, test items the even ones (the split is the file's, not by order); a test
              item's even-numbered images are query, the others gallery
SOP           ``Stanford_Online_Products/<super>_final/<product>_<k>.JPG``,
              ``Ebay_train.txt``, ``Ebay_test.txt``
============  ==========================================================================
"""
import os
import os.path as osp

import numpy as np

from .fixtures import FixtureCounts, _counts, _save, draw_fixture_image

__all__ = ["write_cub200", "write_cars196", "write_inshop", "write_sop"]

# Keeps these classes' synthetic people apart from the other fixtures' and SynthReID's.
_DML_ID_BASE = 3000


def _draw(path, offset, class_id, k, size, seed):
    _save(path, draw_fixture_image(_DML_ID_BASE + offset + class_id, k % 6 + 1, k, size, size,
                                   seed))


def _write_lines(path, lines):
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def _dml_counts(dataset_dir, train, query, gallery) -> FixtureCounts:
    """Counts for (path, class) lists: one training camera, one camera per distinct test image."""
    cams = {}
    for path, _ in query + gallery:
        cams.setdefault(path, len(cams))
    return _counts(dataset_dir, [(p, c, 0) for p, c in train],
                   [(p, c, cams[p]) for p, c in query], [(p, c, cams[p]) for p, c in gallery])


def _first_half(items, num_classes):
    train = [item for item in items if item[1] <= num_classes // 2]
    test = [item for item in items if item[1] > num_classes // 2]
    return train, test


def write_cub200(root: str, num_classes: int = 4, imgs_per_class: int = 3, size: int = 32,
                 seed: int = 0) -> FixtureCounts:
    """CUB-200-2011's layout; classes 1..num_classes // 2 train, the rest is the test set."""
    base = osp.join(root, "CUB_200_2011")
    classes, images, labels, items = [], [], [], []
    for class_id in range(1, num_classes + 1):
        name = "Bird_{}".format(class_id)
        class_dir = "{:03d}.{}".format(class_id, name)
        classes.append("{} {}".format(class_id, class_dir))
        for k in range(imgs_per_class):
            image_id = len(images) + 1
            relative = "{}/{}_{:04d}.jpg".format(class_dir, name, k)
            path = osp.join(base, "images", relative)
            _draw(path, 0, class_id, k, size, seed)
            images.append("{} {}".format(image_id, relative))
            labels.append("{} {}".format(image_id, class_id))
            items.append((path, class_id))
    _write_lines(osp.join(base, "classes.txt"), classes)
    _write_lines(osp.join(base, "images.txt"), images)
    _write_lines(osp.join(base, "image_class_labels.txt"), labels)
    train, test = _first_half(items, num_classes)
    return _dml_counts(base, train, test, test)


_CARS_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")


def write_cars196(root: str, num_classes: int = 4, imgs_per_class: int = 3, size: int = 32,
                  seed: int = 0) -> FixtureCounts:
    """Stanford Cars' ``car_ims/`` and ``cars_annos.mat`` (MATLAB 5, the release's format);
    classes 1..num_classes // 2 train, the rest is the test set."""
    from scipy.io import savemat

    base = osp.join(root, "CARS196")
    records, items = [], []
    for class_id in range(1, num_classes + 1):
        for k in range(imgs_per_class):
            relative = "car_ims/{:06d}.jpg".format(len(records) + 1)
            path = osp.join(base, relative)
            _draw(path, 200, class_id, k, size, seed)
            # the release's 'test' flag is the classification split, which DML ignores
            records.append((relative, 1, 1, size, size, class_id, k % 2))
            items.append((path, class_id))
    annotations = np.empty((1, len(records)), dtype=[(name, object) for name in _CARS_FIELDS])
    for i, (relative, *numbers) in enumerate(records):
        annotations[0, i] = (np.array([relative]),
                             *(np.array([[n]], dtype=np.uint16) for n in numbers))
    class_names = np.empty((1, num_classes), dtype=object)
    class_names[0, :] = ["Car Model {}".format(c) for c in range(1, num_classes + 1)]
    savemat(osp.join(base, "cars_annos.mat"),
            {"annotations": annotations, "class_names": class_names})
    train, test = _first_half(items, num_classes)
    return _dml_counts(base, train, test, test)


_INSHOP_VIEWS = ("front", "side", "back", "full", "additional")


def write_inshop(root: str, num_train_items: int = 3, num_test_items: int = 3,
                 imgs_per_item: int = 3, size: int = 32, seed: int = 0) -> FixtureCounts:
    """In-Shop's ``img/`` and ``Eval/list_eval_partition.txt`` (count line, header, entries).

    Counts are for ``InShop`` (official query / gallery); ``InShopQuery``'s gallery is its query.
    """
    if imgs_per_item < 2:
        raise ValueError("imgs_per_item must be >= 2 (a test item needs a query and a gallery "
                         "image)")
    base = osp.join(root, "InShop")
    parts = {"train": [], "query": [], "gallery": []}
    entries = []
    items = [(2 * j + 1, "train") for j in range(num_train_items)] + \
            [(2 * j + 2, "test") for j in range(num_test_items)]
    for item, split in sorted(items):
        for k in range(imgs_per_item):
            name = "img/{}/Dresses/id_{:08d}/{:02d}_{}_{}.jpg".format(
                "WOMEN" if item % 3 else "MEN", item, k // 2 + 1, k % 2 + 1,
                _INSHOP_VIEWS[k % len(_INSHOP_VIEWS)])
            status = split if split == "train" else "query" if k % 2 == 0 else "gallery"
            path = osp.join(base, name)
            _draw(path, 400, item, k, size, seed)
            entries.append("{:<60} id_{:08d} {}".format(name, item, status))
            parts[status].append((path, item))
    _write_lines(osp.join(base, "Eval", "list_eval_partition.txt"),
                 [str(len(entries)), "image_name item_id evaluation_status"] + entries)
    return _dml_counts(base, parts["train"], parts["query"], parts["gallery"])


_SOP_SUPER_CLASSES = ("bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle", "lamp",
                      "mug", "sofa", "stapler", "table", "toaster")


def write_sop(root: str, num_train_classes: int = 3, num_test_classes: int = 3,
              imgs_per_class: int = 3, size: int = 32, seed: int = 0) -> FixtureCounts:
    """Stanford Online Products: classes 1..num_train_classes in ``Ebay_train.txt``, the next
    num_test_classes in ``Ebay_test.txt`` (header ``image_id class_id super_class_id path``)."""
    base = osp.join(root, "Stanford_Online_Products")
    header = "image_id class_id super_class_id path"
    splits = {"Ebay_train.txt": range(1, num_train_classes + 1),
              "Ebay_test.txt": range(num_train_classes + 1,
                                     num_train_classes + num_test_classes + 1)}
    image_id, lists = 0, {}
    for list_name, class_ids in splits.items():
        lines, items = [header], []
        for class_id in class_ids:
            super_id = (class_id - 1) % len(_SOP_SUPER_CLASSES) + 1
            for k in range(imgs_per_class):
                image_id += 1
                relative = "{}_final/{}_{}.JPG".format(_SOP_SUPER_CLASSES[super_id - 1],
                                                       111085120000 + class_id, k)
                path = osp.join(base, relative)
                _draw(path, 600, class_id, k, size, seed)
                lines.append("{} {} {} {}".format(image_id, class_id, super_id, relative))
                items.append((path, class_id))
        _write_lines(osp.join(base, list_name), lines)
        lists[list_name] = items
    test = lists["Ebay_test.txt"]
    return _dml_counts(base, lists["Ebay_train.txt"], test, test)

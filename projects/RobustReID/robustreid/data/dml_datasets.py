"""The deep-metric-learning datasets of EAT (Tables 1-4) and robrank, as fastreid datasets.

Each reads its release's own files under the datasets root ($FASTREID_DATASETS):

===============  ===========================================================================
``CUB200``       ``CUB_200_2011/images.txt``, ``image_class_labels.txt``, ``classes.txt``,
                 ``images/<class dir>/<file>.jpg``. Train: classes 1-100 (5,864 images),
                 test: classes 101-200 (5,924 images)
``CARS196``      ``CARS196/cars_annos.mat`` (``annotations``: ``relative_im_path``, ``class``;
                 ``class_names``) and ``CARS196/car_ims/<n>.jpg``. Train: classes 1-98
                 (8,054 images), test: classes 99-196 (8,131 images)
``InShop``       ``InShop/Eval/list_eval_partition.txt`` (``image_name item_id
                 evaluation_status``) and ``InShop/img/...``. Train: 3,997 items (25,882
                 images); query: 14,218 images, gallery: 12,612 images (3,985 items)
``InShopQuery``  In-Shop with EAT's test set (Datasets paragraph: "we only select the query
                 part as the test data"): the query part is both query and gallery
``SOP``          ``Stanford_Online_Products/Ebay_train.txt`` and ``Ebay_test.txt``
                 (``image_id class_id super_class_id path``). Train: 11,318 classes (59,551
                 images), test: 11,316 classes (60,502 images)
===============  ===========================================================================

CUB200 and CARS196 train on the first half of the classes the release lists and test on the
other half (the DML split, also EAT's). EAT quotes 2,944 / 3,089 CUB images: those add up to 6,033,
the size of CUB-200 (2010, Welinder et al., the paper's citation), not of CUB-200-2011 (11,788).
We read CUB-200-2011, whose first-100-classes split (5,864 / 5,924) is the one the DML literature
and Roth et al.'s code (EAT's code base) use; the paper's CARS196 counts are the usual ones.

fastreid conventions: training pids and camids carry the dataset name (``cub200_17``,
``cub200_0``: DML has no cameras, so every training image has camera 0). Test pids are the class
ids. A DML test set has no query/gallery split: except In-Shop, the whole test set is both query
and gallery. fastreid's retrieval protocol drops gallery items with the query's pid AND camid, so
every test image gets its own camid (its index among the test images, the same in query and
gallery): exactly the query image itself is dropped and Rank-k is the DML Recall@k (leave one
out; with TEST.METRIC cosine). Its mAP is a leave-one-out mAP over the whole test set, which DML
papers do not report (they report Recall@k, NMI and F1: TEST.EVALUATOR ClusteringEvaluator, which
pools query and gallery and counts each image once).

A missing or malformed index file raises :class:`~robustreid.data.validation.DatasetError` naming
the file and the line (for cars_annos.mat: the annotation).
"""
import os.path as osp
import re

import numpy as np
from fastreid.data.datasets.bases import ImageDataset

from .registry import register_dataset
from .validation import DatasetError

__all__ = ["CUB200", "CARS196", "InShop", "InShopQuery", "SOP"]


def _require_image(path, where):
    if not osp.isfile(path):
        raise DatasetError(f"{where}: image {path} is not found")
    return path


class _IndexFile:
    """A whitespace-separated index file of a release; every error names the file and line."""

    def __init__(self, path):
        self.path = path

    def error(self, number, message):
        return DatasetError(f"{self.path} line {number}: {message}")

    def lines(self):
        """(line number, fields) of every non-blank line."""
        if not osp.isfile(self.path):
            raise DatasetError(f"{self.path} is not found")
        with open(self.path, encoding="utf-8") as f:
            lines = [(number, line.split()) for number, line in enumerate(f, 1) if line.strip()]
        if not lines:
            raise DatasetError(f"{self.path} is empty")
        return lines

    def fields(self, number, fields, columns):
        if len(fields) != len(columns):
            raise self.error(number, f"expected {len(columns)} fields ({' '.join(columns)}), "
                                     f"got {' '.join(fields)!r}")
        return fields

    def header(self, line, columns):
        number, fields = line
        if tuple(fields) != tuple(columns):
            raise self.error(number, f"expected the header {' '.join(columns)!r}, "
                                     f"got {' '.join(fields)!r}")

    def integer(self, number, value, column):
        try:
            return int(value)
        except ValueError:
            raise self.error(number, f"{column} {value!r} is not an integer") from None

    def image(self, number, path):
        return _require_image(path, f"{self.path} line {number}")


class _DMLDataset(ImageDataset):
    """Train / query / gallery from :meth:`read`'s (path, class id) lists, in fastreid's form."""
    dataset_dir = ""
    dataset_name = ""

    def __init__(self, root="datasets", **kwargs):
        self.root = root
        self.dataset_dir = osp.join(root, type(self).dataset_dir)
        self.check_before_run([self.dataset_dir])
        train, query, gallery = self.read()
        camera = f"{self.dataset_name}_0"
        train = [(path, f"{self.dataset_name}_{label}", camera) for path, label in train]
        camids = {}  # one camera per test image: see the module docstring
        for path, _ in query + gallery:
            camids.setdefault(path, len(camids))
        query = [(path, label, camids[path]) for path, label in query]
        gallery = [(path, label, camids[path]) for path, label in gallery]
        super().__init__(train, query, gallery, **kwargs)

    def read(self):
        """``(train, query, gallery)``, each a list of (image path, class id)."""
        raise NotImplementedError

    def combine_all(self):
        # fastreid's would add an image listed as query and as gallery twice, with its test camid
        camera = f"{self.dataset_name}_0"
        combined, seen = list(self.train), set()
        for path, label, _ in self.query + self.gallery:
            if path not in seen:
                seen.add(path)
                combined.append((path, f"{self.dataset_name}_test_{label}", camera))
        self._train = combined


def _split_by_class(items, classes):
    """The first half of ``classes`` (sorted ids) trains; the rest is the test set, whole."""
    classes = sorted(classes)
    train_classes = set(classes[:len(classes) // 2])
    train = [item for item in items if item[1] in train_classes]
    test = [item for item in items if item[1] not in train_classes]
    return train, test, list(test)


@register_dataset
class CUB200(_DMLDataset):
    """CUB-200-2011: train on classes 1-100, test on 101-200 (see the module docstring)."""
    dataset_dir = "CUB_200_2011"
    dataset_name = "cub200"

    def read(self):
        classes_file = _IndexFile(osp.join(self.dataset_dir, "classes.txt"))
        classes = set()
        for number, fields in classes_file.lines():
            class_id, _ = classes_file.fields(number, fields, ("class_id", "class_name"))
            classes.add(classes_file.integer(number, class_id, "class_id"))

        labels_file = _IndexFile(osp.join(self.dataset_dir, "image_class_labels.txt"))
        labels = {}
        for number, fields in labels_file.lines():
            image_id, class_id = labels_file.fields(number, fields, ("image_id", "class_id"))
            image_id = labels_file.integer(number, image_id, "image_id")
            class_id = labels_file.integer(number, class_id, "class_id")
            if class_id not in classes:
                raise labels_file.error(number, f"class_id {class_id} is not in "
                                                f"{classes_file.path}")
            if image_id in labels:
                raise labels_file.error(number, f"image_id {image_id} is labelled twice")
            labels[image_id] = class_id

        images_file = _IndexFile(osp.join(self.dataset_dir, "images.txt"))
        items = []
        for number, fields in images_file.lines():
            image_id, relative = images_file.fields(number, fields, ("image_id", "path"))
            image_id = images_file.integer(number, image_id, "image_id")
            if image_id not in labels:
                raise images_file.error(number, f"image_id {image_id} has no class in "
                                                f"{labels_file.path}")
            path = images_file.image(number, osp.join(self.dataset_dir, "images", relative))
            items.append((path, labels[image_id]))
        return _split_by_class(items, classes)


@register_dataset
class CARS196(_DMLDataset):
    """Stanford Cars (CARS196): train on classes 1-98, test on 99-196 (see the module docstring)."""
    dataset_dir = "CARS196"
    dataset_name = "cars196"

    def read(self):
        from scipy.io import loadmat

        path = osp.join(self.dataset_dir, "cars_annos.mat")
        if not osp.isfile(path):
            raise DatasetError(f"{path} is not found")
        try:
            mat = loadmat(path)
        except Exception as e:  # scipy raises several types for a file it cannot parse
            raise DatasetError(f"{path} cannot be read as a MATLAB file: {e}") from None
        for key in ("annotations", "class_names"):
            if key not in mat:
                raise DatasetError(f"{path} has no {key!r} variable")
        annotations = mat["annotations"].ravel()
        missing = {"relative_im_path", "class"} - set(annotations.dtype.names or ())
        if missing:
            raise DatasetError(f"{path}: 'annotations' has no field(s) {sorted(missing)}")
        classes = range(1, mat["class_names"].size + 1)
        items = []
        for number, record in enumerate(annotations, 1):
            where = f"{path} annotation {number}"
            try:
                relative = str(np.asarray(record["relative_im_path"]).ravel()[0])
                class_id = int(np.asarray(record["class"]).ravel()[0])
            except (IndexError, TypeError, ValueError):
                raise DatasetError(f"{where}: relative_im_path {record['relative_im_path']!r} / "
                                   f"class {record['class']!r} are not a path and a class id"
                                   ) from None
            if class_id not in classes:
                raise DatasetError(f"{where}: class {class_id} is not in 1..{len(classes)} "
                                   f"(class_names)")
            items.append((_require_image(osp.join(self.dataset_dir, relative), where), class_id))
        return _split_by_class(items, classes)


@register_dataset
class InShop(_DMLDataset):
    """In-Shop Clothes Retrieval: the official train / query / gallery partition."""
    dataset_dir = "InShop"
    dataset_name = "inshop"
    columns = ("image_name", "item_id", "evaluation_status")

    def read_partition(self):
        """{"train", "query", "gallery"}: (path, item number) lists, as the partition file says."""
        index = _IndexFile(osp.join(self.dataset_dir, "Eval", "list_eval_partition.txt"))
        lines = index.lines()
        count_number, count_fields = lines[0]
        count = index.integer(count_number, index.fields(count_number, count_fields,
                                                           ("count",))[0], "count")
        if len(lines) < 2:
            raise index.error(count_number, "no header line follows the count")
        index.header(lines[1], self.columns)
        parts = {"train": [], "query": [], "gallery": []}
        for number, fields in lines[2:]:
            name, item, status = index.fields(number, fields, self.columns)
            match = re.fullmatch(r"id_(\d+)", item)
            if match is None:
                raise index.error(number, f"item_id {item!r} is not id_<number>")
            if status not in parts:
                raise index.error(number, f"evaluation_status {status!r} is not one of "
                                          f"{', '.join(parts)}")
            path = index.image(number, osp.join(self.dataset_dir, name))
            parts[status].append((path, int(match.group(1))))
        if count != len(lines) - 2:
            raise index.error(count_number, f"the count says {count} images, the file lists "
                                            f"{len(lines) - 2}")
        return parts

    def read(self):
        parts = self.read_partition()
        return parts["train"], parts["query"], parts["gallery"]


@register_dataset
class InShopQuery(InShop):
    """In-Shop with EAT's test set: the official query part, as both query and gallery."""

    def read(self):
        parts = self.read_partition()
        return parts["train"], parts["query"], list(parts["query"])


@register_dataset
class SOP(_DMLDataset):
    """Stanford Online Products: Ebay_train.txt trains, Ebay_test.txt is the test set."""
    dataset_dir = "Stanford_Online_Products"
    dataset_name = "sop"
    columns = ("image_id", "class_id", "super_class_id", "path")

    def _read_list(self, name):
        index = _IndexFile(osp.join(self.dataset_dir, name))
        lines = index.lines()
        index.header(lines[0], self.columns)
        items = []
        for number, fields in lines[1:]:
            image_id, class_id, super_class_id, relative = index.fields(number, fields,
                                                                        self.columns)
            index.integer(number, image_id, "image_id")
            index.integer(number, super_class_id, "super_class_id")
            items.append((index.image(number, osp.join(self.dataset_dir, relative)),
                          index.integer(number, class_id, "class_id")))
        return items

    def read(self):
        test = self._read_list("Ebay_test.txt")
        return self._read_list("Ebay_train.txt"), test, list(test)


"""Datasets of the DG protocols that fastreid 1.4.0 lacks or cannot evaluate on.

What fastreid 1.4.0 has (checked against its sources):

=============  ===========================================================================
Market1501,    loaded correctly (train / query / gallery); COMBINEALL adds query + gallery
DukeMTMC,      to the training set (Protocol-1/-3's "Full-" sources)
MSMT17, CUHK03
CUHK-SYSU      ``cuhkSYSU``: every crop is a training image, identity from ``p<pid>_s<n>``;
               the pattern also accepts pid -1 (the unlabelled crops of the person-search
               release), which fastreid keeps as one huge identity: :class:`CUHKSYSU` drops them
CUHK02         missing: :class:`CUHK02`
PRID, GRID,    training-only classes over re-organised folders (everything in ``train``, no
VIPeR, iLIDS   query / gallery), so they cannot be DG *targets*: :class:`PRID_DG`,
               :class:`GRID_DG`, :class:`VIPeR_DG`, :class:`iLIDS_DG` read the original
               releases and build the usual single-shot test protocol for one of 10 random
               query / gallery splits (``split_id``; tools/dg_eval.py averages the 10)
=============  ===========================================================================

Expected layouts under the datasets root (the releases' own), and the protocol of each target:

* ``prid_2011/single_shot/cam_a/person_0001.png`` (385 persons), ``cam_b/`` (749); persons
  1-200 appear in both. Test: 100 random persons of the 200; query = their cam_a image, gallery =
  their cam_b image + cam_b persons 201-749 (distractors).
* ``underground_reid/probe/*.jpeg``, ``underground_reid/gallery/*.jpeg``, names
  ``<pid:4>_<cam>_...jpeg`` (pid 0000: 775 gallery-only distractors). Test: 125 random of the 250
  paired persons; query = their probe images; gallery = their gallery images + every distractor.
* ``VIPeR/cam_a/*.bmp``, ``VIPeR/cam_b/*.bmp``, names ``<index>_<angle>.bmp`` (the index is the
  person). Test: 316 random persons; query = cam_a, gallery = cam_b.
* ``ilids/i-LIDS_Pedestrian/Persons/<pid:4><image:3>.jpg`` (QMUL i-LIDS, 119 persons, 476
  images, no camera labels). Test: 60 random persons; one random image each as query (camid 0),
  another as gallery (camid 1).
* ``cuhk02/Dataset/P{1..5}/cam{1,2}/<pid>_<k>.png`` (5 camera pairs, 1,816 persons). train =
  P1-P4, query = P5 cam1, gallery = P5 cam2 (COMBINEALL: all of it, as Protocol-1's Full-C2).
* ``cuhk_sysu/cropped_images/p<pid>_s<n>.jpg`` (as fastreid's cuhkSYSU).

The random splits draw from ``numpy.random.default_rng(split_id)``: the same split_id gives the
same split everywhere, and the 10 splits of tools/dg_eval.py are 0-9.
"""
import glob
import os.path as osp
import re

import numpy as np
from fastreid.data.datasets.bases import ImageDataset

from .registry import register_dataset
from fastreid.data.datasets.cuhk_sysu import cuhkSYSU

__all__ = ["CUHK02", "CUHKSYSU", "PRID_DG", "GRID_DG", "VIPeR_DG", "iLIDS_DG",
           "SPLIT_DATASETS"]


def _sorted_glob(*parts):
    return sorted(glob.glob(osp.join(*parts)))


class _SplitTestDataset(ImageDataset):
    """A test-only dataset with ``num_splits`` random query / gallery splits (``split_id``)."""
    num_splits = 10
    dataset_dir = ""
    dataset_name = ""

    def __init__(self, root="datasets", split_id=0, **kwargs):
        if not 0 <= int(split_id):
            raise ValueError(f"split_id must be >= 0, got {split_id}")
        self.root = root
        self.split_id = int(split_id)
        self.dataset_dir = osp.join(root, type(self).dataset_dir)
        self.check_before_run(self.required_dirs())
        query, gallery = self.make_split(np.random.default_rng(self.split_id))
        kwargs.pop("combineall", None)  # test-only: nothing to combine
        super().__init__([], query, gallery, **kwargs)

    def required_dirs(self):
        return [self.dataset_dir]

    def make_split(self, rng):
        raise NotImplementedError

    @staticmethod
    def _pick(rng, ids, n):
        ids = sorted(ids)
        if len(ids) < n:
            raise RuntimeError(f"the protocol needs {n} identities, found {len(ids)}")
        return set(ids[i] for i in rng.choice(len(ids), size=n, replace=False))


@register_dataset
class PRID_DG(_SplitTestDataset):
    """PRID 2011 single-shot, DG test protocol (see the module docstring)."""
    dataset_dir = "prid_2011"
    dataset_name = "prid"
    num_test_ids = 100
    num_shared_ids = 200

    def required_dirs(self):
        return [osp.join(self.dataset_dir, "single_shot", cam) for cam in ("cam_a", "cam_b")]

    def _images(self, cam):
        out = {}
        for path in _sorted_glob(self.dataset_dir, "single_shot", cam, "person_*.png"):
            out[int(re.search(r"person_(\d+)", osp.basename(path)).group(1))] = path
        return out

    def make_split(self, rng):
        cam_a, cam_b = self._images("cam_a"), self._images("cam_b")
        shared = [p for p in cam_a if p <= self.num_shared_ids and p in cam_b]
        test = self._pick(rng, shared, self.num_test_ids)
        query = [(cam_a[p], p, 0) for p in sorted(test)]
        gallery = [(cam_b[p], p, 1) for p in sorted(cam_b)
                   if p in test or p > self.num_shared_ids]
        return query, gallery


@register_dataset
class GRID_DG(_SplitTestDataset):
    """QMUL underGround Re-IDentification (GRID), DG test protocol (see the module docstring)."""
    dataset_dir = "underground_reid"
    dataset_name = "grid"
    num_test_ids = 125

    def required_dirs(self):
        return [osp.join(self.dataset_dir, sub) for sub in ("probe", "gallery")]

    def _images(self, sub):
        out = []
        for path in _sorted_glob(self.dataset_dir, sub, "*.jpeg"):
            fields = osp.basename(path).split("_")
            out.append((path, int(fields[0]), int(fields[1]) - 1))
        return out

    def make_split(self, rng):
        probe, gallery_all = self._images("probe"), self._images("gallery")
        paired = {pid for _, pid, _ in probe if pid > 0} & {pid for _, pid, _ in gallery_all}
        test = self._pick(rng, paired, self.num_test_ids)
        query = [item for item in probe if item[1] in test]
        gallery = [item for item in gallery_all if item[1] in test or item[1] == 0]
        return query, gallery


@register_dataset
class VIPeR_DG(_SplitTestDataset):
    """VIPeR, DG test protocol (see the module docstring)."""
    dataset_dir = "VIPeR"
    dataset_name = "viper"
    num_test_ids = 316

    def required_dirs(self):
        return [osp.join(self.dataset_dir, cam) for cam in ("cam_a", "cam_b")]

    def _images(self, cam):
        out = {}
        for path in _sorted_glob(self.dataset_dir, cam, "*.bmp"):
            out.setdefault(int(osp.basename(path).split("_")[0]), path)
        return out

    def make_split(self, rng):
        cam_a, cam_b = self._images("cam_a"), self._images("cam_b")
        test = self._pick(rng, set(cam_a) & set(cam_b), self.num_test_ids)
        query = [(cam_a[p], p, 0) for p in sorted(test)]
        gallery = [(cam_b[p], p, 1) for p in sorted(test)]
        return query, gallery


@register_dataset
class iLIDS_DG(_SplitTestDataset):
    """QMUL i-LIDS, DG test protocol (see the module docstring)."""
    dataset_dir = "ilids"
    dataset_name = "ilids"
    num_test_ids = 60

    def required_dirs(self):
        return [osp.join(self.dataset_dir, "i-LIDS_Pedestrian", "Persons")]

    def make_split(self, rng):
        by_pid = {}
        for path in _sorted_glob(self.dataset_dir, "i-LIDS_Pedestrian", "Persons", "*.jpg"):
            by_pid.setdefault(int(osp.basename(path)[:4]), []).append(path)
        usable = [p for p, paths in by_pid.items() if len(paths) >= 2]
        test = self._pick(rng, usable, self.num_test_ids)
        query, gallery = [], []
        for pid in sorted(test):
            q, g = rng.choice(len(by_pid[pid]), size=2, replace=False)
            query.append((by_pid[pid][q], pid, 0))
            gallery.append((by_pid[pid][g], pid, 1))
        return query, gallery


@register_dataset
class CUHK02(ImageDataset):
    """CUHK02: 5 camera pairs (10 cameras); train P1-P4, test P5 (query cam1, gallery cam2)."""
    dataset_dir = "cuhk02"
    dataset_name = "cuhk02"
    pairs = ("P1", "P2", "P3", "P4", "P5")
    test_pair = "P5"

    def __init__(self, root="datasets", **kwargs):
        self.root = root
        self.data_dir = osp.join(root, self.dataset_dir, "Dataset")
        self.check_before_run([osp.join(self.data_dir, pair) for pair in self.pairs])
        train, query, gallery = [], [], []
        for index, pair in enumerate(self.pairs):
            is_test = pair == self.test_pair
            for view in (1, 2):
                camid = 2 * index + view - 1
                for path in _sorted_glob(self.data_dir, pair, f"cam{view}", "*.png"):
                    pid = f"{pair}_{osp.basename(path).split('_')[0]}"
                    if not is_test:
                        train.append((path, f"{self.dataset_name}_{pid}",
                                      f"{self.dataset_name}_{camid}"))
                    else:
                        (query if view == 1 else gallery).append((path, pid, camid))
        # test pids as ints (the evaluator needs numbers); pairs are disjoint people
        test_ids = {pid: i for i, pid in enumerate(sorted({p for _, p, _ in query + gallery}))}
        query = [(path, test_ids[pid], cam) for path, pid, cam in query]
        gallery = [(path, test_ids[pid], cam) for path, pid, cam in gallery]
        super().__init__(train, query, gallery, **kwargs)


@register_dataset
class CUHKSYSU(cuhkSYSU):
    """fastreid's cuhkSYSU without the unlabelled (pid < 0) crops."""

    def process_dir(self, dir_path):
        keep = []
        for img_path, pid, camid in super().process_dir(dir_path):
            if int(pid.rsplit("_", 1)[1]) >= 0:
                keep.append((img_path, pid, camid))
        return sorted(keep)


SPLIT_DATASETS = ("PRID_DG", "GRID_DG", "VIPeR_DG", "iLIDS_DG")

"""Tiny on-disk datasets in the exact layouts fastreid 1.4.0's own loaders read (for tests).

Each ``write_*`` function draws a few synthetic people (SynthReID's renderer) into ``root`` and returns
a :class:`FixtureCounts` with the numbers fastreid's registered dataset class should report for it:

=================  ==========================================================================
Market1501         ``<root>/Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}``
                   ``0002_c1s1_000001_00.jpg``; pid 0 = distractor (kept), -1 = junk (skipped)
DukeMTMC           ``<root>/DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}``,
                   ``0005_c2_f0000001.jpg``; gallery-only distractor identities
MSMT17             ``<root>/MSMT17_V1/{train,test}/<pid>/<pid>_<k>_<cam>_0303<tod>_<n>_0.jpg`` and
                   ``list_{train,val,query,gallery}.txt`` (``V2``: ``mask_train_v2``/``mask_test_v2``)
CUHK03             ``<root>/cuhk03/images_{labeled,detected}/<pair>_<pid>_<view>_<k>.png`` plus the
                   four ``splits_*.json`` files fastreid's preprocessing would have produced
=================  ==========================================================================

CUHK03 note: fastreid's CUHK03 insists that ``cuhk03_release/cuhk-03.mat`` and the two
``cuhk03_new_protocol_config_*.mat`` files *exist* but skips reading them when the extracted images
and split jsons are present, so those three are written as placeholders. Building them for real
needs h5py (MATLAB v7.3), which is not a RobustReID dependency.
"""
from __future__ import annotations

import json
import os
import os.path as osp
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Tuple

import numpy as np
from PIL import Image

from .synth_reid import TIME_LABELS, make_camera_style, make_identity, render_image

__all__ = ["FixtureCounts", "draw_fixture_image", "write_market1501", "write_dukemtmc",
           "write_msmt17", "write_cuhk03", "write_undecodable_image"]

# Keeps fixture people apart from every SynthReID variant's identities.
_FIXTURE_ID_BASE = 700000

Item = Tuple[str, int, int]  # (path, pid, camid) as written


@dataclass
class FixtureCounts:
    """What fastreid should read back: images / distinct pids / distinct cameras per subset."""
    dataset_dir: str
    train_images: int
    train_pids: int
    train_cams: int
    query_images: int
    query_pids: int
    query_cams: int
    gallery_images: int
    gallery_pids: int
    gallery_cams: int

    def as_dict(self) -> Dict:
        return asdict(self)


def _counts(dataset_dir: str, train: List[Item], query: List[Item], gallery: List[Item]) -> FixtureCounts:
    def stats(items):
        return len(items), len({i[1] for i in items}), len({i[2] for i in items})
    return FixtureCounts(dataset_dir, *stats(train), *stats(query), *stats(gallery))


def draw_fixture_image(pid: int, cam: int, frame: int, height: int = 64, width: int = 32,
                       seed: int = 0) -> np.ndarray:
    """A small pedestrian image: same pid -> same clothes; camera picks one of SynthReID's styles."""
    camera = make_camera_style(seed, (cam - 1) % 3, (cam - 1) // 3)
    identity = make_identity(seed, _FIXTURE_ID_BASE + max(pid, 0)) if pid > 0 else None
    rng = np.random.default_rng([seed, max(pid, 0), cam, frame])
    image, _ = render_image(identity, camera, frame % len(TIME_LABELS), rng, height, width)
    return image


def _save(path: str, image: np.ndarray) -> None:
    os.makedirs(osp.dirname(path), exist_ok=True)
    fmt = "PNG" if path.endswith(".png") else "JPEG"
    Image.fromarray(image).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def _cams_for(pid: int, num_images: int, num_cams: int) -> List[int]:
    """Round-robin cameras starting at a pid-dependent one (so cameras are not all aligned)."""
    return [(pid + k) % num_cams + 1 for k in range(num_images)]


def _check(num_cams: int, imgs_per_id: int, max_cams: int) -> None:
    # A query needs a gallery image of the same person from another camera.
    if not 2 <= num_cams <= max_cams:
        raise ValueError("num_cams must be in [2, {}]".format(max_cams))
    if imgs_per_id < 2:
        raise ValueError("imgs_per_id must be >= 2")


# ----------------------------------------------------------------------------------------------
# Market-1501 and DukeMTMC-reID (same folder structure, different names)
# ----------------------------------------------------------------------------------------------
def _write_bbox_layout(data_dir, name_fmt, train_pids, test_pids, num_cams, imgs_per_id,
                       height, width, seed):
    """Write train ids to bounding_box_train; per test id the first image to query, rest to gallery."""
    frame = 0
    train, query, gallery = [], [], []
    for pid in list(train_pids) + list(test_pids):
        for k, cam in enumerate(_cams_for(pid, imgs_per_id, num_cams)):
            frame += 1
            sub, items = (("bounding_box_train", train) if pid in train_pids else
                          ("query", query) if k == 0 else ("bounding_box_test", gallery))
            path = osp.join(data_dir, sub, name_fmt(pid, cam, frame))
            _save(path, draw_fixture_image(pid, cam, frame, height, width, seed))
            items.append((path, pid, cam - 1))
    return train, query, gallery, frame


def _market_name(pid: int, cam: int, frame: int) -> str:
    pid_str = "-1" if pid == -1 else "{:04d}".format(pid)
    return "{}_c{}s1_{:06d}_00.jpg".format(pid_str, cam, frame)


def write_market1501(root: str, num_train_ids: int = 4, num_test_ids: int = 3, num_cams: int = 3,
                     imgs_per_id: int = 4, num_distractors: int = 2, num_junk: int = 1,
                     legacy_layout: bool = False, height: int = 64, width: int = 32,
                     seed: int = 0) -> FixtureCounts:
    """Market-1501 under ``<root>/Market-1501-v15.09.15`` (``legacy_layout``: directly in ``root``).

    Gallery also gets ``num_distractors`` pid-0 images (fastreid keeps them as a pid) and
    ``num_junk`` pid -1 images (fastreid drops them; not counted).
    """
    _check(num_cams, imgs_per_id, 6)
    data_dir = root if legacy_layout else osp.join(root, "Market-1501-v15.09.15")
    train_pids = [2 * i + 2 for i in range(num_train_ids)]  # Market's pids are sparse
    test_pids = [2 * i + 3 for i in range(num_test_ids)]
    train, query, gallery, frame = _write_bbox_layout(
        data_dir, _market_name, train_pids, test_pids, num_cams, imgs_per_id, height, width, seed)
    for k in range(num_distractors + num_junk):
        pid, cam, frame = (0 if k < num_distractors else -1), k % num_cams + 1, frame + 1
        path = osp.join(data_dir, "bounding_box_test", _market_name(pid, cam, frame))
        _save(path, draw_fixture_image(pid, cam, frame, height, width, seed))
        if pid == 0:
            gallery.append((path, pid, cam - 1))
    return _counts(data_dir, train, query, gallery)


def write_dukemtmc(root: str, num_train_ids: int = 4, num_test_ids: int = 3, num_cams: int = 4,
                   imgs_per_id: int = 4, num_gallery_only_ids: int = 1, height: int = 64,
                   width: int = 32, seed: int = 0) -> FixtureCounts:
    """DukeMTMC-reID under ``<root>/DukeMTMC-reID`` (cameras 1-8, ``0005_c2_f0046182.jpg``).

    Like the real set, a few identities appear only in the gallery (distractors).
    """
    _check(num_cams, imgs_per_id, 8)
    data_dir = osp.join(root, "DukeMTMC-reID")
    train_pids = [i + 1 for i in range(num_train_ids)]
    test_pids = [num_train_ids + i + 1 for i in range(num_test_ids)]
    name = lambda pid, cam, frame: "{:04d}_c{}_f{:07d}.jpg".format(pid, cam, frame)  # noqa: E731
    train, query, gallery, frame = _write_bbox_layout(
        data_dir, name, train_pids, test_pids, num_cams, imgs_per_id, height, width, seed)
    for i in range(num_gallery_only_ids):
        pid, cam, frame = num_train_ids + num_test_ids + i + 1, i % num_cams + 1, frame + 1
        path = osp.join(data_dir, "bounding_box_test", name(pid, cam, frame))
        _save(path, draw_fixture_image(pid, cam, frame, height, width, seed))
        gallery.append((path, pid, cam - 1))
    return _counts(data_dir, train, query, gallery)


# ----------------------------------------------------------------------------------------------
# MSMT17
# ----------------------------------------------------------------------------------------------
_MSMT_DIRS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}


def _msmt_name(pid: int, k: int, cam: int, frame: int) -> str:
    # e.g. 0000/0000_000_01_0303morning_0015_0.jpg; fastreid reads the camera from field 2
    return "{0:04d}/{0:04d}_{1:03d}_{2:02d}_0303{3}_{4:04d}_0.jpg".format(
        pid, k, cam, TIME_LABELS[frame % len(TIME_LABELS)], frame)


def _write_list(path: str, entries: Iterable[Tuple[str, int]]) -> None:
    with open(path, "w") as f:
        for rel, pid in entries:
            f.write("{} {}\n".format(rel, pid))  # exactly one space: fastreid does split(' ')


def write_msmt17(root: str, version: str = "V1", num_train_ids: int = 4, num_test_ids: int = 3,
                 num_cams: int = 4, imgs_per_id: int = 4, num_val_ids: int = 2, height: int = 64,
                 width: int = 32, seed: int = 0) -> FixtureCounts:
    """MSMT17 under ``<root>/MSMT17_<version>`` with its four list files.

    The last image of the first ``num_val_ids`` train identities goes to ``list_val.txt`` (not
    to ``list_train.txt``), as in the release; fastreid trains on list_train only. Test pids restart
    at 0 in the lists (fastreid offsets them by the number of train pids).
    """
    _check(num_cams, imgs_per_id, 15)
    main_dir = osp.join(root, "MSMT17_" + version)
    train_dir, test_dir = (osp.join(main_dir, d) for d in _MSMT_DIRS[version])
    lists = {"train": [], "val": [], "query": [], "gallery": []}
    train, query, gallery = [], [], []
    frame = 0
    for split_pid in range(num_train_ids + num_test_ids):
        is_train = split_pid < num_train_ids
        pid = split_pid if is_train else split_pid - num_train_ids  # local pid within train / test
        for k, cam in enumerate(_cams_for(split_pid, imgs_per_id, num_cams)):
            frame += 1
            rel = _msmt_name(pid, k, cam, frame)
            path = osp.join(train_dir if is_train else test_dir, rel)
            _save(path, draw_fixture_image(split_pid + 1, cam, frame, height, width, seed))
            if is_train:
                is_val = pid < num_val_ids and k == imgs_per_id - 1
                lists["val" if is_val else "train"].append((rel, pid))
                if not is_val:
                    train.append((path, pid, cam - 1))
            else:
                lists["query" if k == 0 else "gallery"].append((rel, pid))
                (query if k == 0 else gallery).append((path, pid, cam - 1))
    for name, entries in lists.items():
        _write_list(osp.join(main_dir, "list_{}.txt".format(name)), entries)
    return _counts(main_dir, train, query, gallery)


# ----------------------------------------------------------------------------------------------
# CUHK03 (pre-extracted images + split jsons)
# ----------------------------------------------------------------------------------------------
_CUHK03_PLACEHOLDERS = ("cuhk03_release/cuhk-03.mat", "cuhk03_new_protocol_config_detected.mat",
                        "cuhk03_new_protocol_config_labeled.mat")


def _cuhk03_people(num_ids: int):
    """(camera pair 1-5, pid within pair, global label) for every person, as in the .mat release."""
    return [((label - 1) % 5 + 1, (label - 1) // 5 + 1, label) for label in range(1, num_ids + 1)]


def _cuhk03_images(img_dir, people, imgs_per_view, height, width, seed, jitter):
    """Write each person's two views; returns {label: [(path, camid), ...]}."""
    out = {}
    for campid, pid, label in people:
        paths = []
        for imgid in range(2 * imgs_per_view):
            view = 1 if imgid < imgs_per_view else 2
            name = "{:01d}_{:03d}_{:01d}_{:02d}.png".format(campid, pid, view, imgid + 1)
            path = osp.join(img_dir, name)
            cam = 2 * (campid - 1) + view  # pair k has cameras 2k-1 / 2k
            _save(path, draw_fixture_image(label, (cam - 1) % 6 + 1, imgid + jitter, height, width, seed))
            paths.append((path, view - 1))
        out[label] = paths
    return out


def _cuhk03_splits(images, train_labels, test_labels):
    """The 'new' (767/700-style) split and a single 'classic' split, as fastreid's json has them."""
    relabel = {label: i for i, label in enumerate(sorted(train_labels))}
    train = [[p, relabel[lab], c] for lab in sorted(train_labels) for p, c in images[lab]]
    query, gallery = [], []
    for label in sorted(test_labels):
        seen_views = set()
        for path, camid in images[label]:
            is_query = camid not in seen_views  # first image of each view is a query
            seen_views.add(camid)
            (query if is_query else gallery).append([path, label, camid])
    test_relabel = {label: i for i, label in enumerate(sorted(test_labels))}
    test = [[p, test_relabel[lab], c] for lab in sorted(test_labels) for p, c in images[lab]]

    def entry(tr, q, g):
        return {"train": tr, "query": q, "gallery": g,
                "num_train_pids": len({x[1] for x in tr}), "num_train_imgs": len(tr),
                "num_query_pids": len({x[1] for x in q}), "num_query_imgs": len(q),
                "num_gallery_pids": len({x[1] for x in g}), "num_gallery_imgs": len(g)}
    return [entry(train, query, gallery)], [entry(train, test, test)]


def write_cuhk03(root: str, num_train_ids: int = 4, num_test_ids: int = 3, imgs_per_view: int = 2,
                 height: int = 64, width: int = 32, seed: int = 0) -> FixtureCounts:
    """CUHK03 under ``<root>/cuhk03`` as left by fastreid's preprocessing (see module docstring).

    Returned counts are for fastreid's default protocol (``cuhk03_labeled=True``, new split).
    """
    if imgs_per_view < 2:
        raise ValueError("imgs_per_view must be >= 2 (one query + one gallery image per view)")
    dataset_dir = osp.join(root, "cuhk03")
    people = _cuhk03_people(num_train_ids + num_test_ids)
    train_labels = [label for _, _, label in people[:num_train_ids]]
    test_labels = [label for _, _, label in people[num_train_ids:]]
    new_splits = {}
    for kind, jitter in (("labeled", 0), ("detected", 1)):  # detected = slightly different crops
        images = _cuhk03_images(osp.join(dataset_dir, "images_" + kind), people, imgs_per_view,
                                height, width, seed, jitter)
        new_splits[kind], classic_split = _cuhk03_splits(images, train_labels, test_labels)
        for name, split in (("new", new_splits[kind]), ("classic", classic_split)):
            with open(osp.join(dataset_dir, "splits_{}_{}.json".format(name, kind)), "w") as f:
                json.dump(split, f, indent=1)
    for rel in _CUHK03_PLACEHOLDERS:
        path = osp.join(dataset_dir, rel)
        os.makedirs(osp.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"RobustReID test placeholder: fastreid only checks that this file exists\n")
    default = new_splits["labeled"][0]
    return _counts(dataset_dir, default["train"], default["query"], default["gallery"])


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def write_undecodable_image(path: str, kind: str = "garbage") -> str:
    """Write a file with an image extension that PIL cannot decode.

    ``kind``: ``"garbage"`` (not an image; ``Image.open`` fails), ``"truncated"`` (a real JPEG cut
    short: opens, but fails on decode) or ``"empty"`` (0 bytes).
    """
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    if kind == "garbage":
        payload = b"this is not an image\n" * 8
    elif kind == "truncated":
        from io import BytesIO
        buf = BytesIO()
        Image.fromarray(draw_fixture_image(1, 1, 1)).save(buf, format="JPEG", quality=95)
        payload = buf.getvalue()[: len(buf.getvalue()) // 3]
    elif kind == "empty":
        payload = b""
    else:
        raise ValueError("kind must be garbage | truncated | empty")
    with open(path, "wb") as f:
        f.write(payload)
    return path


# ----------------------------------------------------------------------------------------------
# Domain-generalization protocol datasets (robustreid.data.dg_datasets), in their releases' layouts
# ----------------------------------------------------------------------------------------------
__all__ += ["write_prid", "write_grid", "write_viper", "write_ilids", "write_cuhk02",
            "write_cuhksysu"]

_DG_ID_BASE = 1000  # fixture people of these writers, apart from the ones above


def _save_as(path: str, image: np.ndarray, fmt: str) -> None:
    os.makedirs(osp.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path, format=fmt)


def write_prid(root: str, num_shared: int = 6, num_a_only: int = 2, num_b_only: int = 4,
               height: int = 64, width: int = 32, seed: int = 0) -> Dict[str, int]:
    """PRID 2011 single-shot: ``prid_2011/single_shot/cam_{a,b}/person_%04d.png``; persons
    1..num_shared in both cameras, then cam_a-only and cam_b-only persons (distractors)."""
    base = osp.join(root, "prid_2011", "single_shot")
    for pid in range(1, num_shared + num_a_only + 1):
        _save_as(osp.join(base, "cam_a", "person_{:04d}.png".format(pid)),
                 draw_fixture_image(_DG_ID_BASE + pid, 1, pid, height, width, seed), "PNG")
    b_ids = list(range(1, num_shared + 1)) + [num_shared + num_a_only + i + 1
                                               for i in range(num_b_only)]
    for pid in b_ids:
        # cam_b numbering of the release: shared persons first, then cam_b-only ones
        number = pid if pid <= num_shared else pid - num_a_only
        _save_as(osp.join(base, "cam_b", "person_{:04d}.png".format(number)),
                 draw_fixture_image(_DG_ID_BASE + pid, 2, pid, height, width, seed), "PNG")
    return {"shared": num_shared, "cam_a": num_shared + num_a_only,
            "cam_b": num_shared + num_b_only}


def write_grid(root: str, num_paired: int = 6, num_distractors: int = 3, num_cams: int = 8,
               height: int = 64, width: int = 32, seed: int = 0) -> Dict[str, int]:
    """GRID: ``underground_reid/{probe,gallery}/<pid:4>_<cam>_<frame>_...jpeg``; pid 0000 are
    gallery-only distractors."""
    base = osp.join(root, "underground_reid")
    frame = 0
    for pid in range(1, num_paired + 1):
        for sub, cam in (("probe", pid % num_cams + 1), ("gallery", (pid + 1) % num_cams + 1)):
            frame += 1
            name = "{:04d}_{}_{:05d}_10_20_30_40.jpeg".format(pid, cam, frame)
            _save_as(osp.join(base, sub, name),
                     draw_fixture_image(_DG_ID_BASE + 100 + pid, cam, frame, height, width, seed),
                     "JPEG")
    for k in range(num_distractors):
        frame += 1
        _save_as(osp.join(base, "gallery", "0000_{}_{:05d}_10_20_30_40.jpeg".format(
            k % num_cams + 1, frame)), draw_fixture_image(0, k % num_cams + 1, frame, height,
                                                          width, seed), "JPEG")
    return {"paired": num_paired, "distractors": num_distractors}


def write_viper(root: str, num_ids: int = 6, height: int = 64, width: int = 32,
                seed: int = 0) -> Dict[str, int]:
    """VIPeR: ``VIPeR/cam_{a,b}/<index:3>_<angle>.bmp``, one image per person and camera."""
    base = osp.join(root, "VIPeR")
    for index in range(num_ids):
        for cam, angle in (("cam_a", 0), ("cam_b", 90)):
            _save_as(osp.join(base, cam, "{:03d}_{}.bmp".format(index, angle)),
                     draw_fixture_image(_DG_ID_BASE + 200 + index, 1 if cam == "cam_a" else 4,
                                        index, height, width, seed), "BMP")
    return {"ids": num_ids}


def write_ilids(root: str, num_ids: int = 6, imgs_per_id: int = 3, height: int = 64,
                width: int = 32, seed: int = 0) -> Dict[str, int]:
    """QMUL i-LIDS: ``ilids/i-LIDS_Pedestrian/Persons/<pid:4><image:3>.jpg``."""
    base = osp.join(root, "ilids", "i-LIDS_Pedestrian", "Persons")
    for pid in range(1, num_ids + 1):
        for k in range(1, imgs_per_id + 1):
            _save_as(osp.join(base, "{:04d}{:03d}.jpg".format(pid, k)),
                     draw_fixture_image(_DG_ID_BASE + 300 + pid, k % 6 + 1, k, height, width,
                                        seed), "JPEG")
    return {"ids": num_ids, "images": num_ids * imgs_per_id}


def write_cuhk02(root: str, ids_per_pair: int = 2, imgs_per_view: int = 2, height: int = 64,
                 width: int = 32, seed: int = 0) -> FixtureCounts:
    """CUHK02: ``cuhk02/Dataset/P{1..5}/cam{1,2}/<pid:3>_<k>.png``; pids restart in every pair.

    Counts are for :class:`robustreid.data.dg_datasets.CUHK02`: train P1-P4 (8 cameras), query
    every P5 cam1 image, gallery every P5 cam2 image."""
    base = osp.join(root, "cuhk02", "Dataset")
    subsets = {"train": [], "query": [], "gallery": []}
    for index in range(5):
        pair = "P{}".format(index + 1)
        for pid in range(1, ids_per_pair + 1):
            person = _DG_ID_BASE + 400 + index * ids_per_pair + pid
            for view in (1, 2):
                camid = 2 * index + view - 1
                for k in range(imgs_per_view):
                    path = osp.join(base, pair, "cam{}".format(view),
                                    "{:03d}_{}.png".format(pid, k))
                    image = draw_fixture_image(person, camid % 6 + 1, k, height, width, seed)
                    _save_as(path, image, "PNG")
                    subset = "train" if index < 4 else "query" if view == 1 else "gallery"
                    subsets[subset].append((path, person, camid))
    return _counts(osp.join(root, "cuhk02"), subsets["train"], subsets["query"], subsets["gallery"])


def write_cuhksysu(root: str, num_ids: int = 4, imgs_per_id: int = 3, num_unlabelled: int = 2,
                   height: int = 64, width: int = 32, seed: int = 0) -> FixtureCounts:
    """CUHK-SYSU crops: ``cuhk_sysu/cropped_images/p<pid>_s<n>.jpg``, plus ``num_unlabelled``
    crops with pid -1 (dropped by robustreid's CUHKSYSU, kept by fastreid's cuhkSYSU)."""
    base = osp.join(root, "cuhk_sysu", "cropped_images")
    train, n = [], 0
    for pid in range(1, num_ids + 1):
        for _ in range(imgs_per_id):
            n += 1
            path = osp.join(base, "p{}_s{}.jpg".format(pid, n))
            _save_as(path, draw_fixture_image(_DG_ID_BASE + 500 + pid, 1, n, height, width, seed),
                     "JPEG")
            train.append((path, pid, 0))
    for _ in range(num_unlabelled):
        n += 1
        _save_as(osp.join(base, "p-1_s{}.jpg".format(n)),
                 draw_fixture_image(0, 1, n, height, width, seed), "JPEG")
    return _counts(osp.join(root, "cuhk_sysu"), train, [], [])

"""SynthReID generation / parsing, the dataset fixtures, and fastreid's loaders on CPU."""
import collections
import dataclasses
import hashlib
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

import robustreid  # noqa: F401  (compat patches + dataset registration)
from fastreid.data.datasets import DATASET_REGISTRY
from robustreid.data import fixtures, synth_reid

TINY = synth_reid.SynthReIDTiny.spec
SPLIT_DIRS = ("bounding_box_train", "query", "bounding_box_test")
MARKET_NAME = re.compile(r"^(-1|\d{4})_c[1-6]s[1-3]_\d{6}_\d{2}\.jpg$")


def _digest_tree(directory):
    """sha256 over every file's relative path and bytes."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, directory).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def _jpgs(dataset_dir):
    return sorted(os.path.join(sub, n) for sub in SPLIT_DIRS
                  for n in os.listdir(os.path.join(dataset_dir, sub)) if n.endswith(".jpg"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """One SynthReIDTiny shared by the read-only tests."""
    return synth_reid.ensure_synth_dataset(str(tmp_path_factory.mktemp("synth")), TINY, verbose=False)


# ---------------------------------------------------------------------------------------------------
# SynthReID
# ---------------------------------------------------------------------------------------------------
def test_generation_is_deterministic(tmp_path, tiny_dir):
    again = synth_reid.ensure_synth_dataset(str(tmp_path / "a"), TINY, verbose=False)
    assert _digest_tree(again) == _digest_tree(tiny_dir)
    other_seed = dataclasses.replace(TINY, seed=1)
    other = synth_reid.ensure_synth_dataset(str(tmp_path / "b"), other_seed, verbose=False)
    assert _digest_tree(other) != _digest_tree(tiny_dir)


def test_market_format_and_parser(tiny_dir, tmp_path):
    files = _jpgs(tiny_dir)
    assert files and all(MARKET_NAME.match(os.path.basename(f)) for f in files)
    with Image.open(os.path.join(tiny_dir, files[0])) as img:
        assert img.size == (TINY.width, TINY.height) and img.mode == "RGB"

    ds = DATASET_REGISTRY.get("SynthReIDTiny")(root=os.path.dirname(tiny_dir))
    manifest = json.load(open(os.path.join(tiny_dir, synth_reid.MANIFEST_FILE)))["counts"]
    assert len(ds.train) == manifest["bounding_box_train"]
    assert len(ds.query) == manifest["query"] == TINY.num_test_ids * TINY.queries_per_id
    assert len(ds.gallery) == manifest["bounding_box_test"]
    assert ds.get_num_pids(ds.train) == TINY.num_train_ids
    assert all(pid.startswith("synthreidtiny_") for _, pid, _ in ds.train)  # fastreid's train prefix
    assert all(isinstance(pid, int) and isinstance(cam, int) for _, pid, cam in ds.query + ds.gallery)
    # every query keeps a same-identity gallery image from another camera (fastreid's protocol)
    gallery = {(pid, cam) for _, pid, cam in ds.gallery}
    for _, pid, cam in ds.query:
        assert any(p == pid and c != cam for p, c in gallery)
    assert {p for _, p, _ in ds.query}.isdisjoint({int(p.split("_")[1]) for _, p, _ in ds.train})


def test_long_tail_and_few_cameras():
    spec = synth_reid.SynthReID.spec
    records = synth_reid.plan_dataset(spec)
    splits = collections.Counter(r.split for r in records)
    assert 800 <= splits["train"] <= 1200 and splits["query"] == 100 and 400 <= splits["gallery"] <= 650

    train = [r for r in records if r.split == "train"]
    per_id = np.array(sorted(collections.Counter(r.pid for r in train).values()))
    assert len(per_id) == spec.num_train_ids
    assert per_id.max() >= 4 * np.median(per_id)  # long tail: a few ids have many images
    cams = collections.defaultdict(set)
    for r in train:
        cams[r.pid].add(r.cam)
    num_cams = np.array([len(c) for c in cams.values()])
    assert (num_cams == 1).mean() >= 0.1 and (num_cams <= 2).mean() >= 0.35
    assert num_cams.max() >= 5


def test_domains_have_distinct_styles(tiny_dir):
    """Mean colour of the background corners differs clearly between the three domains."""
    meta = synth_reid.load_side_info(tiny_dir)
    corners = collections.defaultdict(list)
    for rel, info in meta.items():
        img = np.asarray(Image.open(os.path.join(tiny_dir, rel)), np.float32) / 255
        corners[info["domain"]].append(np.concatenate([img[:8, :3], img[:8, -3:]]).mean((0, 1)))
    assert sorted(corners) == [0, 1, 2]
    means = {d: np.mean(v, axis=0) for d, v in corners.items()}
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(means[a] - means[b]).max() > 0.1, (a, b, means)


def test_per_domain_variant_has_one_domain(tmp_path):
    ds = DATASET_REGISTRY.get("SynthReIDTiny_D1")(root=str(tmp_path))
    assert {ds.side_info_for(p)["domain"] for p, _, _ in ds.train + ds.query + ds.gallery} == {1}
    assert ds.get_num_cams(ds.train) <= 4 and len(ds.query) > 0


def test_side_info(tiny_dir):
    meta = synth_reid.load_side_info(tiny_dir)
    assert sorted(meta) == _jpgs(tiny_dir)
    for rel, info in meta.items():
        pid, cam, seq = map(int, re.match(r"^.*/(\d+)_c(\d)s(\d)_", rel).groups())
        assert (info["pid"], info["camid"], info["time_id"]) == (pid, cam - 1, seq - 1)
        assert info["time"] == synth_reid.TIME_LABELS[info["time_id"]]
        assert info["domain_name"] == synth_reid.DOMAIN_NAMES[info["domain"]]
        assert info["identity"] == (TINY.id_offset + pid if pid else -1)
    assert len({info["time"] for info in meta.values()}) == 3

    ds = DATASET_REGISTRY.get("SynthReIDTiny")(root=os.path.dirname(tiny_dir))
    path, pid, cam = ds.train[0]
    info = synth_reid.side_info_for(path)
    assert ds.side_info_for(path) == info
    assert ("synthreidtiny_%d" % info["pid"], "synthreidtiny_%d" % info["camid"]) == (pid, cam)


def test_interrupted_generation_is_never_trusted(tmp_path, monkeypatch):
    root = str(tmp_path)
    real_save, calls = synth_reid._save_jpeg, []

    def crash_midway(image, path, quality):
        calls.append(path)
        if len(calls) == 30:
            raise RuntimeError("simulated crash")
        real_save(image, path, quality)

    monkeypatch.setattr(synth_reid, "_save_jpeg", crash_midway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        synth_reid.ensure_synth_dataset(root, TINY, verbose=False)
    assert os.listdir(root) == []  # no half dataset, no temp dir left behind
    monkeypatch.setattr(synth_reid, "_save_jpeg", real_save)

    target = synth_reid.ensure_synth_dataset(root, TINY, verbose=False)
    assert synth_reid.is_trusted(target, TINY)
    assert len(_jpgs(target)) == len(synth_reid.plan_dataset(TINY))


def test_untrusted_leftovers_are_regenerated(tmp_path):
    """A dir without manifest (hard kill), a missing image, or another spec's manifest: regenerate."""
    root = str(tmp_path)
    target = synth_reid.ensure_synth_dataset(root, TINY, verbose=False)
    expected = _digest_tree(target)

    def damage_and_reload(damage):
        damage()
        assert not synth_reid.is_trusted(target, TINY)
        DATASET_REGISTRY.get("SynthReIDTiny")(root=root)
        assert _digest_tree(target) == expected
        assert sorted(os.listdir(root)) == ["SynthReIDTiny"]  # stale copies were removed

    damage_and_reload(lambda: os.remove(os.path.join(target, synth_reid.MANIFEST_FILE)))
    damage_and_reload(lambda: os.remove(os.path.join(target, _jpgs(target)[5])))

    def other_spec():
        path = os.path.join(target, synth_reid.MANIFEST_FILE)
        manifest = json.load(open(path))
        manifest["spec_hash"] = synth_reid.spec_hash(dataclasses.replace(TINY, seed=7))
        json.dump(manifest, open(path, "w"))
    damage_and_reload(other_spec)


# ---------------------------------------------------------------------------------------------------
# Fixtures, read by fastreid's own dataset classes
# ---------------------------------------------------------------------------------------------------
FIXTURE_CASES = {
    "Market1501": lambda root: fixtures.write_market1501(root),
    "Market1501-legacy": lambda root: fixtures.write_market1501(root, legacy_layout=True),
    "DukeMTMC": lambda root: fixtures.write_dukemtmc(root),
    "MSMT17": lambda root: fixtures.write_msmt17(root),
    "MSMT17-V2": lambda root: fixtures.write_msmt17(root, version="V2", num_cams=5),
    "CUHK03": lambda root: fixtures.write_cuhk03(root),
}


@pytest.mark.filterwarnings("ignore:The current data structure is deprecated")
@pytest.mark.parametrize("case", sorted(FIXTURE_CASES))
def test_fixture_read_by_fastreid(case, tmp_path):
    expected = FIXTURE_CASES[case](str(tmp_path))
    ds = DATASET_REGISTRY.get(case.split("-")[0])(root=str(tmp_path))
    got = {}
    for subset in ("train", "query", "gallery"):
        items = getattr(ds, subset)
        got[subset + "_images"] = len(items)
        got[subset + "_pids"], got[subset + "_cams"] = ds.parse_data(items)
        assert all(os.path.isfile(path) for path, _, _ in items)
    want = {k: v for k, v in expected.as_dict().items() if k != "dataset_dir"}
    assert got == want
    assert expected.train_images > 0 and expected.query_images > 0 and expected.gallery_images > 0


def test_market_fixture_junk_and_distractors(tmp_path):
    counts = fixtures.write_market1501(str(tmp_path), num_distractors=2, num_junk=3)
    ds = DATASET_REGISTRY.get("Market1501")(root=str(tmp_path))
    on_disk = os.listdir(os.path.join(counts.dataset_dir, "bounding_box_test"))
    assert sum(n.startswith("-1_") for n in on_disk) == 3
    assert len(ds.gallery) == len(on_disk) - 3
    assert sum(pid == 0 for _, pid, _ in ds.gallery) == 2


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_undecodable_image(kind, tmp_path):
    from fastreid.data.data_utils import read_image

    path = fixtures.write_undecodable_image(str(tmp_path / "bad" / "0001_c1s1_000001_00.jpg"), kind)
    with pytest.raises(OSError):  # PIL's UnidentifiedImageError is an OSError too
        read_image(path)


# ---------------------------------------------------------------------------------------------------
# fastreid's loaders (needs robustreid.compat's CPU DataLoaderX)
# ---------------------------------------------------------------------------------------------------
def _loader_cfg():
    from fastreid.config import get_cfg

    cfg = robustreid.add_robustreid_config(get_cfg())
    cfg.DATASETS.NAMES = ("SynthReIDTiny",)
    cfg.DATASETS.TESTS = ("SynthReIDTiny",)
    cfg.INPUT.SIZE_TRAIN = [64, 32]
    cfg.INPUT.SIZE_TEST = [64, 32]
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.SAMPLER_TRAIN = "NaiveIdentitySampler"
    cfg.DATALOADER.NUM_INSTANCE = 4
    cfg.SOLVER.IMS_PER_BATCH = 16
    cfg.TEST.IMS_PER_BATCH = 32
    return cfg


def test_fastreid_loaders_on_cpu(tmp_path, monkeypatch):
    import torch
    import fastreid.data.build as data_build

    monkeypatch.setenv("FASTREID_DATASETS", str(tmp_path))
    monkeypatch.setattr(data_build, "_root", str(tmp_path))  # read once at import time
    cfg = _loader_cfg()

    batch = next(iter(data_build.build_reid_train_loader(cfg)))
    assert batch["images"].shape == (16, 3, 64, 32) and batch["images"].device.type == "cpu"
    assert batch["targets"].dtype == torch.int64
    per_id = collections.Counter(batch["targets"].tolist())
    assert len(per_id) == 4 and set(per_id.values()) == {4}  # 16 = 4 ids x NUM_INSTANCE

    test_loader, num_query = data_build.build_reid_test_loader(cfg, dataset_name="SynthReIDTiny")
    ds = DATASET_REGISTRY.get("SynthReIDTiny")(root=str(tmp_path))
    assert num_query == len(ds.query)
    seen = sum(b["images"].shape[0] for b in test_loader)
    assert seen == len(ds.query) + len(ds.gallery)

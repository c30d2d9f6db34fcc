"""The DML datasets (robustreid.data.dml_datasets) read from their fixture copies in the releases'
layouts: the class split, fastreid's pid / camid conventions, combineall, the retrieval protocol on
a test set that is both query and gallery, the errors on malformed index files, and fastreid's
training loader over one of them."""
import os
import re

import numpy as np
import pytest
from fastreid.data.datasets import DATASET_REGISTRY
from scipy.io import loadmat, savemat

from conftest import make_tiny_cfg
from robustreid.data import dml_fixtures
from robustreid.data.validation import DatasetError, build_dataset, check_datasets

pytestmark = pytest.mark.usefixtures("one_thread")

# name -> (fixture writer, dataset_name prefix, train classes, test classes) at the writers'
# defaults: CUB / CARS 4 classes (first half trains), In-Shop odd items train, SOP 3 + 3 classes
CASES = {
    "CUB200": (dml_fixtures.write_cub200, "cub200", {1, 2}, {3, 4}),
    "CARS196": (dml_fixtures.write_cars196, "cars196", {1, 2}, {3, 4}),
    "InShop": (dml_fixtures.write_inshop, "inshop", {1, 3, 5}, {2, 4, 6}),
    "InShopQuery": (dml_fixtures.write_inshop, "inshop", {1, 3, 5}, {2, 4, 6}),
    "SOP": (dml_fixtures.write_sop, "sop", {1, 2, 3}, {4, 5, 6}),
}


@pytest.fixture(scope="module")
def dml_fixture(tmp_path_factory):
    """(root, {writer: the counts it returned}) with every fixture written once."""
    root = str(tmp_path_factory.mktemp("dml"))
    return root, {writer: writer(root) for writer in {case[0] for case in CASES.values()}}


@pytest.fixture(scope="module")
def dml_root(dml_fixture):
    return dml_fixture[0]


def _counts(items):
    return len(items), len({i[1] for i in items}), len({i[2] for i in items})


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_parses_with_the_class_split_and_fastreids_conventions(name, dml_fixture):
    dml_root, written = dml_fixture
    writer, prefix, train_classes, test_classes = CASES[name]
    data = DATASET_REGISTRY.get(name)(root=dml_root)
    assert {pid for _, pid, _ in data.train} == {f"{prefix}_{c}" for c in train_classes}
    assert {camid for _, _, camid in data.train} == {f"{prefix}_0"}
    test = data.query + data.gallery
    assert {pid for _, pid, _ in test} == test_classes
    assert all(isinstance(pid, int) and isinstance(camid, int) for _, pid, camid in test)
    # one camera per test image, the same wherever the image is listed
    by_path = {}
    for path, _, camid in test:
        assert by_path.setdefault(path, camid) == camid
    assert sorted(by_path.values()) == list(range(len(by_path)))
    assert all(os.path.isfile(path) for path, _, _ in data.train + test)

    images_per_class = 3
    assert len(data.train) == len(train_classes) * images_per_class
    if name == "InShop":  # the official partition: query and gallery are different images
        assert not {p for p, _, _ in data.query} & {p for p, _, _ in data.gallery}
        assert len(data.query) + len(data.gallery) == len(test_classes) * images_per_class
    else:  # the whole test set (In-Shop's query part) is both query and gallery
        assert data.query == data.gallery
        expected = len(test_classes) * (2 if name == "InShopQuery" else images_per_class)
        assert len(data.query) == expected
    if name != "InShopQuery":  # the writers count the official split
        want = written[writer].as_dict()
        got = dict(zip(("train_images", "train_pids", "train_cams"), _counts(data.train)))
        got.update(zip(("query_images", "query_pids", "query_cams"), _counts(data.query)))
        got.update(zip(("gallery_images", "gallery_pids", "gallery_cams"), _counts(data.gallery)))
        assert got == {k: v for k, v in want.items() if k != "dataset_dir"}


def test_the_first_half_of_the_listed_classes_trains_whatever_the_image_order(tmp_path):
    dml_fixtures.write_cub200(str(tmp_path), num_classes=6)
    base = tmp_path / "CUB_200_2011"
    lines = (base / "images.txt").read_text().splitlines()
    (base / "images.txt").write_text("\n".join(reversed(lines)) + "\n")
    data = DATASET_REGISTRY.get("CUB200")(root=str(tmp_path))
    assert {pid for _, pid, _ in data.train} == {"cub200_1", "cub200_2", "cub200_3"}
    assert {pid for _, pid, _ in data.query} == {4, 5, 6}
    assert len(data.train) == len(data.query) == 9


@pytest.mark.parametrize("name", ["CUB200", "InShopQuery"])
def test_combineall_adds_each_test_image_once(name, dml_root):
    prefix = CASES[name][1]
    plain = DATASET_REGISTRY.get(name)(root=dml_root)
    combined = DATASET_REGISTRY.get(name)(root=dml_root, combineall=True)
    test_paths = {p for p, _, _ in plain.query + plain.gallery}
    assert len(combined.train) == len(plain.train) + len(test_paths)
    assert len({p for p, _, _ in combined.train}) == len(combined.train)
    assert {camid for _, _, camid in combined.train} == {f"{prefix}_0"}
    assert {pid for _, pid, _ in combined.train[len(plain.train):]} == \
        {f"{prefix}_test_{c}" for c in CASES[name][3]}


def test_retrieval_on_the_whole_test_set_is_leave_one_out_recall_at_k(dml_root):
    """fastreid drops gallery items with the query's pid AND camid: with one camid per image only
    the query itself goes, so Rank-k is the DML Recall@k (the self match never counts)."""
    from fastreid.evaluation.rank import evaluate_rank
    from robustreid.evaluation.clustering import recall_at_k

    data = DATASET_REGISTRY.get("SOP")(root=dml_root)
    q_pids, q_cams = (np.array([item[i] for item in data.query]) for i in (1, 2))
    g_pids, g_cams = (np.array([item[i] for item in data.gallery]) for i in (1, 2))
    x = np.random.default_rng(0).standard_normal((len(data.query), 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cmc, aps, _ = evaluate_rank(1 - x @ x.T, q_pids, g_pids, q_cams, g_cams, max_rank=4,
                                use_cython=False)
    recall = recall_at_k(x, q_pids, ks=(1, 2, 4))
    assert recall[1] < 1  # a self match would make Rank-1 1.0
    assert len(aps) == len(data.query)  # every query has a positive besides itself
    np.testing.assert_allclose(cmc[[0, 1, 3]], [recall[1], recall[2], recall[4]], atol=1e-6)


def _edit_line(path, number, text):
    lines = open(path).read().splitlines()
    lines[number - 1] = text
    open(path, "w").write("\n".join(lines) + "\n")


def _delete_line(path, number):
    lines = open(path).read().splitlines()
    del lines[number - 1]
    open(path, "w").write("\n".join(lines) + "\n")


def _set_car_class(mat_path, annotation, class_id):
    mat = loadmat(mat_path)
    mat["annotations"][0, annotation - 1]["class"] = np.array([[class_id]], dtype=np.uint8)
    savemat(mat_path, {k: mat[k] for k in ("annotations", "class_names")})


CUB, CARS = "CUB_200_2011", "CARS196"
PARTITION = os.path.join("InShop", "Eval", "list_eval_partition.txt")
# case -> (dataset, damage(dataset files root), the file at fault, the error after the file's path)
MALFORMED = {
    "cub-id": ("CUB200", lambda r: _edit_line(f"{r}/{CUB}/images.txt", 2, "two 001.Bird_1/x.jpg"),
               f"{CUB}/images.txt", "line 2: image_id 'two' is not an integer"),
    "cub-fields": ("CUB200", lambda r: _edit_line(f"{r}/{CUB}/images.txt", 3, "3"),
                   f"{CUB}/images.txt", r"line 3: expected 2 fields \(image_id path\), got '3'"),
    "cub-class": ("CUB200", lambda r: _edit_line(f"{r}/{CUB}/image_class_labels.txt", 4, "4 9"),
                  f"{CUB}/image_class_labels.txt", r"line 4: class_id 9 is not in \S+/classes.txt"),
    "cub-unlabelled": ("CUB200", lambda r: _delete_line(f"{r}/{CUB}/image_class_labels.txt", 12),
                       f"{CUB}/images.txt", r"line 12: image_id 12 has no class in \S+labels.txt"),
    "cub-no-labels": ("CUB200", lambda r: os.remove(f"{r}/{CUB}/image_class_labels.txt"),
                      f"{CUB}/image_class_labels.txt", "is not found"),
    "cub-no-image": ("CUB200", lambda r: os.remove(f"{r}/{CUB}/images/002.Bird_2/Bird_2_0001.jpg"),
                     f"{CUB}/images.txt", r"line 5: image \S+/Bird_2_0001.jpg is not found"),
    "cars-class": ("CARS196", lambda r: _set_car_class(f"{r}/{CARS}/cars_annos.mat", 3, 9),
                   f"{CARS}/cars_annos.mat", r"annotation 3: class 9 is not in 1..4"),
    "cars-not-mat": ("CARS196", lambda r: open(f"{r}/{CARS}/cars_annos.mat", "w").write("x"),
                     f"{CARS}/cars_annos.mat", "cannot be read as a MATLAB file"),
    "cars-no-mat": ("CARS196", lambda r: os.remove(f"{r}/{CARS}/cars_annos.mat"),
                    f"{CARS}/cars_annos.mat", "is not found"),
    "cars-no-image": ("CARS196", lambda r: os.remove(f"{r}/{CARS}/car_ims/000002.jpg"),
                      f"{CARS}/cars_annos.mat", r"annotation 2: image \S+/000002.jpg is not found"),
    "inshop-status": ("InShop", lambda r: _edit_line(f"{r}/{PARTITION}", 5,
                                                     "img/WOMEN/Dresses/id_00000001/x.jpg "
                                                     "id_00000001 test"),
                      PARTITION, "line 5: evaluation_status 'test' is not one of train, query, "
                                 "gallery"),
    "inshop-item": ("InShopQuery", lambda r: _edit_line(f"{r}/{PARTITION}", 3,
                                                        "img/x.jpg 00000001 train"),
                    PARTITION, "line 3: item_id '00000001' is not id_<number>"),
    "inshop-count": ("InShop", lambda r: _edit_line(f"{r}/{PARTITION}", 1, "17"),
                     PARTITION, "line 1: the count says 17 images, the file lists 18"),
    "inshop-header": ("InShop", lambda r: _delete_line(f"{r}/{PARTITION}", 2),
                      PARTITION, "line 2: expected the header 'image_name item_id "
                                 "evaluation_status'"),
    "sop-fields": ("SOP", lambda r: _edit_line(f"{r}/Stanford_Online_Products/Ebay_test.txt", 3,
                                               "11 5 5"),
                   "Stanford_Online_Products/Ebay_test.txt",
                   r"line 3: expected 4 fields \(image_id class_id super_class_id path\), "
                   "got '11 5 5'"),
    "sop-class": ("SOP", lambda r: _edit_line(f"{r}/Stanford_Online_Products/Ebay_train.txt", 2,
                                              "1 one 1 bicycle_final/111085120001_0.JPG"),
                  "Stanford_Online_Products/Ebay_train.txt", "line 2: class_id 'one' is not an "
                                                             "integer"),
    "sop-no-header": ("SOP", lambda r: _delete_line(
        f"{r}/Stanford_Online_Products/Ebay_train.txt", 1),
        "Stanford_Online_Products/Ebay_train.txt", "line 1: expected the header"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_release_is_one_error_naming_the_file_and_line(case, tmp_path):
    name, damage, at_fault, message = MALFORMED[case]
    CASES[name][0](str(tmp_path))
    damage(str(tmp_path))
    with pytest.raises(DatasetError) as raised:
        build_dataset(name, root=str(tmp_path))
    text = str(raised.value)
    assert "\n" not in text
    assert re.search(re.escape(f"dataset {name!r} cannot be read under root {str(tmp_path)!r}"),
                     text), text
    at_fault = re.escape(os.path.join(str(tmp_path), at_fault))
    assert re.search(at_fault + r":? " + message, text), text


def test_a_missing_release_is_named_by_preflight(tmp_path, datasets_root):
    with pytest.raises(DatasetError, match=re.escape(
            os.path.join(datasets_root, "Stanford_Online_Products") + '" is not found')):
        check_datasets((), ("SOP",), verify=False)


def test_train_net_stops_on_a_malformed_release_with_one_error_line(tmp_path, monkeypatch, capsys):
    import fastreid.data.build as data_build
    from test_preflight import CONFIG, TINY_OPTS, error_lines, load_tool

    root = tmp_path / "datasets"
    dml_fixtures.write_cub200(str(root))
    _edit_line(f"{root}/{CUB}/images.txt", 2, "two 001.Bird_1/x.jpg")
    monkeypatch.setattr(data_build, "_root", str(root))
    argv = ["--config-file", CONFIG, *TINY_OPTS, "OUTPUT_DIR", str(tmp_path / "out"),
            "DATASETS.NAMES", "('CUB200',)", "DATASETS.TESTS", "('CUB200',)"]
    assert load_tool("train_net").cli(argv) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: dataset 'CUB200' cannot be read under root '{root}' (set $FASTREID_DATASETS): "
        f"{root}/{CUB}/images.txt line 2: image_id 'two' is not an integer"]


def test_fastreids_train_loader_draws_relabelled_cub_batches(tmp_path, datasets_root):
    from robustreid.engine import RobustTrainer

    dml_fixtures.write_cub200(datasets_root, num_classes=6, imgs_per_class=4)
    cfg = make_tiny_cfg(tmp_path, "DATASETS.NAMES", "('CUB200',)", "DATASETS.TESTS", "('CUB200',)",
                        "INPUT.SIZE_TRAIN", "[32, 32]", "SOLVER.IMS_PER_BATCH", "8",
                        "DATALOADER.NUM_INSTANCE", "4")
    stream = RobustTrainer.build_train_loader(cfg)
    batch = next(iter(stream))
    assert tuple(batch["images"].shape) == (8, 3, 32, 32)
    assert sorted(batch["targets"].unique().tolist()) in ([0, 1], [0, 2], [1, 2])
    assert (batch["targets"].bincount(minlength=3) % 4 == 0).all()  # NUM_INSTANCE per class
    assert batch["camids"].unique().tolist() == [0]
    # the images of the first half of the classes only
    assert {re.search(r"/CUB_200_2011/images/(\d+)\.", p).group(1) for p in batch["img_paths"]} \
        <= {"001", "002", "003"}

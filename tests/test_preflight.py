"""Bad inputs stop before training with one "error: ..." line: sampler preconditions (hangs before),
config values, output directory, device, ImageNet download, the tools' arguments; and fastreid's
metric printer on runs of at most 2 iterations."""
import os

import pytest

from conftest import REPO, load_tool, make_tiny_cfg

CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")
# make_tiny_cfg's settings as command-line options (SynthReIDTiny: 60 training images, 12 ids)
TINY_OPTS = ["DATASETS.NAMES", "('SynthReIDTiny',)", "DATASETS.TESTS", "('SynthReIDTiny',)",
             "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]",
             "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "16",
             "TEST.IMS_PER_BATCH", "32", "SOLVER.MAX_EPOCH", "1", "SOLVER.WARMUP_ITERS", "2",
             "SOLVER.STEPS", "[1]"]


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def items(num_ids, per_id):
    """Training items as fastreid's datasets give them (pids prefixed with the dataset name)."""
    return [(f"{pid}_{k}.jpg", f"Tiny_{pid}", f"Tiny_{k % 2}")
            for pid in range(num_ids) for k in range(per_id)]


def sampler_cfg(*opts):
    from robustreid.config import load_config

    return load_config(CONFIG, ["DATASETS.NAMES", "('Tiny',)", *opts])


# --- what fastreid's training samplers need (they loop forever, silently, otherwise) --------------
@pytest.mark.parametrize("opts, world_size, train, message", [
    (("SOLVER.IMS_PER_BATCH", "6"), 1, items(20, 4),
     "SOLVER.IMS_PER_BATCH 6 must be a multiple of DATALOADER.NUM_INSTANCE 4"),
    (("SOLVER.IMS_PER_BATCH", "4096"), 1, items(20, 4),
     "SOLVER.IMS_PER_BATCH 4096 is more than the 80 training images"),
    (("SOLVER.IMS_PER_BATCH", "64"), 1, items(10, 10),
     "have 10 training identities; NaiveIdentitySampler needs .* = 16 per batch"),
    (("SOLVER.IMS_PER_BATCH", "64", "DATALOADER.SAMPLER_TRAIN", "BalancedIdentitySampler"), 1,
     items(10, 10), "10 training identities; BalancedIdentitySampler needs"),
    (("SOLVER.IMS_PER_BATCH", "20"), 2, items(20, 4),
     r"SOLVER.IMS_PER_BATCH 20 / 2 processes must be a multiple of DATALOADER.NUM_INSTANCE 4"),
    (("SOLVER.IMS_PER_BATCH", "18"), 4, items(20, 4), "not divisible by the 4 training processes"),
    (("DATALOADER.SAMPLER_TRAIN", "SetReWeightSampler"), 1, items(20, 4),
     "SetReWeightSampler cannot draw a batch"),
    (("DATALOADER.SAMPLER_TRAIN", "RandomSampler"), 1, items(20, 4),
     "DATALOADER.SAMPLER_TRAIN must be one of"),
    (("SOLVER.IMS_PER_BATCH", "16", "META_LEARNING.ENABLED", "True"), 4, items(20, 4),
     "at least 2 identities per batch"),
])
def test_batches_the_sampler_cannot_fill_are_config_errors(opts, world_size, train, message):
    from robustreid.config import ConfigError
    from robustreid.data.validation import check_train_batches

    with pytest.raises(ConfigError, match=message):
        check_train_batches(sampler_cfg(*opts), train, world_size)


def test_an_empty_training_set_is_a_dataset_error():
    from robustreid.data.validation import DatasetError, check_train_batches

    with pytest.raises(DatasetError, match=r"DATASETS.NAMES \('Tiny',\) hold no training images"):
        check_train_batches(sampler_cfg(), [], 1)


@pytest.mark.parametrize("sampler", ["NaiveIdentitySampler", "BalancedIdentitySampler"])
def test_the_smallest_accepted_set_gives_fastreids_sampler_a_full_batch(sampler):
    """At the boundary the check lets through (identities = IMS_PER_BATCH / NUM_INSTANCE, images
    = IMS_PER_BATCH), fastreid's sampler does yield a full batch of every identity."""
    from fastreid.data import samplers
    from robustreid.data.validation import check_train_batches

    train = items(4, 4)
    check_train_batches(sampler_cfg("SOLVER.IMS_PER_BATCH", "16",
                                    "DATALOADER.SAMPLER_TRAIN", sampler), train, 1)
    stream = iter(getattr(samplers, sampler)(train, 16, 4, seed=0))
    batch = [next(stream) for _ in range(16)]
    assert sorted({train[i][1] for i in batch}) == [f"Tiny_{p}" for p in range(4)]


@pytest.mark.parametrize("opts, world_size, message", [
    (("SOLVER.IMS_PER_BATCH", "52"), 1, "12 training identities; NaiveIdentitySampler needs "
                                         r"SOLVER.IMS_PER_BATCH / DATALOADER.NUM_INSTANCE = "
                                         "52 / 4 = 13 per batch"),
    (("SOLVER.IMS_PER_BATCH", "6"), 1, "must be a multiple of DATALOADER.NUM_INSTANCE 4"),
    (("SOLVER.IMS_PER_BATCH", "4096"), 1, "4096 is more than the 60 training images"),
    (("SOLVER.IMS_PER_BATCH", "16"), 3, "not divisible by the 3 training processes"),
])
def test_preflight_checks_the_training_batches(opts, world_size, message, tmp_path, datasets_root):
    from robustreid.config import ConfigError
    from robustreid.engine import preflight

    with pytest.raises(ConfigError, match=message):
        preflight(make_tiny_cfg(tmp_path, *opts), world_size=world_size)


def test_preflight_counts_the_dg_set_after_adins_validation_split(tmp_path, datasets_root):
    """The DG loader samples from what ADIN's validation split leaves: 60 -> 51 images here."""
    from robustreid.config import ConfigError
    from robustreid.engine import preflight

    cfg = make_tiny_cfg(tmp_path, "MODEL.META_ARCHITECTURE", "RobustBaseline",
                        "DG.ADIN.ENABLED", "True", "DG.ADIN.SCHEDULE.VAL_IMAGES_PER_ID", "1",
                        "SOLVER.IMS_PER_BATCH", "52")
    with pytest.raises(ConfigError, match="52 is more than the 51 training images"):
        preflight(cfg)


def test_trainer_checks_its_loader_before_iterating_it(tmp_path, datasets_root):
    """RobustTrainer used without preflight: the same check, before the loader is iterated."""
    from robustreid.config import ConfigError
    from robustreid.engine import RobustTrainer

    with pytest.raises(ConfigError, match="12 training identities"):
        RobustTrainer(make_tiny_cfg(tmp_path, "SOLVER.IMS_PER_BATCH", "52"))


@pytest.mark.timeout(20)  # fastreid's sampler looped forever here: fail, not hang, without the fix
def test_train_net_on_empty_dataset_directories_stops_with_one_error_line(tmp_path, monkeypatch,
                                                                          capsys):
    """Reproduction of the hang: Market-1501's directories exist but hold no image."""
    import fastreid.data.build as data_build

    root = tmp_path / "datasets"
    for split in ("bounding_box_train", "bounding_box_test", "query"):
        os.makedirs(root / "Market-1501-v15.09.15" / split)
    monkeypatch.setattr(data_build, "_root", str(root))  # $FASTREID_DATASETS, read at import
    train_net = load_tool("train_net")
    assert train_net.cli(["--config-file", CONFIG, "DATASETS.NAMES", "('Market1501',)",
                          "DATASETS.TESTS", "('Market1501',)",
                          "OUTPUT_DIR", str(tmp_path / "out")]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: DATASETS.NAMES ('Market1501',) hold no training images under root '{root}'"]


# --- config values, output directory, device, ImageNet weights ------------------------------------
@pytest.mark.parametrize("opts, message", [
    (("SOLVER.MAX_EPOCH", "0"), "SOLVER.MAX_EPOCH must be a positive integer, got 0"),
    (("SOLVER.IMS_PER_BATCH", "0"), "SOLVER.IMS_PER_BATCH must be a positive integer, got 0"),
    (("DATALOADER.NUM_INSTANCE", "0"), "DATALOADER.NUM_INSTANCE must be a positive integer"),
    (("INPUT.SIZE_TEST", "[128]"),
     r"INPUT.SIZE_TEST must be \[height, width\] in pixels, got \[128\]"),
    (("INPUT.SIZE_TRAIN", "[128, 0]"), r"INPUT.SIZE_TRAIN must be \[height, width\]"),
    (("DATALOADER.NUM_WORKERS", "-1"), "DATALOADER.NUM_WORKERS must be >= 0"),
])
def test_bad_fastreid_values_are_config_errors(opts, message):
    from robustreid.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, list(opts))


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    from robustreid.config import ConfigError, load_config

    base = tmp_path / "base.yml"
    base.write_text("MODEL:\n  BACKBONE: [unclosed\n")
    child = tmp_path / "child.yml"
    child.write_text("_BASE_: base.yml\n")
    for config in (base, child):  # the mark names the _BASE_ file, not the one given
        with pytest.raises(ConfigError, match=rf"^{base}, line 3, column 1: invalid YAML: "
                                              r"expected ',' or '\]'"):
            load_config(str(config))


def test_output_dir_under_a_file_is_refused_first(tmp_path):
    from robustreid.config import ConfigError
    from robustreid.engine import check_output_dir

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=f"OUTPUT_DIR {tmp_path}/afile/out cannot be created: "
                                          f"{tmp_path}/afile is a file"):
        check_output_dir(str(tmp_path / "afile" / "out"))
    check_output_dir(str(tmp_path / "new" / "deeper"))  # creatable: fine
    assert not (tmp_path / "new").exists()  # checked, not created


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "meta"])
def test_a_device_that_is_not_cpu_or_cuda_is_a_config_error(device, tmp_path):
    from robustreid.config import ConfigError, load_config
    from robustreid.engine import resolve_device

    with pytest.raises(ConfigError,
                       match=f"MODEL.DEVICE must be cpu, cuda or cuda:N, got '{device}'"):
        resolve_device(load_config(CONFIG, ["MODEL.DEVICE", device]))


def test_imagenet_download_without_internet_names_the_keys(tmp_path, monkeypatch):
    """PRETRAIN True, no PRETRAIN_PATH, nothing cached, host unreachable -> one ConfigError naming
    both ways out; a cached download, a PRETRAIN_PATH or PRETRAIN False pass without a probe."""
    import socket

    from robustreid.config import ConfigError, load_config
    from robustreid.engine import check_weights

    probes = []

    def unreachable(address, timeout=None):
        probes.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = load_config(os.path.join(REPO, "configs", "Market1501", "bagtricks_R50.yml"))
    with pytest.raises(ConfigError, match=r"downloads https://download.pytorch.org/models/"
                                          r"resnet50-19c8e357.pth, but download.pytorch.org cannot "
                                          r"be reached .*: set MODEL.BACKBONE.PRETRAIN_PATH "
                                          r"/path/to/resnet50-19c8e357.pth, or "
                                          r"MODEL.BACKBONE.PRETRAIN False"):
        check_weights(cfg)
    assert probes == [("download.pytorch.org", 443)]

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet50-19c8e357.pth").write_bytes(b"")
    check_weights(cfg)  # fastreid loads the cached file: no download
    pretrain_file = tmp_path / "r50.pth"
    pretrain_file.write_bytes(b"")
    for opts in (["MODEL.BACKBONE.PRETRAIN_PATH", str(pretrain_file)],
                 ["MODEL.BACKBONE.PRETRAIN", "False"]):
        check_weights(load_config(os.path.join(REPO, "configs", "Market1501",
                                               "bagtricks_R50.yml"), opts))
    assert len(probes) == 1


# --- the tools' own arguments -------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["SOLVER.MAX_EPOCH", "0"], "error: SOLVER.MAX_EPOCH must be a positive integer, got 0"),
    (["SOLVER.IMS_PER_BATCH", "0"],
     "error: SOLVER.IMS_PER_BATCH must be a positive integer, got 0"),
    (["MODEL.DEVICE", "gpu"], "error: MODEL.DEVICE must be cpu, cuda or cuda:N, got 'gpu'"),
    (["INPUT.SIZE_TEST", "[128]"],
     "error: INPUT.SIZE_TEST must be [height, width] in pixels, got [128]"),
])
def test_train_net_prints_one_error_line(argv, message, tmp_path, datasets_root, capsys):
    train_net = load_tool("train_net")
    out = tmp_path / "out"
    assert train_net.cli(["--config-file", CONFIG, *TINY_OPTS, "OUTPUT_DIR", str(out), *argv]) == 2
    assert error_lines(capsys.readouterr().err) == [message]
    assert not out.exists()  # stopped before anything was written


def test_train_net_reports_malformed_yaml_in_one_line(tmp_path, capsys):
    train_net = load_tool("train_net")
    bad = tmp_path / "bad.yml"
    bad.write_text("MODEL:\n  BACKBONE: [unclosed\n")
    assert train_net.cli(["--config-file", str(bad)]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: {bad}, line 3, column 1: invalid YAML: expected ',' or ']', "
        f"but got '<stream end>'"]


def test_train_net_refuses_an_output_dir_under_a_file(tmp_path, datasets_root, capsys):
    train_net = load_tool("train_net")
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out"
    assert train_net.cli(["--config-file", CONFIG, *TINY_OPTS, "OUTPUT_DIR", str(out)]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: OUTPUT_DIR {out} cannot be created: {tmp_path}/afile is a file"]


def test_dg_eval_refuses_zero_splits(capsys):
    dg_eval = load_tool("dg_eval")
    with pytest.raises(SystemExit) as exit_:
        dg_eval.parse_args(["--config-file", CONFIG, "--splits", "0"])
    assert exit_.value.code == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: argument --splits: must be an integer >= 1, got '0'"]


def test_robust_eval_refuses_a_budget_above_the_pixel_range(capsys):
    from robustreid.attacks import eps_from_255

    robust_eval = load_tool("robust_eval")
    assert robust_eval.main(["--config-file", CONFIG, "--eps", "1000"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: --eps: eps=1000.0 is above 255/255, the whole pixel range; budgets are given in "
        "1/255 units (8 for 8/255)"]
    assert eps_from_255(255) == 1.0  # the whole range is still a budget


def test_balance_data_refuses_a_negative_image_count(capsys):
    balance_data = load_tool("balance_data")
    for option in ("--max-new-images", "--train-steps"):
        with pytest.raises(SystemExit) as exit_:
            balance_data.parse_args(["--config-file", CONFIG, option, "-3"])
        assert exit_.value.code == 2
        assert error_lines(capsys.readouterr().err) == [
            f"error: argument {option}: must be an integer >= 0, got '-3'"]
    args = balance_data.parse_args(["--config-file", CONFIG, "--max-new-images", "0"])
    assert args.max_new_images == 0  # train only, generate nothing: still allowed


def test_reproduce_dddefense_refuses_a_dataset_map_without_equals(capsys):
    reproduce = load_tool("reproduce_dddefense")
    assert reproduce.main(["--tables", "main-3", "--dataset-map", "Market1501", "--dry-run"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: --dataset-map: 'Market1501' is not NAME=REGISTERED_NAME"]
    assert reproduce.parse_dataset_map("Market1501=SynthReIDTiny,DukeMTMC=X") == {
        "Market1501": "SynthReIDTiny", "DukeMTMC": "X"}


# --- fastreid's metric printer ------------------------------------------------------------------
def test_metric_printer_writes_twice_at_one_iteration_without_dividing_by_zero(caplog):
    """PeriodicWriter writes after the last step and again after the epoch; without IterationTimer's
    "time" (it skips warm-up iterations) fastreid divides by the 0 iterations in between."""
    from fastreid.utils.events import CommonMetricPrinter, EventStorage

    from robustreid import compat

    with EventStorage(start_iter=1) as storage:
        storage.epoch = 0  # set by fastreid's trainer
        storage.put_scalar("loss_cls", 1.5)
        with pytest.raises(ZeroDivisionError):  # fastreid's own write
            printer = CommonMetricPrinter(max_iter=2)
            for _ in range(2):
                compat.original("metric_printer_eta")(printer)
        printer = CommonMetricPrinter(max_iter=2)
        caplog.clear()
        with caplog.at_level("INFO", logger="fastreid.utils.events"):
            printer.write()
            printer.write()
    assert [r.getMessage().count("loss_cls: 1.5") for r in caplog.records] == [1, 1]

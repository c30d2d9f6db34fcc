"""Shared fixtures: a private datasets root and a tiny CPU config."""
import importlib.util
import os

import pytest
import torch

import robustreid  # noqa: F401  (compat patches + registrations, before fastreid is used)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory):
    """A session-wide $FASTREID_DATASETS; fastreid reads the variable once at import, so patch it."""
    import fastreid.data.build as data_build

    root = str(tmp_path_factory.mktemp("datasets"))
    previous = data_build._root
    os.environ["FASTREID_DATASETS"] = root
    data_build._root = root
    yield root
    data_build._root = previous


def load_tool(name):
    """tools/<name>.py as a module (tools import their siblings: pytest.ini puts tools/ on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool",
                                                  os.path.join(REPO, "tools", f"{name}.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def make_tiny_cfg(output_dir, *opts):
    """A small ResNet-18 BoT config on SynthReIDTiny that trains in seconds on CPU."""
    from robustreid.config import load_config
    from robustreid.engine import resolve_device

    cfg = load_config(os.path.join(REPO, "configs/SynthReID/bagtricks_R18.yml"), [
        "DATASETS.NAMES", "('SynthReIDTiny',)", "DATASETS.TESTS", "('SynthReIDTiny',)",
        "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "16", "TEST.IMS_PER_BATCH", "32",
        "SOLVER.MAX_EPOCH", "2", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "[1]",
        "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.EVAL_PERIOD", "2", "OUTPUT_DIR", str(output_dir),
        *opts])
    return resolve_device(cfg)


@pytest.fixture
def tiny_cfg(tmp_path, datasets_root):
    return make_tiny_cfg(tmp_path / "out")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``),
    restored afterwards: on small tensors a second thread only adds synchronisation, and on a loaded
    machine it made WMA projections 30-100x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Shared fixtures: a private datasets root and a tiny CPU config."""
import importlib.util
import logging
import os

import pytest
import torch

import robustreid  # noqa: F401  (compat patches + registrations, before fastreid is used)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def drop_handlers_of_closed_streams():
    """A tool run in-process sets up fastreid's loggers, whose console handler keeps the
    sys.stdout of that moment: pytest's capture of that test, closed when it ends. Later log
    records would then print "--- Logging error ---" tracebacks into other tests' stderr."""
    yield
    for logger in [logging.getLogger(), *(logging.getLogger(name)
                                          for name in logging.Logger.manager.loggerDict)]:
        for handler in list(logger.handlers):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)


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


# Recipe of trained_tiny: ~15 s per model on one core (34-48 mAP on SynthReIDTiny over seeds,
# chance 17), the recipe of tests/test_robust_eval.py's module model.
TRAINED_TINY_OPTS = ("SOLVER.MAX_EPOCH", "30", "SOLVER.BASE_LR", "0.002", "SOLVER.STEPS", "[100]",
                     "TEST.EVAL_PERIOD", "30", "SOLVER.CHECKPOINT_PERIOD", "30")


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, datasets_root):
    """``trained_tiny(seed)`` -> (cfg, eval-mode model, weights path, clean results): a ResNet-18
    trained on SynthReIDTiny with ROBUSTREID.SEED ``seed``, once per session and seed (tests that
    need a model with skill to lose, or two different models, share them)."""
    from fastreid.utils.env import seed_all_rng
    from robustreid.engine import RobustTrainer

    models = {}

    def train(seed=0):
        if seed not in models:
            seed_all_rng(seed)
            out = tmp_path_factory.mktemp(f"trained_tiny_seed{seed}")
            cfg = make_tiny_cfg(out, *TRAINED_TINY_OPTS, "ROBUSTREID.SEED", str(seed))
            trainer = RobustTrainer(cfg)
            trainer.resume_or_load(resume=False)
            results = trainer.train()
            models[seed] = (cfg, trainer.model.eval(), os.path.join(str(out), "model_final.pth"),
                            results)
        return models[seed]

    return train

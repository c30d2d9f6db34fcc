"""Tiny IPES-GAN configs and a source checkpoint for the tests (tests/test_ipes_*.py)."""
import os

import torch

from conftest import REPO

CONFIG = os.path.join(REPO, "configs", "SynthReID", "ipes_D0_to_D2.yml")
# SynthReIDTiny D0 -> D2 at 64x32, batch 2 + 2, networks a few channels wide, 2 x 2 iterations,
# every loss term on from iteration 1 (the ramp reaches its end at iteration 3).
TINY = ("DATASETS.NAMES", "('SynthReIDTiny_D0',)", "DATASETS.TESTS", "('SynthReIDTiny_D2',)",
        "IPES.TARGET", "SynthReIDTiny_D2", "INPUT.SIZE_TRAIN", "[64, 32]",
        "INPUT.SIZE_TEST", "[64, 32]", "DATALOADER.NUM_WORKERS", "0",
        "DATALOADER.NUM_INSTANCE", "2", "SOLVER.IMS_PER_BATCH", "4", "TEST.IMS_PER_BATCH", "32",
        "SOLVER.MAX_EPOCH", "2", "SOLVER.CHECKPOINT_PERIOD", "5", "TEST.EVAL_PERIOD", "100",
        "IPES.ITERS_PER_EPOCH", "2", "IPES.KEYPOINTS.SIGMA", "1.5",
        "IPES.GEN.DIM", "4", "IPES.GEN.RES_BLOCKS", "1", "IPES.GEN.ASPP_RATES", "(1, 2)",
        "IPES.GEN.STYLE_DIM", "4", "IPES.GEN.MLP_DIM", "16", "IPES.DIS.DIM", "4",
        "IPES.DIS.LAYERS", "2", "IPES.LOSS.RAMP_START", "1", "IPES.LOSS.RAMP_ITERS", "2",
        "IPES.VIS.PERIOD", "3", "IPES.VIS.PAIRS", "3")


def make_ipes_cfg(output_dir, *opts):
    from robustreid.config import load_config
    from robustreid.engine import resolve_device

    return resolve_device(load_config(CONFIG, [*TINY, "OUTPUT_DIR", str(output_dir), *opts]))


def write_source_checkpoint(path, cfg):
    """An (untrained) E_id of ``cfg``'s model as a fastreid checkpoint: the source model IPES
    starts from (MODEL.WEIGHTS) and its teacher."""
    from fastreid.modeling.meta_arch import build_model

    source = cfg.clone()
    source.defrost()
    source.MODEL.META_ARCHITECTURE = "Baseline"
    source.MODEL.HEADS.NUM_CLASSES = 12  # SynthReIDTiny_D0's training identities
    model = build_model(source)
    torch.save({"model": model.state_dict()}, path)
    return str(path)

"""Config keys of the domain-generalization methods (BAU, ADIN) and their model parts.

:func:`add_dg_config` declares every key with its default; :func:`check_dg_config` turns switch
combinations that cannot work into ConfigErrors naming the keys. Every switch is off by default,
so a config that does not mention ``DG`` trains exactly as before.

=========================  =======================================================================
DG.BAU.ENABLED             two views per image (loader) + BAU's losses in RobustBaseline (eq. 3-9)
DG.BAU.ALIGN/UNIFORM/      each BAU term alone (all on = eq. 9)
  DOMAIN
DG.BAU.ADV_UNIFORM/        with ADV_TRAIN: uniformity of the adversarial features / their weighted
  ADV_ALIGN                alignment to the clean (original-view) features
DG.ADIN.ENABLED            nuisance classifier f_N + L_adv on the encoder (eq. 3-6) and, with
                           DG.ADIN.SCHEDULE.ENABLED, the alternating schedule of sec. 3.3
MODEL.BACKBONE.NAME        build_dual_branch_backbone: ADIN's Fig. 4 (global + part branch)
MODEL.HEADS.NAME           MLPClassifierHead: ADIN's two-layer identity head f_I
=========================  =======================================================================
"""
from fastreid.config import CfgNode as CN

__all__ = ["add_dg_config", "check_dg_config", "dg_loader_needed", "NUISANCE_KINDS", "ADV_LOSSES"]

NUISANCE_KINDS = ("camera", "time", "joint")
ADV_LOSSES = ("cane", "ne", "rg", "focal")
VIEW_REDUCTIONS = ("sum", "mean")


def add_dg_config(cfg):
    """Declare the DG keys (idempotent). Defaults are the papers' (BAU: NeurIPS 2024 sec. 4.2 and
    shared/notes/reference-implementations.md; ADIN: sec. 3-4)."""
    if "DG" in cfg:
        return cfg
    frozen = cfg.is_frozen()
    cfg.defrost()

    cfg.DG = CN()

    # ---------------------------------------------------------------- BAU
    cfg.DG.BAU = CN()
    cfg.DG.BAU.ENABLED = False
    cfg.DG.BAU.ALIGN = True            # weighted alignment, eq. (3-5)
    cfg.DG.BAU.UNIFORM = True          # uniformity of both views, eq. (6)
    cfg.DG.BAU.DOMAIN = True           # domain-specific uniformity vs the memory, eq. (7-8)
    cfg.DG.BAU.LAMBDA = 1.5            # weight of the alignment term (eq. 9)
    cfg.DG.BAU.K = 10                  # k of the k-reciprocal neighbour sets (eq. 4)
    cfg.DG.BAU.WEIGHTED = True         # False: the unweighted alignment of eq. (3)
    cfg.DG.BAU.T = 2.0                 # Gaussian potential exp(-t ||.||^2), eq. (2)
    # "sum": the two views' terms summed as eq. (6, 8) print; "mean": averaged (published code)
    cfg.DG.BAU.VIEW_REDUCTION = "sum"
    cfg.DG.BAU.MOMENTUM = 0.1          # mu of eq. (7): weight of the old prototype
    cfg.DG.BAU.NUM_PROTOTYPES = 0      # N nearest prototypes of eq. (8); 0 = the batch size
    # True: exclude the own class by label (paper); False: drop the nearest prototype (code)
    cfg.DG.BAU.EXCLUDE_OWN_CLASS = True
    # Images per batch when the memory is initialised from the initial model's class centroids
    cfg.DG.BAU.INIT_BATCH_SIZE = 128
    # With ADV_TRAIN (DDDefense issue): BAU terms on the adversarial features too
    cfg.DG.BAU.ADV_UNIFORM = False     # + uniformity of the adversarial features
    cfg.DG.BAU.ADV_ALIGN = False       # + LAMBDA * weighted alignment adversarial -> clean
    # Strong view (weak view = fastreid's INPUT.* train transforms: flip, pad, crop)
    cfg.DG.BAU.AUG = CN()
    cfg.DG.BAU.AUG.PROB = 0.5          # p of each: RandAugment, colour jitter, random erasing
    cfg.DG.BAU.AUG.RANDAUG_OPS = 2     # RandAugment N (torchvision's default)
    cfg.DG.BAU.AUG.RANDAUG_MAGNITUDE = 9
    cfg.DG.BAU.AUG.PADDING = 10
    cfg.DG.BAU.AUG.CJ = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    cfg.DG.BAU.AUG.REA_VALUE = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # as fastreid's REA

    # ---------------------------------------------------------------- ADIN
    cfg.DG.ADIN = CN()
    cfg.DG.ADIN.ENABLED = False
    # Nuisance label Y_N: "camera" (training-set camera id), "time" (morning/noon/afternoon, from
    # datasets that have it: MSMT17 file names, SynthReID's meta.json) or "joint" (cam * 3 + time)
    cfg.DG.ADIN.NUISANCE = "camera"
    # L_adv: "cane" (eq. 6), "ne" (eq. 5), "rg" (reverse gradient, eq. 4), "focal" (code's variant)
    cfg.DG.ADIN.LOSS = "cane"
    cfg.DG.ADIN.BETA = 1.0             # beta of eq. (3)
    cfg.DG.ADIN.HIDDEN_DIM = 512       # f_N: Linear(d, 512)-BN-LeakyReLU(0.1)-Dropout-Linear
    cfg.DG.ADIN.DROPOUT = 0.5
    cfg.DG.ADIN.BASE_LR = 0.0          # f_N's optimizer (SOLVER.OPT); 0 = SOLVER.BASE_LR
    cfg.DG.ADIN.WEIGHT_DECAY = 0.0005
    cfg.DG.ADIN.GAMMA = 0.1            # f_N's LR decay at SOLVER.STEPS epochs
    # Sec. 3.3 schedule. Off: f_N is trained every step and L_adv is added to every step (eq. 3).
    cfg.DG.ADIN.SCHEDULE = CN()
    cfg.DG.ADIN.SCHEDULE.ENABLED = True
    cfg.DG.ADIN.SCHEDULE.PRETRAIN_EPOCHS = 1       # E + f_I alone
    cfg.DG.ADIN.SCHEDULE.NUISANCE_PRETRAIN_ITERS = 100  # f_N alone on the frozen E
    # Identity-validation error thresholds (fractions). The identity sub-problem runs until the
    # error is <= I_TARGET, the adversarial one while it stays <= I_TRIGGER (I_TARGET <= I_TRIGGER).
    cfg.DG.ADIN.SCHEDULE.THRESHOLD_I_TARGET = 0.2
    cfg.DG.ADIN.SCHEDULE.THRESHOLD_I_TRIGGER = 0.4
    cfg.DG.ADIN.SCHEDULE.VAL_PERIOD = 20           # iterations between validations
    cfg.DG.ADIN.SCHEDULE.VAL_IMAGES_PER_ID = 1     # held out from ids with >= 2 + this images
    cfg.DG.ADIN.SCHEDULE.VAL_MAX_IMAGES = 2000
    # Keep the identity losses in the adversarial sub-problem (eq. 3 instead of eq. 7's split)
    cfg.DG.ADIN.SCHEDULE.ID_LOSS_IN_ADV = False

    # ---------------------------------------------------------------- model parts
    cfg.MODEL.BACKBONE.DUAL_BRANCH = CN()
    cfg.MODEL.BACKBONE.DUAL_BRANCH.NUM_PARTS = 3   # horizontal stripes of the part branch
    cfg.MODEL.BACKBONE.DUAL_BRANCH.PART_DIM = 256  # per-stripe reduction
    cfg.MODEL.BACKBONE.DUAL_BRANCH.PART_STRIDE = 1  # part branch's layer4 stride (finer stripes)
    cfg.MODEL.HEADS.MLP = CN()
    cfg.MODEL.HEADS.MLP.HIDDEN_DIM = 512
    cfg.MODEL.HEADS.MLP.DROPOUT = 0.5
    cfg.MODEL.HEADS.MLP.NEGATIVE_SLOPE = 0.1

    if frozen:
        cfg.freeze()
    return cfg


def dg_loader_needed(cfg):
    """True when training needs RobustReID's DG train set (two views, domain / time labels, the
    ADIN validation split) instead of fastreid's."""
    return "DG" in cfg and (cfg.DG.BAU.ENABLED or cfg.DG.ADIN.ENABLED)


def check_dg_config(cfg):
    """Switch combinations and values that cannot work, as ConfigErrors naming the keys."""
    from ..config import ConfigError

    if "DG" not in cfg:
        return
    bau, adin = cfg.DG.BAU, cfg.DG.ADIN
    if (bau.ENABLED or adin.ENABLED) and cfg.MODEL.META_ARCHITECTURE != "RobustBaseline":
        raise ConfigError(f"DG.BAU / DG.ADIN need MODEL.META_ARCHITECTURE RobustBaseline, got "
                          f"{cfg.MODEL.META_ARCHITECTURE!r}")
    if (bau.ENABLED or adin.ENABLED) and "MPSNN" in cfg and cfg.MPSNN.ENABLED:
        raise ConfigError("DG.BAU / DG.ADIN cannot be combined with MPSNN.ENABLED (MP-SNN's "
                          "objective has no place for the DG terms)")
    if bau.ENABLED:
        if not (bau.ALIGN or bau.UNIFORM or bau.DOMAIN or bau.ADV_UNIFORM or bau.ADV_ALIGN):
            raise ConfigError("DG.BAU.ENABLED with every term off (ALIGN, UNIFORM, DOMAIN, "
                              "ADV_UNIFORM, ADV_ALIGN): switch one on or disable DG.BAU")
        if bau.VIEW_REDUCTION not in VIEW_REDUCTIONS:
            raise ConfigError(f"DG.BAU.VIEW_REDUCTION must be one of {VIEW_REDUCTIONS}, got "
                              f"{bau.VIEW_REDUCTION!r}")
        if bau.K < 1 or bau.T <= 0 or bau.LAMBDA < 0 or not 0 <= bau.MOMENTUM <= 1:
            raise ConfigError(f"DG.BAU needs K >= 1, T > 0, LAMBDA >= 0, 0 <= MOMENTUM <= 1, got "
                              f"K={bau.K} T={bau.T} LAMBDA={bau.LAMBDA} MOMENTUM={bau.MOMENTUM}")
        if not 0 <= bau.AUG.PROB <= 1:
            raise ConfigError(f"DG.BAU.AUG.PROB must be in [0, 1], got {bau.AUG.PROB}")
        if (bau.ADV_UNIFORM or bau.ADV_ALIGN) and not (cfg.ADV_TRAIN.ENABLED and
                                                       cfg.ADV_TRAIN.INCLUDE_CLEAN):
            raise ConfigError("DG.BAU.ADV_UNIFORM / ADV_ALIGN need ADV_TRAIN.ENABLED True and "
                              "ADV_TRAIN.INCLUDE_CLEAN True (clean and adversarial rows)")
        if cfg.META_LEARNING.ENABLED and cfg.ADV_TRAIN.ENABLED and cfg.ADV_TRAIN.INCLUDE_CLEAN:
            raise ConfigError("DG.BAU with META_LEARNING and ADV_TRAIN.INCLUDE_CLEAN is not "
                              "supported: the meta split cannot pair the strong view with the "
                              "doubled clean + adversarial rows")
    if adin.ENABLED:
        if adin.NUISANCE not in NUISANCE_KINDS:
            raise ConfigError(f"DG.ADIN.NUISANCE must be one of {NUISANCE_KINDS}, got "
                              f"{adin.NUISANCE!r}")
        if adin.LOSS not in ADV_LOSSES:
            raise ConfigError(f"DG.ADIN.LOSS must be one of {ADV_LOSSES}, got {adin.LOSS!r}")
        if adin.BETA < 0:
            raise ConfigError(f"DG.ADIN.BETA must be >= 0, got {adin.BETA}")
        sched = adin.SCHEDULE
        if sched.ENABLED:
            if not 0 <= sched.THRESHOLD_I_TARGET <= sched.THRESHOLD_I_TRIGGER <= 1:
                raise ConfigError(
                    f"DG.ADIN.SCHEDULE needs 0 <= THRESHOLD_I_TARGET <= THRESHOLD_I_TRIGGER <= 1 "
                    f"(identity-validation error fractions), got {sched.THRESHOLD_I_TARGET} and "
                    f"{sched.THRESHOLD_I_TRIGGER}")
            if sched.VAL_PERIOD < 1 or sched.VAL_IMAGES_PER_ID < 1 or sched.VAL_MAX_IMAGES < 1:
                raise ConfigError("DG.ADIN.SCHEDULE needs VAL_PERIOD, VAL_IMAGES_PER_ID and "
                                  "VAL_MAX_IMAGES >= 1")
            if sched.PRETRAIN_EPOCHS < 0 or sched.NUISANCE_PRETRAIN_ITERS < 0:
                raise ConfigError("DG.ADIN.SCHEDULE.PRETRAIN_EPOCHS / NUISANCE_PRETRAIN_ITERS "
                                  "must be >= 0")
            if sched.PRETRAIN_EPOCHS >= cfg.SOLVER.MAX_EPOCH:
                raise ConfigError(f"DG.ADIN.SCHEDULE.PRETRAIN_EPOCHS ({sched.PRETRAIN_EPOCHS}) "
                                  f"leaves no epoch of SOLVER.MAX_EPOCH ({cfg.SOLVER.MAX_EPOCH}) "
                                  f"for the adversarial training")

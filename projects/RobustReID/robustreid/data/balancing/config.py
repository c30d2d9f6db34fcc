"""Config keys of DDDefense phase 1 (data balancing, paper section "Data Balancing", eq. 1-2).

``add_balancing_config(cfg)`` declares them; it is idempotent and must run before ``merge_from_file``
(unknown keys in a yml raise). Two groups:

* ``DATASETS.BALANCED``: train a ReID model on a balanced copy written by ``tools/balance_data.py``
  (see :func:`robustreid.data.balancing.dataset.apply_balanced_config`).
* ``BALANCE``: how ``tools/balance_data.py`` plans (eq. 1-2), trains the ID- and camera-conditional
  EDM diffusion model (Karras et al. 2022) and generates the pseudo samples.

DDDefense gives no hyper-parameters for its diffusion model; where EDM (Karras et al. 2022) gives one,
it is the default and the comment says so.
"""
from fastreid.config import CfgNode as CN

__all__ = ["add_balancing_config"]


def add_balancing_config(cfg):
    """Declare DATASETS.BALANCED.* and BALANCE.* (idempotent; keeps the frozen state)."""
    if "BALANCE" in cfg:
        return cfg
    frozen = cfg.is_frozen()
    cfg.defrost()

    cfg.DATASETS.BALANCED = CN()
    # True: the training split is the balanced copy at PATH (real + synthetic images, manifest.json),
    # in place of DATASETS.NAMES' own training split; test sets (DATASETS.TESTS) are unchanged.
    cfg.DATASETS.BALANCED.ENABLED = False
    # Directory written by tools/balance_data.py (its --output; holds manifest.json). Also the tool's
    # default --output when set.
    cfg.DATASETS.BALANCED.PATH = ""

    cfg.BALANCE = CN()
    # eq. 1: identities with n_i < DELTA1 images get DELTA1 - n_i pseudo samples. 0 = the mean number
    # of images per identity, rounded up (paper Fig. 5: small identities are "filled to an average
    # sample number level").
    cfg.BALANCE.DELTA1 = 0
    # eq. 2: identities whose largest single-camera share max_c n_ic / n_i exceeds DELTA2 get pseudo
    # samples from every other camera. The paper gives no value; 0.5 = "more than half of the
    # identity's images come from one camera".
    cfg.BALANCE.DELTA2 = 0.5
    # Seed of everything random in the tool (training batches, noise levels, each image's seed).
    cfg.BALANCE.SEED = 0
    # [height, width] the diffusion model is trained and sampled at; generated images are written at
    # this size (fastreid's transforms resize them like any real image). Multiple of 2^(levels-1).
    cfg.BALANCE.IMAGE_SIZE = [128, 64]
    # Random horizontal flips of the training images (EDM's x-flip augmentation; persons are
    # left-right symmetric enough).
    cfg.BALANCE.HFLIP = True
    # Image channels (3 = RGB).
    cfg.BALANCE.CHANNELS = 3

    # The network: diffusers' UNet2DModel.
    cfg.BALANCE.MODEL = CN()
    # block_out_channels: feature channels per resolution level (one level per entry).
    cfg.BALANCE.MODEL.BLOCK_CHANNELS = (64, 128, 256, 256)
    # Residual blocks per level (EDM's DDPM++ uses 4 at 32x32; 2 keeps 128x64 affordable).
    cfg.BALANCE.MODEL.LAYERS_PER_BLOCK = 2
    # Self-attention blocks per level (same length as BLOCK_CHANNELS). EDM/DDPM++ attend at 16x16;
    # a 128x64 input is at 32x16 and 16x8 on the last two of four levels.
    cfg.BALANCE.MODEL.ATTENTION = (False, False, True, True)
    # Self-attention in the bottleneck block.
    cfg.BALANCE.MODEL.MID_ATTENTION = True
    cfg.BALANCE.MODEL.ATTENTION_HEAD_DIM = 64
    # GroupNorm groups (must divide every BLOCK_CHANNELS entry).
    cfg.BALANCE.MODEL.NORM_GROUPS = 32
    # Dropout in the residual blocks (EDM: 0.13 on CIFAR-10, 0.10 on ImageNet-64).
    cfg.BALANCE.MODEL.DROPOUT = 0.10
    # How (identity, camera) conditions the UNet's class embedding: "sum" = embedding(id) +
    # embedding(camera), which composes to (id, camera) pairs never seen in training, exactly what
    # eq. 2 asks for; "joint" = one embedding per (id, camera) pair (diffusers' own nn.Embedding of
    # size (ids+1) x (cams+1)); unseen pairs then keep their random initialisation.
    cfg.BALANCE.MODEL.CONDITIONING = "sum"
    # Probability of replacing both labels by the null label in training, so the same network is
    # also unconditional and classifier-free guidance (SAMPLE.GUIDANCE_SCALE > 1) can be used.
    cfg.BALANCE.MODEL.COND_DROP_PROB = 0.1

    # EDM formulation (Karras et al. 2022, Table 1 / Sec. 5): preconditioning and noise levels.
    cfg.BALANCE.EDM = CN()
    # Training noise levels: ln(sigma) ~ N(P_MEAN, P_STD^2).
    cfg.BALANCE.EDM.P_MEAN = -1.2
    cfg.BALANCE.EDM.P_STD = 1.2
    # Standard deviation of the data (images scaled to [-1, 1]); enters c_skip, c_out, c_in, lambda.
    cfg.BALANCE.EDM.SIGMA_DATA = 0.5
    # Sampling schedule sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho.
    cfg.BALANCE.EDM.SIGMA_MIN = 0.002
    cfg.BALANCE.EDM.SIGMA_MAX = 80.0
    cfg.BALANCE.EDM.RHO = 7.0

    cfg.BALANCE.TRAIN = CN()
    # Optimizer steps in total (a rerun with more steps continues from the last checkpoint).
    cfg.BALANCE.TRAIN.STEPS = 200000
    cfg.BALANCE.TRAIN.BATCH_SIZE = 64
    # Adam learning rate (EDM: 2e-4 on FFHQ/AFHQv2 64x64, 1e-3 on CIFAR-10 at batch 512).
    cfg.BALANCE.TRAIN.LR = 2e-4
    # Linear learning-rate warm-up in optimizer steps (EDM ramps over 10M images).
    cfg.BALANCE.TRAIN.WARMUP_STEPS = 5000
    # Gradient-norm clipping (0 = off); EDM does not clip but replaces NaN/Inf gradients.
    cfg.BALANCE.TRAIN.GRAD_CLIP = 0.0
    # Exponential moving average of the weights, sampled from (diffusers' EMAModel with its
    # (1+t)/(10+t) ramp-up). EDM: half-life 500k images = 0.99991 per step at batch 64.
    cfg.BALANCE.TRAIN.EMA_DECAY = 0.9999
    # bfloat16 autocast on CUDA (ignored on CPU).
    cfg.BALANCE.TRAIN.AMP = True
    # Save the resumable training state (model, EMA, optimizer, RNG) every N steps, and at the end.
    cfg.BALANCE.TRAIN.CHECKPOINT_PERIOD = 5000
    # Print loss and speed every N steps.
    cfg.BALANCE.TRAIN.LOG_PERIOD = 500
    # A trained checkpoint to sample from instead of training (""= train under <output>/diffusion).
    cfg.BALANCE.TRAIN.CHECKPOINT = ""

    cfg.BALANCE.SAMPLE = CN()
    # "heun" (EDM's deterministic 2nd-order sampler, Karras et al. Algorithm 1), "euler"
    # (diffusers' EDMEulerScheduler) or "dpmsolver" (diffusers' EDMDPMSolverMultistepScheduler).
    cfg.BALANCE.SAMPLE.SAMPLER = "heun"
    # Number of noise levels N (Heun: 2N-1 network evaluations; EDM: 18 on CIFAR-10, 40 at 64x64).
    cfg.BALANCE.SAMPLE.STEPS = 18
    # Classifier-free guidance weight w: D = D_uncond + w (D_cond - D_uncond); 1 = plain
    # conditional sampling (as EDM's class-conditional models), no extra network evaluation.
    cfg.BALANCE.SAMPLE.GUIDANCE_SCALE = 1.0
    # Images generated per batch; also the chunk after which manifest.json is rewritten (resume).
    cfg.BALANCE.SAMPLE.BATCH_SIZE = 256
    # Real vs generated grid (paper Fig. 5): identities shown, and images of each kind per identity.
    cfg.BALANCE.SAMPLE.GRID_IDS = 8
    cfg.BALANCE.SAMPLE.GRID_IMAGES = 6

    if frozen:
        cfg.freeze()
    return cfg

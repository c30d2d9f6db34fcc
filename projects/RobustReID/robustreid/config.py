"""Every config key RobustReID adds to fastreid's defaults.

Call :func:`add_robustreid_config` on a fastreid ``get_cfg()`` before ``merge_from_file``; unknown keys
in a yml still raise, so typos are caught before training starts.
"""
import contextlib
import numbers
import os

import yaml
from fastreid.config import CfgNode as CN


def add_robustreid_config(cfg):
    """Declare RobustReID's keys (idempotent: calling twice leaves the config unchanged)."""
    if "ROBUSTREID" in cfg:
        return cfg
    frozen = cfg.is_frozen()
    cfg.defrost()

    # Marker, and the knobs that are not tied to one fastreid section.
    cfg.ROBUSTREID = CN()
    # Checkpoints are read with torch.load(weights_only=True); set False only for trusted files
    # written by old code that pickled arbitrary objects.
    cfg.ROBUSTREID.WEIGHTS_ONLY = True
    # Run-level seed; -1 keeps fastreid's behaviour (time-based seed per process).
    cfg.ROBUSTREID.SEED = 0

    # Decode every dataset image once before training/evaluation starts, so a corrupt file stops
    # the run with its path instead of crashing a data-loader worker minutes later.
    cfg.DATALOADER.VERIFY_IMAGES = True

    # Evaluator selection: "FaissReidEvaluator" (ours: streamed exact faiss retrieval),
    # "ReidEvaluator" (fastreid's dense-matrix evaluator) or "ClusteringEvaluator" (deep metric
    # learning: NMI, F1 and Recall@k of the pooled test set, TEST.CLUSTERING).
    cfg.TEST.EVALUATOR = "FaissReidEvaluator"
    cfg.TEST.FAISS = CN()
    # Queries scored per chunk; bounds memory at QUERY_CHUNK x gallery scores.
    cfg.TEST.FAISS.QUERY_CHUNK = 1024
    # Use faiss-gpu when it is installed and CUDA is available.
    cfg.TEST.FAISS.USE_GPU = True
    # Query x gallery scoring: "auto" (faiss-gpu when usable, else torch's GEMM, which is ~2x faster
    # than faiss-cpu's pairwise product on CPU and bit-identical to fastreid's build_dist),
    # "torch", "faiss" (faiss-cpu) or "faiss-gpu". k-NN for re-ranking always uses a faiss index.
    cfg.TEST.FAISS.BACKEND = "auto"
    # Retrieval index (robustreid.evaluation.indexes), a faiss index_factory string: "Flat" =
    # exact (the streamed path above); approximate: "IVF4096,PQ64", "IVF1024,Flat", "HNSW32", ...
    cfg.TEST.FAISS.INDEX = "Flat"
    # Gallery rows the index is trained on (seeded sample); 0 = 64 per IVF list, >= 20000.
    cfg.TEST.FAISS.TRAIN_SIZE = 0
    # IVF lists visited per query / HNSW candidate list size at search time.
    cfg.TEST.FAISS.NPROBE = 16
    cfg.TEST.FAISS.EF_SEARCH = 64
    # Re-rank this many approximate neighbours per query with exact distances (0 = off).
    cfg.TEST.FAISS.SHORTLIST = 0
    # Approximate indexes rank the top TOPK gallery items per query: Rank-k is exact for k <= TOPK,
    # positives beyond it count as missed in mAP/mINP.
    cfg.TEST.FAISS.TOPK = 100
    # Approximation report (never hidden): recall@k against exact search on a seeded sample of
    # APPROX_QUERIES queries (0 = all), and the mAP difference to the exact evaluation.
    cfg.TEST.FAISS.RECALL_KS = (1, 10)
    cfg.TEST.FAISS.APPROX_QUERIES = 1000
    cfg.TEST.FAISS.APPROX_SEED = 0

    # ClusteringEvaluator (robustreid.evaluation.clustering, EAT eq. 11-13); k-means k = classes.
    cfg.TEST.CLUSTERING = CN()
    # Recall@k ranks (CUB200/CARS196: 1, 2, 4, 8; In-Shop/SOP: 1, 10, 20).
    cfg.TEST.CLUSTERING.RECALL_KS = (1, 2, 4, 8)
    # faiss k-means iterations (the DML papers' 20; converged NMI is within 0.3 of it, measured).
    cfg.TEST.CLUSTERING.KMEANS_NITER = 20
    # k-means seed (faiss draws the initial centroids from the samples with it).
    cfg.TEST.CLUSTERING.SEED = 0
    # Ensemble inference: "vote" (the paper's), "mean" or "concat" of the member embeddings.
    cfg.TEST.CLUSTERING.INFERENCE = "vote"
    # Ensemble members whose embeddings the model outputs side by side (1 = a single model).
    cfg.TEST.CLUSTERING.MEMBERS = 1

    # Adversarial robustness evaluation inside RobustTrainer.test (robustreid.evaluation.robust);
    # tools/robust_eval.py takes the same settings from its command line instead.
    cfg.TEST.ROBUST = CN()
    # Run it after the clean evaluation; adds flat keys like "FNA_8_16/mAP" to the results.
    cfg.TEST.ROBUST.ENABLED = False
    # Attack names of robustreid.attacks' registry.
    cfg.TEST.ROBUST.ATTACKS = ("FNA", "SMA", "IFGSM")
    # L-inf budgets in 1/255 units of [0,1] images (8 means 8/255; 0.03 is rejected).
    cfg.TEST.ROBUST.EPS = (8,)
    # Attack iterations; every ATTACKS x EPS x STEPS cell is evaluated.
    cfg.TEST.ROBUST.STEPS = (16,)
    # Step size of every attack in 1/255 units; 0 = each attack's published default (module docs).
    cfg.TEST.ROBUST.STEP_SIZE = 0.0
    # Keyword options of single attacks as "NAME:key=value" strings, e.g. ("WMA:loss=fna",
    # "WMA:sinkhorn_iters=30"); values are Python literals, else strings
    # (robustreid.evaluation.attack_grid.parse_attack_options).
    cfg.TEST.ROBUST.ATTACK_OPTIONS = ()
    # Distance the attacks optimise ("euclidean", as the papers); ranking uses TEST.METRIC.
    cfg.TEST.ROBUST.DISTANCE = "euclidean"
    # During training: every N epochs, on epochs where the clean evaluation (TEST.EVAL_PERIOD) runs
    # too; 0 = only at the end of training.
    cfg.TEST.ROBUST.PERIOD = 0
    # Attack a seeded random subset of this many queries (0 = all): attacks cost ~steps x 3 passes.
    cfg.TEST.ROBUST.MAX_QUERIES = 0
    # AMA protocol: attack the gallery (gallery as guide set) and keep the queries clean.
    cfg.TEST.ROBUST.ATTACK_GALLERY = False
    # Guide split of the metric I-FGSM family and WMA: "" = their references' (the clean split the
    # attacked one is ranked against, Bai et al.'s AMA: the gallery when queries are attacked),
    # or "gallery" / "query" by name. FNA always uses the attacked split (Bouniot et al.).
    # (robustreid.evaluation.guide_choice)
    cfg.TEST.ROBUST.GUIDES = ""
    # Expectation over transformation: gradient samples per step (for randomized defenses).
    cfg.TEST.ROBUST.EOT_SAMPLES = 1
    # Robust model selection: after each evaluation where this results key exists (e.g.
    # "FNA_8_16/mAP"), keep the best checkpoint as OUTPUT_DIR/model_best_robust.pth; "" = off.
    cfg.TEST.ROBUST.BEST_METRIC = ""

    # Proxy-Anchor loss (Kim et al., CVPR 2020; EAT's metric loss): "ProxyAnchorLoss" in
    # MODEL.LOSSES.NAME, on outputs["features"], one proxy per class (MODEL.HEADS.NUM_CLASSES);
    # needs MODEL.META_ARCHITECTURE RobustBaseline, or EnsembleReID with EAT.MEMBER_ARCHITECTURE
    # RobustBaseline (robustreid.modeling.losses.proxy_anchor).
    # Defaults: the authors' code (tjddus9597/Proxy-Anchor-CVPR2020 code/train.py, README).
    cfg.MODEL.LOSSES.PA = CN()
    cfg.MODEL.LOSSES.PA.MARGIN = 0.1           # delta (--mrg 0.1)
    cfg.MODEL.LOSSES.PA.ALPHA = 32.0           # scaling alpha (--alpha 32)
    cfg.MODEL.LOSSES.PA.SCALE = 1.0            # weight of loss_proxy_anchor in the total loss
    cfg.MODEL.LOSSES.PA.LR_MULTIPLIER = 100.0  # proxies' LR = SOLVER.BASE_LR x this (lr * 100)
    # First epochs with the backbone frozen: only the new layers (heads, proxies) train; 0 = off
    # (--warm 1 for BN-Inception on all four datasets, 5 for ResNet-50).
    cfg.MODEL.LOSSES.PA.WARMUP_EPOCHS = 1

    # Online metric adversarial training (engine/train_steps.py: MetricAdversarialBatch).
    # Defaults: DDDefense's supplementary (FNA, 5/255, 8 iterations, Euclidean).
    cfg.ADV_TRAIN = CN()
    cfg.ADV_TRAIN.ENABLED = False
    cfg.ADV_TRAIN.ATTACK = "FNA"          # any name in robustreid.attacks.ATTACK_REGISTRY
    cfg.ADV_TRAIN.EPS = 5.0               # budget in 1/255 units of the [0, 1] pixel range
    cfg.ADV_TRAIN.STEPS = 8
    cfg.ADV_TRAIN.STEP_SIZE = 0.0         # 1/255 units; 0 = the attack's own default
    cfg.ADV_TRAIN.DISTANCE = "euclidean"  # or "cosine"
    # False: train on the adversarial batch only (DDDefense eq. 5, "Metric AT"; Bouniot et al.'s
    # Adv_train); True: clean + adversarial (needed by the discriminator, eq. 6, and eq. 10).
    cfg.ADV_TRAIN.INCLUDE_CLEAN = False
    # With INCLUDE_CLEAN: False = one loss over the combined clean + adversarial batch (each part
    # weighs half, triplets mine across parts); True = eq. 10 as written, l(G, x, y) + l(G, x_adv, y_adv):
    # the model's losses on the clean rows plus those on the adversarial rows (the paper leaves open
    # which one its code does).
    cfg.ADV_TRAIN.SEPARATE_LOSSES = False

    # FNES, farthest negative extension softening (DDDefense eq. 4; supplementary values). Needs
    # MODEL.META_ARCHITECTURE RobustBaseline (soft labels in the classification loss).
    cfg.ADV_TRAIN.FNES = CN()
    cfg.ADV_TRAIN.FNES.ENABLED = False
    cfg.ADV_TRAIN.FNES.GAMMA = 1.5               # perturbation scaling gamma >= 1
    cfg.ADV_TRAIN.FNES.OMEGA_RANGE = (0.3, 0.8)  # omega ~ U(a, b), drawn per sample
    cfg.ADV_TRAIN.FNES.LAMBDA1 = 0.9             # phi(y, lambda1): as the clean CE smoothing
    cfg.ADV_TRAIN.FNES.LAMBDA2 = 0.95            # phi(y, lambda2) before tau
    cfg.ADV_TRAIN.FNES.V = 0.01                  # label mass tau moves to the farthest negative

    # Adversarially-enhanced learning: feature discriminator D (DDDefense eq. 6-8, supplementary).
    cfg.ADV_TRAIN.DISCRIMINATOR = CN()
    cfg.ADV_TRAIN.DISCRIMINATOR.ENABLED = False
    cfg.ADV_TRAIN.DISCRIMINATOR.HIDDEN_DIMS = (512, 256)  # MLP; the paper does not specify D
    cfg.ADV_TRAIN.DISCRIMINATOR.LOSS_WEIGHT = 0.001       # scale of the encoder's L_E
    cfg.ADV_TRAIN.DISCRIMINATOR.BASE_LR = 0.0             # 0 = SOLVER.BASE_LR ("as the model")
    cfg.ADV_TRAIN.DISCRIMINATOR.WEIGHT_DECAY = 0.0005
    cfg.ADV_TRAIN.DISCRIMINATOR.GAMMA = 0.5               # LR decay at SOLVER.STEPS epochs

    # Self-meta learning (DDDefense eq. 9-13): meta-train / meta-test split of each batch by
    # identity, one functional inner step, outer update on L_meta-train + L_meta-test.
    cfg.META_LEARNING = CN()
    cfg.META_LEARNING.ENABLED = False
    cfg.META_LEARNING.TEST_FRACTION = 0.25  # meta-train : meta-test = 3 : 1 identities
    cfg.META_LEARNING.INNER_LR = 0.0        # alpha of eq. 9; 0 = the current learning rate
    cfg.META_LEARNING.FIRST_ORDER = False   # True drops the second-order term (faster)

    # EAT, ensemble adversarial training (Ke et al., "Towards Adversarially Robust Deep Metric
    # Learning": Algorithm 1, eq. 9-10): MODEL.META_ARCHITECTURE EnsembleReID
    # (modeling/meta_arch/ensemble.py) + the batch phase of engine/eat.py.
    cfg.EAT = CN()
    cfg.EAT.ENABLED = False
    cfg.EAT.MEMBERS = 3                       # N models (Algorithm 1's input; Table 3: three)
    # Each member is this registered meta-architecture built from this config (any backbone); the
    # paper's members all start from the same ImageNet weights, so only random inits differ.
    cfg.EAT.MEMBER_ARCHITECTURE = "RobustBaseline"
    # A checkpoint of one MEMBER_ARCHITECTURE model every member starts from in a new run (as the
    # paper's members start from one set of pretrained weights); "" = none.
    cfg.EAT.MEMBER_WEIGHTS = ""
    # Member i trains on D \ D^i of N equal seeded parts (Algorithm 1 lines 2, 5); False = all on D
    # (Table 3's "EAT w/o data split").
    cfg.EAT.DATA_SPLIT = True
    # Adversarial rows crafted on the summed gradient of all members (eq. 10); False = each member's
    # own PGD, i.e. independently adversarially-trained members (with DATA_SPLIT False: Table 3's
    # "naive ensemble").
    cfg.EAT.SELF_TRANSFER = True
    cfg.EAT.BETA = 0.5            # mixed ratio beta of Algorithm 1 line 9; the paper gives no value
    cfg.EAT.EPS = 16.0            # training PGD budget in 1/255 units ("Implementation Details")
    cfg.EAT.STEPS = 10            # training PGD iterations ("Implementation Details")
    # PGD step in 1/255 units; the paper gives none: 0 = Madry et al.'s 2.5 * EPS / STEPS.
    cfg.EAT.STEP_SIZE = 0.0
    cfg.EAT.DISTANCE = "euclidean"  # L of eq. 10 on L2-normalised embeddings, or "cosine"
    # Retrieval embedding ("Model inference"): "vote" (the paper's; the model outputs the N
    # L2-normalised member embeddings concatenated, the clustering evaluator votes over them),
    # "mean" (their mean) or "concat".
    cfg.EAT.INFERENCE = "vote"

    # The classification defenses EAT compares with (Tables 1-4), in their DML form ("Previous
    # Defenses": the label of x is its embedding F(x) under the current model), on one model
    # (engine/dml_defenses.py). F(x) is the model's retrieval embedding, d the distance below.
    cfg.DML_DEFENSE = CN()
    # "" (off), "at" (eq. 4-5), "mixup" (eq. 6), "iat" (eq. 7) or "trades" (eq. 8).
    cfg.DML_DEFENSE.METHOD = ""
    # Adv(x) of at, iat and trades: EAT's training PGD on one model, SMA (maximise d(F(x_adv), F(x))
    # from a random start), EPS/255, STEPS iterations, step STEP_SIZE/255 (0 = 2.5 * EPS / STEPS).
    cfg.DML_DEFENSE.EPS = 16.0
    cfg.DML_DEFENSE.STEPS = 10
    cfg.DML_DEFENSE.STEP_SIZE = 0.0
    # d of the attack and of the embedding-target terms: "cosine" (for unit embeddings half EAT's
    # squared Euclidean distance, same attack direction) or "euclidean" (squared L2, raw embedding).
    cfg.DML_DEFENSE.DISTANCE = "cosine"
    # The model's own losses (L_metric with identity labels) on the clean rows too ("PAL + X" of the
    # tables); False = eq. 4, 6, 7 as written (adversarial / mixed rows only). trades needs True
    # (eq. 8's first term).
    cfg.DML_DEFENSE.INCLUDE_CLEAN = True
    # lambda ~ Beta(ALPHA, ALPHA) of eq. 6-7 (mixup's reference code: alpha 1; EAT gives none).
    cfg.DML_DEFENSE.ALPHA = 1.0
    # lambda of eq. 8, the weight of d(F(Adv(x)), F(x)) (TRADES's beta = 1/lambda default, 6.0).
    cfg.DML_DEFENSE.LAMBDA = 6.0

    # Keys that live beside the parts they configure.
    from .data.balancing.config import add_balancing_config
    from .modeling.backbones.apnet import add_apnet_config
    from .modeling.backbones.bninception import add_bninception_config
    from .modeling.dg_config import add_dg_config
    from .modeling.noise import add_mpsnn_config

    add_apnet_config(cfg)
    add_bninception_config(cfg)  # MODEL.BACKBONE.BNINCEPTION
    add_mpsnn_config(cfg)  # MODEL.NOISE, MPSNN, TEST.NOISE_DRAWS
    add_balancing_config(cfg)  # DATASETS.BALANCED, BALANCE (DDDefense phase 1)
    add_dg_config(cfg)  # DG (BAU, ADIN), MODEL.BACKBONE.DUAL_BRANCH, MODEL.HEADS.MLP

    # Denoised smoothing: a denoiser trained in front of the frozen MODEL.WEIGHTS model
    # (tools/train_denoiser.py, engine/denoiser_training.py). Defaults: the thesis's chapter 6
    # (ZO-RUDS / ZO-AE-RUDS; "6.4" is its Implementation Details). [INF]: the thesis leaves it open.
    cfg.DENOISER = CN()
    cfg.DENOISER.ARCH = "RDUNet"     # DENOISER_REGISTRY name: RDUNet (6.3.1, Fig. 6.2) or SmallUNet
    cfg.DENOISER.WIDTH = 64          # channels of the first U-Net level, doubled per level [INF]
    # first_order (FO-RUDS, white-box gradients), rge (ZO-RUDS, Algorithm 4), cge_ae (ZO-AE-RUDS
    # (C), Algorithm 5) or rge_ae (ZO-AE-RUDS (R)): gradients estimated from queries only.
    cfg.DENOISER.MODE = "rge"
    # Noise std in [0, 1] pixel units. 6.4 writes "variance 0.25", but its results compare with
    # Zhang et al.'s sigma = 0.25 (Table 6.1): we read sigma = 0.25.
    cfg.DENOISER.SIGMA = 0.25
    # The model output the loss compares: "logits" (identity classifier, eq. 6.9's cross-entropy)
    # or "features" (retrieval embedding, feature matching [INF]).
    cfg.DENOISER.OUTPUT = "logits"
    cfg.DENOISER.Q = 192                   # RGE directions q (eq. 6.16; Table 6.1: q = 192)
    cfg.DENOISER.XI = 0.005                # smoothing xi (eq. 6.16, 6.19; 6.4), pixel / latent units
    cfg.DENOISER.RGE_DIFFERENCE = "forward"  # eq. 6.16 (q + 1 queries); "central": antithetic, 2q
    cfg.DENOISER.CGE_DIFFERENCE = "central"  # Algorithm 5 (2d queries); "forward": d + 1
    cfg.DENOISER.LOSS = CN()
    cfg.DENOISER.LOSS.MATCH = 1.0          # L_CE of eq. 6.9 (eq. 6.13 weighs it 1)
    cfg.DENOISER.LOSS.CS = 1.0             # lambda_CS of eq. 6.13 (6.4)
    cfg.DENOISER.LOSS.MMD = 4.0            # lambda_MMD of eq. 6.13 (6.4)
    cfg.DENOISER.LOSS.MMD_KERNEL = "gaussian"  # eq. 6.12's RKHS kernel [INF]; or "linear"
    cfg.DENOISER.LOSS.MMD_BANDWIDTHS = (1.0,)  # gaussian: multiples of the median distance [INF]
    # ||D(x + eta) - x||^2 of denoised smoothing (eq. 6.8, Salman et al.); 0 = eq. 6.13 as written.
    cfg.DENOISER.LOSS.MSE = 0.0
    # Warm start before the mode's training: iterations of ||D(x + eta) - x||^2 alone (Salman et al.
    # 2020's MSE pre-training of denoised smoothing; no model query), with its own Adam. 0 = the
    # thesis as written (D starts from its initialisation). Counted in CHECKPOINT_PERIOD's iterations.
    cfg.DENOISER.MSE_PRETRAIN_ITERS = 0
    cfg.DENOISER.MSE_PRETRAIN_LR = 1e-3    # Salman et al.'s Adam rate for MSE denoisers
    cfg.DENOISER.IMS_PER_BATCH = 256       # 6.4
    cfg.DENOISER.LR = 1e-4                 # Adam (6.4 gives the rate; the optimizer [INF])
    # 6.4: 600 epochs, the rate divided by 10 every 100. Here in iterations (an epoch is
    # training images / IMS_PER_BATCH); same proportions [INF].
    cfg.DENOISER.ITERS = 6000
    cfg.DENOISER.DECAY_EVERY = 1000
    cfg.DENOISER.GAMMA = 0.1
    # Autoencoder of the *_ae modes: pre-trained on reconstruction first (white-box, its own Adam),
    # then the encoder trains with the denoiser and the decoder joins the black box (Algorithm 5).
    cfg.DENOISER.AE = CN()
    cfg.DENOISER.AE.LATENT_DIM = 192       # d of CGE (Table 6.1's q = 192) [INF]
    cfg.DENOISER.AE.WIDTH = 32             # [INF]
    cfg.DENOISER.AE.LEVELS = 4             # stride-2 levels: image sides must be multiples of 2^LEVELS
    cfg.DENOISER.AE.PRETRAIN_ITERS = 1000  # [INF]
    cfg.DENOISER.AE.PRETRAIN_LR = 1e-3     # [INF]
    cfg.DENOISER.CHECKPOINT_PERIOD = 500   # iterations (pre-training included)
    cfg.DENOISER.LOG_PERIOD = 20

    # Certified robustness by randomized smoothing (Cohen et al. 2019; thesis ch. 6):
    # robustreid.evaluation.smoothing, tools/certify.py (whose options override these keys).
    # Gaussian data augmentation: each training batch gets N(0, SIGMA^2) noise per pixel, SIGMA in
    # [0, 1] pixel units (0.25 = 64/255), not clipped to [0, 1] (as Cohen et al.'s training and the
    # smoothing itself). Training steps only (engine/train_steps.py: GaussianNoiseBatch).
    cfg.INPUT.GAUSSIAN_NOISE = CN()
    cfg.INPUT.GAUSSIAN_NOISE.ENABLED = False
    cfg.INPUT.GAUSSIAN_NOISE.SIGMA = 0.25
    cfg.CERTIFY = CN()
    # "retrieval": the identity of the query's nearest gallery item (clean gallery, TEST.METRIC);
    # "classifier": the model's identity classifier on training images.
    cfg.CERTIFY.DECISION = "retrieval"
    # Noise levels in [0, 1] pixel units (Cohen et al.'s 0.12 / 0.25 / 0.5 / 1.0).
    cfg.CERTIFY.SIGMAS = (0.12, 0.25, 0.5)
    # Selection samples (Cohen et al.: 100) and estimation samples. Cohen et al. use 100,000 (on a
    # GPU). 1,000 keeps a SynthReID ResNet-18 query (128x64) at ~16 s per sigma on one busy CPU core
    # (67 noisy images/s, measured). It caps the largest certifiable radius at
    # sigma * PhiInv(ALPHA ** (1 / N)) = 2.46 sigma (100,000: 3.81 sigma).
    cfg.CERTIFY.N0 = 100
    cfg.CERTIFY.N = 1000
    # Failure probability of each certificate (Cohen et al.: 0.001).
    cfg.CERTIFY.ALPHA = 0.001
    # Noisy copies per forward pass.
    cfg.CERTIFY.BATCH = 200

    # IPES-GAN (thesis ch. 3): unsupervised domain adaptation by cyclic novel-view generation
    # (modeling/meta_arch/ipes_gan.py, engine/ipes.py). Labelled source: DATASETS.NAMES; unlabelled
    # target: IPES.TARGET's training split. The identity encoder E_id is the MODEL.* ReID model
    # (any backbone, EmbeddingHead) and starts from MODEL.WEIGHTS, the source-trained model.
    # Defaults: the thesis's values (sec. 3.2, 3.3.2); [INF] marks what it leaves open.
    cfg.IPES = CN()
    cfg.IPES.ENABLED = False              # MODEL.META_ARCHITECTURE IPESGAN + the IPES trainer
    cfg.IPES.TARGET = ""                  # registered dataset name (its train split, ids unused)
    cfg.IPES.TEACHER_WEIGHTS = ""         # E_std of eq. 3.18 (frozen); "" = MODEL.WEIGHTS
    # Source / target cameras (style encoders' classes, eq. 3.7-3.10); 0 = count the datasets'.
    cfg.IPES.SOURCE_CAMERAS = 0
    cfg.IPES.TARGET_CAMERAS = 0
    # One "epoch" of SOLVER.MAX_EPOCH / CHECKPOINT_PERIOD / TEST.EVAL_PERIOD, in iterations; the
    # thesis counts iterations (total not given [INF]: configs/IPES train 50 x 1000).
    cfg.IPES.ITERS_PER_EPOCH = 1000
    # SOLVER.IMS_PER_BATCH is the whole batch (16), half source, half target (sec. 3.3.2).
    cfg.IPES.KEYPOINTS = CN()             # 18-channel pose input (robustreid/data/keypoints.py)
    cfg.IPES.KEYPOINTS.SOURCE = "files"   # "files", "synthreid" or a registered estimator
    cfg.IPES.KEYPOINTS.DIR = ""           # keypoint files' root; "" = $FASTREID_DATASETS/keypoints
    cfg.IPES.KEYPOINTS.SIGMA = 6.0        # heatmap std, INPUT.SIZE_TRAIN pixels [INF]
    cfg.IPES.KEYPOINTS.MIN_VISIBILITY = 2  # draw joints with v >= this (2 visible, 1 occluded)
    cfg.IPES.GEN = CN()                   # encoders / decoders (sec. 3.3.2; widths [INF])
    cfg.IPES.GEN.DIM = 64                 # first conv's channels; 2 downsamplings double it twice
    cfg.IPES.GEN.RES_BLOCKS = 4           # pose encoder's (plain) and decoder's (AdaIN) blocks
    cfg.IPES.GEN.ASPP_RATES = (1, 2, 4, 6)  # pose encoder's atrous rates (+ image pooling)
    cfg.IPES.GEN.STYLE_DIM = 64           # style encoder output (6 convs) = camera classifier input
    cfg.IPES.GEN.MLP_DIM = 256            # MLP from (style, identity) codes to AdaIN parameters
    cfg.IPES.DIS = CN()                   # LSGAN discriminator (PatchGAN convs [INF])
    cfg.IPES.DIS.DIM = 64
    cfg.IPES.DIS.LAYERS = 4               # stride-2 convs before the 1-channel score map
    cfg.IPES.LOSS = CN()                  # eq. 3.19's weights
    cfg.IPES.LOSS.CYC = 5.0               # w1, L_cyc (eq. 3.6)
    cfg.IPES.LOSS.CON = 3.0               # w2, L_con (eq. 3.5): final value of the ramp
    cfg.IPES.LOSS.CAM = 1.0               # L_cam (eq. 3.11)
    cfg.IPES.LOSS.ADV = 1.0               # L_adv (eq. 3.12, least squares: LSGAN)
    cfg.IPES.LOSS.CE = 1.0                # L_CE (eq. 3.15), real source images
    cfg.IPES.LOSS.SOFT_CE = 0.5           # w3, L_softCE (eq. 3.17), I_S->G
    cfg.IPES.LOSS.SOFT_CE_EPSILON = 0.1   # epsilon of eq. 3.16 [INF]
    cfg.IPES.LOSS.KL = 3.0                # w4, L_KL (eq. 3.18): final value of the ramp
    cfg.IPES.LOSS.RAMP_START = 20000      # w2 = w4 = 0 for these iterations (sec. 3.2.2) ...
    cfg.IPES.LOSS.RAMP_ITERS = 6000       # ... then linear up to CON / KL over these
    cfg.IPES.SOLVER = CN()                # sec. 3.3.2
    cfg.IPES.SOLVER.GEN_LR = 0.0002       # Adam, encoders + decoders (G)
    cfg.IPES.SOLVER.DIS_LR = 0.0002       # Adam, D
    cfg.IPES.SOLVER.BETAS = (0.5, 0.999)  # Adam's ("momentum 0.999"; beta1 [INF])
    cfg.IPES.SOLVER.GEN_WEIGHT_DECAY = 0.0001  # G's and D's [INF]
    cfg.IPES.SOLVER.ID_LR = 0.001         # SGD, identity encoder E_id
    cfg.IPES.SOLVER.ID_MOMENTUM = 0.9
    cfg.IPES.SOLVER.ID_WEIGHT_DECAY = 0.0005   # [INF]
    cfg.IPES.SOLVER.STEPS = ()            # iterations where every rate x GAMMA (thesis: none)
    cfg.IPES.SOLVER.GAMMA = 0.1
    cfg.IPES.VIS = CN()                   # PNG grids in OUTPUT_DIR/ipes_images
    cfg.IPES.VIS.PERIOD = 1000            # every K iterations (0 = off)
    cfg.IPES.VIS.PAIRS = 8                # fixed source/target pairs shown

    if frozen:
        cfg.freeze()
    return cfg


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the file, key or value at fault."""


@contextlib.contextmanager
def _config_errors(where):
    """yacs/fastreid merge failures as one ConfigError prefixed with the file (or option) at fault."""
    try:
        yield
    except yaml.MarkedYAMLError as e:  # the mark names the file: a _BASE_ yml may be at fault
        mark = e.problem_mark or e.context_mark
        at = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else where
        raise ConfigError(f"{at}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {' '.join(str(e).split())}") from None
    except KeyError as e:  # unknown key: yacs puts the full key name in the message
        raise ConfigError(f"{where}: {e.args[0]}") from None
    except FileNotFoundError as e:
        raise ConfigError(f"{where}: _BASE_ file not found: {e.filename}") from None
    except (ValueError, TypeError, AssertionError) as e:  # bad value or type
        raise ConfigError(f"{where}: {e}") from None


BASE_KEY = "_BASE_"


def _merge_into(update, base, path):
    """fastreid's _BASE_ merge: ``update``'s values replace ``base``'s, sections merge key by key."""
    for key, value in update.items():
        if isinstance(value, dict) and key in base:
            if not isinstance(base[key], dict):
                raise ValueError(f"{path}: {key} is a section, but a value in its _BASE_")
            _merge_into(value, base[key], path)
        else:
            base[key] = value


def read_config_file(path, _inheriting=()):
    """A yml as a dict with its ``_BASE_`` merged in. fastreid's rules (a path relative to the file,
    the file's keys override its base's), plus: ``_BASE_`` may be a list of files, merged left to
    right, so a config combines independent parts without copying them (configs/EAT: the recipe,
    a dataset, a backbone and a method)."""
    if path in _inheriting:
        raise ValueError(f"_BASE_ cycle: {' -> '.join(_inheriting + (path,))}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    bases = data.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ValueError(f"_BASE_ of {path} must be a file or a list of files, got {bases!r}")
    merged = {}
    for base in bases:
        base = os.path.expanduser(base)
        base = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        _merge_into(read_config_file(base, _inheriting + (path,)), merged, path)
    _merge_into(data, merged, path)
    return merged


def load_config(config_file="", opts=()):
    """fastreid's get_cfg() + RobustReID's keys + a yml (with _BASE_, :func:`read_config_file`) +
    KEY VALUE overrides.

    Every failure is a :class:`ConfigError` naming the file or key, raised before anything is built.
    """
    from fastreid.config import get_cfg

    cfg = add_robustreid_config(get_cfg())
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file not found: {config_file}")
        with _config_errors(config_file):
            cfg.merge_from_other_cfg(type(cfg)(read_config_file(config_file)))
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"command-line options must be KEY VALUE pairs, got an odd list: {opts}")
    with _config_errors("command-line option"):
        cfg.merge_from_list(opts)
    check_fastreid_values(cfg)
    from .data.balancing import apply_balanced_config

    return apply_balanced_config(cfg)  # DATASETS.BALANCED: train on the balanced copy


def _positive_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def check_fastreid_values(cfg):
    """fastreid's own keys whose bad values it does not check: they surface after the model is built
    (a traceback) or as a training loop that never yields a batch."""
    for key in ("INPUT.SIZE_TRAIN", "INPUT.SIZE_TEST"):
        size = cfg.INPUT.get(key.split(".")[1])
        if len(size) != 2 or not all(_positive_int(v) for v in size):
            raise ConfigError(f"{key} must be [height, width] in pixels, got {list(size)}")
    for key in ("SOLVER.MAX_EPOCH", "SOLVER.IMS_PER_BATCH", "TEST.IMS_PER_BATCH",
                "DATALOADER.NUM_INSTANCE"):
        section, name = key.split(".")
        if not _positive_int(cfg[section][name]):
            raise ConfigError(f"{key} must be a positive integer, got {cfg[section][name]!r}")
    workers = cfg.DATALOADER.NUM_WORKERS
    if not isinstance(workers, numbers.Integral) or isinstance(workers, bool) or workers < 0:
        raise ConfigError(f"DATALOADER.NUM_WORKERS must be >= 0, got {workers!r}")


# Gaussian noise levels are in [0, 1] pixel units; above this one looks like 0-255 units (64/255 is
# 0.25), and it already buries the image (Cohen et al. go up to 1.0).
MAX_PIXEL_SIGMA = 2.0


def check_pixel_sigma(value, name):
    """A Gaussian noise level in [0, 1] pixel units: a number in (0, MAX_PIXEL_SIGMA], else a
    ConfigError naming ``name`` (a key or an option)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= \
            MAX_PIXEL_SIGMA:
        hint = " (looks like 0-255 units: 64/255 is 0.25)" if isinstance(value, numbers.Real) and \
            value > MAX_PIXEL_SIGMA else ""
        raise ConfigError(f"{name} must be a noise level in (0, {MAX_PIXEL_SIGMA:g}] in [0, 1] "
                          f"pixel units, got {value!r}{hint}")
    return float(value)

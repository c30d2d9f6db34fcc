"""MP-SNN's noise modules (thesis chapter 5.2.1): a stochastic network F(x; theta, phi, phi_a).

* Isotropic noise (Learn2Perturb style): after each block named in MODEL.NOISE.BLOCKS (names inside
  the backbone, e.g. "layer2"), ``y = x + |phi_c| * e``, ``e ~ N(0, 1)`` element-wise, with one learned
  scale ``phi_c`` per channel. Trained by its own optimizer (Algorithm 2, engine/mpsnn.py).
* Anisotropic noise on the final feature (MODEL.NOISE.ANISOTROPIC.MODULE, default the BN-neck output
  ``heads.bottleneck``, i.e. the input of the identity classifier): ``f + phi_a e``, ``e ~ N(0, I_K)``,
  so the noise covariance is Sigma = phi_a phi_a^T (the thesis gives Sigma only; drawing it through
  the factor is our reading). phi_a is trained with the model's weights.

:func:`attach_noise_modules` adds them to any fastreid meta-architecture after ``build_model``: the
modules live under ``model.noise_modules`` (their tensors are in the model's state dict, so
checkpoints carry them) and act through forward hooks, so the backbone's own parameter names, and
with them pretrained weights, are unchanged, and any BACKBONE_REGISTRY backbone can carry them.

Noise is always on in training; in eval mode it follows MODEL.NOISE.TEST_TIME (on by default: the
thesis's model is stochastic, evaluate it with EOT attacks and TEST.NOISE_DRAWS). A disabled module
returns its block's output untouched, so the model is then bit-identical to one without noise.
"""
import contextlib

import torch
from fastreid.config import CfgNode as CN
from torch import nn

from ..parallel import unwrap

__all__ = ["AnisotropicNoise", "IsotropicNoise", "NoiseAveragedModel", "NoiseModules",
           "add_mpsnn_config", "anisotropic_factor", "attach_noise_modules", "noise_disabled",
           "noise_averaged", "noise_modules_of", "split_noise_parameters", "take_clean_features"]

META_TASKS = ("V", "P", "PA")


def add_mpsnn_config(cfg):
    """Declare MODEL.NOISE, MPSNN and TEST.NOISE_DRAWS (idempotent). Defaults are the thesis's
    (chapter 5.3, "Implementation Details"); [open] marks what it leaves open and what we chose."""
    if "NOISE" in cfg.MODEL:
        return cfg
    frozen = cfg.is_frozen()
    cfg.defrost()

    cfg.MODEL.NOISE = CN()
    # Attach noise modules (attach_noise_modules after build_model). Off: the model is fastreid's.
    cfg.MODEL.NOISE.ENABLED = False
    # Backbone blocks (module names inside MODEL.BACKBONE) followed by isotropic noise; () = none.
    # [open] the thesis injects into "all the intermediary feature space": every ResNet stage.
    cfg.MODEL.NOISE.BLOCKS = ("layer1", "layer2", "layer3", "layer4")
    # Dimension of the blocks' outputs holding channels (one learned scale per channel, as
    # Learn2Perturb); 1 for CNN maps (B, C, H, W), -1 for token-major (B, N, C) transformers.
    cfg.MODEL.NOISE.CHANNEL_DIM = 1
    # Initial isotropic scale phi (noise std). [open] not given by the thesis; our choice.
    cfg.MODEL.NOISE.INIT_SCALE = 0.25
    # Noise in eval mode too (True: the thesis's stochastic model). False: deterministic at test.
    cfg.MODEL.NOISE.TEST_TIME = True
    cfg.MODEL.NOISE.ANISOTROPIC = CN()
    # Anisotropic noise on the final feature, Sigma = phi_a phi_a^T.
    cfg.MODEL.NOISE.ANISOTROPIC.ENABLED = True
    # Module (name inside the model) whose (B, D[, 1, 1]) output gets it: the BN-neck output, the
    # classifier's input ("penultimate layer") and the eval feature of fastreid's EmbeddingHead.
    cfg.MODEL.NOISE.ANISOTROPIC.MODULE = "heads.bottleneck"
    # Columns K of phi_a (D x K); 0 = D (full-rank Sigma). [open] the thesis does not say.
    cfg.MODEL.NOISE.ANISOTROPIC.RANK = 0
    # phi_a starts as INIT_SCALE * I (Sigma = INIT_SCALE^2 I). [open] our choice.
    cfg.MODEL.NOISE.ANISOTROPIC.INIT_SCALE = 0.1

    # MP-SNN training (engine/mpsnn.py): losses eq. 5.2-5.7, Algorithm 2 and 3.
    cfg.MPSNN = CN()
    cfg.MPSNN.ENABLED = False
    # lambda of eq. 5.2 (weight of the noise regularizer r): 1e-4 (thesis 5.3).
    cfg.MPSNN.LAMBDA = 1e-4
    # eta of eq. 5.7 (weight of the adversarial CE + triplet): 0.5 (thesis 5.3).
    cfg.MPSNN.ETA = 0.5
    # Algorithm 2, step 3: "sequential" recomputes L_Tot after the (theta, phi_a) update and steps
    # phi on it (as written; one more forward/backward of the objective per step); "shared" steps
    # phi on the gradient of the same backward (half the cost; needs SOLVER.AMP.ENABLED False).
    cfg.MPSNN.ALTERNATION = "sequential"
    # Noise-scale optimizer: SGD, lr beta = 3e-4, momentum 0.9, weight decay 1e-5 (thesis 5.3;
    # alpha = 1e-5 for theta and phi_a is SOLVER.BASE_LR).
    cfg.MPSNN.NOISE_LR = 3e-4
    cfg.MPSNN.NOISE_MOMENTUM = 0.9
    cfg.MPSNN.NOISE_WEIGHT_DECAY = 1e-5
    # Its scheduler: x NOISE_GAMMA at these epochs. [open] the thesis gives a fixed beta: () keeps it.
    cfg.MPSNN.NOISE_STEPS = ()
    cfg.MPSNN.NOISE_GAMMA = 0.1
    # L_Adv's examples (eq. 5.7): untargeted L-inf PGD (Madry) on the identity classifier, 8/255,
    # 7 iterations (thesis 5.3); STEP_SIZE in 1/255 units, 0 = PGD's 2.5 * EPS / STEPS ([open]).
    cfg.MPSNN.ADV = CN()
    cfg.MPSNN.ADV.ATTACK = "PGD"
    cfg.MPSNN.ADV.EPS = 8.0
    cfg.MPSNN.ADV.STEPS = 7
    cfg.MPSNN.ADV.STEP_SIZE = 0.0
    # Meta training over tasks (Algorithm 3); off: every step minimises L_Tot (eq. 5.7) directly.
    cfg.MPSNN.META = CN()
    cfg.MPSNN.META.ENABLED = True
    # V (eq. 5.1, noise off), P (eq. 5.6), PA (eq. 5.7); one is the meta-test task of each step.
    cfg.MPSNN.META.TASKS = META_TASKS
    # Fraction of the batch's identities in the meta-test rows (the N - k images). [open] k is not
    # given; half keeps hard triplets on both sides of a P x K batch. Meta-train tasks share the rest.
    cfg.MPSNN.META.TEST_FRACTION = 0.5
    # Inner step size of Theta' (Algorithm 3 step 5); 0 = the model's current LR. [open]
    cfg.MPSNN.META.INNER_LR = 0.0
    # True drops the second-order terms of the meta step (first-order MAML). [open] thesis: full.
    cfg.MPSNN.META.FIRST_ORDER = False
    # Outer loss: "thesis" = L_mte(Theta) + L_mte(Theta') (eq. 5.11); "mldg" = L_mtr(Theta) +
    # L_mte(Theta') (MLDG / DDDefense eq. 13, one forward fewer).
    cfg.MPSNN.META.OUTER_LOSS = "thesis"

    # Retrieval-time features averaged over this many noise draws (1 = one draw). [open] the thesis
    # does not say how its stochastic model is evaluated; averaging is the honest option.
    cfg.TEST.NOISE_DRAWS = 1

    if frozen:
        cfg.freeze()
    return cfg


# --- the modules ------------------------------------------------------------------------------------
class _NoiseModule(nn.Module):
    """Noise on in training, at test time when ``test_time``, never while ``enabled`` is False."""

    def __init__(self, test_time):
        super().__init__()
        self.test_time = test_time
        self.enabled = True

    @property
    def active(self):
        return self.enabled and (self.training or self.test_time)


class IsotropicNoise(_NoiseModule):
    """``x + |scale| * N(0, 1)``, one learned scale per channel (dimension ``channel_dim``)."""

    def __init__(self, channels, init_scale, channel_dim=1, test_time=True):
        super().__init__(test_time)
        self.scale = nn.Parameter(torch.full((channels,), float(init_scale)))
        self.channel_dim = channel_dim

    def forward(self, x):
        if not self.active:
            return x
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        # |scale|: the sign does not change the distribution, and r(theta) (eq. 5.2) takes its root.
        return x + self.scale.abs().view(shape) * torch.randn_like(x)


class AnisotropicNoise(_NoiseModule):
    """``f + phi e``, ``e ~ N(0, I_K)`` for features f of shape (B, D) or (B, D, 1, 1): the noise has
    covariance phi phi^T. The pre-noise features of the last training forward are kept for the FCA
    loss (eq. 5.3 aligns Sigma with the clean feature differences); :func:`take_clean_features`."""

    def __init__(self, dim, rank=0, init_scale=0.1, test_time=True):
        super().__init__(test_time)
        rank = rank or dim
        phi = torch.zeros(dim, rank)
        phi[:min(dim, rank), :min(dim, rank)] = torch.eye(min(dim, rank)) * float(init_scale)
        self.phi = nn.Parameter(phi)
        self._clean = None

    def forward(self, f):
        if not self.active:
            return f
        flat = f.flatten(1)
        if flat.shape[1] != self.phi.shape[0]:
            raise ValueError(f"anisotropic noise expects {self.phi.shape[0]} features per sample, "
                             f"got shape {tuple(f.shape)}")
        if self.training:
            self._clean = flat
        eps = torch.randn(flat.shape[0], self.phi.shape[1], dtype=self.phi.dtype, device=f.device)
        return f + (eps @ self.phi.t()).to(f.dtype).view_as(f)

    def __getstate__(self):  # the kept features are a graph tensor: never copied or pickled
        state = dict(self.__dict__)
        state["_clean"] = None
        return state


class _NoiseHook:
    """Forward hook adding ``noise``'s draw to a block's output (an object, not a closure, so a
    deep copy of the model calls the copy's noise module)."""

    def __init__(self, noise):
        self.noise = noise

    def __call__(self, module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"noise modules need blocks returning one tensor, got {type(output)}")
        return self.noise(output)


class NoiseModules(nn.Module):
    """The container attached as ``model.noise_modules``: ``isotropic`` (ModuleDict, key = block
    name with "." -> "_") and ``anisotropic`` (or None); ``blocks`` the configured backbone block
    names, ``hooked`` the model modules whose outputs get the noise (isotropic ones, then the
    anisotropic one)."""

    def __init__(self):
        super().__init__()
        self.isotropic = nn.ModuleDict()
        self.anisotropic = None
        self.blocks = []
        self.hooked = []


def noise_modules_of(model):
    """``model.noise_modules`` (DDP unwrapped), or None when no noise is attached."""
    return getattr(unwrap(model), "noise_modules", None)


def _containers_chain(name, module):
    """``[(name, module), (name.<last>, its last child), ...]`` while the module is a Sequential or
    ModuleList: fastreid's ResNet loops over ``layerN``'s children instead of calling ``layerN``,
    so a stage's output is only seen at its last block."""
    chain = [(name, module)]
    while isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module):
        last = list(module.named_children())[-1]
        name, module = f"{name}.{last[0]}", last[1]
        chain.append((name, module))
    return chain


def _resolve_outputs(model, targets, size):
    """{target: (name of the module whose forward gives the target's output, its output shape)}
    from one eval-mode forward of a zero image batch (no gradients; eval mode leaves the buffers
    alone); the shape sizes the noise parameters for any backbone. A target with no called module
    maps to None."""
    fired, handles = {}, []
    for target, (name, module) in targets.items():
        for cand_name, cand in _containers_chain(name, module):
            def record(_, __, output, key=cand_name):
                fired.setdefault(key, tuple(output.shape) if isinstance(output, torch.Tensor)
                                 else None)
            handles.append(cand.register_forward_hook(record))
    modes = [(m, m.training) for m in model.modules()]
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model({"images": torch.zeros(2, 3, *size, device=device)})
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes:
            m.training = mode
    resolved = {}
    for target, (name, module) in targets.items():
        called = [c for c, _ in _containers_chain(name, module) if c in fired]
        resolved[target] = (called[0], fired[called[0]]) if called else None
    return resolved


def attach_noise_modules(model, cfg):
    """Attach MODEL.NOISE's modules to a freshly built fastreid model (before DDP, optimizer and
    weight loading); returns ``model``. A no-op with MODEL.NOISE.ENABLED False.

    Each block gets a forward hook; a block that is a Sequential/ModuleList never called as a whole
    (fastreid's ResNet stages) is hooked at its last child, whose output is the stage's (with
    WITH_NL non-local blocks after a stage's last block, the noise comes before them)."""
    noise_cfg = cfg.MODEL.NOISE
    if not noise_cfg.ENABLED:
        return model
    model = unwrap(model)
    if noise_modules_of(model) is not None:
        raise ValueError("the model already carries noise modules")
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise ValueError(f"MODEL.NOISE needs a model with a .backbone, got {type(model).__name__}")
    model_modules = dict(model.named_modules())
    targets = {}
    for block in noise_cfg.BLOCKS:
        name = f"backbone.{block}"
        if not block or name not in model_modules:
            raise ValueError(f"MODEL.NOISE.BLOCKS: the backbone has no module {block!r}; its "
                             f"top-level modules: {[n for n, _ in backbone.named_children()]}")
        if block in targets:
            raise ValueError(f"MODEL.NOISE.BLOCKS: {block!r} is listed twice")
        targets[block] = (name, model_modules[name])
    aniso_cfg = noise_cfg.ANISOTROPIC
    if aniso_cfg.ENABLED:
        if aniso_cfg.MODULE not in model_modules:
            raise ValueError(f"MODEL.NOISE.ANISOTROPIC.MODULE: the model has no module "
                             f"{aniso_cfg.MODULE!r}")
        targets[None] = (aniso_cfg.MODULE, model_modules[aniso_cfg.MODULE])
    resolved = _resolve_outputs(model, targets, cfg.INPUT.SIZE_TEST)

    container = NoiseModules()
    hooks = []
    for block in noise_cfg.BLOCKS:
        if resolved[block] is None or resolved[block][1] is None:
            raise ValueError(f"MODEL.NOISE.BLOCKS: {block!r} is not called with one tensor output "
                             f"in the model's forward")
        hooked, shape = resolved[block]
        noise = IsotropicNoise(shape[noise_cfg.CHANNEL_DIM], noise_cfg.INIT_SCALE,
                               noise_cfg.CHANNEL_DIM, noise_cfg.TEST_TIME)
        container.isotropic[block.replace(".", "_")] = noise
        container.blocks.append(block)
        hooks.append((hooked, noise))
    if aniso_cfg.ENABLED:
        hooked, shape = resolved[None] or (None, None)
        if shape is None or any(s != 1 for s in shape[2:]):
            raise ValueError(f"MODEL.NOISE.ANISOTROPIC.MODULE {aniso_cfg.MODULE!r} must return "
                             f"(B, D) or (B, D, 1, 1) features, got {shape}")
        container.anisotropic = AnisotropicNoise(shape[1], aniso_cfg.RANK, aniso_cfg.INIT_SCALE,
                                                 noise_cfg.TEST_TIME)
        hooks.append((hooked, container.anisotropic))
    model.noise_modules = container.to(next(model.parameters()).device)
    container.hooked = [name for name, _ in hooks]
    for name, noise in hooks:
        model_modules[name].register_forward_hook(_NoiseHook(noise))
    return model


# --- helpers for training and evaluation -------------------------------------------------------------
def split_noise_parameters(model):
    """(isotropic noise scales, every other parameter) of ``model``: the scales belong to the noise
    optimizer only (Algorithm 2), phi_a and the weights to the model optimizer."""
    noise = noise_modules_of(model)
    scales = list(noise.isotropic.parameters()) if noise is not None else []
    ids = {id(p) for p in scales}
    return scales, [p for p in unwrap(model).parameters() if id(p) not in ids]


def isotropic_scale_names(model):
    """State-dict names of the isotropic scales (for functional_call parameter dicts)."""
    return [f"noise_modules.isotropic.{k}.scale" for k in noise_modules_of(model).isotropic] \
        if noise_modules_of(model) is not None else []


def anisotropic_factor(model):
    """(name, phi_a) of the anisotropic module, or (None, None)."""
    noise = noise_modules_of(model)
    if noise is None or noise.anisotropic is None:
        return None, None
    return "noise_modules.anisotropic.phi", noise.anisotropic.phi


def take_clean_features(model):
    """The pre-noise (B, D) final features of the last training forward, forgotten on return
    (None without an anisotropic module, or when it was off)."""
    noise = noise_modules_of(model)
    if noise is None or noise.anisotropic is None:
        return None
    clean, noise.anisotropic._clean = noise.anisotropic._clean, None
    return clean


@contextlib.contextmanager
def noise_disabled(model):
    """Every noise module off inside the block (the vanilla task V, eq. 5.1); restored on exit."""
    noise = noise_modules_of(model)
    modules = [m for m in (noise.modules() if noise is not None else ())
               if isinstance(m, _NoiseModule)]
    flags = [(m, m.enabled) for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.enabled = flag


class NoiseAveragedModel(nn.Module):
    """``model`` whose eval output is the mean of ``draws`` forwards (retrieval-time averaging over
    the noise, TEST.NOISE_DRAWS); training forwards pass through. Each draw gets its own copy of
    ``batched_inputs["images"]`` (fastreid normalises it in place), so the caller's is untouched."""

    def __init__(self, model, draws):
        super().__init__()
        self.model = model
        self.draws = int(draws)
        self.train(model.training)  # so inference_context restores the wrapped model's mode

    def forward(self, batched_inputs):
        if self.training:
            return self.model(batched_inputs)
        outputs = [self.model({**batched_inputs, "images": batched_inputs["images"].clone()})
                   for _ in range(self.draws)]
        return torch.stack(outputs).mean(0)


def noise_averaged(model, draws):
    """``model`` itself when ``draws`` <= 1 or it carries no noise active at test time, else a
    :class:`NoiseAveragedModel`. For [0, 1]-image extractors (robust evaluation) the same average
    is ``robustreid.attacks.eot.expected_output(extractor, x01, draws)``."""
    noise = noise_modules_of(model)
    stochastic = noise is not None and any(
        m.test_time for m in noise.modules() if isinstance(m, _NoiseModule))
    if int(draws) <= 1 or not stochastic:
        return model
    return NoiseAveragedModel(model, draws)

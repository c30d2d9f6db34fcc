"""The one place that adapts fastreid 1.4.0, advertorch 0.2.3 and imagecorruptions 1.1.2 to Python 3.11,
torch 2.x, numpy 2, scikit-image >= 0.21 and setuptools >= 81.

Nothing here edits fastreid's or advertorch's files: each patch rebinds a name at import time, is applied
only when the running stack needs it, is idempotent, and is covered by tests/test_compat.py.
``apply()`` runs on ``import robustreid``; ``applied_patches()`` lists what was changed in this process,
and ``original(name)`` returns what a patch replaced. ROBUSTREID_COMPAT_SKIP=name1,name2 leaves the
named patches out (to reproduce an upstream failure, or to check whether a patch is still needed).

Patches, in the order they must run:
  collections_abc_aliases   fastreid imports ``collections.Mapping`` (removed in Python 3.10).
  torch_six                 fastreid imports ``torch._six.string_classes`` (module removed in torch 2).
  advertorch_zero_gradients advertorch imports ``torch.autograd.gradcheck.zero_gradients`` (torch 1.9).
  contiguous_optimizer      ContiguousParams + torch 2's zero_grad(set_to_none=True) = no training.
  cpu_data_loader           fastreid's DataLoaderX creates a CUDA stream: no data loading on CPU.
  evaluator_no_cython_exit  ReidEvaluator compiles Cython with `make` and sys.exit(1)s when it can't.
  cpu_distributed_launch    launch() asserts CUDA and hard-codes NCCL; DDP is given CUDA device ids
                            (CPU only: on GPU fastreid's NCCL path runs unchanged).
  multinode_rendezvous      multi-machine runs meet at 127.0.0.1: --dist-url defaults to it and gloo
                            binds to the hostname's address, often loopback; under torchrun each
                            process trains alone (robustreid/rendezvous.py). CPU and GPU.
  metric_printer_eta        CommonMetricPrinter divides by zero writing twice at one iteration
                            before IterationTimer has timed any (runs of at most 2 iterations).
  mobilenetv2_pretrain      build_mobilenetv2_backbone reads only its own module layout and loads it
                            with strict=False: torchvision's ImageNet file (the one torch users
                            have) crashes it, and a file of another model leaves it random with
                            an info line. Both layouts load, anything else is a ConfigError.
  imagecorruptions_resources  imagecorruptions imports ``pkg_resources`` (gone from setuptools 81)
                            for its frost images' paths; it is imported with a stand-in, which is
                            removed again (nothing else sees a pkg_resources module).
  imagecorruptions_gaussian gaussian_blur and glass_blur pass ``multichannel=True`` to
                            skimage.filters.gaussian (removed in scikit-image 0.21: channel_axis).
  imagecorruptions_float_   fog's plasma_fractal allocates ``np.float_`` (removed in numpy 2).
  imagecorruptions_seeded_noise  impulse_noise's skimage.util.random_noise draws from a fresh
                            generator since scikit-image 0.21 (np.random's global state before), so
                            np.random.seed no longer reproduced it.
The imagecorruptions patches apply only where it is installed (ROBUSTREID_COMPAT_SKIP=
imagecorruptions_resources reproduces its import error, the others its 3 failing corruptions).
"""
import collections
import collections.abc
import functools
import importlib
import importlib.util
import inspect
import logging
import math
import os
import sys
import types

import numpy as np
import torch

logger = logging.getLogger(__name__)

_APPLIED = []
_ORIGINALS = {}


def _record(name, original=None):
    if name not in _APPLIED:
        _APPLIED.append(name)
        _ORIGINALS[name] = original


def original(name):
    """The object a patch replaced (None for patches that only added a missing name; a dict by name
    for a patch that replaced several)."""
    return _ORIGINALS[name]


def applied_patches():
    """Names of the patches this process needed and applied."""
    return list(_APPLIED)


# --- Python 3.10+: ABCs left the top-level collections module --------------------------------------
_ABC_NAMES = ("Mapping", "MutableMapping", "Sequence", "MutableSequence", "Iterable", "Iterator",
              "Callable", "Set", "MutableSet", "Hashable", "Sized", "Container")


def patch_collections_abc_aliases():
    missing = [n for n in _ABC_NAMES if not hasattr(collections, n)]
    for name in missing:
        setattr(collections, name, getattr(collections.abc, name))
    if missing:
        _record("collections_abc_aliases")


# --- torch 2: torch._six was removed; fastreid only needs string_classes ---------------------------
def patch_torch_six():
    import importlib.util
    if "torch._six" in sys.modules or importlib.util.find_spec("torch._six") is not None:
        return
    six = types.ModuleType("torch._six")
    six.string_classes = (str, bytes)
    six.int_classes = (int,)
    six.inf = math.inf
    six.nan = math.nan
    sys.modules["torch._six"] = six
    torch._six = six
    _record("torch_six")


# --- torch 1.9+: zero_gradients left torch.autograd.gradcheck; advertorch imports it ---------------
def _zero_gradients(x):
    """Zero the .grad of a tensor or of every tensor in an iterable (the removed torch helper)."""
    if isinstance(x, torch.Tensor):
        if x.grad is not None:
            x.grad.detach_()
            x.grad.zero_()
    elif isinstance(x, collections.abc.Iterable):
        for elem in x:
            _zero_gradients(elem)


def patch_advertorch_zero_gradients():
    # torch.autograd re-exports the gradcheck() function under the module's name.
    gradcheck = importlib.import_module("torch.autograd.gradcheck")
    if not hasattr(gradcheck, "zero_gradients"):
        gradcheck.zero_gradients = _zero_gradients
        _record("advertorch_zero_gradients")


# --- torch 2: ContiguousParams silently stops training ---------------------------------------------
# torch 2's optimizer.zero_grad() sets .grad to None, which detaches the flat gradient buffer that
# ContiguousParams hands to the optimizer, so optimizer.step() updates nothing. Building the optimizer
# over the plain parameter groups (contiguous=False) keeps every param group and lr factor intact.
def _set_to_none_is_default():
    import inspect
    param = inspect.signature(torch.optim.Optimizer.zero_grad).parameters.get("set_to_none")
    return param is not None and param.default is True


def patch_contiguous_optimizer():
    import fastreid.engine.defaults as engine_defaults
    import fastreid.solver as solver
    import fastreid.solver.build as solver_build

    if getattr(solver_build.build_optimizer, "_robustreid_patched", False):
        return
    if not _set_to_none_is_default():
        return
    fastreid_build_optimizer = solver_build.build_optimizer

    @functools.wraps(fastreid_build_optimizer)
    def build_optimizer(cfg, model, contiguous=True):
        return fastreid_build_optimizer(cfg, model, contiguous=False)

    build_optimizer._robustreid_patched = True
    for module in (solver_build, solver, engine_defaults):
        module.build_optimizer = build_optimizer
    _record("contiguous_optimizer", fastreid_build_optimizer)


# --- CPU machines: DataLoaderX needs CUDA ----------------------------------------------------------
def cpu_data_loader(local_rank, **kwargs):
    """Stand-in for fastreid's DataLoaderX on machines without CUDA: a plain DataLoader."""
    kwargs["pin_memory"] = False  # pinning needs a CUDA driver
    return torch.utils.data.DataLoader(**kwargs)


def patch_cpu_data_loader():
    import fastreid.data.build as data_build

    if data_build.DataLoaderX is cpu_data_loader or torch.cuda.is_available():
        return
    _record("cpu_data_loader", data_build.DataLoaderX)
    data_build.DataLoaderX = cpu_data_loader


# --- ReidEvaluator: no Cython build, no sys.exit ---------------------------------------------------
def _compile_dependencies_without_exit(self):
    # fastreid.evaluation.rank falls back to its Python ranker when the Cython one is absent;
    # RobustReID's FaissReidEvaluator needs neither.
    logger.info("fastreid's Cython ranker is not built; ReidEvaluator uses its Python ranker "
                "(TEST.EVALUATOR FaissReidEvaluator is faster)")


def patch_evaluator_no_cython_exit():
    from fastreid.evaluation import reid_evaluation

    cls = reid_evaluation.ReidEvaluator
    if cls._compile_dependencies is _compile_dependencies_without_exit:
        return
    try:
        from fastreid.evaluation.rank_cylib.rank_cy import evaluate_cy  # noqa: F401
        return
    except ImportError:
        pass
    _record("evaluator_no_cython_exit", cls._compile_dependencies)
    cls._compile_dependencies = _compile_dependencies_without_exit


# --- launch() on CPU machines: gloo, no CUDA asserts; fastreid's own NCCL path is kept on GPU -------
def _distributed_worker(local_rank, main_func, world_size, num_gpus_per_machine, machine_rank,
                        dist_url, args):
    """fastreid's worker for machines without CUDA: gloo instead of NCCL, no CUDA device asserts."""
    import torch.distributed as dist
    from fastreid.utils import comm

    backend = "gloo"
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    try:
        dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size,
                                rank=global_rank)
    except Exception:
        logger.error("Process group URL: %s (backend %s)", dist_url, backend)
        raise
    comm.synchronize()
    num_machines = world_size // num_gpus_per_machine
    for i in range(num_machines):
        ranks_on_i = list(range(i * num_gpus_per_machine, (i + 1) * num_gpus_per_machine))
        group = dist.new_group(ranks_on_i)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def _device_aware_ddp(ddp_cls):
    @functools.wraps(ddp_cls)
    def DistributedDataParallel(module, device_ids=None, **kwargs):
        # DefaultTrainer passes device_ids=[local_rank]; CPU modules must get None.
        if next(module.parameters()).device.type == "cpu":
            device_ids = None
        return ddp_cls(module, device_ids=device_ids, **kwargs)

    DistributedDataParallel._robustreid_patched = True
    return DistributedDataParallel


def patch_cpu_distributed_launch():
    import fastreid.engine.defaults as engine_defaults
    # fastreid.engine re-exports the launch() function under the module's name.
    launch = importlib.import_module("fastreid.engine.launch")

    if launch._distributed_worker is _distributed_worker or torch.cuda.is_available():
        return
    _record("cpu_distributed_launch", launch._distributed_worker)
    launch._distributed_worker = _distributed_worker
    engine_defaults.DistributedDataParallel = _device_aware_ddp(
        engine_defaults.DistributedDataParallel)


# --- multi-machine launches: fastreid sends them to 127.0.0.1 (robustreid/rendezvous.py) ----------
def _rendezvous_parser(fastreid_parser):
    from .rendezvous import DIST_URL_HELP

    @functools.wraps(fastreid_parser)
    def default_argument_parser():
        parser = fastreid_parser()
        for action in parser._actions:
            if action.dest == "dist_url":  # None: launch() decides from --num-machines and the env
                action.default, action.help = None, DIST_URL_HELP
        return parser

    default_argument_parser._robustreid_patched = True
    return default_argument_parser


def _rendezvous_launch(fastreid_launch, launch_module, single_machine_url):
    from . import rendezvous

    @functools.wraps(fastreid_launch)
    def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None,
               args=()):
        job = rendezvous.torchrun_process()
        if job is not None:  # torchrun started this process as one worker of its job
            rendezvous.world_size(num_gpus_per_machine, num_machines, machine_rank)
            if job.num_nodes > 1:
                rendezvous.bind_gloo_to_route("env://")
            return launch_module._distributed_worker(job.local_rank, main_func, job.world_size,
                                                     job.local_world_size, job.node_rank,
                                                     "env://", args)
        world_size = rendezvous.world_size(num_gpus_per_machine, num_machines, machine_rank)
        if world_size == 1:
            return main_func(*args)
        dist_url = rendezvous.resolve_dist_url(dist_url, num_machines) or single_machine_url
        if num_machines > 1:
            rendezvous.bind_gloo_to_route(dist_url)
        if num_gpus_per_machine == 1:  # this process is the machine's worker: no spawn, no re-import
            return launch_module._distributed_worker(0, main_func, world_size, 1, machine_rank,
                                                     dist_url, args)
        return fastreid_launch(main_func, num_gpus_per_machine, num_machines, machine_rank,
                               dist_url, args)

    launch._robustreid_patched = True
    return launch


def patch_multinode_rendezvous():
    import fastreid.engine as engine
    import fastreid.engine.defaults as engine_defaults
    launch_module = importlib.import_module("fastreid.engine.launch")

    if getattr(launch_module.launch, "_robustreid_patched", False):
        return
    fastreid_launch, fastreid_parser = launch_module.launch, engine_defaults.default_argument_parser
    single_machine_url = fastreid_parser().get_default("dist_url")
    launch = _rendezvous_launch(fastreid_launch, launch_module, single_machine_url)
    parser = _rendezvous_parser(fastreid_parser)
    launch_module.launch = engine.launch = launch
    engine_defaults.default_argument_parser = engine.default_argument_parser = parser
    _record("multinode_rendezvous", {"launch": fastreid_launch,
                                     "default_argument_parser": fastreid_parser})


# --- fastreid's metric printer: ZeroDivisionError on short runs -----------------------------------
# Without a "time" history (IterationTimer skips its warm-up iterations) CommonMetricPrinter
# estimates the ETA from the iterations since its last write; PeriodicWriter writes after the last
# step and again after the epoch, at the same iteration, so that count is 0.
def _write_without_zero_division(self):
    from fastreid.utils.events import get_event_storage

    if self._last_write is not None and self._last_write[0] == get_event_storage().iter:
        self._last_write = None  # a repeated write has no new iteration to time: no ETA this time
    return _ORIGINALS["metric_printer_eta"](self)


def patch_metric_printer_eta():
    from fastreid.utils.events import CommonMetricPrinter

    if CommonMetricPrinter.write is _write_without_zero_division:
        return
    _record("metric_printer_eta", CommonMetricPrinter.write)
    CommonMetricPrinter.write = _write_without_zero_division


# --- MobileNetV2 ImageNet weights: torchvision's layout, and no silent random backbone ----------------
# torchvision nests each conv + BN in a module of its own and names the last 1x1 conv features.18;
# fastreid's blocks are flat Sequentials (conv, BN, ReLU6, ...) and its last conv is ``conv``.
# Positions in a fastreid block's ``conv`` of torchvision's (sub)modules, per expand ratio 1 / 6.
_TV_MOBILENETV2_BLOCK = {
    "t1": {"0.0": "0", "0.1": "1", "1": "3", "2": "4"},
    "t6": {"0.0": "0", "0.1": "1", "1.0": "3", "1.1": "4", "2": "6", "3": "7"},
}


def _torchvision_mobilenetv2_key(key):
    """fastreid's MobileNetV2 key for a torchvision ``mobilenet_v2`` key (stem and classifier
    unchanged: they match, or the loader drops them)."""
    parts = key.split(".")
    if parts[0] != "features" or len(parts) < 3:
        return key
    if parts[1] == "18":  # the final 1x1 conv + BN
        return ".".join(["conv"] + parts[2:])
    if parts[2] != "conv":
        return key
    table = _TV_MOBILENETV2_BLOCK["t1" if parts[1] == "1" else "t6"]
    rest = parts[3:]
    position = ".".join(rest[:2]) if ".".join(rest[:2]) in table else rest[0]
    tail = rest[len(position.split(".")):]
    return ".".join(["features", parts[1], "conv", table[position]] + tail)


def mobilenetv2_state_dict(state):
    """A MobileNetV2 ImageNet state dict in fastreid's layout: torchvision's (recognised by its
    ``features.18``) renamed, any other returned as it is (the loader checks it fits)."""
    if "features.18.0.weight" not in state:
        return state
    return {_torchvision_mobilenetv2_key(k): v for k, v in state.items()}


def patch_mobilenetv2_pretrain():
    from fastreid.modeling.backbones.build import BACKBONE_REGISTRY

    name = "build_mobilenetv2_backbone"
    fastreid_builder = BACKBONE_REGISTRY.get(name)
    if getattr(fastreid_builder, "_robustreid_patched", False):
        return

    @functools.wraps(fastreid_builder)
    def build_mobilenetv2_backbone(cfg):
        if not cfg.MODEL.BACKBONE.PRETRAIN:
            return fastreid_builder(cfg)
        random_cfg = cfg.clone()
        random_cfg.defrost()
        random_cfg.MODEL.BACKBONE.PRETRAIN = False
        from .modeling.backbones.pretrained import load_pretrained  # after robustreid's imports
        return load_pretrained(fastreid_builder(random_cfg), cfg.MODEL.BACKBONE.PRETRAIN_PATH,
                               convert=mobilenetv2_state_dict)

    build_mobilenetv2_backbone._robustreid_patched = True
    BACKBONE_REGISTRY._obj_map[name] = build_mobilenetv2_backbone  # build_backbone looks it up
    _record("mobilenetv2_pretrain", fastreid_builder)


# --- imagecorruptions 1.1.2 (ImageNet-C's corruptions) on setuptools >= 81, scikit-image >= 0.21, numpy 2
def _corruptions_module():
    """imagecorruptions.corruptions, or None where it is not installed or does not import."""
    if importlib.util.find_spec("imagecorruptions") is None:
        return None
    try:
        return importlib.import_module("imagecorruptions.corruptions")
    except ImportError:  # the pkg_resources import, with imagecorruptions_resources skipped
        return None


def _resource_filename(package, resource):
    """pkg_resources.resource_filename for a package's own data files (all imagecorruptions asks)."""
    return os.path.join(os.path.dirname(sys.modules[package].__file__), resource)


def patch_imagecorruptions_resources():
    if ("imagecorruptions" in sys.modules or importlib.util.find_spec("imagecorruptions") is None
            or importlib.util.find_spec("pkg_resources") is not None):
        return
    stand_in = types.ModuleType("pkg_resources")
    stand_in.resource_filename = _resource_filename
    sys.modules["pkg_resources"] = stand_in
    try:
        importlib.import_module("imagecorruptions")
    finally:
        del sys.modules["pkg_resources"]  # the module keeps its bound resource_filename
    _record("imagecorruptions_resources")


def _gaussian_with_channel_axis(gaussian):
    @functools.wraps(gaussian)
    def wrapper(image, *args, multichannel=None, **kwargs):
        if multichannel:
            kwargs.setdefault("channel_axis", -1)
        return gaussian(image, *args, **kwargs)

    wrapper._robustreid_patched = True
    return wrapper


def patch_imagecorruptions_gaussian():
    corruptions = _corruptions_module()
    if (corruptions is None or getattr(corruptions.gaussian, "_robustreid_patched", False)
            or "multichannel" in inspect.signature(corruptions.gaussian).parameters):
        return
    _record("imagecorruptions_gaussian", corruptions.gaussian)
    corruptions.gaussian = _gaussian_with_channel_axis(corruptions.gaussian)


class _NumpyWithFloat_(types.ModuleType):
    """numpy as imagecorruptions' module sees it: numpy itself plus numpy 1's ``float_`` alias."""

    float_ = np.float64

    def __getattr__(self, name):
        return getattr(np, name)


def patch_imagecorruptions_float_():
    corruptions = _corruptions_module()
    if corruptions is None or hasattr(corruptions.np, "float_"):
        return
    _record("imagecorruptions_float_", corruptions.np)
    corruptions.np = _NumpyWithFloat_("numpy")


class _SkimageWithGlobalNoise(types.ModuleType):
    """skimage as imagecorruptions' module sees it, with ``util.random_noise`` drawing its generator
    from numpy's global state (what np.random.seed controlled before scikit-image 0.21)."""

    def __init__(self, skimage):
        super().__init__("skimage")
        self._skimage = skimage
        self.util = types.SimpleNamespace(random_noise=self._random_noise)

    @staticmethod
    def _random_noise(image, *args, **kwargs):
        kwargs.setdefault("rng", np.random.randint(2 ** 31))
        return importlib.import_module("skimage.util").random_noise(image, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._skimage, name)


def patch_imagecorruptions_seeded_noise():
    corruptions = _corruptions_module()
    if corruptions is None or isinstance(corruptions.sk, _SkimageWithGlobalNoise):
        return
    if "rng" not in inspect.signature(corruptions.sk.util.random_noise).parameters:
        return  # scikit-image < 0.21 draws from np.random itself
    _record("imagecorruptions_seeded_noise", corruptions.sk)
    corruptions.sk = _SkimageWithGlobalNoise(corruptions.sk)


_PATCHES = (
    patch_collections_abc_aliases,
    patch_torch_six,
    patch_advertorch_zero_gradients,
    patch_contiguous_optimizer,
    patch_cpu_data_loader,
    patch_evaluator_no_cython_exit,
    patch_cpu_distributed_launch,
    patch_multinode_rendezvous,
    patch_metric_printer_eta,
    patch_mobilenetv2_pretrain,
    patch_imagecorruptions_resources,
    patch_imagecorruptions_gaussian,
    patch_imagecorruptions_float_,
    patch_imagecorruptions_seeded_noise,
)


def apply():
    """Apply every needed patch not named in $ROBUSTREID_COMPAT_SKIP (safe to call repeatedly)."""
    skip = {n.strip() for n in os.environ.get("ROBUSTREID_COMPAT_SKIP", "").split(",") if n.strip()}
    unknown = skip - {p.__name__[len("patch_"):] for p in _PATCHES}
    if unknown:
        raise ValueError(f"ROBUSTREID_COMPAT_SKIP names unknown patches: {sorted(unknown)}")
    for patch in _PATCHES:
        if patch.__name__[len("patch_"):] not in skip:
            patch()
    return applied_patches()

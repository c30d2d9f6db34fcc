"""Retrieval features of images for services: a config + weights in, features out, batched.

    from robustreid.inference import FeatureExtractor
    extractor = FeatureExtractor.from_config_file("config.yml", "model_final.pth")
    features = extractor(["a.jpg", "b.jpg"])          # (2, D) float32 numpy
    features = extractor(images)                        # (N, 3, H, W) tensor in [0, 255]

* :class:`FeatureExtractor`: the torch model (CPU or GPU, ``device=``), exactly what the evaluator
  sees: fastreid's test transforms (resize to INPUT.SIZE_TEST, 0-255 pixel values), the eval-mode
  forward, TEST.NOISE_DRAWS averaging of a stochastic (MP-SNN) model;
* :class:`OnnxFeatureExtractor`: the same interface on an exported ``.onnx`` file with onnxruntime;
* :func:`export_onnx`: the ONNX export (torch's exporter, opset 18, dynamic batch size) of a
  FeatureExtractor's model, checked with ``onnx.checker``;
* :func:`load_deploy_config`: the config loader both use; it also reads fastreid model-zoo configs
  written before fastreid 1.0, whose pooling/classifier names fastreid 1.4 no longer knows.

Weights must fit the config's model tensor for tensor (``check_weights_fit``): fastreid's own
checkpointer only warns about missing or mis-shaped tensors and an export of such a model is
silently partly random.
"""
import copy
import hashlib
import os

import numpy as np
import torch
from torch import nn

from .checksums import sha256_of
from .config import ConfigError, load_config
from .engine import RobustTrainer, check_weights, check_weights_fit, resolve_device
from .evaluation.feature_store import FeatureStore
from .modeling.noise import noise_averaged, noise_modules_of

# Names of fastreid < 1.0 configs (its model zoo's config.yaml files) -> fastreid 1.4's classes.
LEGACY_POOL_LAYERS = {"fastavgpool": "FastGlobalAvgPool", "avgpool": "GlobalAvgPool",
                      "maxpool": "GlobalMaxPool", "gempool": "GeneralizedMeanPooling",
                      "gempoolP": "GeneralizedMeanPoolingP", "avgmaxpool": "AdaptiveAvgMaxPool",
                      "clipavgpool": "ClipGlobalAvgPool", "identity": "Identity",
                      "flatten": "Flatten"}
LEGACY_CLS_LAYERS = {"linear": "Linear", "arcSoftmax": "ArcSoftmax",
                     "circleSoftmax": "CircleSoftmax", "cosSoftmax": "CosSoftmax"}
ONNX_INPUT, ONNX_OUTPUT = "images", "features"


def load_deploy_config(config_file="", opts=()):
    """A config for inference: :func:`~robustreid.config.load_config`, legacy fastreid names
    renamed, the device resolved, ImageNet weights never downloaded (MODEL.WEIGHTS has them)."""
    cfg = load_config(config_file, opts)
    heads = cfg.MODEL.HEADS
    heads.POOL_LAYER = LEGACY_POOL_LAYERS.get(heads.POOL_LAYER, heads.POOL_LAYER)
    heads.CLS_LAYER = LEGACY_CLS_LAYERS.get(heads.CLS_LAYER, heads.CLS_LAYER)
    cfg.MODEL.BACKBONE.PRETRAIN = False
    return resolve_device(cfg)


class ImagesToFeatures(nn.Module):
    """A fastreid model's eval forward as ``images (N, 3, H, W) in [0, 255] -> features (N, D)``;
    the caller's batch is left untouched (fastreid normalises ``batched_inputs["images"]`` in
    place)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model({"images": images.clone()})


class _Batched:
    """Turns inputs (paths, PIL images or a float tensor batch) into model batches."""

    def __init__(self, cfg, batch_size):
        from fastreid.data.transforms import build_transforms

        self.transform = build_transforms(cfg, is_train=False)
        self.batch_size = int(batch_size or cfg.TEST.IMS_PER_BATCH)
        self.size = tuple(cfg.INPUT.SIZE_TEST)

    def batches(self, inputs):
        """Float (B, 3, H, W) tensors in [0, 255], ``batch_size`` at a time."""
        if isinstance(inputs, torch.Tensor):
            if inputs.dim() != 4 or inputs.shape[1] != 3:
                raise ValueError(f"images must be (N, 3, H, W), got {tuple(inputs.shape)}")
            for start in range(0, len(inputs), self.batch_size):
                yield inputs[start:start + self.batch_size].float()
            return
        inputs = list(inputs)
        for start in range(0, len(inputs), self.batch_size):
            yield torch.stack([self.transform(_as_image(x)) for x in
                               inputs[start:start + self.batch_size]]).float()

    def __call__(self, run, inputs):
        outs = [run(batch) for batch in self.batches(inputs)]
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _as_image(item):
    from fastreid.data.data_utils import read_image

    return read_image(item) if isinstance(item, (str, os.PathLike)) else item


class FeatureExtractor:
    """Retrieval features of a config's model with MODEL.WEIGHTS (see the module docstring)."""

    def __init__(self, cfg, device=None, batch_size=None):
        cfg = cfg.clone()
        cfg.defrost()
        if device is not None:
            cfg.MODEL.DEVICE = str(device)
            resolve_device(cfg)
        if not cfg.MODEL.WEIGHTS:
            raise ConfigError("a feature extractor needs trained weights: pass MODEL.WEIGHTS "
                              "/path/to/model.pth")
        check_weights(cfg, eval_only=True)
        check_weights_fit(cfg)
        cfg.freeze()
        self.cfg = cfg
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.model = RobustTrainer.load_for_eval(cfg)
        self.module = ImagesToFeatures(self.model).eval()
        self._averaged = ImagesToFeatures(noise_averaged(self.model, cfg.TEST.NOISE_DRAWS)).eval()
        self._batched = _Batched(cfg, batch_size)

    @classmethod
    def from_config_file(cls, config_file, weights, opts=(), device=None, batch_size=None):
        return cls(load_deploy_config(config_file, ["MODEL.WEIGHTS", str(weights), *opts]),
                   device=device, batch_size=batch_size)

    @property
    def stochastic(self):
        """True when the model draws noise at test time (MODEL.NOISE.TEST_TIME)."""
        noise = noise_modules_of(self.model)
        return noise is not None and any(getattr(m, "test_time", False) for m in noise.modules())

    @torch.no_grad()
    def _run(self, batch):
        return self._averaged(batch.to(self.device)).float().cpu().numpy()

    def __call__(self, inputs):
        """``(N, D)`` float32 features of image paths, PIL images or a (N, 3, H, W) tensor in
        [0, 255] (already resized), in ``batch_size`` batches."""
        return self._batched(self._run, inputs)

    def extract_to_store(self, paths, directory, chunk_images=4096):
        """Features of ``paths`` into a resumable :class:`FeatureStore` (chunks of
        ``chunk_images``); a rerun after an interruption computes only the missing chunks."""
        paths = [str(p) for p in paths]
        if not paths:
            raise ConfigError("no images to extract")
        dim = self(paths[:1]).shape[1]
        store = FeatureStore.open_or_create(directory, len(paths), dim, chunk_images,
                                            inputs=self.store_inputs(paths))
        store.fill(lambda start, stop: self(paths[start:stop]))
        return store

    def store_inputs(self, paths):
        """What a store's features depend on: weights, config and image list (digests)."""
        listing = hashlib.sha256("\n".join(paths).encode()).hexdigest()
        return {"weights": sha256_of(self.cfg.MODEL.WEIGHTS),
                "config": hashlib.sha256(self.cfg.dump().encode()).hexdigest(), "images": listing}


class OnnxFeatureExtractor:
    """:class:`FeatureExtractor`'s interface on an exported model, run by onnxruntime."""

    def __init__(self, onnx_path, cfg, batch_size=None, providers=None, threads=0):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads)  # 0 = onnxruntime's default
        self.session = onnxruntime.InferenceSession(
            str(onnx_path), options, providers=providers or ["CPUExecutionProvider"])
        self._batched = _Batched(cfg, batch_size)

    def _run(self, batch):
        return self.session.run([ONNX_OUTPUT], {ONNX_INPUT: batch.numpy()})[0]

    def __call__(self, inputs):
        return self._batched(self._run, inputs)


def export_onnx(extractor: FeatureExtractor, path, opset=18):
    """Export ``extractor``'s model (CPU copy, dynamic batch size) to ``path``; returns the path.

    A model that draws noise at test time is refused: ONNX would draw from onnxruntime's own
    generator, so no output could be checked against torch (export it with
    MODEL.NOISE.TEST_TIME False: the deterministic model the noise was trained around)."""
    import onnx

    if extractor.stochastic:
        raise ConfigError("MODEL.NOISE.TEST_TIME True: the model draws noise at test time, which "
                          "an ONNX graph cannot reproduce; export the deterministic model with "
                          "MODEL.NOISE.TEST_TIME False")
    module = copy.deepcopy(extractor.module).cpu().eval()
    height, width = extractor.cfg.INPUT.SIZE_TEST
    example = torch.rand(2, 3, height, width) * 255
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        program = torch.onnx.export(module, (example,), input_names=[ONNX_INPUT],
                                    output_names=[ONNX_OUTPUT], opset_version=opset,
                                    dynamo=True, dynamic_shapes={"images": {0: batch}},
                                    verbose=False)
    program.save(str(path))
    onnx.checker.check_model(str(path))
    return str(path)

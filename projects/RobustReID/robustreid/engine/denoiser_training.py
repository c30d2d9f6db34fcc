"""Denoised smoothing (thesis chapter 6): train a denoiser in front of a frozen ReID model.

Each step draws a batch x of training images ([0, 1]), noisy inputs x* = x + N(0, SIGMA^2 I), and
minimises L_Tot(f(x), f(D(x*))) (eq. 6.13, :class:`DenoisingLoss`) over the denoiser D, with f the
frozen model's output (DENOISER.OUTPUT). DENOISER.MODE says how the gradient reaches D:

* ``first_order`` (FO-RUDS): back-propagation through the model (white-box).
* ``rge`` (ZO-RUDS, Algorithm 4): the model is a :class:`BlackBox`; the gradient of L_Tot with respect
  to the denoiser's output z = D(x*) is estimated from queries by RGE (eq. 6.16) and
  back-propagated through D (eq. 6.15).
* ``cge_ae`` / ``rge_ae`` (ZO-AE-RUDS (C) / (R), Algorithm 5): an autoencoder is pre-trained on
  reconstruction (white-box, DENOISER.AE.PRETRAIN_ITERS iterations, its own Adam), then its decoder
  joins the black box (f o decoder, frozen, eval mode) and its encoder trains with D: the gradient is
  estimated in the latent z = E(D(x*)) by CGE (eq. 6.18-6.19) or RGE.

Stages, in iterations: the autoencoder's pre-training (``*_ae`` modes), then DENOISER.MSE_PRETRAIN_ITERS
of the denoiser on ||D(x*) - x||^2 alone (Salman et al.'s warm start; no query, its own Adam), then
DENOISER.ITERS of the mode's training (DENOISER.LR and its schedule).

The zeroth-order gradient, per step and sample: (1) query f(x) and f(z) (2 queries); (2) the loss is
ours, so its gradient g = dL_Tot/df(z) comes from autograd on those outputs; (3) estimate
J_f(z)^T g, the black box's part of the chain rule (eq. 6.15's estimated gradient), as the ZO gradient
of the scalar <g, f(z)>, whose value at z is already known: RGE forward q, RGE central 2q, CGE
central 2d, CGE forward d queries (d = the latent size). So a step costs 2 + that per sample
(:func:`queries_per_sample`; q + 2 for ``rge`` as configured by default). Estimating the gradient of
<g, f(.)> rather than of L_Tot itself (Algorithm 4, line 6) changes the differences only by the
loss's curvature over a step of length xi, and lets the MMD term, which couples the batch, reach each
sample's estimate without a query per (sample, batch) pair.

Checkpoints (:class:`RobustCheckpointer`, OUTPUT/denoiser_NNNNNNN.pth and denoiser_final.pth) hold
the :class:`DenoisingFrontEnd` (denoiser + autoencoder), the optimizers, the scheduler, the batch
stream, the query count and the random generators: ``resume`` continues a run exactly.
:func:`load_denoiser` gives the trained front end for certification (``defense=`` of
``ReidFeatureExtractor``).
"""
import logging
import numbers
import os
import time

import torch
import torch.nn.functional as F

from .. import rng_state
from ..attacks.black_box import BlackBox
from ..attacks.feature_extractor import ReidFeatureExtractor
from ..attacks.zeroth_order import DIFFERENCES, cge, estimator_evaluations, rge
from ..config import ConfigError
from ..data.train_stream import build_train_stream
from ..modeling.denoisers import DENOISER_REGISTRY, build_front_end
from ..modeling.losses.denoising import MMD_KERNELS, OUTPUTS, DenoisingLoss
from .checkpoint import RobustCheckpointer, fit_problem, last_checkpoint, read_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["MODES", "DenoiserTrainer", "check_denoiser_config", "load_denoiser",
           "queries_per_sample", "uses_autoencoder", "zeroth_order_loss_gradient"]

# DENOISER.MODE -> gradient estimator (None: back-propagation through the model)
MODES = {"first_order": None, "rge": "rge", "rge_ae": "rge", "cge_ae": "cge"}
FINAL = "denoiser_final"


def uses_autoencoder(cfg):
    return cfg.DENOISER.MODE.endswith("_ae")


def _is_int(value, minimum):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def _is_number(value, minimum, strict):
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and (value > minimum if strict else value >= minimum))


def _value(node, key):
    for part in key.split("."):
        node = node[part]
    return node


# DENOISER keys checked by check_denoiser_config, beyond the choices
_INTEGERS = {"WIDTH": 1, "Q": 1, "IMS_PER_BATCH": 1, "ITERS": 1, "DECAY_EVERY": 1,
             "CHECKPOINT_PERIOD": 1, "LOG_PERIOD": 1, "AE.LATENT_DIM": 1, "AE.WIDTH": 1,
             "AE.LEVELS": 1, "AE.PRETRAIN_ITERS": 0, "MSE_PRETRAIN_ITERS": 0}
_POSITIVE = ("SIGMA", "XI", "LR", "GAMMA", "AE.PRETRAIN_LR", "MSE_PRETRAIN_LR")
_NON_NEGATIVE = ("LOSS.MATCH", "LOSS.CS", "LOSS.MMD", "LOSS.MSE")


def check_denoiser_config(cfg):
    """DENOISER's values, each checked; ConfigError naming the key."""
    d = cfg.DENOISER
    choices = {"MODE": tuple(MODES), "ARCH": tuple(sorted(DENOISER_REGISTRY._obj_map)),
               "OUTPUT": OUTPUTS, "RGE_DIFFERENCE": DIFFERENCES, "CGE_DIFFERENCE": DIFFERENCES,
               "LOSS.MMD_KERNEL": MMD_KERNELS}
    for key, allowed in choices.items():
        if _value(d, key) not in allowed:
            raise ConfigError(f"DENOISER.{key} must be one of {list(allowed)}, got {_value(d, key)!r}")
    for key, minimum in _INTEGERS.items():
        if not _is_int(_value(d, key), minimum):
            raise ConfigError(f"DENOISER.{key} must be an integer >= {minimum}, got {_value(d, key)!r}")
    for keys, strict in ((_POSITIVE, True), (_NON_NEGATIVE, False)):
        for key in keys:
            if not _is_number(_value(d, key), 0, strict):
                raise ConfigError(f"DENOISER.{key} must be a number {'>' if strict else '>='} 0, "
                                  f"got {_value(d, key)!r}")
    bandwidths = d.LOSS.MMD_BANDWIDTHS
    if not bandwidths or not all(_is_number(b, 0, True) for b in bandwidths):
        raise ConfigError(f"DENOISER.LOSS.MMD_BANDWIDTHS must be positive numbers, got {bandwidths!r}")
    if uses_autoencoder(cfg):
        scale = 2 ** d.AE.LEVELS
        size = list(cfg.INPUT.SIZE_TRAIN)
        if size != list(cfg.INPUT.SIZE_TEST) or size[0] % scale or size[1] % scale:
            raise ConfigError(
                f"DENOISER.MODE {d.MODE}: the autoencoder's latent is a vector, so INPUT.SIZE_TRAIN "
                f"and INPUT.SIZE_TEST must be equal and multiples of 2^DENOISER.AE.LEVELS = {scale}, "
                f"got {size} and {list(cfg.INPUT.SIZE_TEST)}")


def queries_per_sample(cfg):
    """Black-box queries per training sample per denoiser step (0 for first_order): f(x), f(z) and
    the estimator's evaluations (module doc). Autoencoder pre-training queries nothing."""
    d = cfg.DENOISER
    method = MODES[d.MODE]
    if method is None:
        return 0
    difference = d.RGE_DIFFERENCE if method == "rge" else d.CGE_DIFFERENCE
    return 2 + estimator_evaluations(method, difference, q=d.Q, dim=d.AE.LATENT_DIM)


def build_denoiser_stream(cfg):
    """The training images in shuffled batches of DENOISER.IMS_PER_BATCH (identities do not matter
    here), as a resumable stream with fastreid's training transforms."""
    loader_cfg = cfg.clone()
    loader_cfg.defrost()
    loader_cfg.SOLVER.IMS_PER_BATCH = cfg.DENOISER.IMS_PER_BATCH
    loader_cfg.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
    return build_train_stream(loader_cfg)


class Progress:
    """Checkpointable: iterations done, black-box queries used, and the global random generators
    (noise and directions draw from them) at the moment of saving."""

    def __init__(self, black_box):
        self.black_box = black_box
        self.iteration = 0

    def state_dict(self):
        return {"iteration": self.iteration, "queries": self.black_box.queries,
                "rng": rng_state.capture()}

    def load_state_dict(self, state):
        self.iteration = int(state["iteration"])
        self.black_box.queries = int(state["queries"])
        rng_state.restore(state["rng"])


class DenoiserTrainer:
    """Trains DENOISER.ARCH in front of ``model`` (frozen, eval mode) as DENOISER.MODE says; writes
    checkpoints to ``output_dir`` ("" = none)."""

    def __init__(self, cfg, model, output_dir=""):
        check_denoiser_config(cfg)
        d = cfg.DENOISER
        self.cfg = cfg
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.estimator = MODES[d.MODE]
        self.front = build_front_end(cfg, uses_autoencoder(cfg)).to(self.device)
        self.autoencoder = self.front.autoencoder
        self.extractor = ReidFeatureExtractor(model)
        # AttackConfigError if the model has no classifier; an unsized one (NUM_CLASSES 0) has no rows
        if d.OUTPUT == "logits" and self.extractor.num_classes == 0:
            raise ConfigError("DENOISER.OUTPUT logits: the model's identity classifier has no classes "
                              "(MODEL.HEADS.NUM_CLASSES 0): set it to MODEL.WEIGHTS' number of "
                              "training identities, or use DENOISER.OUTPUT features")
        self.model_output = self.extractor.logits if d.OUTPUT == "logits" else self.extractor
        self.black_box = BlackBox(self.model_output, chunk=cfg.TEST.IMS_PER_BATCH)
        self.loss = DenoisingLoss.from_config(cfg)
        trained = list(self.front.denoiser.parameters())
        if self.autoencoder is not None:
            trained += list(self.autoencoder.encoder.parameters())
        self.optimizer = torch.optim.Adam(trained, lr=d.LR)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, d.DECAY_EVERY, d.GAMMA)
        self.pretrain_iters = d.AE.PRETRAIN_ITERS if self.autoencoder is not None else 0
        self.warm_start_end = self.pretrain_iters + d.MSE_PRETRAIN_ITERS
        self.max_iter = self.warm_start_end + d.ITERS
        self.stream = build_denoiser_stream(cfg)
        self.progress = Progress(self.black_box)
        checkpointables = dict(optimizer=self.optimizer, scheduler=self.scheduler, stream=self.stream,
                               progress=self.progress)
        if self.autoencoder is not None:
            self.ae_optimizer = torch.optim.Adam(self.autoencoder.parameters(), lr=d.AE.PRETRAIN_LR)
            checkpointables["ae_optimizer"] = self.ae_optimizer
        if d.MSE_PRETRAIN_ITERS:
            self.mse_optimizer = torch.optim.Adam(self.front.denoiser.parameters(),
                                                  lr=d.MSE_PRETRAIN_LR)
            checkpointables["mse_optimizer"] = self.mse_optimizer
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
        self.checkpointer = RobustCheckpointer(self.front, output_dir,
                                               weights_only=cfg.ROBUSTREID.WEIGHTS_ONLY,
                                               **checkpointables)

    def resume_or_start(self, resume):
        """With ``resume``, continue from the output directory's last checkpoint, if any."""
        path = last_checkpoint(self.checkpointer.save_dir) if resume else ""
        if path:
            logger.info("Resuming the denoiser from %s", path)
            self.checkpointer.resume(path)

    @staticmethod
    def _reconstruction_step(module, optimizer, inputs, x, name):
        """One white-box step of ``module`` alone on ||module(inputs) - x||^2 (no model query)."""
        module.train()
        loss = F.mse_loss(module(inputs), x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {name: loss.detach()}

    def _pretrain_step(self, x):
        """Autoencoder reconstruction of clean images (white-box, first stage of ZO-AE-RUDS)."""
        return self._reconstruction_step(self.autoencoder, self.ae_optimizer, x, x, "reconstruction")

    def _mse_pretrain_step(self, x):
        """The denoiser alone on ||D(x + eta) - x||^2 (warm start; the model is not queried)."""
        noisy = x + self.cfg.DENOISER.SIGMA * torch.randn_like(x)
        return self._reconstruction_step(self.front.denoiser, self.mse_optimizer, noisy, x, "mse")

    def _query_latent(self, z):
        """The black box of the *_ae modes: the frozen decoder, then the model."""
        with torch.no_grad():
            return self.black_box(self.autoencoder.decoder(z))

    def _estimate(self, f, point, f_point):
        d = self.cfg.DENOISER
        if self.estimator == "rge":
            return rge(f, point, d.Q, d.XI, d.RGE_DIFFERENCE, f_x=f_point)
        return cge(f, point, d.XI, d.CGE_DIFFERENCE, f_x=f_point)

    def _denoiser_step(self, x):
        d = self.cfg.DENOISER
        self.front.denoiser.train()
        noisy = x + d.SIGMA * torch.randn_like(x)
        denoised = self.front.denoiser(noisy)
        if self.estimator is None:  # white-box: back-propagate through the model
            with torch.no_grad():
                clean = self.model_output(x)
            loss, terms = self.loss(clean, self.model_output(denoised))
            surrogate = loss
        else:
            if self.autoencoder is not None:
                self.autoencoder.encoder.train()
                self.autoencoder.decoder.eval()  # part of the black box now: a fixed function
                point, query = self.autoencoder.encoder(denoised), self._query_latent
            else:
                point, query = denoised, self.black_box
            loss, terms, grad = zeroth_order_loss_gradient(self.loss, query, self.black_box(x),
                                                           point, self._estimate)
            surrogate = (point * grad).sum()  # its gradient over the parameters: eq. 6.15 / 6.18
        terms = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
        if d.LOSS.MSE > 0:
            mse = F.mse_loss(denoised, x)
            surrogate = surrogate + d.LOSS.MSE * mse
            terms["mse"] = mse.detach()
        self.optimizer.zero_grad()
        surrogate.backward()
        self.optimizer.step()
        self.scheduler.step()
        return terms

    def train(self):
        """Run the remaining iterations, save ``denoiser_final``; returns a summary dict."""
        start_iter, start_queries = self.progress.iteration, self.black_box.queries
        started = time.perf_counter()
        terms = {}
        with self.extractor.frozen_eval():
            for iteration in range(start_iter, self.max_iter):
                batch = next(self.stream)
                x = batch["images"].to(self.device, torch.float32) / 255.0
                stage, step, optimizer = self._stage(iteration)
                terms = step(x)
                self.progress.iteration = iteration + 1
                if self.progress.iteration % self.cfg.DENOISER.LOG_PERIOD == 0:
                    self._log(terms, stage, optimizer)
                if self.progress.iteration % self.cfg.DENOISER.CHECKPOINT_PERIOD == 0 and \
                        self.progress.iteration < self.max_iter:
                    self.checkpointer.save(f"denoiser_{self.progress.iteration:07d}")
        self.checkpointer.save(FINAL)
        return {"mode": self.cfg.DENOISER.MODE, "iterations": self.progress.iteration,
                "iterations_run": self.progress.iteration - start_iter,
                "queries": self.black_box.queries,
                "queries_run": self.black_box.queries - start_queries,
                "queries_per_sample_per_step": queries_per_sample(self.cfg),
                "terms": {k: float(v) for k, v in terms.items()},
                "seconds": time.perf_counter() - started}

    def _stage(self, iteration):
        """(name, step function, optimizer) of the stage ``iteration`` belongs to (module doc)."""
        if iteration < self.pretrain_iters:
            return "autoencoder pre-training", self._pretrain_step, self.ae_optimizer
        if iteration < self.warm_start_end:
            return "denoiser MSE pre-training", self._mse_pretrain_step, self.mse_optimizer
        return self.cfg.DENOISER.MODE, self._denoiser_step, self.optimizer

    def _log(self, terms, stage, optimizer):
        values = "  ".join(f"{k} {float(v):.4f}" for k, v in terms.items())
        logger.info("denoiser iter %d/%d (%s)  %s  lr %.2e  queries %d", self.progress.iteration,
                    self.max_iter, stage, values, optimizer.param_groups[0]["lr"],
                    self.black_box.queries)


def zeroth_order_loss_gradient(loss_fn, query, clean, point, estimate):
    """(L_Tot, its terms, an estimate of dL_Tot/d``point``) from queries only (module doc).

    ``query`` maps points (B, *D) to the black box's outputs, ``clean`` are its outputs on the clean
    images, ``estimate(f, point, f(point))`` a ZO estimator (:func:`rge` / :func:`cge` with their
    settings). Costs one query per sample for f(point) plus the estimator's."""
    out = query(point).flatten(1).requires_grad_()
    loss, terms = loss_fn(clean.flatten(1), out)
    weights, = torch.autograd.grad(loss, out)  # the loss is ours: exact on the outputs
    grad = estimate(lambda z: (query(z).flatten(1) * weights).sum(1), point.detach(),
                    (out.detach() * weights).sum(1))
    return loss, terms, grad


def load_denoiser(cfg, path):
    """The trained :class:`DenoisingFrontEnd` of checkpoint ``path`` (built from cfg.DENOISER: ARCH,
    WIDTH, MODE decides the autoencoder), in eval mode on MODEL.DEVICE. ConfigError when the file
    does not fit that config."""
    check_denoiser_config(cfg)
    front = build_front_end(cfg, uses_autoencoder(cfg))
    label = f"denoiser checkpoint {path}"
    checkpoint = read_checkpoint(path, label, cfg.ROBUSTREID.WEIGHTS_ONLY)
    problem = fit_problem(RobustCheckpointer(front)._load_model(checkpoint), strict=True)
    if problem:
        raise ConfigError(f"{label} does not match DENOISER.ARCH / WIDTH / MODE / AE: {problem}")
    return front.to(torch.device(cfg.MODEL.DEVICE)).eval()

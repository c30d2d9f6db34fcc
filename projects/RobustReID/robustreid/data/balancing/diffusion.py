"""The identity- and camera-conditional diffusion model of DDDefense phase 1, in the EDM formulation
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Built on diffusers: the network is ``UNet2DModel`` with a class embedding, the preconditioning and the
sigma schedule are those of ``EDMEulerScheduler`` / ``EDMDPMSolverMultistepScheduler``, the weight
average is ``EMAModel``. What EDM specifies and where it is:

* denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with c_skip = sd^2/(s^2+sd^2),
  c_out = s sd / sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4 (EDM Table 1):
  ``scheduler.precondition_inputs / precondition_noise / precondition_outputs``;
* training: ln(sigma) ~ N(P_mean, P_std^2), loss lambda(sigma) ||D(x+n; sigma) - x||^2 with
  lambda = (s^2+sd^2)/(s sd)^2 (EDM eq. 2, 8, Table 1): :meth:`EDMDiffusion.loss`;
* sampling: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, sigma_N = 0
  (EDM eq. 5, ``scheduler.set_timesteps``); deterministic Heun (EDM Algorithm 1) = the scheduler's
  Euler step plus the 2nd-order correction, or plain Euler, or DPM-Solver++ (diffusers).

Condition: identity and camera, with a null label for each (classifier-free guidance, Ho & Salimans
2022). BALANCE.MODEL.CONDITIONING "sum" (default) replaces the UNet's class embedding by
embedding(id) + embedding(camera), which composes to (id, camera) pairs absent from the training set;
"joint" keeps diffusers' nn.Embedding over all (id, camera) pairs.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_FORMAT", "SAMPLERS", "IdCameraEmbedding", "EDMDiffusion", "load_images",
           "model_settings", "labels_from_items"]

CHECKPOINT_FORMAT = "robustreid-edm-v1"
SAMPLERS = ("heun", "euler", "dpmsolver")


def model_settings(bcfg) -> Dict:
    """What defines the network and its EDM parameterisation (stored in checkpoints, compared on
    load): the BALANCE keys that change the weights' meaning."""
    m, e = bcfg.MODEL, bcfg.EDM
    return {
        "image_size": [int(v) for v in bcfg.IMAGE_SIZE], "channels": int(bcfg.CHANNELS),
        "block_channels": [int(v) for v in m.BLOCK_CHANNELS], "layers_per_block": int(m.LAYERS_PER_BLOCK),
        "attention": [bool(v) for v in m.ATTENTION], "mid_attention": bool(m.MID_ATTENTION),
        "attention_head_dim": int(m.ATTENTION_HEAD_DIM), "norm_groups": int(m.NORM_GROUPS),
        "dropout": float(m.DROPOUT), "conditioning": str(m.CONDITIONING),
        "cond_drop_prob": float(m.COND_DROP_PROB),
        "p_mean": float(e.P_MEAN), "p_std": float(e.P_STD), "sigma_data": float(e.SIGMA_DATA),
        "sigma_min": float(e.SIGMA_MIN), "sigma_max": float(e.SIGMA_MAX), "rho": float(e.RHO),
    }


def load_images(paths: Sequence[str], size, channels: int = 3) -> torch.Tensor:
    """uint8 tensor (N, C, H, W) of the images resized to ``size`` = [H, W] (antialiased bicubic)."""
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    mode = "RGB" if channels == 3 else "L"
    out = np.empty((len(paths), channels, h, w), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            arr = np.asarray(img.convert(mode).resize((w, h), Image.BICUBIC))
        out[i] = arr.reshape(h, w, channels).transpose(2, 0, 1)
    return torch.from_numpy(out)


class IdCameraEmbedding(nn.Module):
    """Class embedding of a joint label id * (num_cams + 1) + cam as embedding(id) + embedding(cam).

    Index ``num_ids`` / ``num_cams`` is the null label (classifier-free guidance). Summing lets the
    network generate an identity under a camera it was never seen in (eq. 2's "other cameras").
    """

    def __init__(self, num_ids: int, num_cams: int, dim: int):
        super().__init__()
        self.num_cams = num_cams
        self.id_embedding = nn.Embedding(num_ids + 1, dim)
        self.cam_embedding = nn.Embedding(num_cams + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.id_embedding(labels // (self.num_cams + 1)) + self.cam_embedding(labels % (self.num_cams + 1))


def _build_unet(settings: Dict, num_ids: int, num_cams: int) -> UNet2DModel:
    levels = len(settings["block_channels"])
    if len(settings["attention"]) != levels:
        raise ValueError("BALANCE.MODEL.ATTENTION needs one entry per BLOCK_CHANNELS level")
    h, w = settings["image_size"]
    if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
        raise ValueError(f"BALANCE.IMAGE_SIZE {h}x{w} must be divisible by 2^{levels - 1} "
                         f"({levels} BLOCK_CHANNELS levels)")
    unet = UNet2DModel(
        sample_size=(h, w), in_channels=settings["channels"], out_channels=settings["channels"],
        block_out_channels=tuple(settings["block_channels"]),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in settings["attention"]),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(settings["attention"])),
        layers_per_block=settings["layers_per_block"], attention_head_dim=settings["attention_head_dim"],
        norm_num_groups=settings["norm_groups"], dropout=settings["dropout"],
        add_attention=settings["mid_attention"],
        # labels id * (num_cams + 1) + cam, null id = num_ids, null camera = num_cams
        num_class_embeds=(num_ids + 1) * (num_cams + 1),
    )
    if settings["conditioning"] == "sum":
        dim = unet.class_embedding.embedding_dim
        unet.class_embedding = IdCameraEmbedding(num_ids, num_cams, dim)
    elif settings["conditioning"] != "joint":
        raise ValueError(f"BALANCE.MODEL.CONDITIONING must be 'sum' or 'joint', got {settings['conditioning']!r}")
    return unet


class EDMDiffusion:
    """Network, EMA, optimizer and RNG of one training run; trains, samples, saves and resumes.

    ``pids`` / ``cams`` are the source dataset's labels (fastreid train labels, e.g. "market1501_2"),
    in the order of the model's label indices.
    """

    def __init__(self, bcfg, pids: Sequence, cams: Sequence, device="cpu", settings: Optional[Dict] = None):
        self.bcfg = bcfg
        self.settings = dict(settings) if settings is not None else model_settings(bcfg)
        self.pids = [str(p) for p in pids]
        self.cams = [str(c) for c in cams]
        self.pid_index = {p: i for i, p in enumerate(self.pids)}
        self.cam_index = {c: i for i, c in enumerate(self.cams)}
        self.device = torch.device(device)
        s = self.settings
        seed = int(bcfg.SEED)
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG untouched
            torch.manual_seed(seed)
            self.unet = _build_unet(s, len(self.pids), len(self.cams)).to(self.device)
        self.ema = EMAModel(self.unet.parameters(), decay=float(bcfg.TRAIN.EMA_DECAY))
        self.optimizer = torch.optim.Adam(self.unet.parameters(), lr=float(bcfg.TRAIN.LR))
        self.scheduler = EDMEulerScheduler(sigma_min=s["sigma_min"], sigma_max=s["sigma_max"],
                                           sigma_data=s["sigma_data"], rho=s["rho"])
        self.step = 0
        # CPU generator: batch indices, flips, noise levels, label drop-out; device generator: noise
        self.gen_cpu = torch.Generator().manual_seed(seed)
        self.gen_dev = torch.Generator(device=self.device).manual_seed(seed + 1)
        self._ema_unet = None

    # ------------------------------------------------------------------------------------------
    # labels and the denoiser
    # ------------------------------------------------------------------------------------------
    def labels(self, pids: Sequence, cams: Sequence) -> torch.Tensor:
        """Joint label id * (num_cams + 1) + cam of source labels (``None`` = the null label)."""
        nc = len(self.cams) + 1
        ids = [len(self.pids) if p is None else self.pid_index[str(p)] for p in pids]
        cs = [len(self.cams) if c is None else self.cam_index[str(c)] for c in cams]
        return torch.tensor([i * nc + c for i, c in zip(ids, cs)], dtype=torch.long, device=self.device)

    @property
    def null_label(self) -> int:
        return len(self.pids) * (len(self.cams) + 1) + len(self.cams)

    def _autocast(self):
        use = bool(self.bcfg.TRAIN.AMP) and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=use)

    def _raw(self, unet, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """F(c_in x; c_noise, label) in float32."""
        with self._autocast():
            return unet(x_in, c_noise, class_labels=labels).sample.float()

    def _guided_raw(self, unet, x_in, c_noise, labels, guidance: float) -> torch.Tensor:
        """Classifier-free guidance on F; D is affine in F at fixed (x, sigma), so this is the same
        as guiding D: D_u + w (D_c - D_u)."""
        if guidance == 1.0:
            return self._raw(unet, x_in, c_noise, labels)
        null = torch.full_like(labels, self.null_label)
        c_noise2 = c_noise.repeat(2) if c_noise.dim() else c_noise
        both = self._raw(unet, torch.cat([x_in, x_in]), c_noise2, torch.cat([labels, null]))
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor, unet=None,
                guidance: float = 1.0) -> torch.Tensor:
        """D(x; sigma) with EDM's preconditioning (sigma: scalar or one per sample)."""
        unet = self.unet if unet is None else unet
        sched = self.scheduler
        sig = sigma.reshape(-1, 1, 1, 1) if sigma.dim() else sigma
        c_noise = sched.precondition_noise(sigma.reshape(-1) if sigma.dim() else sigma).to(x.device)
        c_noise = c_noise.reshape(-1) if sigma.dim() else c_noise.reshape(())
        raw = self._guided_raw(unet, sched.precondition_inputs(x, sig), c_noise, labels, guidance)
        return sched.precondition_outputs(x, raw, sig)

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------
    def noise_levels(self, n: int) -> torch.Tensor:
        """Training noise levels: ln(sigma) ~ N(P_mean, P_std^2) (EDM Table 1), on the CPU."""
        return (torch.randn(n, generator=self.gen_cpu) * self.settings["p_std"] + self.settings["p_mean"]).exp()

    def loss(self, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """EDM training loss on a batch of images in [-1, 1] (EDM eq. 2 with Table 1's lambda)."""
        s = self.settings
        b = x0.shape[0]
        sigma = self.noise_levels(b).to(x0.device)
        drop = torch.rand(b, generator=self.gen_cpu).to(x0.device) < s["cond_drop_prob"]
        labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        noise = torch.randn(x0.shape, generator=self.gen_dev, device=self.device)
        sig = sigma.reshape(-1, 1, 1, 1)
        denoised = self.denoise(x0 + noise * sig, sigma, labels)
        weight = (sig ** 2 + s["sigma_data"] ** 2) / (sig * s["sigma_data"]) ** 2
        return (weight * (denoised - x0) ** 2).mean()

    def _batch(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        idx = torch.randint(images.shape[0], (batch_size,), generator=self.gen_cpu)
        x = images[idx.to(images.device)].to(self.device, torch.float32) / 127.5 - 1.0
        if self.bcfg.HFLIP:
            flip = (torch.rand(batch_size, generator=self.gen_cpu) < 0.5).to(self.device)
            x = torch.where(flip.reshape(-1, 1, 1, 1), x.flip(-1), x)
        return x, labels[idx.to(labels.device)].to(self.device)

    def train(self, images: torch.Tensor, labels: torch.Tensor, steps: int,
              checkpoint_path: Optional[str] = None, progress: bool = True,
              log: Callable[[str], None] = print) -> Dict:
        """Train until ``self.step == steps`` (continues a resumed run); saves the resumable state
        every BALANCE.TRAIN.CHECKPOINT_PERIOD steps and at the end. ``images``: uint8 (N, C, H, W).
        """
        from tqdm import tqdm

        t = self.bcfg.TRAIN
        batch_size, warmup = int(t.BATCH_SIZE), int(t.WARMUP_STEPS)
        period, log_period = int(t.CHECKPOINT_PERIOD), max(1, int(t.LOG_PERIOD))
        if self.device.type == "cuda":
            images = images.to(self.device)
        labels = labels.to(images.device)
        self.unet.train()
        start_step, start = self.step, time.perf_counter()
        running = []
        bar = tqdm(total=steps, initial=self.step, desc="diffusion train", unit="step",
                   disable=not progress, dynamic_ncols=True, mininterval=2.0)
        while self.step < steps:
            lr = float(t.LR) * min(1.0, (self.step + 1) / warmup) if warmup > 0 else float(t.LR)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x, y = self._batch(images, labels, batch_size)
            loss = self.loss(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for p in self.unet.parameters():  # EDM: replace NaN/Inf gradients instead of skipping
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
            if float(t.GRAD_CLIP) > 0:
                torch.nn.utils.clip_grad_norm_(self.unet.parameters(), float(t.GRAD_CLIP))
            self.optimizer.step()
            self.ema.step(self.unet.parameters())
            self.step += 1
            self._ema_unet = None
            running.append(float(loss.detach()))
            bar.update(1)
            if self.step % log_period == 0 or self.step == steps:
                rate = (self.step - start_step) / max(time.perf_counter() - start, 1e-9)
                msg = "[balance] train step {}/{} loss {:.4f} lr {:.2e} {:.2f} steps/s".format(
                    self.step, steps, float(np.mean(running)), lr, rate)
                bar.set_postfix(loss="{:.4f}".format(np.mean(running)))
                if progress:
                    bar.write(msg)
                else:
                    log(msg)
                running = []
            if checkpoint_path and period > 0 and self.step % period == 0 and self.step < steps:
                self.save(checkpoint_path)
        bar.close()
        if checkpoint_path:
            self.save(checkpoint_path)
        self.unet.eval()
        elapsed = time.perf_counter() - start
        return {"steps": self.step - start_step, "seconds": elapsed}

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {
            "format": CHECKPOINT_FORMAT, "step": self.step, "settings": self.settings,
            "pids": self.pids, "cams": self.cams,
            "model": self.unet.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"cpu": self.gen_cpu.get_state(), "device": self.gen_dev.get_state()},
        }

    def save(self, path: str) -> None:
        """Atomic: written to a temporary file, then renamed over ``path``."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = "{}.tmp-{}".format(path, os.getpid())
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    @staticmethod
    def read_checkpoint(path: str) -> Dict:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a RobustReID diffusion checkpoint ({CHECKPOINT_FORMAT})")
        return state

    @classmethod
    def from_checkpoint(cls, path: str, bcfg, device="cpu") -> "EDMDiffusion":
        """Rebuild the network described by the checkpoint (not by ``bcfg.MODEL``) and restore it."""
        state = cls.read_checkpoint(path)
        obj = cls(bcfg, state["pids"], state["cams"], device=device, settings=state["settings"])
        obj.load_state_dict(state)
        return obj

    def load_state_dict(self, state: Dict) -> None:
        if state["settings"] != self.settings:
            diff = {k: (state["settings"].get(k), v) for k, v in self.settings.items()
                    if state["settings"].get(k) != v}
            raise ValueError(f"checkpoint was trained with other BALANCE settings (checkpoint, now): {diff}")
        if state["pids"] != self.pids or state["cams"] != self.cams:
            raise ValueError("checkpoint was trained on other identities/cameras than this dataset")
        self.unet.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.ema.to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.gen_cpu.set_state(state["rng"]["cpu"])
        if self.device.type == "cpu" or state["rng"]["device"].numel() == self.gen_dev.get_state().numel():
            self.gen_dev.set_state(state["rng"]["device"])
        self.step = int(state["step"])
        self._ema_unet = None

    def ema_unet(self) -> UNet2DModel:
        """A copy of the network holding the EMA weights (what is sampled from)."""
        if self._ema_unet is None:
            unet = copy.deepcopy(self.unet)
            self.ema.copy_to(unet.parameters())
            unet.eval()
            self._ema_unet = unet
        return self._ema_unet

    # ------------------------------------------------------------------------------------------
    # sampling
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, pids: Sequence, cams: Sequence, seeds: Sequence[int], steps: int = 18,
               sampler: str = "heun", guidance: float = 1.0, use_ema: bool = True) -> torch.Tensor:
        """Generate one image per (pid, cam, seed); returns uint8 (B, C, H, W) on the CPU.

        Each image's initial noise comes from its own seed and the samplers are deterministic, so
        an image depends only on (model, label, seed), not on the batch it is generated in.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"BALANCE.SAMPLE.SAMPLER must be one of {SAMPLERS}, got {sampler!r}")
        if steps < 1:
            raise ValueError("BALANCE.SAMPLE.STEPS must be >= 1")
        unet = self.ema_unet() if use_ema else self.unet
        unet.eval()
        s = self.settings
        c, (h, w) = s["channels"], s["image_size"]
        labels = self.labels(pids, cams)
        noise = torch.stack([torch.randn((c, h, w), generator=torch.Generator().manual_seed(int(seed)))
                             for seed in seeds]).to(self.device)
        if sampler == "dpmsolver":
            sched = EDMDPMSolverMultistepScheduler(sigma_min=s["sigma_min"], sigma_max=s["sigma_max"],
                                                   sigma_data=s["sigma_data"], rho=s["rho"])
        else:
            sched = EDMEulerScheduler(sigma_min=s["sigma_min"], sigma_max=s["sigma_max"],
                                      sigma_data=s["sigma_data"], rho=s["rho"])
        sched.set_timesteps(steps)  # EDM eq. 5 noise levels + a final 0
        sigmas = sched.sigmas
        x = noise * sigmas[0].to(self.device)  # x_0 ~ N(0, sigma_max^2 I)
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(x, t)  # c_in x
            raw = self._guided_raw(unet, x_in, t.to(self.device), labels, guidance)  # t = c_noise
            out = sched.step(raw, t, x)
            x_next = out.prev_sample.float()
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            if sampler == "heun" and sigma_next > 0:
                # EDM Algorithm 1, lines 9-11: 2nd-order correction with the slope at sigma_{i+1}
                d = (x - out.pred_original_sample) / sigma
                denoised = self.denoise(x_next, torch.tensor(sigma_next), labels, unet, guidance)
                d_next = (x_next - denoised) / sigma_next
                x_next = x + (sigma_next - sigma) * 0.5 * (d + d_next)
            x = x_next
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def labels_from_items(items) -> Tuple[List[str], List[str]]:
    """Sorted identity and camera labels of fastreid train items (the model's label order)."""
    from .plan import sort_key

    pids = sorted({str(i[1]) for i in items}, key=sort_key)
    cams = sorted({str(i[2]) for i in items}, key=sort_key)
    return pids, cams


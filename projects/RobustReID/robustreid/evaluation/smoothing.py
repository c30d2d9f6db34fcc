"""Randomized smoothing (Cohen, Rosenfeld and Kolter, ICML 2019) of ReID decisions: certified L2
robustness (thesis chapter 6).

The smoothed decision of a base decision f is g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I).
Images x are in [0, 1] and sigma is in the same [0, 1] pixel units; fastreid models take [0, 255]
images, and the decisions below reach them through :class:`ReidFeatureExtractor`, which does that
scaling. If the top decision c_A has probability p_A >= 1/2, then g(x + delta) = c_A for every
||delta||_2 < R = sigma * PhiInv(p_A) (Cohen et al., Theorem 1 with p_B = 1 - p_A).

Monte-Carlo estimates, as in Cohen et al.'s algorithms:

* CERTIFY (:meth:`SmoothedDecision.certify`): guess c_A from n0 selection samples, count it in n
  new estimation samples, and take a one-sided Clopper-Pearson lower bound on p_A at level alpha.
  Below 1/2 it abstains (:data:`ABSTAIN`); otherwise it returns c_A with radius
  sigma * PhiInv(lower bound). A returned decision is wrong with probability at most alpha.
* PREDICT (:meth:`SmoothedDecision.predict`): take the top two counts of n samples, and abstain
  unless a two-sided binomial test rejects "equally likely" at level alpha.

The noise is not clipped to [0, 1]: the theorem holds for any base decision, and Cohen et al.'s
models also see unclipped noise. Each image gets its own torch generator, seeded from (seed, image
index) (:func:`noise_generator`). So a certificate can be reproduced without the images before it,
and every sigma scales the same standard-normal draws (common random numbers across sigmas).

A base decision is any callable from a batch of [0, 1] images (B, C, H, W) to integer labels (B,).
For a denoiser in front of the model, wrap the decision (``lambda x: decide(denoiser(x))``) or pass
the denoiser as the ``defense`` of the extractor the decision uses. The two ReID decisions:

* :func:`classifier_decision`: the argmax of identity logits (``ReidFeatureExtractor.logits``);
* :class:`RetrievalDecision`: the pid of the clean gallery item nearest to the noisy query's
  feature (euclidean or cosine, as TEST.METRIC). The query's junk (same pid and same camera) is left
  out, as the Market-1501 protocol does for Rank-1. The junk set is fixed per query, so the base
  decision is a fixed function of the image and the theorem applies.
"""
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from tqdm import tqdm

from ..config import ConfigError, check_pixel_sigma
from .retrieval import ExactRetriever, prepare_features

ABSTAIN = -1
DECISIONS = ("retrieval", "classifier")
# Keys of cfg.CERTIFY, for error messages that name the setting at fault.
CONFIG_NAMES = {"decision": "CERTIFY.DECISION", "sigmas": "CERTIFY.SIGMAS", "n0": "CERTIFY.N0",
                "n": "CERTIFY.N", "alpha": "CERTIFY.ALPHA", "batch": "CERTIFY.BATCH"}


def clopper_pearson_lower(successes, trials, alpha):
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound of a binomial proportion: the
    alpha quantile of Beta(successes, trials - successes + 1), and 0 for no successes. This is
    ``statsmodels`` ``proportion_confint(successes, trials, 2 * alpha, method="beta")[0]``, which
    Cohen et al.'s code calls."""
    if successes == 0:
        return 0.0
    return float(beta.ppf(alpha, successes, trials - successes + 1))


def certified_radius(p_lower, sigma):
    """sigma * PhiInv(p_lower): the L2 radius that a lower bound p_lower >= 1/2 certifies."""
    return float(sigma * norm.ppf(p_lower))


def noise_generator(seed, index, device):
    """The torch generator for image ``index``'s noise, seeded from (seed, index) alone."""
    state = int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(state)


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's answer: ``label`` (ABSTAIN when p_lower < 1/2), the certified L2 ``radius`` (0 when
    abstaining), the lower bound ``p_lower`` and the estimation samples ``count`` of the guess."""

    label: int
    radius: float
    p_lower: float
    count: int

    @property
    def abstained(self):
        return self.label == ABSTAIN


class SmoothedDecision:
    """g(x) of the base decision ``decide`` at noise level ``sigma`` ([0, 1] pixel units). The noisy
    copies of an image go through ``decide`` ``batch_size`` at a time."""

    def __init__(self, decide, sigma, batch_size):
        self.decide = decide
        self.sigma = check_pixel_sigma(sigma, "sigma")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def sample_counts(self, x01, num, generator, progress=None):
        """Counter of f(x01 + e) over ``num`` draws of e (``progress``: a tqdm bar, updated per
        batch of noisy copies)."""
        counts = Counter()
        remaining = num
        while remaining > 0:
            size = min(self.batch_size, remaining)
            noise = torch.randn((size, *x01.shape), generator=generator, device=x01.device,
                                dtype=x01.dtype)
            counts.update(self.decide(x01.unsqueeze(0) + self.sigma * noise).tolist())
            remaining -= size
            if progress is not None:
                progress.update(size)
        return counts

    def predict(self, x01, n, alpha, generator, progress=None):
        """Cohen et al.'s PREDICT: the top label of ``n`` samples, or ABSTAIN unless a two-sided
        binomial test of its count against the runner-up's rejects p = 1/2 at level ``alpha``."""
        ranked = self.sample_counts(x01, n, generator, progress).most_common(2)
        top, n_top = ranked[0]
        n_second = ranked[1][1] if len(ranked) > 1 else 0
        if binomtest(n_top, n_top + n_second, 0.5).pvalue > alpha:
            return ABSTAIN
        return top

    def certify(self, x01, n0, n, alpha, generator, progress=None):
        """Cohen et al.'s CERTIFY: a :class:`Certificate` from ``n0`` selection samples and ``n``
        estimation samples; wrong with probability at most ``alpha``."""
        guess = self.sample_counts(x01, n0, generator, progress).most_common(1)[0][0]
        count = self.sample_counts(x01, n, generator, progress)[guess]
        p_lower = clopper_pearson_lower(count, n, alpha)
        if p_lower < 0.5:
            return Certificate(ABSTAIN, 0.0, p_lower, count)
        return Certificate(int(guess), certified_radius(p_lower, self.sigma), p_lower, count)


def classifier_decision(logits):
    """The identity classifier as a base decision: argmax of ``logits(x01)`` (B, K)."""
    return lambda x01: logits(x01).argmax(dim=1)


class RetrievalDecision:
    """Top-1 retrieval as a base decision: the pid of the gallery item nearest to ``features(x01)``
    (squared L2 or 1 - cosine, as fastreid ranks; :class:`ExactRetriever`). The gallery features
    are clean and fixed."""

    def __init__(self, features, gallery_features, gallery_pids, gallery_camids, metric,
                 use_gpu=False, backend="auto"):
        self.features = features
        self.retriever = ExactRetriever(gallery_features, metric=metric, use_gpu=use_gpu,
                                        backend=backend)
        device = self.retriever.device
        self.gallery_pids = torch.as_tensor(np.asarray(gallery_pids), dtype=torch.int64,
                                            device=device)
        self.gallery_camids = torch.as_tensor(np.asarray(gallery_camids), dtype=torch.int64,
                                              device=device)

    def for_query(self, pid, camid):
        """The base decision for the query (``pid``, ``camid``): its junk never counts."""
        junk = (self.gallery_pids == int(pid)) & (self.gallery_camids == int(camid))

        def decide(x01):
            query = prepare_features(self.features(x01), self.retriever.metric)
            distances = self.retriever.distances(query)
            distances[:, junk] = float("inf")
            return self.gallery_pids[distances.argmin(dim=1)].cpu()

        return decide


@dataclass(frozen=True)
class CertifySettings:
    """What tools/certify.py and cfg.CERTIFY choose: the decision, the noise levels and Cohen et
    al.'s n0, n, alpha, plus the noisy copies per forward pass."""

    decision: str
    sigmas: tuple
    n0: int
    n: int
    alpha: float
    batch: int

    @classmethod
    def from_config(cls, cfg, names=None, **given):
        """cfg.CERTIFY, with the values in ``given`` taking precedence (None = not given). A bad
        value raises a ConfigError naming ``names[setting]`` for given ones (e.g. ``{"n": "--n"}``),
        and the config key otherwise."""
        names = names or {}
        values, where = {}, {}
        for setting, key in CONFIG_NAMES.items():
            from_cfg = given.get(setting) is None
            values[setting] = cfg.CERTIFY[key.split(".")[1]] if from_cfg else given[setting]
            where[setting] = key if from_cfg else names.get(setting, key)
        return cls.checked(values, where)

    @classmethod
    def checked(cls, values, where):
        if values["decision"] not in DECISIONS:
            raise ConfigError(f"{where['decision']} must be one of {', '.join(DECISIONS)}, got "
                              f"{values['decision']!r}")
        sigmas = tuple(values["sigmas"])
        if not sigmas:
            raise ConfigError(f"{where['sigmas']} is empty")
        sigmas = tuple(check_pixel_sigma(s, where["sigmas"]) for s in sigmas)
        for setting in ("n0", "n", "batch"):
            value = values[setting]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where[setting]} must be an integer >= 1, got {value!r}")
        alpha = values["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 0.5:
            raise ConfigError(f"{where['alpha']} must be in (0, 0.5) (Cohen et al.: 0.001), got "
                              f"{alpha!r}")
        return cls(values["decision"], sigmas, values["n0"], values["n"], float(alpha),
                   values["batch"])


def certify_images(load_image, labels, decide_for, settings, seed=0, device="cpu", progress=True):
    """CERTIFY every image at every sigma of ``settings``.

    ``load_image(i)`` reads image i in [0, 1] (C, H, W) when it is certified; ``labels[i]`` is its
    true label; ``decide_for(i)`` is its base decision. Returns ``{sigma: [record, ...]}``, one
    record per image: index, label, base (the base decision on the clean image), prediction
    (ABSTAIN = -1), correct, radius, p_lower, count and seconds (the time its n0 + n noisy copies
    took). One progress bar per sigma counts noisy copies.
    """
    results = {}
    for sigma in settings.sigmas:
        records = []
        bar = tqdm(total=len(labels) * (settings.n0 + settings.n), unit="img",
                   desc=f"certify sigma {sigma:g}", disable=not progress, dynamic_ncols=True,
                   mininterval=1.0)
        for index, label in enumerate(labels):
            x01 = load_image(index).to(device, torch.float32)
            decide = decide_for(index)
            smoothed = SmoothedDecision(decide, sigma, settings.batch)
            start = time.perf_counter()
            certificate = smoothed.certify(x01, settings.n0, settings.n, settings.alpha,
                                           noise_generator(seed, index, device), progress=bar)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                base = int(decide(x01.unsqueeze(0))[0])
            records.append({"index": index, "label": int(label), "base": base,
                            "prediction": certificate.label,
                            "correct": certificate.label == int(label),
                            "radius": certificate.radius, "p_lower": certificate.p_lower,
                            "count": certificate.count, "seconds": seconds})
        bar.close()
        results[sigma] = records
    return results

"""The classification defenses EAT is compared with (Ke et al., "Towards Adversarially Robust Deep
Metric Learning", section "Previous Defenses", eq. 4-8, Tables 1-4) in their DML form: the label of
a sample x is its embedding F(x) under the current model ("Problem Formulation"), L and C become
L_metric and F. One model (RobustBaseline), switched on by DML_DEFENSE.METHOD:

======  ============================================================================================
at      eq. 4-5: Adv(x) = EAT's training PGD on this model, SMA: maximise d(F(x_adv), F(x)) from a
        random start (16/255, 10 steps of 2.5 * eps / steps); the model's losses on the adversarial
        rows (+ the clean rows with INCLUDE_CLEAN). The existing MetricAdversarialBatch phase.
mixup   eq. 6: x~ = lam x_i0 + (1 - lam) x_i1, lam ~ Beta(ALPHA, ALPHA), y~ = lam F(x_i0) +
        (1 - lam) F(x_i1); loss_mixup = mean_i d(F(x~_i), y~_i) (+ the model's losses on the clean
        rows with INCLUDE_CLEAN).
iat     eq. 7: mixup's term plus loss_mixup_adv = mean_i d(F(g(x~_i)), y~_i), g(x~) =
        lam Adv(x_i0) + (1 - lam) Adv(x_i1) (Adv as in at; the same lam and pairs).
trades  eq. 8: the model's losses on the clean rows + loss_trades = LAMBDA * mean_i d(F(Adv(x_i)),
        F(x_i)), Adv the PGD maximising this d (SMA).
======  ============================================================================================

How L_metric takes an embedding as its target. The paper replaces y by F(x) but does not say how a
metric loss, which compares samples with each other, reads a target vector. Ours: the target is the
sample's only positive and there are no negatives, i.e. the pull term of eq. 2, d(F(x~), y~), with d
the attack's distance (DML_DEFENSE.DISTANCE: cosine by default, or squared Euclidean), averaged
over the rows. F is the model's retrieval embedding (what it returns in eval mode), computed in the
training forward (Adv crafts on the eval-mode model, as every training attack here). The mixup targets are the clean rows' embeddings of the same forward, detached
(labels); TRADES's F(x) is not detached, as in TRADES's code. Alternatives the paper leaves open:
Proxy-Anchor on the mixed identity labels (lam L(x~, y_i0) + (1 - lam) L(x~, y_i1): Zhang et al.'s
form, which never reads F(x)), or a triplet with y~ as the positive.

Other choices, all the paper's silence: one lam per batch and x_i1 a random permutation of the
batch (mixup's reference code); the clean, mixed and adversarial rows go through the model as one
batch (BN statistics over all of them, as MetricAdversarialBatch's clean + adversarial batch), the
model's losses read the clean rows only (``loss_rows``); eq. 4, 6 and 7 have no clean term
(INCLUDE_CLEAN False: every constant embedding then minimises eq. 6, whose targets are the model's
own outputs), while the tables' rows are "PAL + X", hence INCLUDE_CLEAN True by default.
"""
import torch

from ..attacks.losses import paired_distance
from ..config import ConfigError
from .eat import check_training_pgd, default_step_size
from .train_steps import MetricAdversarialBatch

METHODS = ("", "at", "mixup", "iat", "trades")
ADVERSARIAL_METHODS = ("at", "iat", "trades")


class MixUpBatch:
    """Phase "mixup": the clean rows, then x~ = lam x + (1 - lam) x[partner] (B rows), and when the
    batch holds adversarial copies (the "adversarial" phase's clean + adversarial batch) g(x~) =
    lam Adv(x) + (1 - lam) Adv(x[partner]) (B rows) in place of them.

    Adds ``is_mixed`` and ``is_adversarial`` (rows), ``mix_lambda`` (a 0-dim tensor) and
    ``mix_partner`` (B,), the clean row each sample is mixed with; mixed rows keep the
    identities of their first sample (unused: the model's losses read clean rows only).
    """

    name = "mixup"

    def __init__(self, alpha):
        self.beta = torch.distributions.Beta(float(alpha), float(alpha))

    def __call__(self, model, batch):
        images = batch["images"]
        adversarial = batch.get("is_adversarial")
        clean_rows = slice(None) if adversarial is None else ~adversarial
        clean = images[clean_rows]
        size = len(clean)
        lam = self.beta.sample()
        partner = torch.randperm(size, device=images.device)

        def mix(rows):
            return lam * rows + (1 - lam) * rows[partner]

        blocks = [clean, mix(clean)]
        if adversarial is not None:
            blocks.append(mix(images[adversarial]))
        copies = len(blocks)
        rows = torch.arange(copies * size, device=images.device)
        out = dict(batch)
        out["images"] = torch.cat(blocks)
        out["is_mixed"] = rows >= size
        out["is_adversarial"] = rows >= 2 * size
        out["mix_lambda"] = lam.to(images.device)
        out["mix_partner"] = partner
        for key in ("targets", "camids"):
            out[key] = torch.cat([batch[key][clean_rows]] * copies)
        if "img_paths" in batch:
            paths = list(batch["img_paths"])[:size]  # the clean rows come first
            out["img_paths"] = paths * copies
        return out


class EmbeddingTargetTerms:
    """Objective part: which rows the model's own losses read (``loss_rows``), and the terms on
    the embeddings of the other rows (module docstring)."""

    def __init__(self, method, distance, include_clean=True, trades_lambda=6.0):
        self.method = method
        self.distance = distance
        self.include_clean = include_clean or method == "trades"
        self.trades_lambda = trades_lambda

    def loss_rows(self, batch):
        """The clean rows (all rows not mixed or adversarial), or none without INCLUDE_CLEAN."""
        plain = ~batch["is_adversarial"]
        if "is_mixed" in batch:
            plain = plain & ~batch["is_mixed"]
        return plain if self.include_clean else torch.zeros_like(plain)

    def distance_to(self, embeddings, targets):
        return paired_distance(embeddings, targets, self.distance).mean()

    def __call__(self, outputs, batch):
        embeddings = outputs["neck_features"]
        adversarial = batch["is_adversarial"]
        if self.method == "trades":
            clean = embeddings[~adversarial]
            return {"loss_trades": self.trades_lambda *
                    self.distance_to(embeddings[adversarial], clean)}
        mixed = batch["is_mixed"]
        clean = embeddings[~mixed].detach()
        lam = batch["mix_lambda"]
        targets = lam * clean + (1 - lam) * clean[batch["mix_partner"]]
        terms = {"loss_mixup": self.distance_to(embeddings[mixed & ~adversarial], targets)}
        if self.method == "iat":
            terms["loss_mixup_adv"] = self.distance_to(embeddings[mixed & adversarial], targets)
        return terms


def _attack_phase(cfg, include_clean):
    d = cfg.DML_DEFENSE
    return MetricAdversarialBatch("SMA", d.EPS, d.STEPS, d.STEP_SIZE or
                                  default_step_size(d.EPS, d.STEPS), d.DISTANCE, include_clean)


def build_dml_defense_phases(cfg):
    """The batch phases of DML_DEFENSE.METHOD, in order ([] when off)."""
    method = cfg.DML_DEFENSE.METHOD
    phases = []
    if method in ADVERSARIAL_METHODS:
        # at keeps the clean rows with INCLUDE_CLEAN; iat and trades always need them (the mixup
        # targets, eq. 8's F(x))
        phases.append(_attack_phase(cfg, cfg.DML_DEFENSE.INCLUDE_CLEAN or method != "at"))
    if method in ("mixup", "iat"):
        phases.append(MixUpBatch(cfg.DML_DEFENSE.ALPHA))
    return phases


def build_dml_defense_terms(cfg):
    """The objective part of DML_DEFENSE.METHOD, or None (off, or at: the model's losses only)."""
    d = cfg.DML_DEFENSE
    if d.METHOD in ("", "at"):
        return None
    return EmbeddingTargetTerms(d.METHOD, d.DISTANCE, d.INCLUDE_CLEAN, d.LAMBDA)


def leaves_parameters_unused(cfg):
    """True when steps give the identity classifier (and proxies) no gradient: mixup / iat without
    the clean rows' losses (DistributedDataParallel's find_unused_parameters)."""
    d = cfg.DML_DEFENSE
    return d.METHOD in ("mixup", "iat") and not d.INCLUDE_CLEAN


def _positive_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def check_dml_defense_config(cfg):
    """DML_DEFENSE's keys and switch combinations, as ConfigErrors naming key and value."""
    d = cfg.DML_DEFENSE
    if d.METHOD not in METHODS:
        raise ConfigError(f"DML_DEFENSE.METHOD must be one of {list(METHODS)}, got {d.METHOD!r}")
    if not d.METHOD:
        return
    check_training_pgd(d, "DML_DEFENSE")
    for key in ("ALPHA", "LAMBDA"):
        if not _positive_number(d[key]):
            raise ConfigError(f"DML_DEFENSE.{key} must be > 0, got {d[key]!r}")
    if not isinstance(d.INCLUDE_CLEAN, bool):
        raise ConfigError(f"DML_DEFENSE.INCLUDE_CLEAN must be True or False, got "
                          f"{d.INCLUDE_CLEAN!r}")
    if d.METHOD == "trades" and not d.INCLUDE_CLEAN:
        raise ConfigError("DML_DEFENSE.INCLUDE_CLEAN False with DML_DEFENSE.METHOD trades: eq. 8's "
                          "first term is the metric loss of the clean rows")
    for key, on in (("ADV_TRAIN.ENABLED", cfg.ADV_TRAIN.ENABLED), ("EAT.ENABLED", cfg.EAT.ENABLED),
                    ("META_LEARNING.ENABLED", cfg.META_LEARNING.ENABLED),
                    ("MPSNN.ENABLED", cfg.MPSNN.ENABLED),
                    ("DG.BAU.ENABLED", cfg.DG.BAU.ENABLED),
                    ("DG.ADIN.ENABLED", cfg.DG.ADIN.ENABLED)):
        if on:
            raise ConfigError(f"DML_DEFENSE.METHOD {d.METHOD!r} is a training method of its own: "
                              f"set {key} False")
    if d.METHOD != "at" and cfg.MODEL.META_ARCHITECTURE != "RobustBaseline":
        raise ConfigError(f"DML_DEFENSE.METHOD {d.METHOD!r} needs MODEL.META_ARCHITECTURE "
                          f"RobustBaseline (embeddings and per-row losses), got "
                          f"{cfg.MODEL.META_ARCHITECTURE!r}")

"""EAT's training step (Ke et al., "Towards Adversarially Robust Deep Metric Learning", Algorithm 1,
eq. 9-10): the batch phase that adds the adversarial rows and the members' masks, the checks of the
EAT keys, and the members' shared starting weights (EAT.MEMBER_WEIGHTS).

EAT.ENABLED adds :class:`EnsembleAdversarialBatch` to the step; the objective is the loss dict of
MODEL.META_ARCHITECTURE EnsembleReID (robustreid.modeling.meta_arch.ensemble), which mixes each
member's clean and adversarial losses (Algorithm 1 line 9).
"""
import logging

import torch

from ..attacks import DISTANCES, AttackConfigError, ReidFeatureExtractor, build_attack
from ..attacks.validation import check_choice, eps_from_255, positive_int, step_from_255
from ..config import ConfigError
from ..data.ensemble_split import assign_parts, member_mask
from ..modeling.meta_arch.ensemble import EnsembleEmbedding, check_ensemble_config
from ..parallel import unwrap
from .checkpoint import RobustCheckpointer, fit_problem, read_checkpoint

logger = logging.getLogger(__name__)


def default_step_size(eps, steps):
    """EAT.STEP_SIZE 0: the paper gives no PGD step; Madry et al.'s 2.5 * eps / steps (4/255 at the
    paper's 16/255 and 10 steps)."""
    return 2.5 * eps / steps


class EnsembleAdversarialBatch:
    """Phase "eat": the clean batch followed by its adversarial copies, with ``is_adversarial`` (B',)
    and ``ensemble_mask`` (B', N), row j trains member i.

    Clean rows train every member except the one whose data part holds the image (Algorithm 1 lines
    2, 5; all members without ``parts``). With ``self_transfer`` (eq. 10) the batch gets one
    adversarial copy, crafted once for all members: L-inf PGD (the attack engine's SMA) on the
    concatenated L2-normalised member embeddings, whose squared Euclidean distance to the clean one
    is sum_i ||F_i(x_adv) - F_i(x)||^2, so every step follows sign(sum_i grad_x L(F_i(x_adv),
    F_i(x))); its rows carry the clean rows' mask. Without it the batch gets N copies, copy k crafted
    on member k alone and trained on by member k only (independently adversarially trained
    members). The members are frozen and in eval mode while crafting (BN statistics untouched:
    ReidFeatureExtractor).

    The PGD starts from a uniform random point of the eps-ball, not at x as eq. 10 writes: at
    x_adv = x every member's distance to its own clean embedding is minimal, its gradient is zero,
    and a sign step of zero would leave x_adv = x for ever (SMA's random start, attacks/metric.py).
    ``eps``/``step_size`` are in 1/255 units.
    """

    name = "eat"

    def __init__(self, members, parts=None, *, eps, steps, step_size, distance, self_transfer=True):
        self.members = members
        self.parts = parts
        self.eps = eps
        self.steps = steps
        self.step_size = step_size
        self.distance = distance
        self.self_transfer = self_transfer
        self._model = None
        self._extractors = {}

    @classmethod
    def from_config(cls, cfg, train_items):
        """``train_items``: the (path, pid, camid) items of the training loader (the split's set)."""
        eat = cfg.EAT
        parts = (assign_parts([item[0] for item in train_items], eat.MEMBERS, cfg.ROBUSTREID.SEED)
                 if eat.DATA_SPLIT else None)
        return cls(eat.MEMBERS, parts, eps=eat.EPS, steps=eat.STEPS,
                   step_size=eat.STEP_SIZE or default_step_size(eat.EPS, eat.STEPS),
                   distance=eat.DISTANCE, self_transfer=eat.SELF_TRANSFER)

    def extractor(self, model, members):
        """The attack extractor of the ``members`` (indices) of ``model``: kept across steps, so
        its BN-folded copy is built once and refreshed in place."""
        module = unwrap(model)
        if self._model is not module:
            self._model, self._extractors = module, {}
        if members not in self._extractors:
            self._extractors[members] = ReidFeatureExtractor(
                EnsembleEmbedding([module.members[i] for i in members]))
        return self._extractors[members]

    def attack(self, model, members):
        """The training PGD against ``members`` (a tuple of indices) of ``model``."""
        return build_attack("SMA", self.extractor(model, members), eps=self.eps, steps=self.steps,
                            step_size=self.step_size, distance=self.distance)

    def __call__(self, model, batch):
        images01 = batch["images"].div(255.0)  # loader images are in [0, 255]
        pids = batch["targets"]
        mask = member_mask(batch["img_paths"], self.parts, self.members).to(pids.device)
        if self.self_transfer:
            crafted = [(self.attack(model, tuple(range(self.members))).perturb(images01, pids),
                        mask)]
        else:
            only = torch.eye(self.members, dtype=torch.bool, device=pids.device)
            crafted = [(self.attack(model, (k,)).perturb(images01, pids), mask & only[k])
                       for k in range(self.members)]
        copies = 1 + len(crafted)
        out = dict(batch)
        out["images"] = torch.cat([batch["images"], *(adv.mul(255.0) for adv, _ in crafted)])
        out["ensemble_mask"] = torch.cat([mask, *(rows for _, rows in crafted)])
        out["is_adversarial"] = torch.arange(copies * len(pids), device=pids.device) >= len(pids)
        for key in ("targets", "camids"):
            out[key] = torch.cat([batch[key]] * copies)
        out["img_paths"] = list(batch["img_paths"]) * copies
        return out


def build_eat_phases(cfg, train_items):
    """[EnsembleAdversarialBatch] when EAT.ENABLED, else []."""
    return [EnsembleAdversarialBatch.from_config(cfg, train_items)] if cfg.EAT.ENABLED else []


def check_training_pgd(node, section):
    """The training PGD keys EPS, STEPS, STEP_SIZE and DISTANCE of config block ``node`` (named
    ``section``), as ConfigErrors naming key and value."""
    checks = (("EPS", eps_from_255), ("STEPS", lambda v: positive_int(v, "steps")),
              ("STEP_SIZE", lambda v: v == 0 or step_from_255(v)),
              ("DISTANCE", lambda v: check_choice(v, DISTANCES, "distance")))
    for key, check in checks:
        try:
            check(node[key])
        except AttackConfigError as e:
            raise ConfigError(f"{section}.{key} {node[key]!r}: {e}") from None


def check_eat_config(cfg):
    """EAT's keys and switch combinations, as ConfigErrors naming key and value."""
    eat = cfg.EAT
    ensemble = cfg.MODEL.META_ARCHITECTURE == "EnsembleReID"
    if eat.ENABLED and not ensemble:
        raise ConfigError(f"EAT.ENABLED True needs MODEL.META_ARCHITECTURE EnsembleReID, got "
                          f"{cfg.MODEL.META_ARCHITECTURE!r}")
    if ensemble and not eat.ENABLED:
        raise ConfigError("MODEL.META_ARCHITECTURE EnsembleReID trains with EAT.ENABLED True (its "
                          "batches carry the members' masks)")
    if not eat.ENABLED:
        return
    check_ensemble_config(cfg)
    if cfg.ADV_TRAIN.ENABLED:
        raise ConfigError("EAT.ENABLED crafts its own adversarial rows: set ADV_TRAIN.ENABLED False")
    if cfg.MODEL.NOISE.ENABLED:
        raise ConfigError("MODEL.NOISE.ENABLED attaches to one model's backbone, not to "
                          "EnsembleReID's members: set it False with EAT.ENABLED")
    check_training_pgd(eat, "EAT")
    if eat.DATA_SPLIT and cfg.ROBUSTREID.SEED < 0:
        raise ConfigError("EAT.DATA_SPLIT needs ROBUSTREID.SEED >= 0: the split must be the same "
                          f"when a run resumes, got ROBUSTREID.SEED {cfg.ROBUSTREID.SEED}")


def load_member_weights(model, path, weights_only=True):
    """Every member of the ensemble ``model`` starts from the single-model checkpoint ``path``
    (EAT.MEMBER_WEIGHTS); ConfigError when its tensors do not fit a member exactly."""
    label = f"EAT.MEMBER_WEIGHTS {path}"
    state = read_checkpoint(path, label, weights_only)["model"]
    for member in unwrap(model).members:
        problem = fit_problem(RobustCheckpointer(member)._load_model({"model": dict(state)}),
                              strict=True)
        if problem:
            raise ConfigError(f"{label} does not fit EAT.MEMBER_ARCHITECTURE: {problem}")
    logger.info("Every ensemble member starts from %s", path)

"""Adversarial attacks on ReID models and the input-transformation defenses they are evaluated on.

Images are in [0, 1]; budgets and step sizes in 1/255 units (``eps=8`` is 8/255, see
:func:`eps_from_255`). Typical use (robust evaluation: queries attacked, gallery clean)::

    extractor = ReidFeatureExtractor(model)               # optionally defense=build_defense(...)
    guides = GuideSet(clean_query_features, query_pids)   # the guide set A of DDDefense eq. 3
    attack = build_attack("FNA", extractor, eps=8, steps=16)
    adv01 = attack.perturb(queries01, pids, guides, sample_index=query_rows)

Registered attacks: FNA, FNA_PULL, SMA, IFGSM, FGSM, MIFGSM, NIFGSM, SINIFGSM (metric, see
:mod:`.metric`), PGD (classification, :mod:`.classification`) and WMA (Wasserstein ball, budget in
transport cost per unit of image mass, not 1/255: :mod:`.wasserstein`); :func:`EOTAttack` averages
gradients over random forwards. Transfer attacks craft on a surrogate model
(``robustreid.engine.build_surrogate_extractor``: the engine builds trained models).
"""
from . import classification, metric, wasserstein  # noqa: F401  (registration side effects)
from .base import ReidAttack
from .defenses import DEFENSES, StraightThrough, bpda, build_defense
from .eot import EOTAttack
from .feature_extractor import ReidFeatureExtractor
from .guides import GuideSet, SameIdGuides
from .losses import DISTANCES
from .registry import ATTACK_REGISTRY, build_attack, eps_unit, registered_attacks
from .validation import AttackConfigError, eps_from_255

__all__ = [
    "ATTACK_REGISTRY",
    "AttackConfigError",
    "DEFENSES",
    "DISTANCES",
    "EOTAttack",
    "GuideSet",
    "ReidAttack",
    "ReidFeatureExtractor",
    "SameIdGuides",
    "StraightThrough",
    "bpda",
    "build_attack",
    "eps_unit",
    "build_defense",
    "eps_from_255",
    "registered_attacks",
]

"""ATTACK_REGISTRY and build_attack: every attack by name, with its settings checked."""
from fastreid.utils.registry import Registry

from .validation import AttackConfigError, check_kwargs, keyword_options

ATTACK_REGISTRY = Registry("ATTACK")


def registered_attacks():
    """The registered attack names, sorted."""
    return sorted(ATTACK_REGISTRY._obj_map)  # fastreid 1.4's Registry has no public listing


def eps_unit(name):
    """How the budget of attack ``name`` is written: "/255" (L-inf, the default for names that are
    not registered) or the attack's own ``eps_unit`` ("" for WMA's transport budget)."""
    return getattr(ATTACK_REGISTRY._obj_map.get(name), "eps_unit", "/255")


def build_attack(name, extractor, *, eps, steps, step_size=None, distance="euclidean", **kwargs):
    """The registered attack ``name`` on ``extractor``; eps and step_size in 1/255 units.

    Extra keywords are the attack's own options (e.g. ``rand_init``, ``eot_samples``, ``loss``,
    ``decay``, ``scales``); an unknown name or option raises :class:`AttackConfigError` listing the
    valid ones.
    """
    try:
        cls = ATTACK_REGISTRY.get(name)
    except KeyError:
        raise AttackConfigError(f"unknown attack {name!r}; registered attacks: "
                                f"{registered_attacks()}") from None
    constructors = [vars(k)["__init__"] for k in cls.__mro__[:-1] if "__init__" in vars(k)]
    check_kwargs(kwargs, keyword_options(*constructors), f"attack {name}")  # [:-1]: not object
    return cls(extractor, eps=eps, steps=steps, step_size=step_size, distance=distance, **kwargs)

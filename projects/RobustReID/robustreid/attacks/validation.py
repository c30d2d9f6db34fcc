"""Checks of user-given attack settings, and the one place budgets change units.

Budgets and step sizes are given in 1/255 units of the [0, 1] pixel range ("8" means 8/255) and are
converted to [0, 1] units here, exactly once. Every bad value raises :class:`AttackConfigError`
naming it, before any image is touched.
"""
import inspect
import math
import numbers


class AttackConfigError(ValueError):
    """An attack/defense setting is invalid; the message names the value at fault."""


def _finite_number(value, what, units=" in 1/255 units"):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise AttackConfigError(f"{what} must be a finite number{units}, got {value!r}")
    return float(value)


def eps_from_255(value):
    """An L-inf budget in 1/255 units -> the same budget in [0, 1] pixel units (``8 -> 8/255``).

    Attack images live in [0, 1]; fastreid's model multiplies them by 255 before its own
    normalisation, so a budget of 8/255 in [0, 1] units is a budget of 8 in fastreid's model-input
    units. Raises :class:`AttackConfigError` if ``value`` is not a finite number, is negative, lies
    strictly between 0 and 1 (which looks like a budget already in [0, 1] units, e.g. 0.03), or is
    above 255 (255/255 already lets every pixel take any value).
    """
    eps = _finite_number(value, "eps")
    if eps < 0:
        raise AttackConfigError(f"eps must be >= 0 (in 1/255 units), got {value!r}")
    if eps > 255:
        raise AttackConfigError(f"eps={value!r} is above 255/255, the whole pixel range; budgets "
                                f"are given in 1/255 units (8 for 8/255)")
    if 0 < eps < 1:
        raise AttackConfigError(f"eps={value!r} looks like [0, 1] units; budgets are given in 1/255 "
                                f"units: give 8 for 8/255")
    return eps / 255.0


def step_from_255(value):
    """A step size in 1/255 units -> [0, 1] units. Any positive finite value is accepted: unlike
    budgets, sub-unit steps are common (NI-FGSM's eps/steps is 0.5/255 at eps 8, 16 steps)."""
    step = _finite_number(value, "step_size")
    if step <= 0:
        raise AttackConfigError(f"step_size must be > 0 (in 1/255 units), got {value!r}")
    return step / 255.0


def non_negative_float(value, what):
    """``value`` as a float if it is a finite number >= 0, else AttackConfigError naming it."""
    number = _finite_number(value, what, units="")
    if number < 0:
        raise AttackConfigError(f"{what} must be >= 0, got {value!r}")
    return number


def positive_int(value, what):
    """``value`` if it is a positive int (bools are refused), else AttackConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise AttackConfigError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def check_choice(value, choices, what):
    """``value`` if it is one of ``choices``, else AttackConfigError listing them."""
    if value not in choices:
        raise AttackConfigError(f"{what} must be one of {list(choices)}, got {value!r}")
    return value


def keyword_options(*functions):
    """The keyword-only parameter names of ``functions``, sorted."""
    return sorted({name for f in functions for name, p in inspect.signature(f).parameters.items()
                   if p.kind is p.KEYWORD_ONLY})


def check_kwargs(kwargs, options, what):
    """AttackConfigError naming any keyword not in ``options`` (and listing the options)."""
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise AttackConfigError(f"{what} does not accept {unknown}; options: {list(options)}")

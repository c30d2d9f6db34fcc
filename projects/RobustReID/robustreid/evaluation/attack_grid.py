"""What a robust evaluation runs: attack cells (attack x budget x iterations) and their settings and
per-attack options, checked before any work starts (robust_eval's flags or ``TEST.ROBUST``).

Budgets are L-inf in 1/255 units of [0,1] images (WMA: its transport cost); a cell "FNA 8/255-16" is
FNA with eps 8/255 and 16 iterations.
"""
import ast
from dataclasses import dataclass
from types import SimpleNamespace

from ..attacks import (ATTACK_REGISTRY, DISTANCES, AttackConfigError, build_attack, eps_unit,
                       registered_attacks)
from ..attacks.validation import check_choice, positive_int
from ..config import ConfigError
from .guide_choice import check_guides

METRICS = ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP")
ROBUST_CONFIG_NAMES = {key: f"TEST.ROBUST.{key.upper()}" for key in
                       ("attacks", "eps", "steps", "distance")} | {
                           "eot": "TEST.ROBUST.EOT_SAMPLES",
                           "options": "TEST.ROBUST.ATTACK_OPTIONS", "guides": "TEST.ROBUST.GUIDES"}
# Keywords every cell sets itself (attack_grid, RobustEvaluator): not per-attack options.
CELL_KEYWORDS = ("eps", "steps", "distance")


@dataclass(frozen=True)
class AttackCell:
    """One column of a robustness table: an attack at one budget (1/255 units) and iteration count."""

    attack: str
    eps: float
    steps: int

    @property
    def key(self):
        """Flat-metric prefix, e.g. ``FNA_8_16`` (``FNA_8/mAP`` would clash with the "/" nesting)."""
        return f"{self.attack}_{format_eps(self.eps)}_{self.steps}"

    @property
    def label(self):
        """The papers' column header, e.g. ``FNA 8/255-16`` (``WMA 0.1-16``: budgets in the
        attack's own units)."""
        return f"{self.attack} {format_eps(self.eps)}{eps_unit(self.attack)}-{self.steps}"


def format_eps(eps):
    """8.0 -> "8", 8.5 -> "8.5" (budgets are printed in 1/255 units)."""
    return f"{float(eps):g}"


def attack_grid(attacks, eps_values, steps_values):
    """Every attack x eps x steps cell, attack-major (the papers' column order)."""
    return [AttackCell(a, float(e), int(s)) for a in attacks for e in eps_values for s in steps_values]


def check_attack_settings(attacks, eps_values, steps_values, distance, eot_samples, names):
    """Raise :class:`ConfigError` for the first bad setting, naming its option (``names[setting]``,
    e.g. ``{"eps": "--eps"}`` or ``{"eps": "TEST.ROBUST.EPS"}``), before any work starts."""
    known = registered_attacks()
    unknown = [a for a in attacks if a not in known]
    if not attacks or unknown:
        raise ConfigError(f"{names['attacks']}: unknown attack(s) {unknown or list(attacks)}; "
                          f"registered: {', '.join(known)}")
    def check_each(setting, check, values):
        if not values:
            raise ConfigError(f"{names[setting]} is empty")
        try:
            for value in values:
                check(value)
        except AttackConfigError as e:
            raise ConfigError(f"{names[setting]}: {e}") from None

    for attack in attacks:  # each attack checks budgets in its own units (WMA: transport cost)
        check_each("eps", ATTACK_REGISTRY.get(attack).check_eps, eps_values)
    check_each("steps", lambda s: positive_int(s, "steps"), steps_values)
    check_each("distance", lambda d: check_choice(d, DISTANCES, "distance"), [distance])
    check_each("eot", lambda n: positive_int(n, "EOT samples"), [eot_samples])


def _option_value(text):
    """A Python literal ("30", "1e3", "True", "(1, 2)") as its value, anything else as is."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_attack_options(entries, attacks, names):
    """``["WMA:loss=fna", "WMA:sinkhorn_iters=30"]`` -> ``{"WMA": {"loss": "fna", "sinkhorn_iters":
    30}}``: keyword options of individual attacks, for :func:`build_attack`. Values are Python
    literals (int, float, bool, tuple), else strings. Each attack is built once with its options, so
    an unknown keyword or a bad value fails here, before any work. Raises ConfigError naming the
    option (``names["options"]``, as in :func:`check_attack_settings`) and the entry or attack at
    fault: a malformed entry, an attack not in ``attacks``, a keyword the grid sets (eps, steps,
    distance), an unknown keyword or a bad value."""
    name = names["options"]
    options = {}
    for entry in entries:
        attack, colon, setting = entry.partition(":")
        key, equals, value = setting.partition("=")
        attack, key = attack.strip(), key.strip()
        if not (colon and equals and key.isidentifier()):
            raise ConfigError(f"{name}: {entry!r} is not NAME:key=value")
        if attack not in attacks:
            raise ConfigError(f"{name}: {entry!r}: attack {attack!r} is not evaluated (attacks: "
                              f"{', '.join(attacks)})")
        if key in CELL_KEYWORDS:
            raise ConfigError(f"{name}: {entry!r}: {key} is set for every attack by {names[key]}")
        options.setdefault(attack, {})[key] = _option_value(value.strip())
    model = SimpleNamespace(num_classes=1)  # constructors read no more of it (PGD: the class count)
    for attack, kwargs in options.items():
        try:
            build_attack(attack, model, eps=0, steps=1, **kwargs)
        except AttackConfigError as e:
            raise ConfigError(f"{name}: {attack}: {e}") from None
    return options


def check_robust_config(cfg):
    """:func:`check_attack_settings` on ``cfg.TEST.ROBUST`` (run before training starts)."""
    robust = cfg.TEST.ROBUST
    check_attack_settings(list(robust.ATTACKS), list(robust.EPS), list(robust.STEPS),
                          robust.DISTANCE, robust.EOT_SAMPLES, ROBUST_CONFIG_NAMES)
    if robust.MAX_QUERIES < 0 or robust.PERIOD < 0:
        raise ConfigError("TEST.ROBUST.MAX_QUERIES and TEST.ROBUST.PERIOD must be >= 0")
    check_guides(robust.GUIDES, ROBUST_CONFIG_NAMES["guides"])
    parse_attack_options(robust.ATTACK_OPTIONS, list(robust.ATTACKS), ROBUST_CONFIG_NAMES)


"""RobustReID: a fastreid project for adversarially robust and domain-generalizable person ReID.

Importing this package first adapts fastreid 1.4.0 / advertorch 0.2.3 to today's Python, torch and
numpy (:mod:`robustreid.compat`), then registers every dataset, model part and evaluator.
"""
from . import compat

compat.apply()

from . import attacks, data, evaluation, modeling  # noqa: E402,F401  (registration side effects)
from .config import add_robustreid_config  # noqa: E402,F401

__version__ = "0.1.0"

"""Query-based black-box attacks (:mod:`robustreid.attacks.query_based`) in robust evaluation.

The queries are attacked through the evaluated model's own retrieval output: its features
(TEST.NOISE_DRAWS-averaged, as scored) of the attacker's images ranked against the clean gallery
with TEST.METRIC. Each cell (:class:`QueryCell`: attack, L-inf budget, queries per image) is scored
by :meth:`RobustEvaluator.evaluate_attack` (budgets checked batch by batch), and carries the queries
used per image (mean, max) beside its budget.
"""
from dataclasses import dataclass

from ..attacks.query_based import QUERY_ATTACKS, QueryAttack, RetrievalSystem
from ..config import ConfigError
from .attack_grid import format_eps
from .robust import RobustEvaluator


@dataclass(frozen=True)
class QueryCell:
    """One column: a query-based attack at an L-inf budget (1/255 units) and a query budget per
    image."""

    attack: str
    eps: float
    queries: int

    @property
    def steps(self):
        """What reports list as the cell's iteration count: its query budget."""
        return self.queries

    @property
    def key(self):
        return f"{self.attack}_{format_eps(self.eps)}_q{self.queries}"

    @property
    def label(self):
        """E.g. ``NES 8/255 q1000``."""
        return f"{self.attack} {format_eps(self.eps)}/255 q{self.queries}"


def query_grid(attacks, eps_values, query_budgets):
    """Every attack x eps x budget cell, attack-major; ConfigError naming an unknown attack."""
    unknown = [a for a in attacks if a not in QUERY_ATTACKS]
    if not attacks or unknown:
        raise ConfigError(f"--attacks: unknown query-based attack(s) {unknown or list(attacks)}; "
                          f"known: {', '.join(QUERY_ATTACKS)}")
    return [QueryCell(a, float(e), int(q)) for a in attacks for e in eps_values
            for q in query_budgets]


class QueryAttackEvaluator(RobustEvaluator):
    """:class:`RobustEvaluator` whose cells are :class:`QueryCell`: queries attacked through the
    model's retrieval output, gallery clean."""

    def __init__(self, cfg, model, dataset_name, *, max_queries=0, seed=0, progress=True,
                 attack_options=None):
        super().__init__(cfg, model, dataset_name, max_queries=max_queries, seed=seed,
                         progress=progress)
        self.query_attack_options = attack_options or {}

    def retrieval_system(self):
        """The evaluated model's retrieval, as the attacker may query it."""
        self.evaluate_clean()
        return RetrievalSystem(lambda x01: self._retrieval_features(self.extractor, x01),
                               self.gallery.features, self.gallery.pids, self.metric,
                               gallery_camids=self.gallery.camids)

    def _perturb(self, attack, x01, batch, guides, rows):
        if not isinstance(attack, QueryAttack):  # e.g. the uniform-noise baseline
            return super()._perturb(attack, x01, batch, guides, rows)
        # the queries' cameras: their same-camera matches are junk to the evaluation (and attack)
        return attack.perturb(x01, batch["targets"], camids=batch["camids"])

    def evaluate_cell(self, cell, **attack_kwargs):
        options = {**self.query_attack_options.get(cell.attack, {}), **attack_kwargs}
        attack = QUERY_ATTACKS[cell.attack](self.retrieval_system(), eps=cell.eps,
                                            queries=cell.queries, **options)
        return {**self.evaluate_attack(attack, cell), **attack.query_stats()}

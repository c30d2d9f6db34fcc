"""Sanity checks of a robust evaluation (robust_eval --sanity): eps 0 reproduces the clean model,
mAP does not rise with eps or steps, every attack beats uniform noise of its budget, a very large
budget reaches chance, budgets hold, and a rerun gives the same numbers. Cells are run as needed.
"""
from dataclasses import dataclass

from .attack_grid import METRICS, AttackCell, format_eps

# Slack on "mAP does not increase with eps or steps" (mAP points): attacks are local searches.
MONOTONE_TOLERANCE = 0.5
# The "very large budget" of the sanity check, and how close to chance it must bring the model:
# at most this fraction of the model's above-chance mAP may survive.
LARGE_EPS = 64.0
NEAR_CHANCE_FRACTION = 0.1


@dataclass
class SanityCheck:
    name: str
    passed: bool
    detail: str

    def line(self):
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.detail}"


def _same_numbers(a, b):
    return (all(a[m] == b[m] for m in METRICS)
            and a["per_identity_mAP"]["values"] == b["per_identity_mAP"]["values"])


def _non_increasing(points, tolerance):
    """Violations ``(x_prev, x, mAP_prev, mAP)`` of "mAP does not increase along x"."""
    return [(x0, x1, m0, m1) for (x0, m0), (x1, m1) in zip(points, points[1:]) if m1 > m0 + tolerance]


def sanity_checks(evaluator, result, tolerance=MONOTONE_TOLERANCE, large_eps=LARGE_EPS):
    """Checks that the attacks and the evaluation behave; extra cells are run as needed.

    Returns ``(checks, extra_cells)``. ``result`` is ``evaluator.run(cells)`` (the grid).
    """
    clean, grid = result["clean"], result["cells"]
    attacks = list(dict.fromkeys(c["attack"] for c in grid))
    eps_values = sorted({c["eps"] for c in grid if c["eps"] > 0})
    max_steps = max(c["steps"] for c in grid)
    extra, checks = [], []

    def run(cell, purpose, **attack_kwargs):
        cell_result = dict(evaluator.evaluate_cell(cell, **attack_kwargs), purpose=purpose)
        extra.append(cell_result)
        return cell_result

    zero = [run(AttackCell(a, 0.0, 1), "eps 0") for a in attacks]
    bad = [c["label"] for c in zero if not _same_numbers(c, clean)]
    checks.append(SanityCheck("eps 0 reproduces clean", not bad,
                              f"differs: {bad}" if bad else f"{len(zero)} attacks, identical metrics"))

    if len({c["steps"] for c in grid}) == 1 and max_steps >= 2 and eps_values:
        for a in attacks:
            run(AttackCell(a, eps_values[-1], max_steps // 2), "steps monotonicity")
    cells = grid + extra
    violations = []
    for a in attacks:
        for s in sorted({c["steps"] for c in cells if c["attack"] == a}):
            points = [(0.0, clean["mAP"])] + sorted(
                (c["eps"], c["mAP"]) for c in cells if c["attack"] == a and c["steps"] == s
                and c["eps"] > 0)
            violations += [f"{a}-{s}: eps {x0:g}->{x1:g} mAP {m0:.2f}->{m1:.2f}"
                           for x0, x1, m0, m1 in _non_increasing(points, tolerance)]
        for e in eps_values:
            points = sorted((c["steps"], c["mAP"]) for c in cells if c["attack"] == a
                            and c["eps"] == e)
            violations += [f"{a} {e:g}/255: steps {x0}->{x1} mAP {m0:.2f}->{m1:.2f}"
                           for x0, x1, m0, m1 in _non_increasing(points, tolerance)]
    checks.append(SanityCheck(f"mAP non-increasing in eps and steps (tolerance {tolerance})",
                              not violations, "; ".join(violations) or "no violation"))

    weaker = []
    for e in eps_values:
        noise = evaluator.evaluate_noise(e)
        extra.append(dict(noise, purpose="random noise baseline"))
        weaker += [f"{c['label']} {c['mAP']:.2f} >= noise {noise['mAP']:.2f}"
                   for c in grid if c["eps"] == e and c["mAP"] >= noise["mAP"]]
    checks.append(SanityCheck("every attack beats uniform noise of its budget", not weaker,
                              "; ".join(weaker) or f"eps {[format_eps(e) for e in eps_values]}"))

    chance = result["chance"]["mAP"]
    limit = chance + NEAR_CHANCE_FRACTION * max(clean["mAP"] - chance, 0.0)
    # Steps of 2.5 eps / steps (Madry et al.) so that the iterations can reach the whole ball; the
    # attacks' own 1/255 default would cap the change at steps/255.
    large_step = max(1.0, 2.5 * large_eps / max_steps)
    large = [run(AttackCell(a, large_eps, max_steps), "large eps", step_size=large_step)
             for a in attacks]
    far = [f"{c['label']} mAP {c['mAP']:.2f}" for c in large if c["mAP"] > limit]
    checks.append(SanityCheck(
        f"eps {format_eps(large_eps)}/255 drives mAP near chance ({chance:.2f}, limit {limit:.2f})",
        not far, "; ".join(far) or ", ".join(f"{c['attack']} {c['mAP']:.2f}" for c in large)))

    over = [f"{c['label']} {c['max_linf_255']:.4f}/255" for c in grid + extra if not c["within_budget"]]
    checks.append(SanityCheck("every adversarial image within its budget and [0, 1]", not over,
                              "; ".join(over) or f"{len(grid) + len(extra)} cells checked per batch"))

    again = evaluator.evaluate_cell(AttackCell(grid[0]["attack"], grid[0]["eps"], grid[0]["steps"]))
    same = _same_numbers(again, grid[0])
    checks.append(SanityCheck("deterministic (first cell run twice)", same,
                              f"{grid[0]['label']} mAP {grid[0]['mAP']:.4f} vs {again['mAP']:.4f}"))
    return checks, extra


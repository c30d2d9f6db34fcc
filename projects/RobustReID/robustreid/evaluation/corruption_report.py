"""Reports of the corruption protocol (:mod:`.corruption_evaluator`) in CIL-ReID's layout.

* CIL-ReID's table: clean mINP / mAP / Rank-1 beside the "corruption evaluation" (the mixed cell: a
  corruption and a severity drawn per image);
* the severity x corruption mAP table with the mean over corruptions per severity and over
  severities per corruption;
* mCE-style averages (Hendrycks & Dietterich's corruption error with mAP as the accuracy):
  CE_c = mean over severities of (100 - mAP_{c,s}); "mCE" is the mean of CE_c over corruptions,
  "relative mCE" the mean of (clean mAP - mAP_{c,s}). ImageNet-C normalises each CE_c by a
  reference model's (AlexNet); :func:`normalized_mce` does that against any reference report (the
  leaderboard uses its first model).
"""

import numpy as np

from .report_files import write_report_files
from .plots import figure_axes, save_figure

MEASURES = ("mINP", "mAP", "Rank-1")


def _mean(values):
    return float(np.mean(values)) if values else None


def corruption_grid(entry):
    """(corruptions, severities, {(corruption, severity): cell}) of one dataset entry."""
    cells = {(c["corruption"], c["severity"]): c for c in entry["cells"]}
    corruptions = list(dict.fromkeys(c for c, _ in cells))
    severities = sorted({s for _, s in cells})
    return corruptions, severities, cells


def corruption_summary(entry):
    """Means over corruptions per severity, over severities per corruption, over every cell, and the
    mCE-style averages of one dataset entry (all in %)."""
    corruptions, severities, cells = corruption_grid(entry)
    clean = entry["clean"]["mAP"]
    by_severity = {str(s): {m: _mean([cells[c, s][m] for c in corruptions]) for m in MEASURES}
                   for s in severities}
    by_corruption = {c: {m: _mean([cells[c, s][m] for s in severities]) for m in MEASURES}
                     for c in corruptions}
    errors = {c: _mean([100.0 - cells[c, s]["mAP"] for s in severities]) for c in corruptions}
    return {
        "by_severity": by_severity, "by_corruption": by_corruption,
        "mean": {m: _mean([cell[m] for cell in cells.values()]) for m in MEASURES},
        "corruption_errors": errors, "mCE": _mean(list(errors.values())),
        "relative_mCE": _mean([clean - cell["mAP"] for cell in cells.values()]),
    }


def normalized_mce(entry, reference):
    """ImageNet-C's mCE (%) of a dataset entry against a reference model's entry of the same grid:
    the mean over corruptions of sum_s (100 - mAP_{c,s}) / sum_s (100 - mAP^ref_{c,s}); None when
    the grids differ."""
    corruptions, severities, cells = corruption_grid(entry)
    ref_corruptions, ref_severities, ref_cells = corruption_grid(reference)
    if (corruptions, severities) != (ref_corruptions, ref_severities) or not cells:
        return None
    ratios = [sum(100.0 - cells[c, s]["mAP"] for s in severities)
              / max(sum(100.0 - ref_cells[c, s]["mAP"] for s in severities), 1e-12)
              for c in corruptions]
    return 100.0 * float(np.mean(ratios))


SIDES = {"both": "query and gallery corrupted", "query": "queries corrupted, gallery clean",
         "gallery": "gallery corrupted, queries clean"}


def _number(value):
    return "" if value is None else f"{value:.1f}"


def corruption_markdown(report):
    """CIL-ReID's table, then per dataset the severity x corruption mAP table and the averages."""
    datasets, settings = report["datasets"], report["settings"]
    model = settings.get("model", "model")
    side = SIDES[datasets[0]["corrupted"]] if datasets else ""
    lines = [f"Common corruptions (CIL-ReID protocol, {len(settings['corruptions'])} corruptions, "
             f"severities {', '.join(map(str, settings['severities']))}); {side}; "
             f"seed {settings.get('seed')}; retrieval metric "
             f"{datasets[0]['metric'] if datasets else '?'}. Corruption eval.: a corruption and a "
             "severity drawn per image, as CIL-ReID's leaderboard.", "",
             "| Model | Dataset | Clean mINP | Clean mAP | Clean Rank-1 | Corruption mINP | "
             "Corruption mAP | Corruption Rank-1 |", "|---|---|---|---|---|---|---|---|"]
    for d in datasets:
        mixed = d.get("mixed") or {}
        lines.append(f"| {model} | {d['dataset']} | "
                     + " | ".join(_number(d["clean"][m]) for m in MEASURES) + " | "
                     + " | ".join(_number(mixed.get(m)) for m in MEASURES) + " |")
    for d in datasets:
        corruptions, severities, cells = corruption_grid(d)
        summary = d["summary"]
        lines += ["", f"mAP (%) on {d['dataset']} (clean {d['clean']['mAP']:.1f}, chance "
                  f"{d['chance']['mAP']:.1f}): severity x corruption", "",
                  "| Severity | " + " | ".join(corruptions) + " | mean |",
                  "|---|" + "---|" * (len(corruptions) + 1)]
        for s in severities:
            lines.append(f"| {s} | " + " | ".join(_number(cells[c, s]["mAP"]) for c in corruptions)
                         + f" | {_number(summary['by_severity'][str(s)]['mAP'])} |")
        lines.append("| mean | " + " | ".join(_number(summary["by_corruption"][c]["mAP"])
                                               for c in corruptions)
                     + f" | {_number(summary['mean']['mAP'])} |")
        lines += ["", f"Mean over every corruption x severity: mAP {_number(summary['mean']['mAP'])}, "
                  f"Rank-1 {_number(summary['mean']['Rank-1'])}, mINP "
                  f"{_number(summary['mean']['mINP'])}; mCE-style (100 - mAP, not normalised) "
                  f"{_number(summary['mCE'])}; relative mCE (clean - corrupted mAP) "
                  f"{_number(summary['relative_mCE'])}."]
    return "\n".join(lines) + "\n"


def plot_corruption_heatmap(report, path):
    """mAP per severity (rows) x corruption (columns), one panel per dataset, values written in."""
    plt, fig, axes = figure_axes(len(report["datasets"]))
    width = max(6.0, 0.75 * max((len(corruption_grid(d)[0]) for d in report["datasets"]),
                                default=1))
    fig.set_size_inches(width * len(axes), 4.5)
    for ax, d in zip(axes, report["datasets"]):
        corruptions, severities, cells = corruption_grid(d)
        values = np.array([[cells[c, s]["mAP"] for c in corruptions] for s in severities])
        image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 50 else "black")
        ax.set_xticks(range(len(corruptions)), corruptions, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(severities)), severities)
        ax.set(title=f"{d['dataset']}: mAP (%) (clean {d['clean']['mAP']:.1f})",
               ylabel="severity")
        fig.colorbar(image, ax=ax)
    save_figure(plt, fig, path)


def write_corruption_report(report, output_dir):
    """results.json, results.md and corruption_heatmap.png in ``output_dir``; their paths."""
    return write_report_files(report, output_dir, corruption_markdown,
                              {"corruption_heatmap.png": plot_corruption_heatmap})

"""Reports of a certification run (robustreid.evaluation.smoothing; tools/certify.py).

The certified accuracy at radius r is the percentage of the certified images whose smoothed decision
is right AND certified at radius >= r, as in Cohen et al.'s tables. Abstentions count as wrong.
For the retrieval decision this is the certified Rank-1: no L2 perturbation of the query smaller
than r changes its top-1 gallery identity, and that identity is the query's own. r = 0 is the
smoothed decision's plain accuracy (or Rank-1). The abstention rate is the percentage of images
where CERTIFY abstained.

Files: certified.json (settings, environment, the images, and per sigma a summary and one record
per image with its radius), certified.md (certified accuracy against radius, one row per sigma, with
the abstention rate and seconds per image) and certified_curve.png (one line per sigma).
"""
import numpy as np

from .plots import figure_axes, save_figure
from .report_files import write_report_files
from .robust_report import environment

# Radii of the table: Cohen et al.'s columns (L2, [0, 1] pixel units).
RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
# Radii of the last line (issue 15).
HEADLINE_RADII = (0.25, 0.5)
# What the certified accuracy is called for each decision.
METRIC_NAMES = {"retrieval": "certified Rank-1", "classifier": "certified accuracy"}
HEADLINE_KEYS = {"retrieval": "certified_rank1", "classifier": "certified_accuracy"}


def certified_accuracy(records, radius):
    """Percentage of ``records`` with a right decision certified at radius >= ``radius``."""
    return 100.0 * sum(r["correct"] and r["radius"] >= radius for r in records) / len(records)


def summarize(records, radii=RADII):
    """A sigma's summary: certified accuracy at each radius (keys "%g"), abstention rate (%), base
    decision accuracy without noise (%), mean seconds per image and the image count."""
    return {"certified": {f"{r:g}": certified_accuracy(records, r) for r in radii},
            "abstain": 100.0 * sum(r["prediction"] == -1 for r in records) / len(records),
            "base_accuracy": 100.0 * sum(r["base"] == r["label"] for r in records) / len(records),
            "seconds_per_image": float(np.mean([r["seconds"] for r in records])),
            "num_images": len(records)}


def build_report(settings, images, results, seconds_total):
    """The report: ``settings`` (a dict with "decision", ...), ``images`` (one dict per certified
    image: path, pid, camid), ``results`` (:func:`certify_images`' ``{sigma: records}``)."""
    return {"settings": settings, "environment": environment(), "seconds_total": seconds_total,
            "images": images,
            "sigmas": [{"sigma": sigma, "summary": summarize(records), "records": records}
                       for sigma, records in results.items()]}


def by_sigma(report):
    """The report's sigmas in increasing order (they are kept in the order given)."""
    return sorted(report["sigmas"], key=lambda entry: entry["sigma"])


def certified_markdown(report):
    """Certified accuracy (%) against radius, one row per sigma."""
    settings = report["settings"]
    metric = METRIC_NAMES[settings["decision"]]
    first = report["sigmas"][0]["summary"]
    lines = [f"{metric} (%) at L2 radius r ([0, 1] pixel units), {first['num_images']} images; "
             f"n0 {settings['n0']}, n {settings['n']}, alpha {settings['alpha']:g}. "
             f"Base model without noise: {first['base_accuracy']:.1f}.", "",
             "| sigma | " + " | ".join(f"r={r:g}" for r in RADII) + " | abstain | s/image |",
             "|---|" + "---|" * (len(RADII) + 2)]
    for entry in by_sigma(report):
        summary = entry["summary"]
        lines.append(f"| {entry['sigma']:g} | " + " | ".join(
            f"{summary['certified'][f'{r:g}']:.1f}" for r in RADII) +
            f" | {summary['abstain']:.1f} | {summary['seconds_per_image']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_certified_curves(report, path):
    """Certified accuracy against radius, one step line per sigma."""
    plt, fig, (ax,) = figure_axes(1)
    certified = [r["radius"] for entry in report["sigmas"] for r in entry["records"]]
    radii = np.linspace(0.0, max(certified + [RADII[-1]]) * 1.05, 400)
    for entry in by_sigma(report):
        ax.plot(radii, [certified_accuracy(entry["records"], r) for r in radii],
                label=f"sigma {entry['sigma']:g} (abstain {entry['summary']['abstain']:.0f}%)")
    ax.set(title=f"{report['settings'].get('model', '')} {report['settings'].get('dataset', '')}",
           xlabel="L2 radius ([0, 1] pixel units)",
           ylabel=f"{METRIC_NAMES[report['settings']['decision']]} (%)", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(plt, fig, path)


def write_report(report, output_dir):
    """certified.json, certified.md and certified_curve.png in ``output_dir``."""
    return write_report_files(report, output_dir, certified_markdown,
                              {"certified_curve.png": plot_certified_curves}, stem="certified")


def headline(report):
    """The tools' last line, for the FIRST sigma given: certified accuracy (%) at radii 0.25 and
    0.5, abstention rate (%) and seconds per image."""
    key = HEADLINE_KEYS[report["settings"]["decision"]]
    summary = report["sigmas"][0]["summary"]
    records = report["sigmas"][0]["records"]
    certified = " ".join(f"{key}@{r:g}={certified_accuracy(records, r):.1f}"
                         for r in HEADLINE_RADII)
    return (f"{certified} abstain={summary['abstain']:.1f} "
            f"seconds_per_query={summary['seconds_per_image']:.3f}")

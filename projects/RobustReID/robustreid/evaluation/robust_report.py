"""Reports of a robust evaluation: results.json, the papers' table ("mAP/Rank-1" per model x dataset
x attack cell) with every metric, mAP against eps and per-identity mAP histograms (PNG)."""
import os
import platform
from importlib import metadata

import numpy as np
import torch

from ..attacks import eps_unit
from .attack_grid import METRICS, format_eps
from .plots import figure_axes, save_figure
from .report_files import write_report_files

def environment():
    """Versions and device that produced the numbers."""
    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__,
            "fastreid": version("fastreid"), "robustreid": version("robustreid"),
            "faiss": version("faiss-cpu") or version("faiss-gpu"),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "host": platform.node()}


def build_report(settings, datasets, seconds_total):
    """The report :func:`write_report` and :func:`robust_markdown` read: settings (needs "model" and
    "distance"), environment, timing and each dataset's :meth:`RobustEvaluator.run` result."""
    return {"settings": settings, "environment": environment(), "seconds_total": seconds_total,
            "datasets": datasets}


def _pair(result):
    return f"{result['mAP']:.1f}/{result['Rank-1']:.1f}"


def _column(cell):
    """A cell's column header; EOT attacks say so ("FNA 8/255-16 EOT 10")."""
    eot = cell.get("eot_samples", 1)
    return cell["label"] + (f" EOT {eot}" if eot > 1 else "")


def papers_table(reports):
    """The papers' layout: one row per model x dataset, "mAP/Rank-1" cells, one column per cell."""
    rows = [(r["settings"].get("model", "model"), d) for r in reports for d in r["datasets"]]
    labels = list(dict.fromkeys(_column(c) for _, d in rows for c in d["cells"]))
    lines = ["| Model | Dataset | Clean | " + " | ".join(labels) + " |",
             "|---|---|---|" + "---|" * len(labels)]
    for model, d in rows:
        by_label = {_column(c): c for c in d["cells"]}
        cells = [_pair(by_label[label]) if label in by_label else "" for label in labels]
        lines.append(f"| {model} | {d['dataset']} | {_pair(d['clean'])} | " + " | ".join(cells) + " |")
    return lines


def robust_markdown(report):
    """Papers' layout (rows = model x dataset, "mAP/Rank-1" cells) plus a table of every metric."""
    datasets = report["datasets"]
    attacked = datasets[0]["attacked"] if datasets else "query"
    protocol = ("queries attacked, gallery clean" if attacked == "query"
                else "gallery attacked (AMA protocol), queries clean")
    surrogate = report["settings"].get("surrogate_config")
    if surrogate:
        protocol += f"; transfer (black-box) attacks crafted on {os.path.basename(surrogate)}"
    guided = dict.fromkeys(f"{c['attack']} {c['guides']}" for d in datasets for c in d["cells"]
                           if c.get("guides"))
    if guided:
        protocol += "; guide sets: " + ", ".join(guided)
    lines = [f"mAP/Rank-1 (%); {protocol}; attack distance {report['settings'].get('distance')}, "
             f"retrieval metric {datasets[0]['metric'] if datasets else '?'}.", ""]
    lines += papers_table([report])

    lines += ["", "| Dataset | Setting | Rank-1 | Rank-5 | Rank-10 | mAP | mINP | "
              "per-ID mAP mean ± std | max L-inf (/255) | max budget used | attack s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in datasets:
        for name, r in [("Clean", d["clean"])] + [(c["label"], c) for c in
                                                  d["cells"] + d.get("noise_baselines", [])]:
            per_id = r["per_identity_mAP"]
            linf = f"{r['max_linf_255']:.3f}" if "max_linf_255" in r else "0"
            # in the attack's own budget unit: L-inf /255, or WMA's transport cost per unit mass
            used = (f"{r['max_budget_used']:.4g}{eps_unit(r['attack'])} of "
                    f"{format_eps(r['eps'])}{eps_unit(r['attack'])}" if "max_budget_used" in r else "")
            seconds = f"{r['seconds']['attack']:.1f}" if "seconds" in r else ""
            lines.append(f"| {d['dataset']} | {name} | " + " | ".join(f"{r[m]:.1f}" for m in METRICS)
                         + f" | {per_id['mean']:.1f} ± {per_id['std']:.1f} | {linf} | {used} | "
                         f"{seconds} |")
        lines.append(f"| {d['dataset']} | chance | {d['chance']['Rank-1']:.1f} | | | "
                     f"{d['chance']['mAP']:.1f} | | | | | |")
    return "\n".join(lines) + "\n"


def plot_map_vs_eps(report, path):
    """mAP against the budget per attack (and iteration count); eps 0 is the clean model."""
    plt, fig, axes = figure_axes(len(report["datasets"]))
    for ax, d in zip(axes, report["datasets"]):
        for attack, steps in dict.fromkeys((c["attack"], c["steps"]) for c in d["cells"]):
            points = sorted((c["eps"], c["mAP"]) for c in d["cells"]
                            if c["attack"] == attack and c["steps"] == steps)
            xs, ys = zip(*([(0.0, d["clean"]["mAP"])] + points))
            ax.plot(xs, ys, marker="o", label=f"{attack} ({steps} steps)")
        ax.axhline(d["chance"]["mAP"], color="grey", linestyle=":", label="chance")
        ax.set(title=d["dataset"], xlabel="eps (/255)", ylabel="mAP (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(plt, fig, path)


def largest_budget_cells(cells):
    """Per attack, the cell with the largest eps (most steps among those)."""
    best = {}
    for c in cells:
        if c["attack"] not in best or (c["eps"], c["steps"]) > (best[c["attack"]]["eps"],
                                                                best[c["attack"]]["steps"]):
            best[c["attack"]] = c
    return list(best.values())


def plot_per_identity_map(report, path):
    """Histogram of per-identity mAP, clean and each attack at its largest budget (Fig. 8 style)."""
    plt, fig, axes = figure_axes(len(report["datasets"]))
    bins = np.linspace(0, 100, 21)
    for ax, d in zip(axes, report["datasets"]):
        for label, r in [("Clean", d["clean"])] + [(c["label"], c) for c in
                                                    largest_budget_cells(d["cells"])]:
            per_id = r["per_identity_mAP"]
            ax.hist(list(per_id["values"].values()), bins=bins, histtype="step", linewidth=1.5,
                    label=f"{label} (mean {per_id['mean']:.1f}, std {per_id['std']:.1f})")
        ax.set(title=f"{d['dataset']}: per-identity mAP", xlabel="mAP (%)",
               ylabel="identities")
        ax.legend(fontsize="small")
    save_figure(plt, fig, path)


def write_report(report, output_dir):
    """results.json, results.md, mAP_vs_eps.png and per_identity_map.png in ``output_dir``."""
    return write_report_files(report, output_dir, robust_markdown,
                              {"mAP_vs_eps.png": plot_map_vs_eps,
                               "per_identity_map.png": plot_per_identity_map})

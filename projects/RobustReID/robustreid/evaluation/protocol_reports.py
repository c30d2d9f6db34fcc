"""Reports of robust_eval's query-based and universal-perturbation protocols: the retrieval
protocol's tables (:func:`robust_markdown`) plus each protocol's own columns."""
import os

from .report_files import write_report_files
from .robust_report import plot_map_vs_eps, robust_markdown


def query_markdown(report):
    """The papers' layout and metric table, then the queries each attack used per image."""
    lines = [robust_markdown(report).rstrip("\n"), "",
             "Query-based black-box attacks on the retrieval output (distances: NES; top-k list: "
             "HSJA), no gradient; queries per image:", "",
             "| Dataset | Setting | budget | mean used | max used | images |",
             "|---|---|---|---|---|---|"]
    for d in report["datasets"]:
        for c in d["cells"]:
            lines.append(f"| {d['dataset']} | {c['label']} | {c['query_budget']} | "
                         f"{c['queries_mean']:.0f} | {c['queries_max']} | {c['images']} |")
    return "\n".join(lines) + "\n"


def uap_markdown(report):
    """The papers' layout and metric table, then how each universal perturbation was learned."""
    surrogate = report["settings"].get("surrogate_config")
    crafted = (f"the surrogate {os.path.basename(surrogate)} (transfer)" if surrogate
               else "the evaluated model")
    lines = [robust_markdown(report).rstrip("\n"), "",
             f"Universal perturbations: one per column, learned on {crafted} from the training "
             "images (push away from the clean features), added to every query:", "",
             "| Dataset | Setting | training images | steps | images seen | final objective | "
             "L-inf (/255) | fit s |", "|---|---|---|---|---|---|---|---|"]
    for d in report["datasets"]:
        for c in d["cells"]:
            lines.append(f"| {d['dataset']} | {c['label']} | {c['training_images']} | "
                         f"{c['fit_steps']} | {c['fit_images_seen']} | "
                         f"{c['fit_final_objective']:.4g} | {c['delta_linf_255']:.3f} | "
                         f"{c['fit_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def write_protocol_report(report, output_dir, markdown):
    """results.json, results.md (``markdown(report)``) and mAP_vs_eps.png in ``output_dir``."""
    return write_report_files(report, output_dir, markdown, {"mAP_vs_eps.png": plot_map_vs_eps})

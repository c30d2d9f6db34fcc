"""Reports of the query-based protocol: robust_eval's tables plus the queries each attack used."""
import json
import os

from .robust import plot_map_vs_eps, robust_markdown


def query_markdown(report):
    """The papers' layout and metric table (:func:`robust_markdown`), then queries per image."""
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


def write_query_report(report, output_dir):
    """results.json, results.md and mAP_vs_eps.png in ``output_dir``; their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, name) for name in
             ("results.json", "results.md", "mAP_vs_eps.png")}
    with open(paths["results.json"], "w") as f:
        json.dump(report, f, indent=1)
    with open(paths["results.md"], "w") as f:
        f.write(query_markdown(report))
    plot_map_vs_eps(report, paths["mAP_vs_eps.png"])
    return paths

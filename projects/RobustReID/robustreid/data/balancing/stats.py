"""Before/after statistics of a balanced training set (the paper's Fig. 1: images per identity, and
the per-camera share that eq. 2 thresholds), as JSON and PNG.

Units: counts are images; shares are fractions in [0, 1] of one identity's images.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Dict, Iterable, Optional, Sequence

import numpy as np

from .plan import camera_counts, max_camera_share, sort_key

__all__ = ["set_statistics", "balance_statistics", "write_statistics", "plot_statistics"]


def _summary(values: Sequence[float]) -> Dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()),
            "median": float(np.median(v)), "std": float(v.std())}


def set_statistics(items: Iterable[Sequence], delta2: Optional[float] = None) -> Dict:
    """Statistics of one training list [(img_path, pid, camid), ...]."""
    counts = camera_counts(items)
    pids = sorted(counts, key=sort_key)
    n = [sum(counts[p].values()) for p in pids]
    shares = [max_camera_share(counts[p]) for p in pids]
    cam_total = Counter()
    for cams in counts.values():
        cam_total.update(cams)
    cams = sorted(cam_total, key=sort_key)
    total = sum(n)
    hist = np.bincount(np.asarray(n, dtype=np.int64))
    out = {
        "num_ids": len(pids), "num_images": total, "num_cameras": len(cams),
        "images_per_id": _summary(n),
        # histogram[k] = number of identities with exactly k images
        "images_per_id_histogram": {str(k): int(c) for k, c in enumerate(hist) if c},
        "max_camera_share": _summary(shares),
        "camera_images": {str(c): int(cam_total[c]) for c in cams},
        "camera_share": {str(c): cam_total[c] / total for c in cams},
        "per_id": {str(p): {"images": k, "max_camera_share": s,
                            "cameras": {str(c): int(counts[p][c]) for c in sorted(counts[p], key=sort_key)}}
                   for p, k, s in zip(pids, n, shares)},
    }
    if delta2 is not None:
        above = [str(p) for p, s in zip(pids, shares) if s > delta2]
        out["ids_above_delta2"] = above
    return out


def balance_statistics(real_items, balanced_items, plan=None, synthetic_items=()) -> Dict:
    """{"before": ..., "after": ..., "plan": ...} for the real and the balanced training lists."""
    delta2 = plan.delta2 if plan is not None else None
    stats = {"before": set_statistics(real_items, delta2), "after": set_statistics(balanced_items, delta2),
             "num_synthetic": len(list(synthetic_items))}
    if plan is not None:
        p = plan.to_json()
        stats["plan"] = {k: p[k] for k in ("delta1", "delta2", "mean_images_per_id", "num_synthetic",
                                           "num_synthetic_eq1", "num_synthetic_eq2", "unfixable")}
    return stats


def plot_statistics(stats: Dict, png_path: str) -> None:
    """Four panels: images per identity (sorted as Fig. 1, before vs after), its histogram, the
    largest camera share per identity (with delta2), and images per camera."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = stats["before"], stats["after"]
    pids = sorted(before["per_id"], key=lambda p: -before["per_id"][p]["images"])
    n_before = np.array([before["per_id"][p]["images"] for p in pids])
    n_after = np.array([after["per_id"].get(p, {"images": 0})["images"] for p in pids])
    s_before = np.array([before["per_id"][p]["max_camera_share"] for p in pids])
    s_after = np.array([after["per_id"].get(p, {"max_camera_share": 0})["max_camera_share"] for p in pids])
    plan = stats.get("plan", {})

    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    ax = axes[0, 0]
    x = np.arange(len(pids))
    ax.bar(x, n_after, width=1.0, color="tab:orange", label="after (real + synthetic)")
    ax.bar(x, n_before, width=1.0, color="tab:green", label="before (real)")
    if "delta1" in plan:
        ax.axhline(plan["delta1"], color="k", ls="--", lw=1, label=f"delta1 = {plan['delta1']}")
    ax.set(xlabel="identity (sorted by real images)", ylabel="images", title="Images per identity")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    top = int(max(n_before.max(), n_after.max()))
    bins = np.arange(0, top + 2) - 0.5 if top <= 60 else 40
    ax.hist([n_before, n_after], bins=bins, color=["tab:green", "tab:orange"], label=["before", "after"])
    ax.set(xlabel="images per identity", ylabel="identities", title="Histogram of images per identity")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    order = np.argsort(-s_before, kind="stable")
    ax.plot(s_before[order], color="tab:green", label="before")
    ax.plot(s_after[order], ".", ms=3, color="tab:orange", label="after")
    if "delta2" in plan:
        ax.axhline(plan["delta2"], color="k", ls="--", lw=1, label=f"delta2 = {plan['delta2']:g}")
    ax.set(xlabel="identity (sorted by real share)", ylabel="largest camera share", ylim=(0, 1.02),
           title="Largest single-camera share per identity (eq. 2)")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    cams = list(after["camera_images"])
    cb = [before["camera_images"].get(c, 0) for c in cams]
    ca = [after["camera_images"][c] for c in cams]
    xc = np.arange(len(cams))
    ax.bar(xc - 0.2, cb, width=0.4, color="tab:green", label="before")
    ax.bar(xc + 0.2, ca, width=0.4, color="tab:orange", label="after")
    ax.set_xticks(xc)
    ax.set_xticklabels(cams, rotation=30, fontsize=7)
    ax.set(ylabel="images", title="Images per camera")
    ax.legend(fontsize=8)

    fig.suptitle("Data balancing (DDDefense eq. 1-2): {} -> {} images, {} identities".format(
        before["num_images"], after["num_images"], before["num_ids"]))
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)


def write_statistics(stats: Dict, json_path: str, png_path: Optional[str] = None) -> None:
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=1)
        f.write("\n")
    os.replace(tmp, json_path)
    if png_path:
        plot_statistics(stats, png_path)

"""How many pseudo samples each (identity, camera) gets: DDDefense eq. 1 and eq. 2.

eq. 1 (inter-ID balancing)::

    D <- D u { x_i^{pseudo,j} | i in I, n_i < delta1, j = 1 .. delta1 - n_i }

eq. 2 (intra-ID diversifying)::

    D_i' <- D_i' u { x_{i',c}^pseudo | c in C \\ {c_i'} },   c_i' = argmax_c n_{i',c} / n_i'
    for every i' with max_c n_{i',c} / n_i' > delta2; the number of x_{i',c}^pseudo is "the initial
    mean value of each camera of D_i'".

Reading of the parts the paper leaves open (documented because they change counts):

* eq. 2 runs "subsequently", on the D that eq. 1 produced: the share test and c_i' use the counts
  after eq. 1 (so rounding in eq. 1 cannot leave an untested identity above delta2), while the number
  added per camera is, as the paper says, the *initial* mean per camera of D_i': n_i' / |C_i'| with
  the counts before any synthesis, C_i' = the cameras in which i' has images. (Sizing it on the
  filled counts would give a 2-image identity filled to delta1 another delta1 images per camera.)
* Counts are integers, so that mean is rounded up (ceil), as is the automatic delta1 (the mean
  images per identity): a filled identity never ends below the level it is filled to.
* eq. 1's pseudo samples are only ID-conditional in the paper, so they follow the identity's own
  camera distribution: delta1 - n_i is apportioned over i's cameras in proportion to n_{i,c}
  (largest remainder; ties to the camera with fewer images). eq. 1 therefore fills counts without
  changing camera shares; changing shares is eq. 2's job.
* An identity is "fixed" when, after both equations, its largest camera share is <= delta2; the
  rest are reported in :attr:`BalancePlan.unfixable` with the reason (e.g. a one-camera dataset).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, Hashable, Iterable, List, Sequence, Tuple

__all__ = ["SyntheticRequest", "SyntheticJob", "BalancePlan", "plan_balancing", "sort_key",
           "camera_counts", "max_camera_share", "image_seed"]


def sort_key(value):
    """Natural order for labels: "market1501_10" after "market1501_9"; ints numerically."""
    if isinstance(value, (int, float)):
        return (0, value)
    parts = re.split(r"(\d+)", str(value))
    return (1, tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts))


def camera_counts(items: Iterable[Sequence]) -> Dict[Hashable, Counter]:
    """{pid: Counter({camid: n_ic})} from (img_path, pid, camid, ...) items."""
    counts: Dict[Hashable, Counter] = defaultdict(Counter)
    for item in items:
        counts[item[1]][item[2]] += 1
    return dict(counts)


def max_camera_share(cams: Counter) -> float:
    """max_c n_ic / n_i of one identity (the quantity eq. 2 thresholds)."""
    total = sum(cams.values())
    return max(cams.values()) / total if total else 0.0


@dataclass(frozen=True)
class SyntheticRequest:
    """``count`` pseudo samples of identity ``pid`` under camera ``camid``, asked for by ``rule``."""
    pid: Hashable
    camid: Hashable
    count: int
    rule: str  # "eq1" or "eq2"


@dataclass(frozen=True)
class SyntheticJob:
    """One pseudo sample to generate; ``index`` is its stable position in the plan."""
    index: int
    pid: Hashable
    camid: Hashable
    rule: str
    seed: int


def image_seed(base_seed: int, pid, camid, rule: str, j: int) -> int:
    """Noise seed of the j-th pseudo sample of (pid, camid, rule): independent of the other
    identities, so an image's seed does not depend on how the plan is ordered or chunked."""
    key = json.dumps([int(base_seed), str(pid), str(camid), rule, int(j)])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1  # 63 bits


def _apportion(total: int, weights: Dict[Hashable, int]) -> Dict[Hashable, int]:
    """Split ``total`` in proportion to ``weights`` (largest remainder, deterministic ties)."""
    wsum = sum(weights.values())
    exact = {c: total * w / wsum for c, w in weights.items()}
    out = {c: int(math.floor(v)) for c, v in exact.items()}
    left = total - sum(out.values())
    # largest remainder first; ties to the camera with fewer images, then camera order
    order = sorted(weights, key=lambda c: (-(exact[c] - out[c]), weights[c], sort_key(c)))
    for c in order[:left]:
        out[c] += 1
    return out


@dataclass
class BalancePlan:
    """Result of :func:`plan_balancing`: requested pseudo samples and the counts they lead to."""
    delta1: int
    delta2: float
    mean_images_per_id: float
    cameras: List[Hashable]
    counts_before: Dict[Hashable, Counter]
    requests: List[SyntheticRequest]
    # pid -> why its largest camera share stays above delta2 after eq. 1 and eq. 2
    unfixable: Dict[Hashable, str] = field(default_factory=dict)

    @property
    def num_synthetic(self) -> int:
        return sum(r.count for r in self.requests)

    def synthetic_counts(self, rule: str = None) -> Dict[Tuple[Hashable, Hashable], int]:
        """{(pid, camid): pseudo samples}, optionally of one rule only."""
        out: Dict[Tuple[Hashable, Hashable], int] = Counter()
        for r in self.requests:
            if rule is None or r.rule == rule:
                out[(r.pid, r.camid)] += r.count
        return dict(out)

    def counts_after(self) -> Dict[Hashable, Counter]:
        after = {pid: Counter(c) for pid, c in self.counts_before.items()}
        for r in self.requests:
            after[r.pid][r.camid] += r.count
        return after

    def jobs(self, base_seed: int = 0) -> List[SyntheticJob]:
        """Every pseudo sample, in a fixed order (identity, camera, rule), each with its seed."""
        jobs: List[SyntheticJob] = []
        for r in self.requests:  # already sorted by (pid, camid, rule)
            for j in range(r.count):
                jobs.append(SyntheticJob(len(jobs), r.pid, r.camid, r.rule,
                                         image_seed(base_seed, r.pid, r.camid, r.rule, j)))
        return jobs

    def to_json(self) -> Dict:
        return {
            "delta1": self.delta1, "delta2": self.delta2,
            "mean_images_per_id": self.mean_images_per_id,
            "cameras": [str(c) for c in self.cameras],
            "num_synthetic": self.num_synthetic,
            "num_synthetic_eq1": sum(r.count for r in self.requests if r.rule == "eq1"),
            "num_synthetic_eq2": sum(r.count for r in self.requests if r.rule == "eq2"),
            "requests": [[str(r.pid), str(r.camid), r.count, r.rule] for r in self.requests],
            "unfixable": {str(p): why for p, why in self.unfixable.items()},
        }

    def digest(self, base_seed: int = 0) -> str:
        """Hash of what will be generated (requests + seed): a resumed run must match it."""
        payload = json.dumps({"seed": int(base_seed), "requests": self.to_json()["requests"]})
        return hashlib.sha256(payload.encode()).hexdigest()


def plan_balancing(items: Iterable[Sequence], delta1: float = 0, delta2: float = 0.5) -> BalancePlan:
    """Apply eq. 1 then eq. 2 to ``items`` = [(img_path, pid, camid), ...] (fastreid train items).

    ``delta1 <= 0`` means the mean number of images per identity, rounded up. ``delta2`` is a share
    in (0, 1]. Returns the requests sorted by (pid, camid, rule).
    """
    if not 0.0 < float(delta2) <= 1.0:
        raise ValueError(f"delta2 is a camera share in (0, 1], got {delta2}")
    counts = camera_counts(items)
    if not counts:
        raise ValueError("plan_balancing: no training items")
    cameras = sorted({c for cams in counts.values() for c in cams}, key=sort_key)
    n = {pid: sum(cams.values()) for pid, cams in counts.items()}
    mean = sum(n.values()) / len(n)
    if delta1 is None or float(delta1) <= 0:
        delta1 = int(math.ceil(mean - 1e-9))  # the mean, rounded up (see module docstring)
    elif float(delta1) != int(delta1):
        raise ValueError(f"delta1 is a number of images, got {delta1}")
    delta1 = int(delta1)

    added: Dict[Tuple[Hashable, Hashable, str], int] = Counter()
    unfixable: Dict[Hashable, str] = {}
    for pid in sorted(counts, key=sort_key):
        cams = counts[pid]
        filled = Counter(cams)
        # eq. 1: delta1 - n_i pseudo samples, on i's own cameras in proportion to n_ic
        if n[pid] < delta1:
            for cam, k in _apportion(delta1 - n[pid], dict(cams)).items():
                if k:
                    added[(pid, cam, "eq1")] += k
                    filled[cam] += k
        # eq. 2: identity dominated by one camera -> the initial per-camera mean from every other one
        if max_camera_share(filled) > delta2:
            dominant = max(sorted(filled, key=sort_key), key=lambda c: filled[c])  # first max on ties
            per_camera = int(math.ceil(n[pid] / len(cams) - 1e-9))
            others = [c for c in cameras if c != dominant]
            for cam in others:
                added[(pid, cam, "eq2")] += per_camera
            if not others:
                unfixable[pid] = "the dataset has a single camera: eq. 2 has no other camera to add"

    requests = [SyntheticRequest(pid, cam, k, rule) for (pid, cam, rule), k in added.items() if k > 0]
    requests.sort(key=lambda r: (sort_key(r.pid), sort_key(r.camid), r.rule))
    plan = BalancePlan(delta1, float(delta2), mean, cameras, counts, requests, unfixable)
    for pid, cams in plan.counts_after().items():
        share = max_camera_share(cams)
        if share > delta2 and pid not in unfixable:
            unfixable[pid] = (f"largest camera share {share:.3f} > delta2 {delta2:g} after eq. 1-2 "
                              f"({sum(cams.values())} images)")
    return plan

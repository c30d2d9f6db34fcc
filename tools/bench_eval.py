#!/usr/bin/env python
"""Benchmark RobustReID's streamed exact ranker against fastreid's evaluate_rank.

Synthetic features with a realistic pid/camid structure (features = identity centroid + camera bias +
noise, plus pid-0 distractors in the gallery) at

* Market-1501 size: 3,368 queries x 15,913 gallery, 512-d, 750 ids, 6 cameras;
* MSMT17 size:     11,659 queries x 82,161 gallery, 512-d, 3,060 ids, 15 cameras.

All timings include the distance computation.  Compared:

* ours:            robustreid.evaluation.evaluate_rank_from_features (chunked, no q x g matrix);
* fastreid python: build_dist + evaluate_rank(use_cython=False);
* fastreid cython: build_dist + rank_cy.evaluate_cy, built from fastreid's rank_cy.pyx into a temp
                   dir when Cython is importable (``--cython-dir`` adds a directory holding it, e.g.
                   one made with ``pip install --target DIR cython``); otherwise reported as n/a.

Metrics of every run are asserted equal to ours (1e-6).  At MSMT size our peak RSS is measured in a
child process that runs only our evaluation (ru_maxrss); fastreid's dense path (~12 GB) only runs
with ``--msmt-fastreid``.

The last line is always:
``market_speedup=<x> market_speedup_vs_cython=<x> msmt_speedup=<x> msmt_peak_rss_gb=<x>``
"""
import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

SIZES = {
    # name: (num_query, num_gallery, num_ids, num_cams, distractor fraction of the gallery)
    "market": (3368, 15913, 750, 6, 0.18),
    "msmt": (11659, 82161, 3060, 15, 0.05),
}
DIM = 512
TOL = 1e-6


def log(msg):
    print(msg, flush=True)


# --- synthetic data ---------------------------------------------------------------------------------
def make_split(name, seed=0, dim=DIM, noise=1.8, cam_bias=0.5):
    """Query/gallery features, pids and camids with Market/MSMT-like structure (float32 features)."""
    num_query, num_gallery, num_ids, num_cams, distractor_frac = SIZES[name]
    rng = np.random.default_rng(seed)
    # Every identity is seen by 2..num_cams cameras (min(num_cams, 6) at most, like real captures).
    max_views = min(num_cams, 6)
    cam_sets = [rng.choice(num_cams, size=rng.integers(2, max_views + 1), replace=False)
                for _ in range(num_ids)]
    pids = np.arange(1, num_ids + 1)

    def allocate(total, per_id_min_cams):
        """(pid, cam) pairs: ``per_id_min_cams`` cameras of each id first, the rest at random."""
        pid_list, cam_list = [], []
        for pid, cams in zip(pids, cam_sets):
            for cam in cams[:per_id_min_cams]:
                pid_list.append(pid)
                cam_list.append(cam)
        rest = total - len(pid_list)
        assert rest >= 0
        owners = rng.integers(0, num_ids, size=rest)
        for o in owners:
            pid_list.append(pids[o])
            cam_list.append(rng.choice(cam_sets[o]))
        return np.asarray(pid_list, np.int64), np.asarray(cam_list, np.int64)

    q_pids, q_cams = allocate(num_query, 1)
    num_distractors = int(distractor_frac * num_gallery)
    g_pids, g_cams = allocate(num_gallery - num_distractors, max_views)
    g_pids = np.concatenate([g_pids, np.zeros(num_distractors, np.int64)])  # pid 0: distractors
    g_cams = np.concatenate([g_cams, rng.integers(0, num_cams, size=num_distractors)])

    # Shuffle the gallery so that pids are not contiguous.
    perm = rng.permutation(num_gallery)
    g_pids, g_cams = g_pids[perm], g_cams[perm]

    centroids = rng.standard_normal((num_ids + 1, dim), dtype=np.float32)
    cam_offsets = cam_bias * rng.standard_normal((num_cams, dim), dtype=np.float32)

    def features(p, c, block=8192):
        """Filled block by block so that generating MSMT-size data needs no large temporaries."""
        out = np.empty((len(p), dim), dtype=np.float32)
        for s in range(0, len(p), block):
            bp, bc = p[s:s + block], c[s:s + block]
            f = centroids[bp] + cam_offsets[bc]
            distractor = bp == 0  # pid-0 distractors: each its own random "identity"
            f[distractor] = rng.standard_normal((int(distractor.sum()), dim), dtype=np.float32)
            f += noise * rng.standard_normal(f.shape, dtype=np.float32)
            out[s:s + block] = f
        return out

    return features(q_pids, q_cams), features(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


# --- runners ----------------------------------------------------------------------------------------
def run_ours(data, metric, chunk):
    from robustreid.evaluation import evaluate_rank_from_features
    import torch

    qf, gf, q_pids, g_pids, q_cams, g_cams = data
    t0 = time.perf_counter()
    out = evaluate_rank_from_features(torch.from_numpy(qf), torch.from_numpy(gf), q_pids, g_pids,
                                      q_cams, g_cams, metric=metric, chunk_size=chunk)
    return time.perf_counter() - t0, out


def run_fastreid(data, metric, ranker):
    import torch
    from fastreid.utils.compute_dist import build_dist

    qf, gf, q_pids, g_pids, q_cams, g_cams = data
    t0 = time.perf_counter()
    dist = build_dist(torch.from_numpy(qf), torch.from_numpy(gf), metric)
    out = ranker(dist, q_pids, g_pids, q_cams, g_cams)
    return time.perf_counter() - t0, out


def fastreid_python_ranker(dist, q_pids, g_pids, q_cams, g_cams):
    from fastreid.evaluation.rank import evaluate_rank

    return evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=50, use_cython=False)


_SETUP_PY = """
import numpy as np
from setuptools import Extension, setup
from Cython.Build import cythonize
setup(name="rank_cy_bench", script_args=["build_ext", "--inplace", "-q"],
      ext_modules=cythonize([Extension("rank_cy", ["rank_cy.pyx"], include_dirs=[np.get_include()])],
                            quiet=True, language_level=3))
"""


def build_cython_ranker(cython_dir, workdir):
    """Compile fastreid's rank_cy.pyx in ``workdir``; returns (evaluate_cy or None, reason)."""
    import fastreid.evaluation

    env = dict(os.environ)
    if cython_dir:
        env["PYTHONPATH"] = os.pathsep.join([cython_dir, env.get("PYTHONPATH", "")])
    probe = subprocess.run([sys.executable, "-c", "import Cython; print(Cython.__version__)"],
                           env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        return None, "Cython is not importable (not in .venv; pass --cython-dir DIR holding it)"
    pyx = os.path.join(os.path.dirname(fastreid.evaluation.__file__), "rank_cylib", "rank_cy.pyx")
    shutil.copy(pyx, workdir)
    with open(os.path.join(workdir, "setup.py"), "w") as f:
        f.write(_SETUP_PY)
    build = subprocess.run([sys.executable, "setup.py"], cwd=workdir, env=env, capture_output=True,
                           text=True)
    if build.returncode != 0:
        return None, "rank_cy.pyx failed to build: " + build.stderr.strip().splitlines()[-1]
    built = [f for f in os.listdir(workdir) if f.startswith("rank_cy") and f.endswith(".so")]
    spec = importlib.util.spec_from_file_location("rank_cy", os.path.join(workdir, built[0]))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def ranker(dist, q_pids, g_pids, q_cams, g_cams):
        return module.evaluate_cy(dist, q_pids, g_pids, q_cams, g_cams, 50, False)

    return ranker, "Cython " + probe.stdout.strip()


def assert_same(name, ours, ref):
    cmc, ap, inp = ours
    rcmc, rap, rinp = ref
    d_cmc = float(np.max(np.abs(cmc - np.asarray(rcmc))))
    d_map = abs(float(np.mean(ap)) - float(np.mean(rap)))
    d_minp = abs(float(np.mean(inp)) - float(np.mean(rinp)))
    assert len(ap) == len(rap), f"{name}: {len(ap)} valid queries vs {len(rap)}"
    assert max(d_cmc, d_map, d_minp) <= TOL, f"{name}: |dCMC|={d_cmc} |dmAP|={d_map} |dmINP|={d_minp}"
    log(f"  {name}: metrics equal to ours (max |dCMC|={d_cmc:.1e}, |dmAP|={d_map:.1e}, "
        f"|dmINP|={d_minp:.1e})")


def summary(out):
    cmc, ap, inp = out
    return (f"R1={cmc[0] * 100:.2f} R5={cmc[4] * 100:.2f} R10={cmc[9] * 100:.2f} "
            f"mAP={np.mean(ap) * 100:.2f} mINP={np.mean(inp) * 100:.2f} valid_q={len(ap)}")


def peak_rss_gb():
    """This process's ru_maxrss in GB (Linux reports KiB).

    Linux carries ru_maxrss over fork + exec, so a child's value is only its own when its parent
    was smaller at spawn time: the MSMT child is therefore started before this script imports torch.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def vm_hwm_gb():
    """Peak RSS of the current address space (/proc VmHWM; reset by exec), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return None


def child_msmt(args):
    """Child process: only generate MSMT-size data and run our evaluation; report JSON."""
    import robustreid  # noqa: F401  (compat patches)

    data = make_split("msmt", seed=args.seed)
    rss_data = peak_rss_gb()
    seconds, out = run_ours(data, args.metric, args.chunk)
    np.savez(args.child_out, cmc=out[0], ap=out[1], inp=out[2])
    print(json.dumps({"seconds": seconds, "peak_rss_gb": peak_rss_gb(), "vm_hwm_gb": vm_hwm_gb(),
                      "rss_after_data_gb": rss_data, "summary": summary(out)}), flush=True)


def fmt(x):
    return "n/a" if x is None else f"{x:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-msmt", action="store_true", help="only the Market-size benchmark")
    parser.add_argument("--skip-python", action="store_true",
                        help="skip fastreid's pure-Python ranker (about 50 s at Market size)")
    parser.add_argument("--msmt-fastreid", action="store_true",
                        help="also run fastreid's dense path at MSMT size (needs ~12 GB RAM, slow)")
    parser.add_argument("--cython-dir", default=os.environ.get("ROBUSTREID_CYTHON_DIR", ""),
                        help="directory to put on PYTHONPATH to find Cython (e.g. pip --target DIR)")
    parser.add_argument("--metric", default="cosine", choices=["cosine", "euclidean"])
    parser.add_argument("--chunk", type=int, default=1024, help="query chunk (TEST.FAISS.QUERY_CHUNK)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child-msmt", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_msmt:
        return child_msmt(args)

    # MSMT first, while this process is still small (see peak_rss_gb); reported after Market.
    msmt = None
    if not args.skip_msmt:
        log("[msmt] 11,659 x 82,161 x 512 synthetic features: generating them and running only our "
            "evaluation in a child process (peak RSS measured there)")
        msmt = run_msmt_child(args)
        log(f"[msmt] ours:            {msmt['report']['seconds']:7.2f} s   {msmt['report']['summary']}")

    warnings.filterwarnings("ignore", category=UserWarning)  # fastreid's Cython/addmm_ warnings
    import robustreid  # noqa: F401  (compat patches before fastreid is imported)
    import torch

    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, metric={args.metric}, "
        f"chunk={args.chunk}")
    market_speedup = market_speedup_cy = msmt_speedup = msmt_rss = t_py_market = None

    # --- Market-1501 size ---
    log("[market] generating 3,368 x 15,913 x 512 synthetic features")
    data = make_split("market", seed=args.seed)
    t_ours, ours = run_ours(data, args.metric, args.chunk)
    t_ours = min(t_ours, run_ours(data, args.metric, args.chunk)[0])  # best of 2 (warm caches)
    log(f"[market] ours:            {t_ours:7.2f} s   {summary(ours)}")

    if args.skip_python:
        log("[market] fastreid python: skipped (--skip-python)")
    else:
        t_py, ref = run_fastreid(data, args.metric, fastreid_python_ranker)
        log(f"[market] fastreid python: {t_py:7.2f} s")
        assert_same("fastreid python", ours, ref)
        market_speedup = t_py / t_ours
        t_py_market = t_py

    with tempfile.TemporaryDirectory(prefix="rank_cy_") as workdir:
        cy_ranker, why = build_cython_ranker(args.cython_dir, workdir)
        if cy_ranker is None:
            log(f"[market] fastreid cython: n/a ({why})")
        else:
            t_cy, ref = run_fastreid(data, args.metric, cy_ranker)
            t_cy = min(t_cy, run_fastreid(data, args.metric, cy_ranker)[0])
            log(f"[market] fastreid cython: {t_cy:7.2f} s   ({why})")
            assert_same("fastreid cython", ours, ref)
            market_speedup_cy = t_cy / t_ours
    del data

    # --- MSMT17 size ---
    if msmt is None:
        log("[msmt] skipped (--skip-msmt)")
    else:
        report = msmt["report"]
        msmt_rss = report["peak_rss_gb"]
        hwm = report.get("vm_hwm_gb")
        log(f"[msmt] ours:            {report['seconds']:7.2f} s   peak RSS {msmt_rss:.2f} GB "
            f"(ru_maxrss of the child; VmHWM {fmt(hwm)} GB; {report['rss_after_data_gb']:.2f} GB "
            f"of it reached by importing torch/fastreid and generating the data)")
        if args.msmt_fastreid and not args.skip_python:
            ours_msmt = (msmt["cmc"], msmt["ap"], msmt["inp"])
            data = make_split("msmt", seed=args.seed)
            t_py, ref = run_fastreid(data, args.metric, fastreid_python_ranker)
            log(f"[msmt] fastreid python: {t_py:7.2f} s   peak RSS of this process "
                f"{peak_rss_gb():.2f} GB")
            assert_same("fastreid python (msmt)", ours_msmt, ref)
            msmt_speedup = t_py / report["seconds"]
        else:
            note = ""
            if t_py_market is not None:
                # fastreid's Python ranker is O(q x g log g); q x g alone grows ~17.9x.
                scale = (SIZES["msmt"][0] * SIZES["msmt"][1]) / (SIZES["market"][0] * SIZES["market"][1])
                est = t_py_market * scale
                note = (f"; extrapolated from Market by q x g (x{scale:.1f}): >= {est:.0f} s, i.e. "
                        f"~{est / report['seconds']:.0f}x slower than ours -- an estimate, not measured")
            log("[msmt] fastreid python: not run (dense q x g path needs ~12 GB; pass "
                f"--msmt-fastreid){note} -> msmt_speedup=n/a")

    print(f"market_speedup={fmt(market_speedup)} market_speedup_vs_cython={fmt(market_speedup_cy)} "
          f"msmt_speedup={fmt(msmt_speedup)} msmt_peak_rss_gb={fmt(msmt_rss)}", flush=True)


def run_msmt_child(args):
    """Run :func:`child_msmt` in a fresh interpreter; returns its report and metric arrays."""
    with tempfile.TemporaryDirectory(prefix="msmt_") as tmp:
        child_out = os.path.join(tmp, "ours.npz")
        cmd = [sys.executable, os.path.abspath(__file__), "--child-msmt", "--child-out", child_out,
               "--metric", args.metric, "--chunk", str(args.chunk), "--seed", str(args.seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"MSMT child failed with exit code {proc.returncode}")
        saved = np.load(child_out)
        return {"report": json.loads(proc.stdout.strip().splitlines()[-1]),
                "cmc": saved["cmc"], "ap": saved["ap"], "inp": saved["inp"]}


if __name__ == "__main__":
    main()

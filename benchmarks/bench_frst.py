"""Benchmark: 3-D FRST (``transforms.frst.frst_3d``) against an ``np.add.at`` formulation of the same map.

Volume: 256 x 256 x 160 voxels (0.98 x 0.98 x 1.0 mm) of a synthetic SWI-like head: a bright ellipsoidal
brain on a dark background with a smooth bias field, dark spheres (radius 1-5 mm) and dark tubes (veins),
Gaussian noise; its brain mask is the ellipsoid. Radii 2, 3, 4, 5 mm (``--radii``), alpha 2, beta 0.05.

Two cases, each method getting the same inputs: ``brain`` (the call as the detector makes it: voters and the
gradient maximum restricted to the brain mask, which ``frst_3d`` also uses to crop the computation) and
``none`` (no mask: every voxel may vote, the whole volume is computed). Methods:

* ``reference_add_at``: the baseline, a straightforward formulation (scipy Sobel and Gaussian over the
  whole volume, float64, votes accumulated with ``np.add.at`` after a bounds test per vote);
* ``frst_f64_full_1thread``: ``frst_3d(dtype=float64, crop=False, workers=1)``, the exact reference path;
* ``frst_fast``: ``frst_3d(dtype=float32)`` with the default threads and cropping (what ``FRSTCandidatesd``
  runs on a CPU); ``frst_fast_1thread`` the same on one thread;
* ``candidates_fast``: ``frst_fast`` followed by ``find_candidates`` (the whole candidate stage);
* ``torch_f32_cpu`` / ``torch_f32_cuda``: the torch backend (skipped without a CUDA device).

Each (case, method) runs in a fresh subprocess (so peak RSS is its own): one warm-up call, then ``--repeats``
timed calls (median reported). Peak memory = the child's ``ru_maxrss`` minus its RSS before the first call
(after the volume was built), and ``tracemalloc``'s peak of NumPy allocations during one call. Each map is
compared with the reference's: max |a - b| / max |b|, Pearson correlation over the volume and inside the mask,
and the candidate list (``find_candidates`` with the detector's settings, top 300).

Run by hand (results go to docs/performance.md, "FRST candidate stage"), the machine stated there::

    OMP_NUM_THREADS=2 python benchmarks/bench_frst.py [--volume swi|noise] [--repeats 3] [--output FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = (256, 256, 160)
SPACING = (0.98, 0.98, 1.0)
RADII = (2.0, 3.0, 4.0, 5.0)
CASES = ("brain", "none")
METHODS = ("reference_add_at", "frst_f64_full_1thread", "frst_fast", "frst_fast_1thread", "candidates_fast",
           "torch_f32_cpu", "torch_f32_cuda")


def make_volume(seed: int = 0, kind: str = "swi") -> np.ndarray:
    """Synthetic float32 volume: ``"swi"`` (see the module docstring) or ``"noise"`` (worst case: Gaussian
    noise only, so about half of all voxels pass the gradient threshold and vote)."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return (400.0 + rng.normal(0.0, 12.0, SHAPE)).astype(np.float32)
    g = np.meshgrid(*[(np.arange(s) - s / 2) * sp for s, sp in zip(SHAPE, SPACING)], indexing="ij")
    brain = brain_mask()
    bias = 1.0 + 0.15 * np.sin(g[0] / 60) * np.cos(g[1] / 70)
    v = np.where(brain, 400.0 * bias, 20.0)
    for _ in range(60):  # dark spheres (CMB-like)
        c = [rng.uniform(-70, 70), rng.uniform(-70, 70), rng.uniform(-45, 45)]
        r = rng.uniform(1.0, 5.0)
        v[(g[0] - c[0]) ** 2 + (g[1] - c[1]) ** 2 + (g[2] - c[2]) ** 2 <= r**2] *= 0.35
    for _ in range(40):  # dark tubes (veins) along random axes
        ax = rng.integers(0, 3)
        a, b = [i for i in range(3) if i != ax]
        ca, cb = rng.uniform(-60, 60), rng.uniform(-40, 40)
        r = rng.uniform(0.6, 2.0)
        v[(g[a] - ca) ** 2 + (g[b] - cb) ** 2 <= r**2] *= 0.5
    v += rng.normal(0.0, 12.0, SHAPE)
    return np.abs(v).astype(np.float32)


def brain_mask() -> np.ndarray:
    """(X, Y, Z) bool: the synthetic head's brain (the bright ellipsoid of ``make_volume("swi")``), also used
    for the ``noise`` volume so that both volumes are benchmarked with the same mask."""
    g = np.meshgrid(*[(np.arange(s) - s / 2) * sp for s, sp in zip(SHAPE, SPACING)], indexing="ij")
    return (g[0] / 110) ** 2 + (g[1] / 115) ** 2 + (g[2] / 72) ** 2 <= 1.0


def frst_reference_add_at(vol: np.ndarray, spacing, radii_mm, alpha: float = 2.0, beta: float = 0.05,
                          mask: np.ndarray | None = None) -> np.ndarray:
    """The same transform accumulated with ``np.add.at`` (float64, bounds test per vote, whole volume): the
    baseline. With ``mask``, only voxels inside it vote and the gradient maximum is taken inside it."""
    from scipy import ndimage

    from transforms.frst import _gaussian_kernel1d, kappa_for_radius

    vol = np.asarray(vol, dtype=np.float64)
    shape = vol.shape
    grads = [ndimage.sobel(vol, axis=ax, mode="reflect") / (32.0 * spacing[ax]) for ax in range(3)]
    mag = np.sqrt(grads[0] ** 2 + grads[1] ** 2 + grads[2] ** 2)
    gmax = mag[mask].max() if mask is not None else mag.max()
    sel = mag > beta * gmax
    if mask is not None:
        sel &= mask
    idx = np.nonzero(sel)
    m = mag[idx]
    units = [grads[ax][idx] / m for ax in range(3)]
    out = np.zeros(shape)
    for n in radii_mm:
        kappa = kappa_for_radius(n)
        tgt = [idx[ax] - np.round(units[ax] * (n / spacing[ax])).astype(np.int64) for ax in range(3)]
        ok = np.ones(len(m), bool)
        for ax in range(3):
            ok &= (tgt[ax] >= 0) & (tgt[ax] < shape[ax])
        tgt = tuple(t[ok] for t in tgt)
        orient = np.zeros(shape)
        magn = np.zeros(shape)
        np.add.at(orient, tgt, 1.0)
        np.add.at(magn, tgt, m[ok])
        orient = np.minimum(orient, kappa)
        f = (magn / kappa) * (orient / kappa) ** alpha
        for ax in range(3):
            f = ndimage.correlate1d(f, _gaussian_kernel1d(0.25 * n / spacing[ax]), axis=ax, mode="reflect")
        out += f * n
    return out / len(radii_mm)


def accumulation_only(vol: np.ndarray, beta: float, repeats: int) -> dict:
    """Time only the vote accumulation (O_n and M_n for all radii, same votes): np.add.at vs np.bincount."""
    from scipy import ndimage

    g = [ndimage.sobel(vol.astype(np.float64), axis=a) / (32 * s) for a, s in enumerate(SPACING)]
    mag = np.sqrt(sum(x**2 for x in g))
    idx = np.nonzero(mag > beta * mag.max())
    m = mag[idx]
    flats = []
    for n in RADII:
        t = [idx[a] - np.round(g[a][idx] / m * (n / SPACING[a])).astype(np.int64) for a in range(3)]
        ok = np.all([(t[a] >= 0) & (t[a] < SHAPE[a]) for a in range(3)], axis=0)
        flats.append((np.ravel_multi_index(tuple(x[ok] for x in t), SHAPE), m[ok]))
    size = int(np.prod(SHAPE))

    def with_add_at():
        for flat, w in flats:
            o, mm = np.zeros(size), np.zeros(size)
            np.add.at(o, flat, 1.0)
            np.add.at(mm, flat, w)

    def with_bincount():
        for flat, w in flats:
            np.bincount(flat, minlength=size)
            np.bincount(flat, weights=w, minlength=size)

    res = {"n_votes_per_radius": int(len(m))}
    for name, fn in (("add_at_s", with_add_at), ("bincount_s", with_bincount)):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        res[name] = min(times)
    res["speedup"] = res["add_at_s"] / res["bincount_s"]
    return res


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(method: str, case: str, repeats: int, beta: float, radii: tuple[float, ...], map_out: str,
            kind: str = "swi") -> dict:
    """Time one method on one case in this process; save its map (and candidates) to ``map_out`` (.npz)."""
    import torch

    from transforms.candidates import find_candidates
    from transforms.frst import default_workers, frst_3d

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    vol = make_volume(kind=kind)
    mask = brain_mask() if case == "brain" else None
    if method == "torch_f32_cuda" and not torch.cuda.is_available():
        return {"method": method, "case": case, "skipped": "no CUDA device"}
    extra: dict = {}
    if method == "reference_add_at":
        def call():
            return frst_reference_add_at(vol, SPACING, radii, beta=beta, mask=mask)
    elif method == "frst_f64_full_1thread":
        def call():
            return frst_3d(vol, SPACING, radii_mm=radii, beta=beta, mask=mask, dtype=np.float64, workers=1, crop=False)
    elif method in ("frst_fast", "frst_fast_1thread"):
        workers = 1 if method.endswith("1thread") else None
        extra["workers"] = workers or default_workers()

        def call():
            return frst_3d(vol, SPACING, radii_mm=radii, beta=beta, mask=mask, dtype=np.float32, workers=workers)
    elif method == "candidates_fast":
        extra["workers"] = default_workers()

        def call():
            fmap = frst_3d(vol, SPACING, radii_mm=radii, beta=beta, mask=mask, dtype=np.float32)
            find_candidates(fmap, mask, SPACING, image=vol)
            return fmap
    else:
        device = "cuda" if method.endswith("cuda") else "cpu"
        t = torch.as_tensor(vol, device=device)
        tm = torch.as_tensor(mask, device=device) if mask is not None else None

        def call():
            out = frst_3d(t, SPACING, radii_mm=radii, beta=beta, mask=tm, dtype=torch.float32)
            if device == "cuda":
                torch.cuda.synchronize()
            return out.cpu().numpy()
    rss0 = _rss_mib()
    tracemalloc.start()
    out = call()  # warm-up, and the call whose allocations tracemalloc sees
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = call()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    coords, _ = find_candidates(out, mask, SPACING, image=vol)  # the detector's settings (tuned defaults)
    np.savez(map_out, map=np.asarray(out, dtype=np.float64), coords=coords)
    res = {"method": method, "case": case, "median_s": statistics.median(times), "times_s": times,
           "cpu_s": cpu, "peak_rss_mib": peak, "rss_before_mib": rss0, "peak_rss_increase_mib": peak - rss0,
           "tracemalloc_peak_mib": traced_peak / 2**20, **extra}
    if method == "torch_f32_cuda":
        res["device"] = torch.cuda.get_device_name(0)
    return res


def compare(path: str, ref_path: str, mask: np.ndarray | None) -> dict:
    """Map and candidate agreement of one method's output with the reference's."""
    with np.load(path) as a, np.load(ref_path) as b:
        m, r, ca, cb = a["map"], b["map"], a["coords"], b["coords"]
    res = {"max_rel_diff_vs_reference": float(np.abs(m - r).max() / np.abs(r).max()),
           "pearson_vs_reference": float(np.corrcoef(m.ravel(), r.ravel())[0, 1])}
    if mask is not None:
        res["pearson_in_mask_vs_reference"] = float(np.corrcoef(m[mask], r[mask])[0, 1])
    same = {tuple(c) for c in ca} & {tuple(c) for c in cb}
    res["candidates_identical"] = bool(len(ca) == len(cb) and np.array_equal(ca, cb))
    res["candidates_shared"] = f"{len(same)}/{len(cb)}"
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--radii", type=float, nargs="+", default=list(RADII))
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    p.add_argument("--volume", choices=("swi", "noise"), default="swi")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_map", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    radii = tuple(float(r) for r in args.radii)
    if args._run:
        print(json.dumps(run_one(args._run, args._case, args.repeats, args.beta, radii, args._map, args.volume)))
        return
    try:
        from cmb_synthesis.progress import progress
    except ImportError:  # an older checkout without the progress helper
        def progress(items, desc):  # noqa: ARG001
            return items

    load_before = os.getloadavg()
    results = []
    jobs = [(case, method) for case in args.cases for method in args.methods]
    with tempfile.TemporaryDirectory() as tmp:
        maps = {}
        for case, method in progress(jobs, "bench_frst"):
            map_path = os.path.join(tmp, f"{case}_{method}.npz")
            proc = subprocess.run([sys.executable, __file__, "--_run", method, "--_case", case, "--_map", map_path,
                                   "--repeats", str(args.repeats), "--beta", str(args.beta),
                                   "--volume", args.volume, "--radii", *map(str, radii)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"bench_frst: {method} ({case}) failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(res)
            if "skipped" not in res:
                maps[(case, method)] = map_path
            print(json.dumps(res), flush=True)
        for r in results:
            if "skipped" in r:
                continue
            ref = next((x for x in results if x["case"] == r["case"] and x["method"] == "reference_add_at"), None)
            if ref is not None:
                r["speedup_vs_add_at"] = ref["median_s"] / r["median_s"]
                r["cpu_speedup_vs_add_at"] = statistics.median(ref["cpu_s"]) / statistics.median(r["cpu_s"])
                r.update(compare(maps[(r["case"], r["method"])], maps[(r["case"], "reference_add_at")],
                                 brain_mask() if r["case"] == "brain" else None))
        vol = make_volume(kind=args.volume)
        from scipy import ndimage

        g = [ndimage.sobel(vol.astype(np.float64), axis=a) / (32 * s) for a, s in enumerate(SPACING)]
        mag = np.sqrt(sum(x**2 for x in g))
        n_voters = int((mag > args.beta * mag.max()).sum())
        bm = brain_mask()
        n_voters_brain = int(((mag > args.beta * mag[bm].max()) & bm).sum())
        accumulation = accumulation_only(vol, args.beta, args.repeats)
    summary = {
        "machine": f"{os.cpu_count()}-core CPU VM ({platform.processor() or platform.machine()}), shared with "
                   f"other jobs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "python": platform.python_version(), "numpy": np.__version__,
        "volume": args.volume, "shape": SHAPE, "spacing": SPACING, "radii_mm": radii, "beta": args.beta,
        "n_voters_no_mask": n_voters, "n_voters_brain_mask": n_voters_brain, "brain_mask_voxels": int(bm.sum()),
        "repeats": args.repeats, "results": results, "accumulation_only": accumulation,
    }
    print("\n| mask | method | median (best) s | vs np.add.at | CPU s (median) | peak RSS increase MiB | "
          "max rel diff | Pearson (in mask) | candidates as reference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "skipped" in r:
            print(f"| {r['case']} | {r['method']} | skipped: {r['skipped']} | | | | | | |")
            continue
        corr = f"{r.get('pearson_vs_reference', float('nan')):.6f}"
        if "pearson_in_mask_vs_reference" in r:
            corr += f" ({r['pearson_in_mask_vs_reference']:.6f})"
        print(f"| {r['case']} | {r['method']} | {r['median_s']:.2f} ({min(r['times_s']):.2f}) | "
              f"{r.get('speedup_vs_add_at', float('nan')):.1f}x | {statistics.median(r['cpu_s']):.2f} | "
              f"{r['peak_rss_increase_mib']:.0f} | {r.get('max_rel_diff_vs_reference', float('nan')):.1e} | {corr} | "
              f"{'identical' if r.get('candidates_identical') else r.get('candidates_shared', '')} |")
    print(f"voters (|g| > beta max|g|): {n_voters} of {int(np.prod(SHAPE))} voxels without a mask, "
          f"{n_voters_brain} with the brain mask ({int(bm.sum())} voxels)")
    a = accumulation
    print(f"accumulation only (O_n, M_n for {len(RADII)} radii): np.add.at {a['add_at_s']:.3f} s, np.bincount "
          f"{a['bincount_s']:.3f} s, {a['speedup']:.1f}x")
    print(f"load average before {load_before}, after {os.getloadavg()}")
    if args.output:
        from cmb_synthesis.data.io import write_json

        write_json(summary, args.output)


if __name__ == "__main__":
    main()

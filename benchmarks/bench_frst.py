"""Benchmark: 3-D FRST (``transforms.frst.frst_3d``) against an ``np.add.at`` formulation.

Volume: 256 x 256 x 160 voxels (0.98 x 0.98 x 1.0 mm) of a synthetic SWI-like head: a bright ellipsoidal
brain on a dark background with a smooth bias field, dark spheres (radius 1-5 mm) and dark tubes (veins),
Gaussian noise. Radii 2, 3, 4, 5 mm, alpha 2, beta as given (default 0.05).

Each method runs in a fresh subprocess (so peak RSS is its own): one warm-up call, then ``--repeats``
timed calls (median reported). Peak memory = the child's ``ru_maxrss`` minus its RSS before the first call
(after the volume was built), and ``tracemalloc``'s peak of NumPy allocations during one call. The reference
keeps the same algorithm but accumulates with ``np.add.at`` (bounds test per vote, float64), and its map is
compared with each method's.

Run by hand (results go to docs/performance.md, "FRST candidate stage")::

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
METHODS = ("reference_add_at", "numpy_f64", "numpy_f32_2threads", "torch_f32_cpu", "torch_f32_cuda")


def make_volume(seed: int = 0, kind: str = "swi") -> np.ndarray:
    """Synthetic float32 volume: ``"swi"`` (see the module docstring) or ``"noise"`` (worst case: Gaussian
    noise only, so about half of all voxels pass the gradient threshold and vote)."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return (400.0 + rng.normal(0.0, 12.0, SHAPE)).astype(np.float32)
    g = np.meshgrid(*[(np.arange(s) - s / 2) * sp for s, sp in zip(SHAPE, SPACING)], indexing="ij")
    brain = (g[0] / 110) ** 2 + (g[1] / 115) ** 2 + (g[2] / 72) ** 2 <= 1.0
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


def frst_reference_add_at(vol: np.ndarray, spacing, radii_mm, alpha: float = 2.0, beta: float = 0.05) -> np.ndarray:
    """The same transform accumulated with ``np.add.at`` (float64, bounds test per vote): the baseline."""
    from scipy import ndimage

    from transforms.frst import _gaussian_kernel1d, kappa_for_radius

    vol = np.asarray(vol, dtype=np.float64)
    shape = vol.shape
    grads = [ndimage.sobel(vol, axis=ax, mode="reflect") / (32.0 * spacing[ax]) for ax in range(3)]
    mag = np.sqrt(grads[0] ** 2 + grads[1] ** 2 + grads[2] ** 2)
    sel = mag > beta * mag.max()
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


def run_one(method: str, repeats: int, beta: float, map_out: str, kind: str = "swi") -> dict:
    """Time one method in this process; save its map to ``map_out`` (.npy)."""
    import torch

    from transforms.frst import frst_3d

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    vol = make_volume(kind=kind)
    if method == "torch_f32_cuda" and not torch.cuda.is_available():
        return {"method": method, "skipped": "no CUDA device"}
    if method == "reference_add_at":
        def call():
            return frst_reference_add_at(vol, SPACING, RADII, beta=beta)
    elif method == "numpy_f64":
        def call():
            return frst_3d(vol, SPACING, radii_mm=RADII, beta=beta, dtype=np.float64, workers=1)
    elif method == "numpy_f32_2threads":
        def call():
            return frst_3d(vol, SPACING, radii_mm=RADII, beta=beta, dtype=np.float32, workers=2)
    else:
        device = "cuda" if method.endswith("cuda") else "cpu"
        t = torch.as_tensor(vol, device=device)

        def call():
            out = frst_3d(t, SPACING, radii_mm=RADII, beta=beta, dtype=torch.float32)
            if device == "cuda":
                torch.cuda.synchronize()
            return out.cpu().numpy()
    rss0 = _rss_mib()
    tracemalloc.start()
    out = call()  # warm-up, and the call whose allocations tracemalloc sees
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(map_out, np.asarray(out, dtype=np.float64))
    res = {"method": method, "median_s": statistics.median(times), "times_s": times,
           "peak_rss_mib": peak, "rss_before_mib": rss0, "peak_rss_increase_mib": peak - rss0,
           "tracemalloc_peak_mib": traced_peak / 2**20}
    if method == "torch_f32_cuda":
        res["device"] = torch.cuda.get_device_name(0)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--volume", choices=("swi", "noise"), default="swi")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_map", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._run:
        print(json.dumps(run_one(args._run, args.repeats, args.beta, args._map, args.volume)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        maps = {}
        for method in args.methods:
            map_path = os.path.join(tmp, f"{method}.npy")
            proc = subprocess.run([sys.executable, __file__, "--_run", method, "--_map", map_path,
                                   "--repeats", str(args.repeats), "--beta", str(args.beta),
                                   "--volume", args.volume],
                                  capture_output=True, text=True, check=True)
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(res)
            if "skipped" not in res:
                maps[method] = map_path
            print(json.dumps(res), flush=True)
        ref_time = next((r["median_s"] for r in results if r["method"] == "reference_add_at"), None)
        ref_map = np.load(maps["reference_add_at"]) if "reference_add_at" in maps else None
        n_voters = None
        for r in results:
            if "skipped" in r:
                continue
            if ref_time:
                r["speedup_vs_add_at"] = ref_time / r["median_s"]
            if ref_map is not None:
                r["max_rel_diff_vs_reference"] = float(np.abs(np.load(maps[r["method"]]) - ref_map).max()
                                                       / np.abs(ref_map).max())
        vol = make_volume(kind=args.volume)
        from scipy import ndimage

        g = [ndimage.sobel(vol.astype(np.float64), axis=a) / (32 * s) for a, s in enumerate(SPACING)]
        mag = np.sqrt(sum(x**2 for x in g))
        n_voters = int((mag > args.beta * mag.max()).sum())
        accumulation = accumulation_only(vol, args.beta, args.repeats)
    summary = {
        "machine": f"{os.cpu_count()}-core CPU VM ({platform.processor() or platform.machine()}), "
                   f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        "python": platform.python_version(), "numpy": np.__version__,
        "volume": args.volume, "shape": SHAPE, "spacing": SPACING, "radii_mm": RADII, "beta": args.beta, "n_voters": n_voters,
        "repeats": args.repeats, "results": results, "accumulation_only": accumulation,
    }
    print("\n| method | median s | best s | speed-up vs np.add.at (median) | peak RSS increase MiB | tracemalloc peak MiB | max rel diff |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "skipped" in r:
            print(f"| {r['method']} | skipped: {r['skipped']} | | | | | |")
            continue
        print(f"| {r['method']} | {r['median_s']:.2f} | {min(r['times_s']):.2f} | {r.get('speedup_vs_add_at', float('nan')):.1f}x | "
              f"{r['peak_rss_increase_mib']:.0f} | {r['tracemalloc_peak_mib']:.0f} | "
              f"{r.get('max_rel_diff_vs_reference', float('nan')):.1e} |")
    print(f"voters (|g| > beta max|g|): {n_voters} of {int(np.prod(SHAPE))} voxels")
    a = accumulation
    print(f"accumulation only (O_n, M_n for {len(RADII)} radii): np.add.at {a['add_at_s']:.3f} s, np.bincount "
          f"{a['bincount_s']:.3f} s, {a['speedup']:.1f}x")
    if args.output:
        from cmb_synthesis.data.io import write_json

        write_json(summary, args.output)


if __name__ == "__main__":
    main()

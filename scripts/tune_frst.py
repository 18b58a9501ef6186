"""Tune the FRST candidate-stage defaults on the TRAINING split of a phantom cohort (never on test).

Coordinate descent from the current defaults over radii sets, alpha, beta, intensity pre-smoothing,
non-maximum-suppression distance and darkest-voxel snapping, with the cap per scan fixed
(``--max_candidates``, default 300). Objective, compared lexicographically: candidate sensitivity with
the cap (fraction of CMBs of the training scans hit by a candidate, the FROC hit rule), then the
sensitivity with only the top 50 candidates per scan, then the CPM of the FRST score alone used as a
detector (how well FRST ranks CMBs above the other maxima), then fewer candidates per scan. Each round varies one parameter at a time around the best setting so far and
stops when a round improves nothing (or after ``--rounds``).

    OMP_NUM_THREADS=2 python scripts/tune_frst.py --datalist /tmp/cohort_default/datalist.json \
        --output /tmp/tune_frst.json [--max_scans 12]

Writes every evaluated setting with its numbers and the best one; the chosen values are copied by hand
into ``transforms/frst.py`` (``DEFAULT_*``) and documented in ``docs/frst.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from candidate_stage import load_scan, load_split  # noqa: E402

from cmb_synthesis.evaluation import froc  # noqa: E402
from cmb_synthesis.evaluation.hits import match_candidates  # noqa: E402
from transforms import candidates, frst  # noqa: E402

GRID: dict[str, list[Any]] = {
    "radii_mm": [(1.0, 1.5, 2.0, 3.0), (1.0, 2.0, 3.0), (1.0, 1.5, 2.0), (1.5, 2.0, 3.0, 4.0),
                 (1.0, 1.5, 2.0, 2.5, 3.0, 4.0), (0.75, 1.0, 1.5, 2.0), (2.0, 3.0, 4.0, 5.0)],
    "alpha": [1.0, 2.0, 3.0],
    "beta": [0.0, 0.02, 0.05, 0.1, 0.2],
    "presmooth_sigma_mm": [0.0, 0.5, 1.0],
    "min_distance_mm": [2.0, 3.0, 4.0, 5.0],
    "snap_radius_mm": [0.0, 1.0, 1.5],
}
FRST_KEYS = ("radii_mm", "alpha", "beta", "presmooth_sigma_mm")
TOP_K = (25, 50, 100)


def evaluate_setting(scans: list[dict[str, Any]], s: dict[str, Any], cap: int, cache: dict) -> dict[str, Any]:
    """Candidate-stage numbers of one setting on the loaded scans (FRST maps cached per FRST setting)."""
    fkey = tuple((k, s[k]) for k in FRST_KEYS)
    hits, n_les, n_cand, seconds, results = 0, 0, [], 0.0, []
    hits_k = {k: 0 for k in TOP_K}
    for i, scan in enumerate(scans):
        t0 = time.perf_counter()
        if (fkey, i) not in cache:
            cache[(fkey, i)] = frst.frst_3d(
                scan["image"], scan["spacing"], mask=scan["brainmask"], dtype=np.float32, workers=2, radii_mm=s["radii_mm"],
                alpha=s["alpha"], beta=s["beta"], presmooth_sigma_mm=s["presmooth_sigma_mm"])
        fmap = cache[(fkey, i)]
        coords, scores = candidates.find_candidates(fmap, scan["brainmask"], scan["spacing"], image=scan["image"],
                                              min_distance_mm=s["min_distance_mm"], max_candidates=cap,
                                              snap_radius_mm=s["snap_radius_mm"])
        seconds += time.perf_counter() - t0
        r = match_candidates(scan["id"], coords, scores, scan["label"])
        results.append(r)
        hits += int((~np.isnan(r.lesion_scores)).sum())
        for k in TOP_K:
            rk = match_candidates(scan["id"], coords[:k], scores[:k], scan["label"])
            hits_k[k] += int((~np.isnan(rk.lesion_scores)).sum())
        n_les += len(r.lesion_scores)
        n_cand.append(len(coords))
    frst_only = froc.evaluate(results, n_bootstrap=0)
    return {"sensitivity": hits / max(n_les, 1),
            **{f"sensitivity_top{k}": hits_k[k] / max(n_les, 1) for k in TOP_K},
            "frst_score_cpm": frst_only["cpm"], "candidates_per_scan": float(np.mean(n_cand)), "n_lesions": n_les,
            "seconds": seconds}


def objective(m: dict[str, Any]) -> tuple:
    return (round(m["sensitivity"], 6), round(m["sensitivity_top50"], 6), round(m["frst_score_cpm"], 6),
            -m["candidates_per_scan"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datalist", required=True)
    p.add_argument("--split", default="training", choices=("training",), help="tuning uses the training split only")
    p.add_argument("--max_scans", type=int, default=None, help="first N pathological training scans")
    p.add_argument("--max_candidates", type=int, default=frst.DEFAULT_MAX_CANDIDATES)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--output", required=True)
    args = p.parse_args()
    items = [it for it in load_split(args.datalist, args.split) if it.get("group", "pathological") == "pathological"]
    items = items[: args.max_scans]
    scans = []
    for it in items:
        sc = load_scan(it)
        scans.append({k: sc[k] for k in ("id", "image", "brainmask", "label", "spacing")})
    print(f"{len(scans)} pathological training scans", flush=True)
    best = {"radii_mm": tuple(frst.DEFAULT_RADII_MM), "alpha": frst.DEFAULT_ALPHA, "beta": frst.DEFAULT_BETA,
            "presmooth_sigma_mm": frst.DEFAULT_PRESMOOTH_SIGMA_MM, "min_distance_mm": frst.DEFAULT_MIN_DISTANCE_MM,
            "snap_radius_mm": frst.DEFAULT_SNAP_RADIUS_MM}
    seen: dict[str, dict[str, Any]] = {}
    cache: dict = {}

    def run(s: dict[str, Any]) -> dict[str, Any]:
        key = json.dumps(s, sort_keys=True)
        if key not in seen:
            fkey = tuple((k, s[k]) for k in FRST_KEYS)
            for k in [k for k in cache if k[0] != fkey]:  # keep memory bounded: one FRST setting's maps
                del cache[k]
            m = evaluate_setting(scans, s, args.max_candidates, cache)
            seen[key] = {"setting": dict(s), **m}
            print(json.dumps(seen[key]), flush=True)
        return seen[key]

    best_m = run(best)
    for rnd in range(args.rounds):
        improved = False
        for name, values in GRID.items():
            for v in values:
                cand = dict(best, **{name: v})
                m = run(cand)
                if objective(m) > objective(best_m):
                    best, best_m, improved = cand, m, True
        print(f"round {rnd + 1}: best {json.dumps(best_m)}", flush=True)
        if not improved:
            break
    from cmb_synthesis.data.io import write_json

    write_json({"datalist": args.datalist, "split": args.split, "n_scans": len(scans),
                "max_candidates": args.max_candidates, "objective": "sensitivity at the cap, then top-50 sensitivity, "
                "then FRST-score CPM, then fewer candidates", "machine": f"{os.cpu_count()}-core CPU VM, no GPU",
                "best": best_m, "evaluated": list(seen.values())}, args.output)
    print("best:", json.dumps(best_m, indent=1))


if __name__ == "__main__":
    main()

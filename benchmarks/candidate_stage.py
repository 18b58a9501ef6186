"""Candidate stage of the CMB detector: FRST candidate sensitivity and candidates per scan on a datalist split.

For every scan of the split: preprocess as the detector does (``transforms.pipelines.preprocessing``:
load, RAS, percentile clip + rescale to [0, 1] inside the brain mask), FRST candidates inside the brain mask
(``transforms.candidates.FRSTCandidatesd`` with the given settings, defaults = the tuned defaults), then the FROC
hit rule (``cmb_synthesis.evaluation.hits.match_candidates``: a candidate hits a CMB when its voxel lies in the CMB's
instance mask). Reports the fraction of CMBs hit by at least one candidate, candidates per scan, the same at
smaller caps, the missed CMBs' sizes, seconds per scan, and the FROC of the FRST score alone.

Run by hand, e.g. on the default phantom test split::

    OMP_NUM_THREADS=2 python benchmarks/candidate_stage.py --datalist /tmp/cohort_default/datalist.json \
        --split test --output /tmp/candidate_stage_test.json

Settings of ``FRSTCandidatesd`` can be overridden: ``--radii_mm 1 1.5 2 3 --beta 0.05 --max_candidates 300``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmb_synthesis.evaluation import froc  # noqa: E402
from cmb_synthesis.evaluation.hits import match_candidates  # noqa: E402
from transforms import candidates, frst  # noqa: E402

CAPS = (25, 50, 100, 200, 300, 500)


def load_split(datalist: str, split: str) -> list[dict[str, Any]]:
    """Items of a split with absolute paths (``monai.data.load_decathlon_datalist``)."""
    from monai.data import load_decathlon_datalist

    if not Path(datalist).is_file():
        raise FileNotFoundError(f"{datalist}: datalist does not exist")
    return load_decathlon_datalist(datalist, True, split)


def load_scan(item: dict[str, Any]) -> dict[str, Any]:
    """Preprocessed scan: ``image`` (X, Y, Z) float32 in [0, 1], ``brainmask`` bool, ``label`` int instance
    labels, ``spacing`` (mm), ``id``; via the project's preprocessing pipeline when it is installed."""
    try:
        from transforms.pipelines import preprocessing
    except ImportError:  # transforms.pipelines not landed yet: plain nibabel loading, same voxel grid
        preprocessing = None
    if preprocessing is not None:
        d = preprocessing(keys=("image",), mask_keys=("brainmask",), label_keys=("label",))(
            {"image": item["image"], "brainmask": item["brainmask"], "label": item["label"]})
        img, bm, lab = (np.asarray(d[k][0]) for k in ("image", "brainmask", "label"))
        spacing = candidates.spacing_from_affine(d["image"].affine)
        how = "transforms.pipelines.preprocessing"
    else:
        from cmb_synthesis.data.io import load_nifti

        img, aff, _ = load_nifti(item["image"])
        bm = load_nifti(item["brainmask"], np.uint8)[0]
        lab = load_nifti(item["label"], np.int64)[0]
        spacing = candidates.spacing_from_affine(aff)
        how = "nibabel (raw intensities; FRST candidates do not depend on the intensity scale)"
    return {"id": str(item.get("id") or Path(item["image"]).name), "image": img.astype(np.float32),
            "brainmask": bm > 0, "label": lab.astype(np.int64), "spacing": spacing, "loader": how,
            "lesions_csv": item.get("lesions")}


def lesion_diameters(scan: dict[str, Any]) -> dict[int, float]:
    """{label: diameter_mm} from the phantom's lesion table, when present."""
    path = scan.get("lesions_csv")
    if not path or not Path(path).is_file():
        return {}
    with open(path, newline="") as f:
        return {int(r["label"]): float(r["diameter_mm"]) for r in csv.DictReader(f) if r.get("label")}


def run_scan(scan: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Candidates of one scan and their hits: returns coords, scores, the ScanResult and the time."""
    t0 = time.perf_counter()
    fmap = frst.frst_3d(scan["image"], scan["spacing"], mask=scan["brainmask"], **settings["frst"])
    coords, scores = candidates.find_candidates(fmap, scan["brainmask"], scan["spacing"], image=scan["image"],
                                          **settings["candidates"])
    seconds = time.perf_counter() - t0
    result = match_candidates(scan["id"], coords, scores, scan["label"])
    return {"coords": coords, "scores": scores, "result": result, "seconds": seconds}


def summarize(scans: list[dict[str, Any]], runs: list[dict[str, Any]], caps=CAPS) -> dict[str, Any]:
    """Candidate sensitivity (overall and at smaller caps), candidates per scan, misses by size."""
    n_les = sum(len(r["result"].lesion_scores) for r in runs)
    n_cand = np.array([len(r["coords"]) for r in runs])
    hit = sum(int((~np.isnan(r["result"].lesion_scores)).sum()) for r in runs)
    at_cap = {}
    for cap in caps:
        h = 0
        for scan, r in zip(scans, runs):
            res = match_candidates(scan["id"], r["coords"][:cap], r["scores"][:cap], scan["label"])
            h += int((~np.isnan(res.lesion_scores)).sum())
        at_cap[str(cap)] = h / n_les if n_les else None
    missed = []
    for scan, r in zip(scans, runs):
        ids = np.unique(scan["label"])
        ids = ids[ids > 0]
        diam = lesion_diameters(scan)
        for lab_id, s in zip(ids, r["result"].lesion_scores):
            if np.isnan(s):
                missed.append({"scan": scan["id"], "label": int(lab_id), "diameter_mm": diam.get(int(lab_id)),
                               "n_voxels": int((scan["label"] == lab_id).sum())})
    out = {
        "n_scans": len(runs), "n_lesions": n_les, "n_lesions_hit": hit,
        "candidate_sensitivity": hit / n_les if n_les else None,
        "candidates_per_scan_mean": float(n_cand.mean()) if len(n_cand) else 0.0,
        "candidates_per_scan_median": float(np.median(n_cand)) if len(n_cand) else 0.0,
        "candidates_per_scan_max": int(n_cand.max()) if len(n_cand) else 0,
        "sensitivity_with_top_k": at_cap,
        "seconds_per_scan_mean": float(np.mean([r["seconds"] for r in runs])) if runs else 0.0,
        "missed": missed,
    }
    if n_les:
        m = froc.evaluate([r["result"] for r in runs], n_bootstrap=0)
        out["frst_score_only"] = {"sensitivity_at_fp": m["sensitivity_at_fp"], "cpm": m["cpm"]}
    return out


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "frst": {"radii_mm": tuple(args.radii_mm), "alpha": args.alpha, "beta": args.beta,
                 "presmooth_sigma_mm": args.presmooth_sigma_mm},
        "candidates": {"min_distance_mm": args.min_distance_mm, "max_candidates": args.max_candidates,
                       "snap_radius_mm": args.snap_radius_mm},
    }


def add_setting_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--radii_mm", type=float, nargs="+", default=list(frst.DEFAULT_RADII_MM))
    p.add_argument("--alpha", type=float, default=frst.DEFAULT_ALPHA)
    p.add_argument("--beta", type=float, default=frst.DEFAULT_BETA)
    p.add_argument("--presmooth_sigma_mm", type=float, default=frst.DEFAULT_PRESMOOTH_SIGMA_MM)
    p.add_argument("--min_distance_mm", type=float, default=frst.DEFAULT_MIN_DISTANCE_MM)
    p.add_argument("--max_candidates", type=int, default=frst.DEFAULT_MAX_CANDIDATES)
    p.add_argument("--snap_radius_mm", type=float, default=frst.DEFAULT_SNAP_RADIUS_MM)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datalist", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--output", required=True, help="JSON file with the results")
    p.add_argument("--max_scans", type=int, default=None, help="only the first N scans of the split")
    add_setting_args(p)
    args = p.parse_args()
    settings = settings_from_args(args)
    items = load_split(args.datalist, args.split)[: args.max_scans]
    scans, runs, failures, loader = [], [], [], None
    for item in items:
        try:
            scan = load_scan(item)
            run = run_scan(scan, settings)
        except (ValueError, FileNotFoundError) as e:  # a bad scan is reported, the others still run
            failures.append({"image": item.get("image"), "error": str(e)})
            print(f"skipped: {e}", file=sys.stderr)
            continue
        loader = scan["loader"]
        scans.append({k: scan[k] for k in ("id", "label", "lesions_csv")})
        runs.append(run)
        r = run["result"]
        print(f"{scan['id']}: {len(run['coords'])} candidates, {int((~np.isnan(r.lesion_scores)).sum())}/"
              f"{len(r.lesion_scores)} CMBs hit, {run['seconds']:.2f} s", flush=True)
    summary = summarize(scans, runs)
    report = {"datalist": str(args.datalist), "split": args.split, "settings": settings,
              "loader": loader,
              "machine": f"{os.cpu_count()}-core CPU VM, no GPU, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
              **summary, "failures": failures}
    from cmb_synthesis.data.io import write_json

    write_json(report, args.output)
    print(json.dumps({k: v for k, v in report.items() if k not in ("missed",)}, indent=1))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()

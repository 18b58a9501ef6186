"""One calibration round of the ``benchmark`` phantom: generate, train the real-only detector, evaluate on VALIDATION.

    OMP_NUM_THREADS=1 python scripts/calibrate_benchmark.py --round r1 --workdir /tmp/calib \\
        [--seed 0] [--option KEY=VALUE ...] [--site-option SITE:KEY=VALUE ...] [--min-mean-lesions N] \\
        [--note TEXT] \\
        [--record docs/results/calibration]

Steps (each skipped when its output already exists in ``<workdir>/<round>/``, so an interrupted round resumes):

1. ``python -m cmb_synthesis.phantom --preset benchmark --seed S --n-test-pathological 0 [--option ...]
   [--site-option ...] [--min-mean-lesions N]`` into ``cohort/``: training and validation splits only (the test split is never
   generated while calibrating, so it cannot be looked at);
2. the detection bundle's default CPU training, real-only and without cDA (``python -m monai.bundle run
   training --config_file bundles/cmb_detection/configs/train.yaml --datalist ... --ckpt_dir ... --cache_dir
   ... --log_dir ... --training_data real --cda false``) into ``models/``;
3. its evaluation on the **validation** split (the ``evaluate.yaml`` overlay, ``--split validation``) into
   ``eval/``;
4. a per-lesion breakdown of the validation detections at 10 FP/scan (by site, contrast and apparent size),
   from ``eval/candidates.csv`` and the cohort's label maps and lesion tables, with what the false positives
   above that threshold lie on (mimic type, vein, tissue).

The round is appended to (or replaces the same-named round of) ``<record>/rounds.json`` with its options, the
validation sensitivity at 1/2/4/8/10 FP/scan with 95 % bootstrap CIs, CPM, the candidate-stage sensitivity,
the breakdown, the wall time of each step and the commands; ``<record>/<round>_metrics.json`` keeps the
evaluation's ``metrics.json`` without its full-resolution curve (``curve``; the ``curve_ci95`` grid stays).
Every file is written atomically. Exit code 2 on bad arguments, 1 when a step fails (its log is named).
``python scripts/calibrate_benchmark.py --table [--record DIR]`` prints the rounds as the Markdown table of
``docs/phantom.md``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmb_synthesis.data.io import write_json  # noqa: E402
from cmb_synthesis.evaluation.hits import match_candidates  # noqa: E402

FP_RATES = ("1", "2", "4", "8", "10")
# the lesion and mimic options of the benchmark preset (recorded per round as generated)
REALISM_KEYS = ("lesion_model", "faint_fraction", "deposit_median_mm", "lesion_depth", "faint_depth",
                "n_vein_branches", "n_cross_vessels", "mineralisation_rate", "pineal_prob", "choroid_prob",
                "flow_void_prob", "artefact_depth")
TRAIN_CFG = "bundles/cmb_detection/configs/train.yaml"
EVAL_CFG = "['bundles/cmb_detection/configs/train.yaml','bundles/cmb_detection/configs/evaluate.yaml']"


def _run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` in the repository with OMP_NUM_THREADS=1 (unless set); stdout+stderr to ``log``; wall s."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise RuntimeError(f"step failed (exit {rc}): {' '.join(cmd)}; see {log}")
    return time.time() - t0


def _threshold_at(fp_scores: np.ndarray, n_scans: int, rate: float) -> float:
    """Lowest threshold t such that the candidates scoring >= t include at most ``rate`` FP/scan on average
    (the step interpolation of ``cmb_synthesis.evaluation.froc``); +inf when even one FP is too many."""
    allowed = int(np.floor(rate * n_scans + 1e-9))
    s = np.sort(fp_scores)[::-1]
    if allowed >= len(s):
        return -np.inf
    # a threshold just above the (allowed+1)-th highest FP score; ties at that score are all excluded
    return float(np.nextafter(s[allowed], np.inf))


def breakdown(datalist: Path, candidates_csv: Path, split: str = "validation", rate: float = 10.0) -> dict[str, Any]:
    """Lesions detected at ``rate`` FP/scan on ``split``, grouped by site, contrast and apparent diameter.

    Candidates are those of the evaluation (``candidates.csv``: voxel indices in each image file's grid, which
    for the phantom is the label map's grid); the hit rule is ``cmb_synthesis.evaluation.hits``.
    Returns ``{"threshold", "overall", "by_site", "by_contrast", "by_diameter_mm"}``, each group as
    ``{"n": lesions, "detected": n, "sensitivity": fraction}``; ``candidate_hit`` counts lesions any candidate hit.
    """
    root = datalist.parent
    items = json.loads(datalist.read_text())[split]
    cands: dict[str, list[tuple[int, int, int, float]]] = {}
    with open(candidates_csv, newline="") as f:
        for r in csv.DictReader(f):
            cands.setdefault(Path(r["image"]).name, []).append((int(r["i"]), int(r["j"]), int(r["k"]),
                                                                float(r["probability"])))
    lesions, fps, fp_types = [], [], []
    codes = {0: "none"}
    cohort_json = root / "cohort.json"
    if cohort_json.is_file():
        codes.update({int(v): k for k, v in json.loads(cohort_json.read_text()).get("mimic_codes", {}).items()})
    for it in items:
        c = np.asarray(cands.get(Path(it["image"]).name, []), dtype=np.float64).reshape(-1, 4)
        lab = np.asarray(nib.load(str(root / it["label"])).dataobj)
        res = match_candidates(it["id"], c[:, :3].astype(np.int64), c[:, 3], lab)
        fps.append(res.fp_scores)
        fp_types += _fp_types(root, it, c, lab, codes)
        with open(root / it["lesions"], newline="") as f:
            rows = sorted(csv.DictReader(f), key=lambda r: int(r["label"]))
        ids = np.unique(lab[lab > 0])
        by_id = {int(r["label"]): r for r in rows}
        for lid, score in zip(ids, res.lesion_scores):
            r = by_id.get(int(lid), {})
            lesions.append({"site": it.get("site"), "score": score, "contrast": float(r.get("contrast", "nan")),
                            "diameter_mm": float(r.get("diameter_mm", "nan"))})
    thr = _threshold_at(np.concatenate(fps) if fps else np.zeros(0), len(items), rate)

    def group(sel: list[dict]) -> dict[str, Any]:
        det = sum(1 for x in sel if not np.isnan(x["score"]) and x["score"] >= thr)
        hit = sum(1 for x in sel if not np.isnan(x["score"]))
        return {"n": len(sel), "detected": det, "candidate_hit": hit,
                "sensitivity": round(det / len(sel), 4) if sel else None}

    top = [t for p_, t in fp_types if p_ >= thr]
    fp_at_rate = {t: top.count(t) for t in sorted(set(top), key=lambda t: -top.count(t))}
    sites = sorted({x["site"] for x in lesions if x["site"] is not None})
    contrast_bins = (("faint <0.45", 0.0, 0.45), ("0.45-0.6", 0.45, 0.6), (">=0.6", 0.6, 9.0))
    size_bins = (("<2.5", 0.0, 2.5), ("2.5-3", 2.5, 3.0), ("3-5", 3.0, 5.0), (">=5", 5.0, 99.0))
    return {
        "rate_fp_per_scan": rate, "threshold": None if not np.isfinite(thr) else thr,
        "overall": group(lesions),
        "by_site": {s: group([x for x in lesions if x["site"] == s]) for s in sites},
        "by_contrast": {n: group([x for x in lesions if lo <= x["contrast"] < hi]) for n, lo, hi in contrast_bins},
        "by_diameter_mm": {n: group([x for x in lesions if lo <= x["diameter_mm"] < hi]) for n, lo, hi in size_bins},
        "false_positives_by_type": fp_at_rate,
    }


def _fp_types(root: Path, item: dict, cands: np.ndarray, lab: np.ndarray, codes: dict[int, str]) -> list[tuple[float, str]]:
    """(probability, what it lies on) of each false-positive candidate of one scan: a mimic type of the mimic map
    (the voxel or its 3 x 3 x 3 neighbourhood), else ``vein`` (the vein mask dilated by one voxel), else its
    tissue class (``deep_gm``, ``csf``, ``tissue``, ``outside``)."""
    from scipy import ndimage

    mm = np.asarray(nib.load(str(root / item["mimic_map"])).dataobj) if item.get("mimic_map") else np.zeros_like(lab, np.uint8)
    mmd = ndimage.grey_dilation(mm, size=(3, 3, 3))
    vn = ndimage.binary_dilation(np.asarray(nib.load(str(root / item["veins"])).dataobj) > 0) if item.get("veins") \
        else np.zeros(lab.shape, bool)
    tis = np.asarray(nib.load(str(root / item["tissue"])).dataobj) if item.get("tissue") else np.full(lab.shape, 3)
    out = []
    for i, j, k, p_ in cands:
        i, j, k = int(i), int(j), int(k)
        if lab[i, j, k]:
            continue
        t = codes.get(int(mm[i, j, k]) or int(mmd[i, j, k]), "mimic")
        if t == "none":
            t = "vein" if vn[i, j, k] else {4: "deep_gm", 1: "csf", 0: "outside"}.get(int(tis[i, j, k]), "tissue")
        out.append((float(p_), t))
    return out


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers a round is judged by (validation split)."""
    cs = metrics.get("candidate_stage", {})
    return {
        "n_scans": metrics["n_scans"], "n_lesions": metrics["n_lesions"],
        "sensitivity_at_fp": {r: round(metrics["sensitivity_at_fp"][r], 4) for r in FP_RATES},
        "sensitivity_at_fp_ci95": {r: [None if v is None else round(v, 4) for v in metrics["sensitivity_at_fp_ci95"][r]]
                                   for r in FP_RATES},
        "cpm": round(metrics["cpm"], 4), "cpm_ci95": [None if v is None else round(v, 4) for v in metrics["cpm_ci95"]],
        "candidate_sensitivity": None if cs.get("candidate_sensitivity") is None else round(cs["candidate_sensitivity"], 4),
        "candidates_per_scan_mean": cs.get("candidates_per_scan_mean"),
    }


def rounds_table(rounds: list[dict[str, Any]]) -> str:
    """Markdown table of the rounds (validation split): changes, CMBs, sensitivity at 10 FP/scan with CI, CPM,
    candidate stage, detected / CMBs at 10 FP/scan by site and by core darkening (``contrast``)."""
    lines = ["| round | change (over the round before) | val. CMBs | sens. @10 FP/scan (95 % CI) | CPM (95 % CI) | "
             "candidate stage | site A / B | core darkening < 0.45 · 0.45-0.6 · >= 0.6 |", "|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        v, b = r["validation"], r["validation_breakdown_at_10fp"]
        lo, hi = v["sensitivity_at_fp_ci95"]["10"]
        clo, chi = v["cpm_ci95"]
        site = " / ".join(f"{g['detected']}/{g['n']}" for g in b["by_site"].values())
        fo = " · ".join(f"{g['detected']}/{g['n']}" for g in b["by_contrast"].values())
        lines.append(f"| {r['round']} | {r.get('change', '')} | {v['n_lesions']} | {100 * v['sensitivity_at_fp']['10']:.1f} % "
                     f"({100 * lo:.1f}-{100 * hi:.1f}) | {v['cpm']:.3f} ({clo:.3f}-{chi:.3f}) | "
                     f"{100 * v['candidate_sensitivity']:.1f} % | {site} | {fo} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--table"]:                     # print the rounds table of --record (default docs/results/...)
        rec = Path(argv[2]) if len(argv) > 2 and argv[1] == "--record" else REPO / "docs/results/calibration"
        print(rounds_table(json.loads((rec / "rounds.json").read_text())))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--round", required=True, help="round name (folder under --workdir, key in rounds.json)")
    p.add_argument("--workdir", required=True, help="scratch folder for cohorts, models, caches (not the repo)")
    p.add_argument("--change", default="", help="what changed over the round before (short; the rounds table)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (training seed stays the bundle's)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--site-option", action="append", default=[], metavar="SITE:KEY=VALUE")
    p.add_argument("--min-mean-lesions", type=float, default=None, help="floor of planned CMBs per pathological scan")
    p.add_argument("--note", default="", help="why this round (recorded)")
    p.add_argument("--record", default=str(REPO / "docs/results/calibration"), help="rounds.json folder")
    p.add_argument("--n_bootstrap", type=int, default=1000)
    args = p.parse_args(argv)
    work = Path(args.workdir).resolve() / args.round
    try:
        work.relative_to(REPO)
        print(f"error: --workdir {args.workdir} lies inside the repository; use a scratch folder", file=sys.stderr)
        return 2
    except ValueError:
        pass
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.workdir).resolve() / "candidate_cache"        # content-hashed: shared by rounds
    cohort, models, ev = work / "cohort", work / "models", work / "eval"
    datalist = cohort / "datalist.json"
    py = sys.executable
    gen_cmd = [py, "-m", "cmb_synthesis.phantom", "--output", str(cohort), "--preset", "benchmark", "--seed",
               str(args.seed), "--n-test-pathological", "0"]
    for o in args.option:
        gen_cmd += ["--option", o]
    for o in args.site_option:
        gen_cmd += ["--site-option", o]
    if args.min_mean_lesions is not None:
        gen_cmd += ["--min-mean-lesions", str(args.min_mean_lesions)]
    train_cmd = [py, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN_CFG, "--datalist", str(datalist),
                 "--ckpt_dir", str(models), "--cache_dir", str(cache), "--log_dir", str(work / "runs"),
                 "--training_data", "real", "--cda", "false"]
    eval_cmd = [py, "-m", "monai.bundle", "run", "evaluating", "--config_file", EVAL_CFG, "--datalist", str(datalist),
                "--ckpt_dir", str(models), "--cache_dir", str(cache), "--log_dir", str(work / "runs"),
                "--training_data", "real", "--cda", "false", "--split", "validation", "--output_dir", str(ev),
                "--n_bootstrap", str(args.n_bootstrap)]
    times: dict[str, float | None] = {}
    try:
        steps = ((datalist, gen_cmd, "generate"), (models / "train_metrics.json", train_cmd, "train"),
                 (ev / "metrics.json", eval_cmd, "evaluate"))
        for done, cmd, name in steps:
            if done.is_file() and (name != "train" or (models / "model.pt").is_file()):
                print(f"[{args.round}] {name}: exists, skipped ({done})")
                times[name] = None
                continue
            print(f"[{args.round}] {name} ... (log {work / (name + '.log')})", flush=True)
            times[name] = round(_run(cmd, work / f"{name}.log"), 1)
            print(f"[{args.round}] {name}: {times[name]} s", flush=True)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    metrics = json.loads((ev / "metrics.json").read_text())
    meta = json.loads((cohort / "cohort.json").read_text())
    train_metrics = json.loads((models / "train_metrics.json").read_text())
    br = breakdown(datalist, ev / "candidates.csv")
    rel = [str(Path(c).relative_to(REPO)) if c.startswith(str(REPO)) else c for c in gen_cmd]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    record = {
        "round": args.round, "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": commit, "note": args.note, "change": args.change, "seed": args.seed,
        "options": dict(o.split("=", 1) for o in args.option), "site_options": list(args.site_option),
        "min_mean_lesions": meta.get("min_mean_lesions"),
        "effective_options": {k: v for k, v in meta.get("options", {}).items() if k in REALISM_KEYS},
        "sites": meta.get("sites"), "lesions_per_split": meta.get("lesions_per_split"),
        "validation": _summary(metrics), "validation_breakdown_at_10fp": br,
        "training": {k: train_metrics.get(k) for k in ("best_metric", "best_epoch", "training_candidates",
                                                      "validation_candidates") if k in train_metrics},
        "wall_s": times,
        "machine": "2-core shared VM, loaded by other jobs (OMP_NUM_THREADS=1)",
        "command": "OMP_NUM_THREADS=1 python scripts/calibrate_benchmark.py --round " + args.round
                   + " --workdir WORKDIR --seed " + str(args.seed)
                   + "".join(f" --option '{o}'" for o in args.option)
                   + "".join(f" --site-option '{o}'" for o in args.site_option)
                   + ("" if args.min_mean_lesions is None else f" --min-mean-lesions {args.min_mean_lesions}"),
        "steps": {"generate": " ".join(rel[1:]).replace(str(work), "WORKDIR/" + args.round),
                  "train": " ".join(train_cmd[1:]).replace(str(work), "WORKDIR/" + args.round),
                  "evaluate": " ".join(eval_cmd[1:]).replace(str(work), "WORKDIR/" + args.round)},
    }
    rec = Path(args.record)
    rec.mkdir(parents=True, exist_ok=True)
    small = {k: v for k, v in metrics.items() if k != "curve"}
    write_json(small, rec / f"{args.round}_metrics.json")
    rounds_path = rec / "rounds.json"
    rounds = json.loads(rounds_path.read_text()) if rounds_path.is_file() else []
    old = next((r for r in rounds if r["round"] == args.round), None)
    if old is not None:            # a rerun over existing outputs: keep what the first run measured / said
        record["wall_s"] = {k: v if v is not None else old.get("wall_s", {}).get(k) for k, v in times.items()}
        record["date_utc"] = old.get("date_utc", record["date_utc"])
        record["commit"] = old.get("commit", record["commit"])
        for k in ("note", "change"):
            record[k] = record[k] or old.get(k, "")
        rounds = [r if r["round"] != args.round else record for r in rounds]
    else:
        rounds.append(record)
    write_json(rounds, rounds_path)
    v = record["validation"]
    lo, hi = v["sensitivity_at_fp_ci95"]["10"]
    print(f"[{args.round}] validation: sensitivity at 10 FP/scan {v['sensitivity_at_fp']['10']:.3f} "
          f"(95 % CI {lo}-{hi}), CPM {v['cpm']:.3f}, candidate stage {v['candidate_sensitivity']}, "
          f"{v['n_lesions']} CMBs / {v['n_scans']} scans")
    print(json.dumps({k: br[k] for k in ("by_site", "by_contrast", "by_diameter_mm")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

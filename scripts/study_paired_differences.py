"""Pooled paired differences between any two arms of a finished study, from its cached stages.

The study (``bundles/cmb_detection/configs/study.yaml``) reports real+synthetic minus real; this script computes
any pair (e.g. the effect of classical augmentation, ``real+cDA`` minus ``real``) with the same statistics
(:func:`cmb_synthesis.evaluation.pooled.pooled_paired_bootstrap_difference`: per K, the mean over seeds of the
paired differences at 10 FP/scan, each bootstrap resample drawing the same test scans for both arms and every
seed), reading each evaluation stage's per-scan candidates. It trains nothing.

    python scripts/study_paired_differences.py --study_dir bundles/cmb_detection/study \\
        --pairs "real+cDA:real" --output docs/results/study/benchmark_real_arms/cda_differences.json

How stages are matched: each ``evaluate-*`` stage's ``log.txt`` starts with the command the study ran, whose
``--datalist`` is a ``datalist-*`` stage (the K subset; ``results.json`` maps it to K and seed) and whose
``--model_path`` is a ``detector-*`` stage (its ``stage.json`` holds the arm and the seed).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmb_synthesis.data.io import write_json  # noqa: E402
from cmb_synthesis.evaluation.pooled import pooled_paired_bootstrap_difference  # noqa: E402
from cmb_synthesis.study.report import arm_name  # noqa: E402
from cmb_synthesis.study.runner import scan_results  # noqa: E402


def _option(cmd: list[str], name: str) -> str:
    if name not in cmd:
        raise ValueError(f"the stage command has no {name}: {' '.join(cmd)[:200]}")
    return cmd[cmd.index(name) + 1]


def evaluations(study_dir: Path) -> dict[tuple[str, str, int], Path]:
    """``{(K, arm, seed): candidates.csv}`` of every finished evaluation stage of the study in ``study_dir``."""
    results = json.loads((study_dir / "results.json").read_text())
    k_of = {}  # (datalist stage folder, seed) -> K label
    for run in results["runs"]:
        k_of[(run["stages"]["datalist"], int(run["seed"]))] = run["k"]
    found: dict[tuple[str, str, int], Path] = {}
    for ev in sorted((study_dir / "stages").glob("evaluate-*")):
        if not (ev / "stage.json").is_file():
            continue  # an interrupted attempt
        cmd = shlex.split((ev / "log.txt").read_text().splitlines()[0])
        datalist = Path(_option(cmd, "--datalist")).parent.name
        detector = json.loads((Path(_option(cmd, "--model_path")).parents[1] / "stage.json").read_text())["params"]
        seed = int(detector["seed"])
        key = (datalist, seed)
        if key not in k_of:
            continue  # a stage of another study run (other K values or seeds)
        arm = arm_name(detector["training_data"], bool(detector["cda"]))
        found[(k_of[key], arm, seed)] = ev / "candidates.csv"
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study_dir", type=Path, default=Path("bundles/cmb_detection/study"))
    ap.add_argument("--pairs", nargs="+", default=["real+cDA:real"], help="A:B pairs, each reported as A minus B")
    ap.add_argument("--fp_rate", type=float, default=10.0)
    ap.add_argument("--n_bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, required=True)
    a = ap.parse_args(argv)
    results = json.loads((a.study_dir / "results.json").read_text())
    datalist = results["datalist"]
    seeds = [int(s) for s in results["protocol"]["seeds"]]
    cands = evaluations(a.study_dir)
    by_k: dict[str, dict] = defaultdict(dict)
    for pair in a.pairs:
        arm_a, sep, arm_b = pair.partition(":")
        if not sep:
            ap.error(f"--pairs expects A:B, got {pair!r}")
        for k in results["protocol"]["k_values"]:
            missing = [(k, arm, s) for arm in (arm_a, arm_b) for s in seeds if (k, arm, s) not in cands]
            if missing:
                print(f"K={k}: {pair}: no evaluation stage for {missing}, skipped", file=sys.stderr)
                continue
            per_arm = [[scan_results(cands[(k, arm, s)], datalist, "test") for s in seeds] for arm in (arm_a, arm_b)]
            d = pooled_paired_bootstrap_difference(*per_arm, fp_rate=a.fp_rate, n_bootstrap=a.n_bootstrap, seed=a.seed)
            by_k[k][f"{arm_a} minus {arm_b}"] = d
            lo, hi = d["ci95"]
            print(f"K={k:>3}  {arm_a} minus {arm_b}: {100 * d['difference']:+.1f} points "
                  f"[{100 * lo:+.1f}, {100 * hi:+.1f}] (half-widths {100 * (d['difference'] - lo):.1f} / "
                  f"{100 * (hi - d['difference']):.1f}), seeds {seeds}")
    write_json({"study_dir": str(a.study_dir), "seeds": seeds, "fp_rate": a.fp_rate, "differences": by_k}, a.output)
    print(f"written: {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

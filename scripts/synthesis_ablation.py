"""Summarise synthesis training runs (the realism ablation) into a table with the targets.

Each run is one ``python -m monai.bundle run training --config_file bundles/cmb_synthesis/configs/train.yaml
--seed S --ckpt_dir RUNS/<setup>/seed<S>/models [overrides]``; this script reads every
``RUNS/<setup>/seed<S>/models/metrics.json`` (the evaluator's history), copies it beside the run folder as
``RUNS/<setup>/seed<S>/metrics.json`` (small, committed; the models are not) and writes ``RUNS/summary.json`` and
``RUNS/summary.md`` (mean and min-max over seeds of the final validation round, and the largest identity error
after the first quarter of training).

    python scripts/synthesis_ablation.py --runs bundles/cmb_synthesis/ablation

``--at_epoch E`` compares every run, finished or still training, at its validation round of epoch ``E`` (the
same number of iterations for every setup): an unfinished run's history is copied to
``RUNS/<setup>/seed<S>/metrics_partial.json`` (never counted as a result by the default mode) and the table goes to
``RUNS/summary_epoch<E>.{json,md}``.

``--reevaluate`` scores every trained run again with today's evaluator (``validate#evaluator`` of
``configs/train.yaml`` with ``configs/evaluate.yaml``, on the final checkpoint in ``seed<S>/models``) when its setup
folder has an ``overrides.json`` (``{"args": ["--key", "value", ...]}``: what the setup changes relative to today's
train.yaml, so that the networks are built as trained) and the run has no ``eval.json`` yet (``--force``: again):
``RUNS/<setup>/seed<S>/eval.json`` (committed); then ``RUNS/summary_eval.{json,md}`` from every ``eval.json``. It compares runs trained under an older evaluator like for like (the
weights are not committed: only where the runs were trained). ``max_identity_after_q1`` there still comes from the
training's own validation rounds (``seed<S>/metrics.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmb_synthesis.data.io import atomic_output, write_json  # noqa: E402

# final-round metrics reported per setup, and the targets of the CPU preset
COLUMNS = ("realism_auc", "centre_ratio", "profile_error", "lesion_fidelity", "removal_contrast", "identity_mae")
TARGETS = {"realism_auc": "<= 0.70", "centre_ratio": "0.9-1.1", "profile_error": "<= 0.05",
           "removal_contrast": ">= 0.9", "identity_mae": "<= 0.01", "max_identity_after_q1": "<= 0.03"}


def run_summary(metrics_json: Path, at_epoch: int | None = None) -> dict | None:
    """Final-round metrics of one run (or of its round at ``at_epoch``: None when the run has no such round)."""
    m = json.loads(metrics_json.read_text())
    hist = m.get("history", [])
    if at_epoch is not None:
        hist = [h for h in hist if h.get("epoch", 0) <= at_epoch]
        if not hist or hist[-1].get("epoch") != at_epoch:
            return None
    last = hist[-1] if hist else {"metrics": m.get("metrics", {})}
    step = "iteration" if any("iteration" in h for h in hist) else "epoch"  # what the writer recorded
    total = m.get("max_epochs") if step == "epoch" else None
    total = total or max((h.get(step, 0) for h in hist), default=0)
    later = [h["metrics"].get("identity_mae") for h in hist if h.get(step, 0) > total / 4]
    later = [v for v in later if v is not None]
    out = {k: last["metrics"].get(k) for k in COLUMNS}
    out["max_identity_after_q1"] = max(later) if later else None
    out["profile_real"] = [last["metrics"].get(f"profile_real_{d}") for d in range(5)]
    out["profile_synthetic"] = [last["metrics"].get(f"profile_synthetic_{d}") for d in range(5)]
    out["iterations"] = last.get("iteration") or (last.get("epoch", 0) * (m.get("epoch_length") or 0))
    out["elapsed_s"] = last.get("elapsed_s")
    return out


def _fmt(values: list) -> str:
    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return "-"
    return f"{v.mean():.3f} ({v.min():.3f}-{v.max():.3f})" if len(v) > 1 else f"{v[0]:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="bundles/cmb_synthesis/ablation")
    ap.add_argument("--at_epoch", type=int, default=None, help="compare all runs (finished or not) at this validation epoch")
    ap.add_argument("--reevaluate", action="store_true", help="score the trained runs again with today's evaluator")
    ap.add_argument("--setups", nargs="*", default=None, help="with --reevaluate: evaluate only these setups")
    ap.add_argument("--force", action="store_true", help="with --reevaluate: evaluate runs that have an eval.json again")
    args = ap.parse_args(argv)
    root = Path(args.runs)
    if args.at_epoch is not None:
        return _at_epoch(root, args.at_epoch)
    if args.reevaluate:
        return _reevaluate(root, args.setups, args.force)
    setups: dict[str, dict[str, dict]] = {}
    for mj in sorted(root.glob("*/seed*/models/metrics.json")):
        m = json.loads(mj.read_text())
        last = (m.get("history") or [{}])[-1]
        if m.get("max_epochs") and last.get("epoch", 0) < int(m["max_epochs"]):  # still training: not a result
            print(f"{mj}: incomplete (epoch {last.get('epoch')} of {m['max_epochs']}), skipped")
            continue
        shutil.copyfile(mj, mj.parent.parent / "metrics.json")
    for mj in sorted(root.glob("*/seed*/metrics.json")):
        setups.setdefault(mj.parent.parent.name, {})[mj.parent.name] = run_summary(mj)
    if not setups:
        print(f"error: no {root}/<setup>/seed<S>/models/metrics.json", file=sys.stderr)
        return 1
    write_json({"targets": TARGETS, "setups": setups}, root / "summary.json")
    _write_table(setups, root / "summary.md")
    return 0


def _write_table(setups: dict[str, dict[str, dict]], path: Path, header: str = "") -> None:
    cols = (*COLUMNS, "max_identity_after_q1")
    lines = ([header, ""] if header else []) + [
        "| setup | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols),
        "| target | | " + " | ".join(TARGETS.get(c, "") for c in cols) + " |",
    ]  # fmt: skip
    for name, runs in setups.items():
        seeds = ",".join(s.removeprefix("seed") for s in runs)
        lines.append(f"| {name} | {len(runs)} ({seeds}) | " + " | ".join(_fmt([r[c] for r in runs.values()]) for c in cols) + " |")
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _at_epoch(root: Path, epoch: int) -> int:
    """Every run at its validation round of ``epoch`` (finished runs from ``metrics.json``, unfinished ones from
    ``models/metrics.json``, copied to ``metrics_partial.json``); writes ``summary_epoch<E>.{json,md}``."""
    setups: dict[str, dict[str, dict]] = {}
    for run in sorted(p for p in root.glob("*/seed*") if p.is_dir()):
        live, done = run / "models" / "metrics.json", run / "metrics.json"
        if done.is_file():
            src = done
        elif live.is_file():
            src = run / "metrics_partial.json"
            shutil.copyfile(live, src)
        else:
            continue
        summary = run_summary(src, at_epoch=epoch)
        if summary is None:
            print(f"{src}: no validation round at epoch {epoch}, skipped")
            continue
        # max identity after the first quarter of the FULL schedule, over the rounds up to `epoch`
        setups.setdefault(run.parent.name, {})[run.name] = summary
    if not setups:
        print(f"error: no run of {root} has a validation round at epoch {epoch}", file=sys.stderr)
        return 1
    write_json({"targets": TARGETS, "epoch": epoch, "setups": setups}, root / f"summary_epoch{epoch}.json")
    _write_table(setups, root / f"summary_epoch{epoch}.md", header=f"Every run at its validation round of epoch {epoch}:")
    return 0


def _reevaluate(root: Path, only: list[str] | None = None, force: bool = False) -> int:
    """Today's evaluator on every run with models and an ``overrides.json`` that has no ``eval.json`` yet (all of
    them with ``force``), then the table of every ``<setup>/seed<S>/eval.json`` (see the module docstring)."""
    repo = Path(__file__).resolve().parents[1]
    configs = repo / "bundles" / "cmb_synthesis" / "configs"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    for ov in sorted(root.glob("*/overrides.json")):
        setup = ov.parent
        if only and setup.name not in only:
            continue
        extra = [str(a) for a in json.loads(ov.read_text()).get("args", [])]
        for run in sorted(p for p in setup.glob("seed*") if (p / "models").is_dir()):
            out = run / "eval.json"
            if out.is_file() and not force:
                continue
            live = run / "models" / "metrics.json"
            if live.is_file():
                m = json.loads(live.read_text())
                if m.get("max_epochs") and (m.get("history") or [{}])[-1].get("epoch", 0) < int(m["max_epochs"]):
                    print(f"{run}: still training, not evaluated")
                    continue
            cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file",
                   str([str(configs / "train.yaml"), str(configs / "evaluate.yaml")]),
                   "--ckpt_dir", str(run / "models"), "--metrics_path", str(out), *extra]
            print("+", " ".join(cmd[1:]), flush=True)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{run}: evaluation failed:\n{done.stderr[-2000:]}", file=sys.stderr)
    setups: dict[str, dict[str, dict]] = {}
    for out in sorted(root.glob("*/seed*/eval.json")):
        run = out.parent
        summary = run_summary(out)
        if (run / "metrics.json").is_file():  # the training's rounds (its own evaluator) for the identity check
            summary["max_identity_after_q1"] = run_summary(run / "metrics.json")["max_identity_after_q1"]
        setups.setdefault(run.parent.name, {})[run.name] = summary
    if not setups:
        print(f"error: no {root}/<setup>/seed<S>/eval.json (and nothing to evaluate)", file=sys.stderr)
        return 1
    write_json({"targets": TARGETS, "evaluator": "today's train.yaml validate#evaluator", "setups": setups},
               root / "summary_eval.json")
    _write_table(setups, root / "summary_eval.md",
                 header="Every run re-scored by today's evaluator (`scripts/synthesis_ablation.py --reevaluate`):")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

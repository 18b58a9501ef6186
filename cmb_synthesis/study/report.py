"""The learning-curve study's reports, from the ``results.json`` dict (:func:`cmb_synthesis.study.runner.run_study`).

- :func:`table1_markdown`: the paper's Table 1 layout for K = all (arms x cDA: sensitivity at 10 FP/scan with
  its 95 % CI, FP/scan at 90 % sensitivity, CPM; the paper's numbers beside ours) -> ``table1.md``.
- :func:`results_markdown`: the protocol, every K's arms, the pooled paired differences -> ``results.md``.
- :func:`plot_learning_curve`: sensitivity at 10 FP/scan against K, real vs real+synthetic (and synthetic
  when run), without / with cDA, CI bands = scan bootstrap pooled over seeds -> ``learning_curve.png``.

Numbers in ``results.json`` are fractions; the Markdown shows percentages (sensitivity, differences in
percentage points) and FP/scan as they are.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cmb_synthesis.data.io import atomic_output

__all__ = ["ARMS", "PAPER_TABLE1", "arm_name", "table1_markdown", "results_markdown", "plot_learning_curve",
           "fmt_ci"]

# (training_data, cda) in the paper's Table 1 order
ARMS: tuple[tuple[str, bool], ...] = (
    ("real", False), ("synthetic", False), ("real+synthetic", False),
    ("real", True), ("synthetic", True), ("real+synthetic", True),
)
# Faryna et al., Table 1 (sensitivity at 10 FP/patient) and the text (FP/patient at 90 % sensitivity)
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "real": {"sensitivity_at_10": 0.778, "fp_at_90": 27.3},
    "synthetic": {"sensitivity_at_10": 0.718, "fp_at_90": 31.4},
    "real+synthetic": {"sensitivity_at_10": 0.789, "fp_at_90": 23.7},
    "real+cDA": {"sensitivity_at_10": 0.805, "fp_at_90": 17.9},
    "synthetic+cDA": {"sensitivity_at_10": 0.801, "fp_at_90": 27.4},
    "real+synthetic+cDA": {"sensitivity_at_10": 0.824, "fp_at_90": 15.5},
}


def arm_name(training_data: str, cda: bool) -> str:
    """``real``, ``real+cDA``, ``real+synthetic+cDA``, ..."""
    return training_data + ("+cDA" if cda else "")


def fmt_ci(v: float | None, ci: Sequence[float | None] | None, pct: bool = True, signed: bool = False,
           digits: int = 1) -> str:
    """``95.1 [87.2, 100.0]`` (x100 when ``pct``, ``digits`` decimals, a sign when ``signed``); ``not reached``
    for a missing value, ``inf`` for an open end."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "not reached"
    scale = 100.0 if pct else 1.0

    def num(x: float | None) -> str:
        if x is None or not math.isfinite(x):
            return "not reached" if x is None else "inf"
        return f"{x * scale:+.{digits}f}" if signed else f"{x * scale:.{digits}f}"

    s = num(v)
    if ci and (ci[0] is not None or ci[1] is not None):
        s += f" [{num(ci[0])}, {num(ci[1])}]"
    return s


def _per_seed(vals: Sequence[float | None], pct: bool = True) -> str:
    return ", ".join("n.r." if v is None else (f"{v * 100:.1f}" if pct else f"{v:.1f}") for v in vals)


def _fp90_mean(vals: Sequence[float | None]) -> str:
    reached = [v for v in vals if v is not None]
    if not reached:
        return "not reached"
    s = f"{sum(reached) / len(reached):.1f}"
    return s if len(reached) == len(vals) else f"{s} ({len(vals) - len(reached)} of {len(vals)} seeds not reached)"


def _arm_rows(results: Mapping[str, Any], k: str) -> list[dict[str, Any]]:
    """Per arm of K (Table 1 order): the pooled curve point, per-seed values and the paper's numbers."""
    runs = [r for r in results["runs"] if r["k"] == k]
    rows = []
    for td, cda in ARMS:
        name = arm_name(td, cda)
        if name not in results["learning_curve"].get(k, {}):
            continue
        lc = results["learning_curve"][k][name]
        fp90 = [r["arms"][name]["fp_at_90"] for r in runs]
        rows.append({"name": name, "training_data": td, "cda": cda, "lc": lc, "fp90": fp90,
                     "paper": PAPER_TABLE1.get(name, {})})
    return rows


def table1_markdown(results: Mapping[str, Any], k: str = "all") -> str:
    """The paper's Table 1 for K (default all): sensitivity at 10 FP/scan (mean over seeds, 95 % CI of the scan
    bootstrap pooled over seeds), FP/scan at 90 % sensitivity (mean over seeds), CPM, the paper's values."""
    runs = [r for r in results["runs"] if r["k"] == k]
    if not runs:
        raise ValueError(f"table 1: no runs with K={k} in the results (K values: {results['protocol']['k_values']})")
    seeds = [r["seed"] for r in runs]
    n_path = runs[0]["counts"]["n_real_pathological"]
    lines = [
        f"Table 1 layout, K = {k} ({n_path} real pathological training scans), mean over seeds {seeds}; "
        f"{runs[0]['arms'][next(iter(runs[0]['arms']))]['n_scans']} test scans, "
        f"{runs[0]['arms'][next(iter(runs[0]['arms']))]['n_lesions']} CMBs.",
        "",
        "| Training data | cDA | Sensitivity at 10 FP/scan, % [95 % CI] | per seed | FP/scan at 90 % sensitivity "
        "| CPM [95 % CI] | Paper: sensitivity at 10 FP, % | Paper: FP at 90 % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in _arm_rows(results, k):
        lc, paper = row["lc"], row["paper"]
        lines.append(
            f"| {row['training_data']} | {'yes' if row['cda'] else 'no'} | {fmt_ci(lc['sensitivity'], lc['sensitivity_ci95'])} "
            f"| {_per_seed(lc['per_seed_sensitivity'])} | {_fp90_mean(row['fp90'])} "
            f"| {fmt_ci(lc['cpm'], lc['cpm_ci95'], pct=False, digits=3)} "
            f"| {paper.get('sensitivity_at_10', float('nan')) * 100:.1f} | {paper.get('fp_at_90', float('nan')):.1f} |")
    lines += ["", "CI: percentile interval of the test-scan bootstrap (the same resample for every seed) of the mean "
              "over seeds. Paper: Faryna et al., Table 1 (real patients)."]
    return "\n".join(lines) + "\n"


def _differences_table(results: Mapping[str, Any]) -> list[str]:
    lines = ["| K | Comparison | Sensitivity at 10 FP/scan, points [95 % CI] | CI excludes 0 | per seed "
             "| CPM difference [95 % CI] |", "|---|---|---|---|---|---|"]
    for k, comps in results["differences"].items():
        for name, d in comps.items():
            lo, hi = d["ci95"]
            excl = "n/a" if lo is None else ("yes, better" if lo > 0 else "yes, worse" if hi < 0 else "no")
            per = ", ".join(f"{p['difference'] * 100:+.1f}" for p in d["per_seed"])
            lines.append(f"| {k} | {name} | {fmt_ci(d['difference'], d['ci95'], signed=True)} | {excl} | {per} "
                         f"| {fmt_ci(d['cpm_difference'], d['cpm_ci95'], pct=False, signed=True, digits=3)} |")
    return lines


def results_markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: the protocol, the pooled paired differences at every K, then each K's arms."""
    p = results["protocol"]
    lines = [
        "# Learning-curve study",
        "",
        f"- Cohort: `{results['datalist']}` (preset `{p.get('preset')}`); quick: {p.get('quick')}.",
        f"- K values: {', '.join(p['k_values'])} real pathological training scans (all = "
        f"{p['n_pathological_available']}); seeds {', '.join(map(str, p['seeds']))}; arms {', '.join(p['arms'])}.",
        f"- Synthesis: {'trained per K and seed on exactly the K pathological + the healthy training scans (strict protocol)' if p['strict'] else 'REUSED from ' + str(p['synthesis_ckpt_dir']) + ' for every K: NOT the strict low-data protocol'}.",
        f"- Synthetic scans per real pathological scan: {results['synthetic_per_real']}; bootstrap resamples: "
        f"{results['n_bootstrap']}.",
        "",
        "## real+synthetic minus real (paired, pooled over seeds)",
        "",
        "Each bootstrap resample draws the same test scans for both arms and every seed; the difference is the mean "
        "over seeds of the paired differences (percentage points).",
        "",
        *_differences_table(results),
        "",
    ]
    for k in results["learning_curve"]:
        runs = [r for r in results["runs"] if r["k"] == k]
        lines += [f"## K = {k}", ""]
        lines.append("| Arm | Sensitivity at 10 FP/scan, % [95 % CI] | per seed | FP/scan at 90 % (per seed) "
                     "| CPM [95 % CI] | Sensitivity at 1 / 2 / 4 / 8 FP/scan, % (mean over seeds) |")
        lines.append("|---|---|---|---|---|---|")
        for row in _arm_rows(results, k):
            lc = row["lc"]
            at = []
            for rate in ("1", "2", "4", "8"):
                vals = [r["arms"][row["name"]]["sensitivity_at_fp"].get(rate) for r in runs]
                vals = [v for v in vals if v is not None]
                at.append(f"{sum(vals) / len(vals) * 100:.1f}" if vals else "-")
            lines.append(f"| {row['name']} | {fmt_ci(lc['sensitivity'], lc['sensitivity_ci95'])} "
                         f"| {_per_seed(lc['per_seed_sensitivity'])} | {_per_seed(row['fp90'], pct=False)} "
                         f"| {fmt_ci(lc['cpm'], lc['cpm_ci95'], pct=False, digits=3)} | {' / '.join(at)} |")
        lines.append("")
        for r in runs:
            syn = r["synthesis"]
            if not syn.get("strict"):
                saw = f"reused from {syn.get('models')} (not the strict protocol)"
            elif syn.get("pathological_ids") is None:
                saw = "not trained (no arm uses synthetic scans)"
            else:
                saw = f"trained on {syn['pathological_ids']} + the healthy scans"
            lines.append(f"- seed {r['seed']}: pathological training scans {r['pathological_ids']}; synthesis "
                         f"{saw}; {r['n_synthetic']} synthetic scans.")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_learning_curve(results: Mapping[str, Any], out_png: str | os.PathLike) -> Path:
    """``learning_curve.png``: sensitivity at 10 FP/scan (mean over seeds, pooled-bootstrap 95 % band, each
    seed as a dot) against K, one panel without and one with cDA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lc = results["learning_curve"]
    n_all = results["protocol"]["n_pathological_available"]
    ks = list(lc)
    x = [n_all if k == "all" else int(k) for k in ks]
    panels = [c for c in (False, True) if any(arm_name(td, c) in lc[k] for k in ks for td, _ in ARMS)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.5 * max(len(panels), 1), 4.3), squeeze=False)
    styles = {"real": ("tab:blue", "-"), "real+synthetic": ("tab:orange", "-"), "synthetic": ("tab:green", "--")}
    for ax, cda in zip(axes[0], panels):
        for td, (color, ls) in styles.items():
            name = arm_name(td, cda)
            pts = [(xi, lc[k][name]) for xi, k in zip(x, ks) if name in lc[k]]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1]["sensitivity"] * 100 for p in pts], ls, color=color, marker="o", label=name)
            lo = [(p[1]["sensitivity_ci95"][0] or 0.0) * 100 for p in pts]
            hi = [(p[1]["sensitivity_ci95"][1] or 0.0) * 100 for p in pts]
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
            for xi, p in pts:
                ax.scatter([xi] * len(p["per_seed_sensitivity"]), [v * 100 for v in p["per_seed_sensitivity"]],
                           color=color, s=8, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{xi}\n(all)" if k == "all" else str(xi) for xi, k in zip(x, ks)])
        ax.set_xlabel("real pathological training scans K")
        ax.set_ylabel("sensitivity at 10 FP/scan, %")
        ax.set_ylim(-2, 102)
        ax.set_title("with cDA" if cda else "without cDA")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(f"Learning curve (mean over {len(results['protocol']['seeds'])} seeds, 95 % CI: scan bootstrap)")
    fig.tight_layout()
    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(out_png)

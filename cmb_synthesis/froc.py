"""FROC evaluation of CMB detection with bootstrap confidence intervals (one module for bundle and study).

Hit rule (LUNA16's convention): a candidate *hits* a lesion when its voxel lies inside that lesion's instance
mask. Several hits on one lesion count once, with the highest probability, and the other hits are ignored
(neither true nor false positives). A candidate on no lesion is a false positive (FP).

FROC curve: for every threshold ``t`` (each distinct probability, from high to low, plus ``+inf`` for the
empty detection set) the sensitivity is the fraction of all lesions whose best hit has probability ``>= t``
and the FP rate is the number of FP candidates with probability ``>= t`` divided by the number of scans.

Sensitivity at an FP rate ``r`` uses *step interpolation*: the highest sensitivity reached at a threshold
whose mean FP/scan is ``<= r`` (no linear interpolation between operating points, so the value is attainable
by an actual threshold and never optimistic). If every candidate is accepted before reaching ``r`` FPs, the
value is the sensitivity with all candidates (the candidate stage's ceiling).
``fp_per_scan_at_sensitivity_90`` is the smallest mean FP/scan of an operating point with sensitivity
``>= 0.9`` (``None`` when never reached; in the bootstrap such resamples count as infinite). The CPM is the
mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 FP/scan.

95 % confidence intervals: bootstrap over scans (``n_bootstrap`` resamples of the scans with replacement,
``numpy.random.default_rng(seed)``), percentile interval (2.5 %, 97.5 %). Lesions and FPs of a scan drawn k
times count k times.

Command line::

    python -m cmb_synthesis.froc --candidates candidates.csv --datalist datalist.json --split test \
        --output_dir OUT [--n_bootstrap 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmb_synthesis.io import PathLike, atomic_output, write_csv, write_json

__all__ = [
    "CANDIDATE_COLUMNS",
    "FP_RATES",
    "CPM_RATES",
    "ScanResult",
    "match_candidates",
    "froc_curve",
    "sensitivity_at",
    "evaluate",
    "paired_bootstrap_difference",
    "write_report",
    "plot_froc",
    "plot_froc_panels",
    "candidate_rows",
    "write_candidates_csv",
    "read_candidates_csv",
    "evaluate_csv",
    "scan_results_from_csv",
    "main",
]

CANDIDATE_COLUMNS = ("image", "i", "j", "k", "x", "y", "z", "probability")
FP_RATES = (1, 2, 4, 8, 10, 20)
CPM_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class ScanResult:
    """Detection outcome of one scan.

    Attributes:
        scan_id: identifier of the scan.
        lesion_scores: (n_lesions,) best probability among the candidates hitting each lesion, NaN when the
            lesion was not hit.
        fp_scores: (n_fp,) probabilities of the false-positive candidates.
    """

    scan_id: str
    lesion_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fp_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        self.lesion_scores = np.asarray(self.lesion_scores, dtype=np.float64).reshape(-1)
        self.fp_scores = np.asarray(self.fp_scores, dtype=np.float64).reshape(-1)
        if np.isnan(self.fp_scores).any():
            raise ValueError(f"scan {self.scan_id}: false-positive probabilities contain NaN")


def match_candidates(scan_id: str, coords: np.ndarray, probs: np.ndarray, instance_labels: np.ndarray) -> ScanResult:
    """Apply the hit rule to one scan.

    Args:
        scan_id: identifier used in errors and results.
        coords: (N, 3) integer voxel indices of the candidates in ``instance_labels``' grid.
        probs: (N,) candidate probabilities (any real scores; higher = more likely a CMB).
        instance_labels: 3-D integer array, 0 background, one positive label per lesion.

    Returns:
        ScanResult with one entry per distinct positive label (sorted by label).
    """
    labels = np.asarray(instance_labels)
    if labels.ndim == 4 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim != 3:
        raise ValueError(f"scan {scan_id}: instance labels must be 3-D, got shape {labels.shape}")
    coords = np.asarray(coords).reshape(-1, 3)
    if len(coords) and not np.issubdtype(coords.dtype, np.integer):
        if not np.allclose(coords, np.round(coords)):
            raise ValueError(f"scan {scan_id}: candidate voxel coordinates must be integers")
        coords = np.round(coords)
    coords = coords.astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if len(probs) != len(coords):
        raise ValueError(f"scan {scan_id}: {len(coords)} candidates but {len(probs)} probabilities")
    if np.isnan(probs).any():
        raise ValueError(f"scan {scan_id}: candidate probabilities contain NaN")
    shape = np.array(labels.shape)
    bad = np.nonzero(np.any((coords < 0) | (coords >= shape), axis=1))[0]
    if len(bad):
        raise ValueError(f"scan {scan_id}: candidate {int(bad[0])} at voxel {coords[bad[0]].tolist()} lies outside "
                         f"the image of shape {tuple(labels.shape)}")
    lesion_ids = np.unique(labels)
    lesion_ids = lesion_ids[lesion_ids > 0]
    lesion_scores = np.full(len(lesion_ids), np.nan)
    hit_labels = labels[coords[:, 0], coords[:, 1], coords[:, 2]] if len(coords) else np.zeros(0, dtype=labels.dtype)
    is_hit = hit_labels > 0
    if is_hit.any():
        pos = np.searchsorted(lesion_ids, hit_labels[is_hit])
        best = np.full(len(lesion_ids), -np.inf)
        np.maximum.at(best, pos, probs[is_hit])  # at most a few hundred hits: no speed concern
        lesion_scores = np.where(np.isneginf(best), np.nan, best)
    return ScanResult(str(scan_id), lesion_scores, probs[~is_hit])


# ---------------------------------------------------------------------------------------- curve algebra
class _Pool:
    """All scores of a list of scans, sorted once, for the curve and for weighted (bootstrap) curves."""

    def __init__(self, results: Sequence[ScanResult]) -> None:
        if len(results) == 0:
            raise ValueError("FROC: no scans to evaluate")
        self.n_scans = len(results)
        self.n_lesions_per_scan = np.array([len(r.lesion_scores) for r in results], dtype=np.float64)
        scores, scan, is_lesion = [], [], []
        for s, r in enumerate(results):
            hit = r.lesion_scores[~np.isnan(r.lesion_scores)]
            scores += [hit, r.fp_scores]
            scan += [np.full(len(hit), s), np.full(len(r.fp_scores), s)]
            is_lesion += [np.ones(len(hit), bool), np.zeros(len(r.fp_scores), bool)]
        scores = np.concatenate(scores) if scores else np.zeros(0)
        scan = np.concatenate(scan).astype(np.int64) if scan else np.zeros(0, np.int64)
        is_lesion = np.concatenate(is_lesion) if is_lesion else np.zeros(0, bool)
        order = np.argsort(-scores, kind="stable")
        self.scores, self.scan, self.is_lesion = scores[order], scan[order], is_lesion[order]
        # operating points: after the last item of each group of equal scores
        if len(self.scores):
            ends = np.nonzero(np.diff(self.scores) != 0)[0]
            self.group_end = np.concatenate([ends, [len(self.scores) - 1]])
        else:
            self.group_end = np.zeros(0, np.int64)
        self.thresholds = np.concatenate([[np.inf], self.scores[self.group_end]])

    def curves(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, n_scans) scan multiplicities -> (fp_per_scan, sensitivity), each (B, n_points)."""
        w = np.asarray(weights, dtype=np.float64)
        n_les = w @ self.n_lesions_per_scan  # (B,)
        n_scans = w.sum(axis=1)
        item_w = w[:, self.scan]  # (B, n_items)
        tp = np.cumsum(item_w * self.is_lesion, axis=1)[:, self.group_end]
        fp = np.cumsum(item_w * ~self.is_lesion, axis=1)[:, self.group_end]
        zeros = np.zeros((len(w), 1))
        tp, fp = np.hstack([zeros, tp]), np.hstack([zeros, fp])
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = np.where(n_les[:, None] > 0, tp / n_les[:, None], np.nan)
        return fp / n_scans[:, None], sens


def _sens_at(fp: np.ndarray, sens: np.ndarray, rate: float) -> np.ndarray:
    """Step interpolation on (B, P) monotone curves: sensitivity of the last point with fp <= rate."""
    idx = (fp <= rate + 1e-12).sum(axis=1) - 1  # the first point (threshold inf) has fp 0
    return sens[np.arange(len(fp)), idx]


def _fp_at_sens(fp: np.ndarray, sens: np.ndarray, target: float) -> np.ndarray:
    """Smallest fp of a point with sensitivity >= target per row (inf when never reached)."""
    ok = sens >= target - 1e-12
    first = ok.argmax(axis=1)
    out = fp[np.arange(len(fp)), first]
    return np.where(ok.any(axis=1), out, np.inf)


def froc_curve(results: Sequence[ScanResult]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FROC curve of ``results``.

    Returns:
        ``(fp_per_scan, sensitivity, thresholds)``, each (P,), ordered by decreasing threshold (so
        increasing FP rate and sensitivity). The first point is ``threshold = inf`` (nothing detected).
        Sensitivity is NaN when there are no lesions at all.
    """
    pool = _Pool(results)
    fp, sens = pool.curves(np.ones((1, pool.n_scans)))
    return fp[0], sens[0], pool.thresholds.copy()


def sensitivity_at(fp_per_scan: np.ndarray, sensitivity: np.ndarray, rate: float) -> float:
    """Sensitivity of a curve at an FP/scan rate (step interpolation, see the module docstring)."""
    return float(_sens_at(np.asarray(fp_per_scan)[None], np.asarray(sensitivity)[None], rate)[0])


def _percentile_ci(samples: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2.5/97.5 percentiles that tolerate +inf samples (an interval end is inf when its quantile is)."""
    s = np.sort(np.asarray(samples, dtype=np.float64), axis=axis)
    big = np.where(np.isinf(s), np.finfo(np.float64).max / 4, s)
    lo = np.percentile(big, 2.5, axis=axis)
    hi = np.percentile(big, 97.5, axis=axis)
    lim = np.finfo(np.float64).max / 8
    return np.where(lo > lim, np.inf, lo), np.where(hi > lim, np.inf, hi)


def _finite_or_none(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _rate_key(r: float) -> str:
    return f"{r:g}"


def _bootstrap_weights(n_scans: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """(n_bootstrap, n_scans) multiplicities of each scan in each resample (drawn with replacement)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_scans, size=(n_bootstrap, n_scans))
    w = np.zeros((n_bootstrap, n_scans))
    np.add.at(w, (np.repeat(np.arange(n_bootstrap), n_scans), draws.ravel()), 1.0)
    return w


def evaluate(
    results: Sequence[ScanResult],
    n_bootstrap: int = 1000,
    seed: int = 0,
    fp_rates: Sequence[float] = FP_RATES,
    target_sensitivity: float = 0.9,
    chunk: int = 100,
) -> dict[str, Any]:
    """FROC metrics with 95 % bootstrap CIs (see the module docstring for the definitions).

    Returns a JSON-serialisable dict with ``sensitivity_at_fp`` ({"1": s, ...}), ``sensitivity_at_fp_ci95``
    ({"1": [lo, hi], ...}), ``fp_per_scan_at_sensitivity_90`` ({"value": v|None, "ci95": [lo|None, hi|None]},
    None meaning never reached), ``cpm``, ``cpm_ci95``, ``n_scans``, ``n_lesions``,
    ``curve`` ({"fp_per_scan", "sensitivity", "threshold"}; the +inf threshold written as None),
    ``curve_ci95`` ({"fp_per_scan", "sensitivity", "low", "high"} on a fixed FP grid), ``n_bootstrap``,
    ``seed``, ``interpolation``, ``n_lesions_hit`` and ``n_false_positives`` (over all candidates).
    """
    results = list(results)
    pool = _Pool(results)
    n_lesions = int(pool.n_lesions_per_scan.sum())
    if n_lesions == 0:
        raise ValueError("FROC: the evaluated scans contain no lesions; sensitivity is undefined")
    fp0, sens0 = pool.curves(np.ones((1, pool.n_scans)))
    max_fp = float(fp0[0, -1])
    grid = np.unique(np.concatenate([np.geomspace(1 / 16, max(64.0, max_fp), 81), np.asarray(fp_rates, float),
                                     np.asarray(CPM_RATES)]))
    point = {
        "sens": {r: float(_sens_at(fp0, sens0, r)[0]) for r in fp_rates},
        "cpm": float(np.mean([_sens_at(fp0, sens0, r)[0] for r in CPM_RATES])),
        "fp90": float(_fp_at_sens(fp0, sens0, target_sensitivity)[0]),
        "band": np.array([_sens_at(fp0, sens0, g)[0] for g in grid]),
    }
    boot_sens = {r: [] for r in fp_rates}
    boot_cpm, boot_fp90, boot_band = [], [], []
    if n_bootstrap > 0:
        weights = _bootstrap_weights(pool.n_scans, n_bootstrap, seed)
        for start in range(0, n_bootstrap, chunk):
            fp, sens = pool.curves(weights[start:start + chunk])
            for r in fp_rates:
                boot_sens[r].append(_sens_at(fp, sens, r))
            boot_cpm.append(np.mean([_sens_at(fp, sens, r) for r in CPM_RATES], axis=0))
            boot_fp90.append(_fp_at_sens(fp, sens, target_sensitivity))
            boot_band.append(np.stack([_sens_at(fp, sens, g) for g in grid], axis=1))

    def ci(samples: list[np.ndarray]) -> list[float | None]:
        if not samples:
            return [None, None]
        s = np.concatenate(samples)
        s = s[~np.isnan(s)]  # resamples drawing only lesion-free scans have no sensitivity
        if len(s) == 0:
            return [None, None]
        lo, hi = _percentile_ci(s)
        return [_finite_or_none(lo), _finite_or_none(hi)]

    if boot_band:
        band = np.concatenate(boot_band, axis=0)
        with np.errstate(invalid="ignore"):
            band_lo = np.nanpercentile(band, 2.5, axis=0)
            band_hi = np.nanpercentile(band, 97.5, axis=0)
    else:
        band_lo = band_hi = point["band"]
    thr = [None if not math.isfinite(t) else float(t) for t in pool.thresholds]
    return {
        "sensitivity_at_fp": {_rate_key(r): point["sens"][r] for r in fp_rates},
        "sensitivity_at_fp_ci95": {_rate_key(r): ci(boot_sens[r]) for r in fp_rates},
        "fp_per_scan_at_sensitivity_90": {"value": _finite_or_none(point["fp90"]), "ci95": ci(boot_fp90)},
        "cpm": point["cpm"],
        "cpm_ci95": ci(boot_cpm),
        "n_scans": pool.n_scans,
        "n_lesions": n_lesions,
        "n_lesions_hit": int(pool.is_lesion.sum()),
        "n_false_positives": int((~pool.is_lesion).sum()),
        "n_bootstrap": int(n_bootstrap),
        "seed": int(seed),
        "target_sensitivity": float(target_sensitivity),
        "interpolation": "step: highest sensitivity at an operating point with mean FP/scan <= rate",
        "curve": {"fp_per_scan": fp0[0].tolist(), "sensitivity": sens0[0].tolist(), "threshold": thr},
        "curve_ci95": {"fp_per_scan": grid.tolist(), "sensitivity": point["band"].tolist(),
                       "low": band_lo.tolist(), "high": band_hi.tolist()},
    }


def paired_bootstrap_difference(
    results_a: Sequence[ScanResult],
    results_b: Sequence[ScanResult],
    fp_rate: float = 10,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Difference of sensitivity at ``fp_rate`` (a - b) with a paired bootstrap CI over the same scans.

    Both lists must cover the same scan ids (matched by id, any order) with the same lesion counts; each
    resample draws the same scans for both models.

    Returns:
        ``{"difference": d, "ci95": [lo, hi], "sensitivity_a": sa, "sensitivity_b": sb, "fp_rate": r,
        "n_bootstrap": B, "seed": seed}``.
    """
    a = {r.scan_id: r for r in results_a}
    b = {r.scan_id: r for r in results_b}
    if set(a) != set(b) or len(a) != len(results_a) or len(b) != len(results_b):
        raise ValueError("paired bootstrap: both result lists must contain the same, unique scan ids "
                         f"(only in a: {sorted(set(a) - set(b))[:5]}, only in b: {sorted(set(b) - set(a))[:5]})")
    ids = sorted(a)
    for i in ids:
        if len(a[i].lesion_scores) != len(b[i].lesion_scores):
            raise ValueError(f"paired bootstrap: scan {i} has {len(a[i].lesion_scores)} lesions in a but "
                             f"{len(b[i].lesion_scores)} in b")
    pa, pb = _Pool([a[i] for i in ids]), _Pool([b[i] for i in ids])
    one = np.ones((1, len(ids)))
    sa = float(_sens_at(*pa.curves(one), fp_rate)[0])
    sb = float(_sens_at(*pb.curves(one), fp_rate)[0])
    diffs = []
    if n_bootstrap > 0:
        weights = _bootstrap_weights(len(ids), n_bootstrap, seed)
        for start in range(0, n_bootstrap, 100):
            w = weights[start:start + 100]
            diffs.append(_sens_at(*pa.curves(w), fp_rate) - _sens_at(*pb.curves(w), fp_rate))
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    d = d[~np.isnan(d)]
    ci = [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))] if len(d) else [None, None]
    return {"difference": sa - sb, "ci95": ci, "sensitivity_a": sa, "sensitivity_b": sb, "fp_rate": float(fp_rate),
            "n_bootstrap": int(n_bootstrap), "seed": int(seed)}


# ---------------------------------------------------------------------------------------------- report
def plot_froc(metrics: Mapping[str, Any], ax: Any, label: str | None = None, color: Any = None) -> None:
    """Draw one FROC curve (step) with its 95 % CI band on a matplotlib axis (log FP axis)."""
    curve, band = metrics["curve"], metrics["curve_ci95"]
    fp = np.asarray(curve["fp_per_scan"], dtype=float)
    sens = np.asarray(curve["sensitivity"], dtype=float)
    keep = fp > 0
    line = ax.step(np.r_[band["fp_per_scan"][0], fp[keep]], np.r_[sens[~keep].max(initial=0.0), sens[keep]],
                   where="post", label=label, color=color)[0]
    ax.fill_between(band["fp_per_scan"], band["low"], band["high"], step="post", alpha=0.2, color=line.get_color(),
                    linewidth=0)
    ax.set_xscale("log")
    ax.set_xlim(band["fp_per_scan"][0], max(band["fp_per_scan"][-1], 1.0))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.grid(True, which="both", alpha=0.3)


def _save_figure(fig: Any, out_png: PathLike) -> Path:
    import matplotlib.pyplot as plt

    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(out_png)


def plot_froc_panels(
    curves: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Mapping[str, Any]]],
    out_png: PathLike | Any,
    title: str | Sequence[str] | None = None,
) -> Path | None:
    """FROC curves with CI bands, several models per panel (the study's Figure 3).

    Args:
        curves: ``{name: metrics}`` for one panel, or a list of such dicts for several panels side by side.
        out_png: output PNG path (written atomically), or a matplotlib axis / sequence of axes to draw on.
        title: panel title, or one title per panel.

    Returns:
        The PNG path, or None when drawing on given axes.
    """
    import matplotlib

    panels = [curves] if isinstance(curves, Mapping) else list(curves)
    titles = [title] * len(panels) if (title is None or isinstance(title, str)) else list(title)
    if isinstance(out_png, (str, Path)):
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
        axes = list(axes[0])
    else:
        fig, axes = None, list(out_png) if isinstance(out_png, Sequence) else [out_png]
    for ax, panel, t in zip(axes, panels, titles):
        for name, m in panel.items():
            plot_froc(m, ax, label=name)
        for r in (1, 10):
            ax.axvline(r, color="grey", linestyle=":", linewidth=0.8)
        ax.legend(loc="lower right")
        if t:
            ax.set_title(t)
    if fig is None:
        return None
    fig.tight_layout()
    return _save_figure(fig, out_png)


def write_report(metrics: Mapping[str, Any], out_dir: PathLike, title: str | None = None) -> dict[str, Path]:
    """Write ``metrics.json``, ``froc.csv`` (the curve) and ``froc.png`` (curve + CI band) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "csv": out / "froc.csv", "png": out / "froc.png"}
    write_json(dict(metrics), paths["metrics"])
    c = metrics["curve"]
    rows = [{"threshold": "inf" if t is None else repr(float(t)), "fp_per_scan": repr(float(f)),
             "sensitivity": repr(float(s))} for t, f, s in zip(c["threshold"], c["fp_per_scan"], c["sensitivity"])]
    write_csv(rows, paths["csv"], ["threshold", "fp_per_scan", "sensitivity"])
    s10 = metrics["sensitivity_at_fp"].get("10")
    default_title = f"FROC ({metrics['n_scans']} scans, {metrics['n_lesions']} lesions" + (
        f", sens@10FP {s10:.3f})" if s10 is not None else ")")
    plot_froc_panels({"detector": metrics}, paths["png"], title=title or default_title)
    return paths


# ------------------------------------------------------------------------------------- candidates CSV
def candidate_rows(image: str, coords: np.ndarray, probs: np.ndarray, affine: np.ndarray) -> list[dict[str, Any]]:
    """Rows of ``candidates.csv`` for one image: voxel (i, j, k), world (x, y, z) = affine @ (i, j, k, 1)."""
    from nibabel.affines import apply_affine

    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 3)
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if len(coords) != len(probs):
        raise ValueError(f"{image}: {len(coords)} candidates but {len(probs)} probabilities")
    world = apply_affine(np.asarray(affine, dtype=np.float64), coords) if len(coords) else np.zeros((0, 3))
    return [{"image": str(image), "i": int(c[0]), "j": int(c[1]), "k": int(c[2]), "x": round(float(w[0]), 4),
             "y": round(float(w[1]), 4), "z": round(float(w[2]), 4), "probability": float(p)}
            for c, w, p in zip(coords, world, probs)]


def write_candidates_csv(rows: Iterable[Mapping[str, Any]], path: PathLike) -> Path:
    """Write candidate rows (dicts with :data:`CANDIDATE_COLUMNS`) atomically."""
    rows = list(rows)
    for n, r in enumerate(rows):
        missing = [c for c in CANDIDATE_COLUMNS if c not in r]
        if missing:
            raise ValueError(f"{path}: candidate row {n} lacks columns {missing}")
    return write_csv([{c: r[c] for c in CANDIDATE_COLUMNS} for r in rows], path, CANDIDATE_COLUMNS)


def read_candidates_csv(
    path: PathLike,
    shapes: Mapping[str, Sequence[int]] | None = None,
    affines: Mapping[str, np.ndarray] | None = None,
    world_tolerance_mm: float | None = None,
) -> list[dict[str, Any]]:
    """Read and validate ``candidates.csv``.

    Checks the columns, that i, j, k are integers, probability a finite number and, when ``shapes``
    ({image: (X, Y, Z)}) is given, that (i, j, k) lies inside the image; with ``affines`` also that x, y, z
    equal ``affine @ (i, j, k)`` within ``world_tolerance_mm`` (default: half the largest voxel size).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming the CSV, the row (1-based data row, header excluded) and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: candidates CSV does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in CANDIDATE_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: candidates CSV lacks columns {missing} (has {header}; expected "
                             f"{list(CANDIDATE_COLUMNS)})")
        raw = list(reader)
    rows = []
    for n, r in enumerate(raw, start=1):
        try:
            ijk = [float(r[c]) for c in ("i", "j", "k")]
            xyz = [float(r[c]) for c in ("x", "y", "z")]
            prob = float(r["probability"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: row {n}: non-numeric value ({e})") from e
        if any(v != round(v) for v in ijk):
            raise ValueError(f"{path}: row {n}: voxel indices i, j, k must be integers, got {ijk}")
        if not (math.isfinite(prob) and all(math.isfinite(v) for v in xyz)):
            raise ValueError(f"{path}: row {n}: probability and x, y, z must be finite numbers")
        image = (r["image"] or "").strip()
        if not image:
            raise ValueError(f"{path}: row {n}: empty image name")
        ijk = [int(v) for v in ijk]
        if shapes is not None:
            if image not in shapes:
                raise ValueError(f"{path}: row {n}: image {image!r} is not one of the evaluated images")
            shape = tuple(shapes[image])
            if any(v < 0 or v >= s for v, s in zip(ijk, shape)):
                raise ValueError(f"{path}: row {n}: voxel {ijk} lies outside image {image!r} of shape {shape}")
        if affines is not None and image in affines:
            from nibabel.affines import apply_affine

            aff = np.asarray(affines[image], dtype=np.float64)
            tol = world_tolerance_mm
            if tol is None:
                tol = 0.5 * float(np.sqrt((aff[:3, :3] ** 2).sum(axis=0)).max())
            expect = apply_affine(aff, ijk)
            if np.abs(expect - np.asarray(xyz)).max() > tol:
                raise ValueError(f"{path}: row {n}: world coordinates {xyz} do not match voxel {ijk} of "
                                 f"{image!r} (affine gives {np.round(expect, 3).tolist()})")
        rows.append({"image": image, "i": ijk[0], "j": ijk[1], "k": ijk[2], "x": xyz[0], "y": xyz[1], "z": xyz[2],
                     "probability": prob})
    return rows


def _load_split(datalist: PathLike, split: str) -> list[dict[str, Any]]:
    datalist = Path(datalist)
    if not datalist.is_file():
        raise FileNotFoundError(f"{datalist}: datalist does not exist")
    try:
        data = json.loads(datalist.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{datalist}: not valid JSON ({e})") from e
    if split not in data or not isinstance(data[split], list):
        raise ValueError(f"{datalist}: no {split!r} list (has {sorted(data)})")
    items = []
    for n, item in enumerate(data[split]):
        if not isinstance(item, Mapping) or "image" not in item or "label" not in item:
            raise ValueError(f"{datalist}: {split}[{n}] needs 'image' and 'label' entries")
        it = dict(item)
        for key in ("image", "label"):
            p = Path(it[key])
            p = p if p.is_absolute() else datalist.parent / p
            if not p.is_file():
                raise FileNotFoundError(f"{datalist}: {split}[{n}] names {key} file {p}, which does not exist")
            it[key] = str(p)
        items.append(it)
    return items


def _image_keys(item: Mapping[str, Any]) -> list[str]:
    """Names by which a candidates CSV may refer to a datalist item: file name, path, and id."""
    p = Path(item["image"])
    keys = [p.name, str(p)]
    if item.get("id"):
        keys.append(str(item["id"]))
    return keys


def scan_results_from_csv(candidates_csv: PathLike, datalist: PathLike, split: str = "test") -> list[ScanResult]:
    """Match a ``candidates.csv`` against the instance labels of a datalist split: one :class:`ScanResult` per
    item of the split (in datalist order; a scan without candidates has all its lesions missed).

    The CSV's ``image`` column names a split item by file name (e.g. ``sub-001_swi.nii.gz``), path, or ``id``;
    voxel indices refer to the image file's voxel grid as stored, which the label must share.
    """
    import nibabel as nib

    items = _load_split(datalist, split)
    if not items:
        raise ValueError(f"{datalist}: split {split!r} is empty")
    name_to_item: dict[str, int] = {}
    shapes, affines, labels = {}, {}, []
    for n, it in enumerate(items):
        try:
            img = nib.load(it["image"])
            lab_img = nib.load(it["label"])
            lab = np.asarray(lab_img.dataobj)
        except Exception as e:
            raise ValueError(f"{it['image']}: cannot read the image or its label {it['label']} ({e})") from e
        if lab.ndim == 4 and lab.shape[3] == 1:
            lab = lab[..., 0]
        if tuple(lab.shape) != tuple(img.shape[:3]):
            raise ValueError(f"{it['label']}: label shape {lab.shape} differs from image {it['image']} shape {img.shape}")
        labels.append(lab.astype(np.int64))
        for key in _image_keys(it):
            name_to_item.setdefault(key, n)
            shapes[key] = lab.shape
            affines[key] = img.affine
    rows = read_candidates_csv(candidates_csv, shapes=shapes, affines=affines)
    per_scan: list[list[dict[str, Any]]] = [[] for _ in items]
    for r in rows:
        per_scan[name_to_item[r["image"]]].append(r)
    results = []
    for it, lab, rs in zip(items, labels, per_scan):
        coords = np.array([[r["i"], r["j"], r["k"]] for r in rs], dtype=np.int64).reshape(-1, 3)
        probs = np.array([r["probability"] for r in rs], dtype=np.float64)
        results.append(match_candidates(str(it.get("id") or Path(it["image"]).name), coords, probs, lab))
    return results


def evaluate_csv(
    candidates_csv: PathLike,
    datalist: PathLike,
    split: str = "test",
    out_dir: PathLike | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    fp_rates: Sequence[float] = FP_RATES,
) -> dict[str, Any]:
    """Evaluate a ``candidates.csv`` against the instance labels of a datalist split.

    The CSV's ``image`` column names a split item by file name (e.g. ``sub-001_swi.nii.gz``), path, or
    ``id``. Every item of the split is a scan (one without candidates has all its lesions missed). Voxel
    indices refer to the image file's voxel grid as stored; the label must share it. With ``out_dir`` the
    report is written there (:func:`write_report`).
    """
    results = scan_results_from_csv(candidates_csv, datalist, split)
    metrics = evaluate(results, n_bootstrap=n_bootstrap, seed=seed, fp_rates=fp_rates)
    metrics["candidates_csv"] = str(candidates_csv)
    metrics["datalist"] = str(datalist)
    metrics["split"] = split
    if out_dir is not None:
        write_report(metrics, out_dir)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: evaluate a candidates CSV against a datalist split and write the FROC report."""
    p = argparse.ArgumentParser(prog="python -m cmb_synthesis.froc", description=main.__doc__)
    p.add_argument("--candidates", required=True, help="candidates.csv (image,i,j,k,x,y,z,probability)")
    p.add_argument("--datalist", required=True, help="datalist.json (MONAI decathlon format)")
    p.add_argument("--split", default="test")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--n_bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        m = evaluate_csv(args.candidates, args.datalist, args.split, args.output_dir, args.n_bootstrap, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ci = m["sensitivity_at_fp_ci95"].get("10", [None, None])
    s10 = m["sensitivity_at_fp"].get("10")
    print(f"{m['n_scans']} scans, {m['n_lesions']} lesions; sensitivity at 10 FP/scan {s10:.3f} "
          f"(95% CI {ci[0]}, {ci[1]}); CPM {m['cpm']:.3f}; report in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""FROC maths: the curve, sensitivity at FP rates, CPM and bootstrap 95 % CIs, and the paired bootstrap
difference of two detectors (one module for the bundle, the study and the CPM validation metric).

Inputs are per-scan :class:`~cmb_synthesis.evaluation.hits.ScanResult` objects from the hit rule
(:mod:`cmb_synthesis.evaluation.hits`); plots and files are :mod:`cmb_synthesis.evaluation.report`.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cmb_synthesis.evaluation.hits import ScanResult

__all__ = ["FP_RATES", "CPM_RATES", "ScorePool", "bootstrap_weights", "sensitivity_at_rate", "froc_curve",
           "sensitivity_at", "evaluate", "paired_bootstrap_difference"]

FP_RATES = (1, 2, 4, 8, 10, 20)
CPM_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


# ---------------------------------------------------------------------------------------- curve algebra
class ScorePool:
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


def sensitivity_at_rate(fp: np.ndarray, sens: np.ndarray, rate: float) -> np.ndarray:
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
    pool = ScorePool(results)
    fp, sens = pool.curves(np.ones((1, pool.n_scans)))
    return fp[0], sens[0], pool.thresholds.copy()


def sensitivity_at(fp_per_scan: np.ndarray, sensitivity: np.ndarray, rate: float) -> float:
    """Sensitivity of a curve at an FP/scan rate (step interpolation, see the module docstring)."""
    return float(sensitivity_at_rate(np.asarray(fp_per_scan)[None], np.asarray(sensitivity)[None], rate)[0])


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


def bootstrap_weights(n_scans: int, n_bootstrap: int, seed: int) -> np.ndarray:
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
    pool = ScorePool(results)
    n_lesions = int(pool.n_lesions_per_scan.sum())
    if n_lesions == 0:
        raise ValueError("FROC: the evaluated scans contain no lesions; sensitivity is undefined")
    fp0, sens0 = pool.curves(np.ones((1, pool.n_scans)))
    max_fp = float(fp0[0, -1])
    grid = np.unique(np.concatenate([np.geomspace(1 / 16, max(64.0, max_fp), 81), np.asarray(fp_rates, float),
                                     np.asarray(CPM_RATES)]))
    point = {
        "sens": {r: float(sensitivity_at_rate(fp0, sens0, r)[0]) for r in fp_rates},
        "cpm": float(np.mean([sensitivity_at_rate(fp0, sens0, r)[0] for r in CPM_RATES])),
        "fp90": float(_fp_at_sens(fp0, sens0, target_sensitivity)[0]),
        "band": np.array([sensitivity_at_rate(fp0, sens0, g)[0] for g in grid]),
    }
    boot_sens = {r: [] for r in fp_rates}
    boot_cpm, boot_fp90, boot_band = [], [], []
    if n_bootstrap > 0:
        weights = bootstrap_weights(pool.n_scans, n_bootstrap, seed)
        for start in range(0, n_bootstrap, chunk):
            fp, sens = pool.curves(weights[start:start + chunk])
            for r in fp_rates:
                boot_sens[r].append(sensitivity_at_rate(fp, sens, r))
            boot_cpm.append(np.mean([sensitivity_at_rate(fp, sens, r) for r in CPM_RATES], axis=0))
            boot_fp90.append(_fp_at_sens(fp, sens, target_sensitivity))
            boot_band.append(np.stack([sensitivity_at_rate(fp, sens, g) for g in grid], axis=1))

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
        "label_maps_split_into_components": [r.scan_id for r in results if r.label_split],
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
    pa, pb = ScorePool([a[i] for i in ids]), ScorePool([b[i] for i in ids])
    one = np.ones((1, len(ids)))
    sa = float(sensitivity_at_rate(*pa.curves(one), fp_rate)[0])
    sb = float(sensitivity_at_rate(*pb.curves(one), fp_rate)[0])
    diffs = []
    if n_bootstrap > 0:
        weights = bootstrap_weights(len(ids), n_bootstrap, seed)
        for start in range(0, n_bootstrap, 100):
            w = weights[start:start + 100]
            diffs.append(sensitivity_at_rate(*pa.curves(w), fp_rate) - sensitivity_at_rate(*pb.curves(w), fp_rate))
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    d = d[~np.isnan(d)]
    ci = [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))] if len(d) else [None, None]
    return {"difference": sa - sb, "ci95": ci, "sensitivity_a": sa, "sensitivity_b": sb, "fp_rate": float(fp_rate),
            "n_bootstrap": int(n_bootstrap), "seed": int(seed)}

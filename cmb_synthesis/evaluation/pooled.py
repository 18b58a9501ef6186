"""Bootstrap over test scans pooled over seeds (repeats): the learning-curve study's statistics.

A study repeats every detector with several seeds, each evaluated on the same test scans. Two kinds of
uncertainty are summarised here, with ONE resample of the test scans shared by every seed and both arms:

- :func:`pooled_bootstrap`: one arm's sensitivity at an FP rate (and CPM), averaged over seeds; the 95 %
  percentile CI resamples the scans (the CI band of the learning curve).
- :func:`pooled_paired_bootstrap_difference`: arm a minus arm b (e.g. real+synthetic minus real), the paired
  difference of each seed averaged over seeds; each resample draws the same scans for both arms and all seeds,
  so scan-to-scan variation that both arms share cancels. The per-seed paired differences come with it
  (:func:`cmb_synthesis.evaluation.froc.paired_bootstrap_difference`, the seed's own CI).

Seeds enter as a fixed set (the mean over the seeds run), not resampled: with 3-5 seeds a resample of seeds
says little; the per-seed values are reported so their spread can be read directly.

The FROC operating points are those of :mod:`cmb_synthesis.evaluation.froc` (step interpolation, the same
curve code: its ``ScorePool`` weighted curves, so a resample where a scan is drawn k times counts it k times).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cmb_synthesis.evaluation.froc import (CPM_RATES, ScorePool, bootstrap_weights, paired_bootstrap_difference,
                                           sensitivity_at_rate)
from cmb_synthesis.evaluation.hits import ScanResult

__all__ = ["pooled_bootstrap", "pooled_paired_bootstrap_difference"]


def _aligned(per_seed: Sequence[Sequence[ScanResult]], ids: list[str] | None,
             what: str) -> tuple[list[str], list[ScorePool]]:
    """Pools of each seed's results in the order of ``ids`` (the sorted scan ids of the first seed)."""
    if len(per_seed) == 0:
        raise ValueError(f"{what}: no seeds to pool")
    pools = []
    for s, results in enumerate(per_seed):
        by_id = {r.scan_id: r for r in results}
        if len(by_id) != len(results):
            raise ValueError(f"{what}: seed #{s} has duplicate scan ids")
        if ids is None:
            ids = sorted(by_id)
        if set(by_id) != set(ids):
            raise ValueError(f"{what}: seed #{s} covers other test scans than the first "
                             f"(only here: {sorted(set(by_id) - set(ids))[:5]}, missing: {sorted(set(ids) - set(by_id))[:5]})")
        pools.append(ScorePool([by_id[i] for i in ids]))
    n_les = pools[0].n_lesions_per_scan
    for s, p in enumerate(pools):
        if not np.array_equal(p.n_lesions_per_scan, n_les):
            raise ValueError(f"{what}: seed #{s} counts other lesions per scan than the first (different label maps?)")
    return ids, pools


def _metrics(pool: ScorePool, w: np.ndarray, fp_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """(B,) sensitivity at ``fp_rate`` and (B,) CPM under the (B, n_scans) scan multiplicities ``w``."""
    fp, sens = pool.curves(w)
    cpm = np.mean([sensitivity_at_rate(fp, sens, r) for r in CPM_RATES], axis=0)
    return sensitivity_at_rate(fp, sens, fp_rate), cpm


def _ci(samples: np.ndarray) -> list[float | None]:
    s = samples[~np.isnan(samples)]
    if len(s) == 0:
        return [None, None]
    return [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))]


def _boot(pools: Sequence[ScorePool], n_scans: int, n_bootstrap: int, seed: int, fp_rate: float,
          chunk: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(n_seeds, B) sensitivity and CPM of each pool under the same resamples of the scans."""
    if n_bootstrap <= 0:
        return np.zeros((len(pools), 0)), np.zeros((len(pools), 0))
    weights = bootstrap_weights(n_scans, n_bootstrap, seed)
    sens = np.zeros((len(pools), n_bootstrap))
    cpm = np.zeros((len(pools), n_bootstrap))
    for start in range(0, n_bootstrap, chunk):
        w = weights[start:start + chunk]
        for i, p in enumerate(pools):
            sens[i, start:start + chunk], cpm[i, start:start + chunk] = _metrics(p, w, fp_rate)
    return sens, cpm


def pooled_bootstrap(
    results_per_seed: Sequence[Sequence[ScanResult]],
    fp_rate: float = 10,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """One arm's sensitivity at ``fp_rate`` and CPM, mean over seeds, with a scan-bootstrap 95 % CI.

    Args:
        results_per_seed: per seed, the per-scan results on the test split (the same scan ids for every seed).
        fp_rate: FP/scan of the operating point (step interpolation).
        n_bootstrap: resamples of the test scans (with replacement), shared by all seeds.
        seed: seed of the resampling (``numpy.random.default_rng``).

    Returns:
        ``{"sensitivity": mean over seeds, "sensitivity_ci95": [lo, hi], "per_seed_sensitivity": [...],
        "cpm", "cpm_ci95", "per_seed_cpm", "fp_rate", "n_seeds", "n_scans", "n_lesions", "n_bootstrap", "seed"}``.
    """
    ids, pools = _aligned(results_per_seed, None, "pooled bootstrap")
    one = np.ones((1, len(ids)))
    point = [_metrics(p, one, fp_rate) for p in pools]
    sens0 = np.array([float(s[0]) for s, _ in point])
    cpm0 = np.array([float(c[0]) for _, c in point])
    bs, bc = _boot(pools, len(ids), n_bootstrap, seed, fp_rate)
    return {
        "sensitivity": float(sens0.mean()), "sensitivity_ci95": _ci(bs.mean(axis=0)),
        "per_seed_sensitivity": sens0.tolist(),
        "cpm": float(cpm0.mean()), "cpm_ci95": _ci(bc.mean(axis=0)), "per_seed_cpm": cpm0.tolist(),
        "fp_rate": float(fp_rate), "n_seeds": len(pools), "n_scans": len(ids),
        "n_lesions": int(pools[0].n_lesions_per_scan.sum()), "n_bootstrap": int(n_bootstrap), "seed": int(seed),
    }


def pooled_paired_bootstrap_difference(
    results_a_per_seed: Sequence[Sequence[ScanResult]],
    results_b_per_seed: Sequence[Sequence[ScanResult]],
    fp_rate: float = 10,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Arm a minus arm b, sensitivity at ``fp_rate`` and CPM, mean over seeds of the paired differences.

    Seed ``s`` of a is paired with seed ``s`` of b (the same data subset, synthesis model, initialisation seed).
    Every bootstrap resample draws the same test scans for both arms and every seed; the CI is the
    2.5/97.5 percentile of the resampled mean differences.

    Args:
        results_a_per_seed, results_b_per_seed: per seed, per-scan test results (same seeds, same scans).
        fp_rate: FP/scan of the operating point (10 in the paper's Table 1).
        n_bootstrap: resamples of the test scans; seed: their seed.

    Returns:
        ``{"difference", "ci95", "cpm_difference", "cpm_ci95", "sensitivity_a", "sensitivity_b", "cpm_a",
        "cpm_b"`` (means over seeds), ``"per_seed"`` (each seed's own paired bootstrap:
        :func:`~cmb_synthesis.evaluation.froc.paired_bootstrap_difference` plus its CPM difference),
        ``"fp_rate", "n_seeds", "n_scans", "n_lesions", "n_bootstrap", "seed"}``. Differences are fractions
        (0.05 = 5 percentage points).

    Raises:
        ValueError: different numbers of seeds, or seeds covering different scans or lesions.
    """
    if len(results_a_per_seed) != len(results_b_per_seed):
        raise ValueError(f"pooled paired bootstrap: {len(results_a_per_seed)} seeds of a but "
                         f"{len(results_b_per_seed)} of b")
    ids, pa = _aligned(results_a_per_seed, None, "pooled paired bootstrap (a)")
    _, pb = _aligned(results_b_per_seed, ids, "pooled paired bootstrap (b)")
    if not np.array_equal(pa[0].n_lesions_per_scan, pb[0].n_lesions_per_scan):
        raise ValueError("pooled paired bootstrap: a and b count other lesions per scan")
    one = np.ones((1, len(ids)))
    ma = np.array([[float(v[0]) for v in _metrics(p, one, fp_rate)] for p in pa])  # (S, 2): sens, cpm
    mb = np.array([[float(v[0]) for v in _metrics(p, one, fp_rate)] for p in pb])
    sa, ca = _boot(pa, len(ids), n_bootstrap, seed, fp_rate)
    sb, cb = _boot(pb, len(ids), n_bootstrap, seed, fp_rate)  # same seed: the same resamples as a
    per_seed = []
    for s in range(len(pa)):
        d = paired_bootstrap_difference(results_a_per_seed[s], results_b_per_seed[s], fp_rate=fp_rate,
                                        n_bootstrap=n_bootstrap, seed=seed)
        d["cpm_difference"] = float(ma[s, 1] - mb[s, 1])
        d["cpm_ci95"] = _ci(ca[s] - cb[s])
        per_seed.append(d)
    return {
        "difference": float((ma[:, 0] - mb[:, 0]).mean()), "ci95": _ci((sa - sb).mean(axis=0)),
        "cpm_difference": float((ma[:, 1] - mb[:, 1]).mean()), "cpm_ci95": _ci((ca - cb).mean(axis=0)),
        "sensitivity_a": float(ma[:, 0].mean()), "sensitivity_b": float(mb[:, 0].mean()),
        "cpm_a": float(ma[:, 1].mean()), "cpm_b": float(mb[:, 1].mean()),
        "per_seed": per_seed, "fp_rate": float(fp_rate), "n_seeds": len(pa), "n_scans": len(ids),
        "n_lesions": int(pa[0].n_lesions_per_scan.sum()), "n_bootstrap": int(n_bootstrap), "seed": int(seed),
    }

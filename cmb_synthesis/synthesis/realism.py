"""Do synthetic CMBs look like real ones? Per-lesion measurements and a classifier two-sample test.

Beyond the paper (which shows pictures only), the synthesis evaluator measures, on fixed validation lesions:

- the **radial profile** of a lesion: the mean intensity at distance ``d = 0, 1, ..., max_radius`` voxels from the
  lesion centre (the voxels whose distance rounds to ``d``), divided by the mean intensity of the surrounding
  tissue (brain voxels at ``ring`` = 5-7 voxels from the centre that are not within 1 voxel of any lesion). A
  real CMB on SWI is darkest at its centre and blooms out (``~0.4`` at the centre, ``~0.6`` one voxel out, 1.0
  far away on the phantom); a flat light disc has a flat, higher profile.
- a **classifier two-sample test**: a logistic regression (scikit-learn, standardised features) trained to tell
  real from synthetic lesion patches (``(2 r + 1)^3`` voxels around the centre, divided by the surrounding
  tissue mean), scored by stratified k-fold cross-validated ROC AUC. 0.5: indistinguishable; 1.0: every
  synthetic lesion is recognised.

Lesion centres are the rounded centres of mass of the 26-connected components of the mask; lesions whose
measurement window leaves the patch are skipped. Inputs are single patches (X, Y, Z) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["PROFILE_RADII", "lesion_measurements", "profile_summary", "two_sample_auc", "realism_report"]

PROFILE_RADII = (0, 1, 2, 3, 4)


def _np3(x: Any) -> np.ndarray:
    a = x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"expected a 3-D patch, got shape {a.shape}")
    return a


def lesion_measurements(
    image: Any,
    mask: Any,
    brainmask: Any | None = None,
    max_radius: int = 4,
    ring: tuple[float, float] = (5.0, 7.0),
    patch_radius: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Radial profiles and normalised patches of every lesion of one patch.

    Args:
        image: (X, Y, Z) or (1, X, Y, Z) intensities in [0, 1].
        mask: same shape, non-zero = lesion (binary or instance labels; components are the lesions).
        brainmask: same shape, non-zero = brain (None: every voxel).
        max_radius: profile distances 0..max_radius voxels.
        ring: (inner, outer) radius in voxels of the surrounding-tissue reference.
        patch_radius: half-width of the classifier patch.

    Returns:
        ``profiles`` (L, max_radius + 1) float64 relative intensities and ``patches``
        (L, (2 patch_radius + 1)^3) float32, for the L lesions whose window fits inside the patch and whose
        reference ring holds at least 10 tissue voxels.
    """
    img, m = _np3(image), _np3(mask) > 0
    brain = np.ones_like(m) if brainmask is None else _np3(brainmask) > 0
    if img.shape != m.shape or img.shape != brain.shape:
        raise ValueError(f"image {img.shape}, mask {m.shape} and brain mask {brain.shape} differ in shape")
    labels, n = ndimage.label(m, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros((0, max_radius + 1)), np.zeros((0, (2 * patch_radius + 1) ** 3), np.float32)
    near_lesion = ndimage.binary_dilation(m, structure=np.ones((3, 3, 3), bool))
    reach = int(np.ceil(max(ring[1], max_radius, patch_radius)))
    g = np.arange(-reach, reach + 1)
    dist = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    shells = [np.abs(dist - d) < 0.5 for d in range(max_radius + 1)]
    ring_sel = (dist >= ring[0]) & (dist <= ring[1])
    pr = slice(reach - patch_radius, reach + patch_radius + 1)
    profiles, patches = [], []
    for c in ndimage.center_of_mass(m, labels, range(1, n + 1)):
        c = np.rint(c).astype(int)
        if (c - reach < 0).any() or (c + reach >= np.array(img.shape)).any():
            continue
        win = tuple(slice(int(v) - reach, int(v) + reach + 1) for v in c)
        wi, tissue = img[win], brain[win] & ~near_lesion[win] & ring_sel
        if tissue.sum() < 10:
            continue
        ref = float(wi[tissue].mean())
        if ref <= 1e-6:
            continue
        profiles.append([float(wi[s].mean()) / ref for s in shells])
        patches.append((wi[pr, pr, pr] / ref).astype(np.float32).ravel())
    k = (2 * patch_radius + 1) ** 3
    return (np.asarray(profiles, np.float64).reshape(-1, max_radius + 1), np.asarray(patches, np.float32).reshape(-1, k))


def profile_summary(real: np.ndarray, synthetic: np.ndarray) -> dict[str, Any]:
    """Mean profiles of real and synthetic lesions, their largest absolute difference and the centre ratio.

    Returns ``{"profile_real": [...], "profile_synthetic": [...], "profile_error": max |diff|,
    "centre_ratio": synthetic[0] / real[0], "n_real": L_r, "n_synthetic": L_s}`` (NaN where a set is empty).
    """
    real, synthetic = np.asarray(real, np.float64), np.asarray(synthetic, np.float64)
    width = real.shape[1] if real.ndim == 2 and real.size else (synthetic.shape[1] if synthetic.size else len(PROFILE_RADII))
    pr = real.mean(0) if len(real) else np.full(width, np.nan)
    ps = synthetic.mean(0) if len(synthetic) else np.full(width, np.nan)
    return {
        "profile_real": pr.tolist(),
        "profile_synthetic": ps.tolist(),
        "profile_error": float(np.max(np.abs(ps - pr))),
        "centre_ratio": float(ps[0] / pr[0]) if pr[0] > 0 else float("nan"),
        "n_real": int(len(real)),
        "n_synthetic": int(len(synthetic)),
    }


def two_sample_auc(real: np.ndarray, synthetic: np.ndarray, n_splits: int = 5, seed: int = 0, C: float = 1.0) -> float:
    """Cross-validated ROC AUC of a logistic regression telling synthetic (1) from real (0) feature rows.

    Stratified ``n_splits``-fold CV (fewer folds when a class has fewer rows), features standardised inside
    each fold; the AUC is computed on the pooled out-of-fold scores. NaN when a class has fewer than 2 rows.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    real, synthetic = np.asarray(real, np.float64), np.asarray(synthetic, np.float64)
    folds = min(int(n_splits), len(real), len(synthetic))
    if folds < 2:
        return float("nan")
    x = np.concatenate([real, synthetic])
    y = np.concatenate([np.zeros(len(real)), np.ones(len(synthetic))])
    scores = np.zeros(len(y))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=int(seed)).split(x, y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
        clf.fit(x[train], y[train])
        scores[test] = clf.predict_proba(x[test])[:, 1]
    return float(roc_auc_score(y, scores))


def realism_report(
    real_profiles: Sequence[np.ndarray], synthetic_profiles: Sequence[np.ndarray],
    real_patches: Sequence[np.ndarray], synthetic_patches: Sequence[np.ndarray], seed: int = 0,
) -> dict[str, Any]:
    """:func:`profile_summary` plus ``realism_auc`` (:func:`two_sample_auc` on the patches) of collected lesions."""
    def cat(parts: Sequence[np.ndarray], width: int) -> np.ndarray:
        parts = [np.asarray(p) for p in parts if len(p)]
        return np.concatenate(parts) if parts else np.zeros((0, width))

    rp, sp = cat(real_profiles, len(PROFILE_RADII)), cat(synthetic_profiles, len(PROFILE_RADII))
    out = profile_summary(rp, sp)
    width = max([np.asarray(p).shape[1] for p in list(real_patches) + list(synthetic_patches) if len(p)] or [1])
    out["realism_auc"] = two_sample_auc(cat(real_patches, width), cat(synthetic_patches, width), seed=seed)
    return out

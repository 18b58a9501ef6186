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

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from ignite.metrics import Metric
from scipy import ndimage

from cmb_synthesis.data.datalist import load_split, split_groups
from cmb_synthesis.data.io import PathLike
from cmb_synthesis.synthesis.codes import quantile_profiles
from transforms.pipelines import preprocessing

__all__ = [
    "PROFILE_RADII",
    "REALISM_METRICS",
    "lesion_measurements",
    "batch_measurements",
    "pathological_volumes",
    "split_lesions",
    "reference_lesions",
    "size_binned_profiles",
    "profile_summary",
    "two_sample_auc",
    "realism_report",
    "RealismMetric",
]

PROFILE_RADII = (0, 1, 2, 3, 4)
# what RealismMetric can report (the profiles at each radius of PROFILE_RADII, real and synthetic)
REALISM_METRICS = (
    "realism_auc", "profile_error", "centre_ratio",
    *(f"profile_real_{d}" for d in PROFILE_RADII), *(f"profile_synthetic_{d}" for d in PROFILE_RADII),
)  # fmt: skip


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
    return_sizes: bool = False,
    subvoxel: bool = False,
) -> tuple[np.ndarray, ...]:
    """Radial profiles and normalised patches of every lesion of one patch.

    Args:
        image: (X, Y, Z) or (1, X, Y, Z) intensities in [0, 1].
        mask: same shape, non-zero = lesion (binary or instance labels; components are the lesions).
        brainmask: same shape, non-zero = brain (None: every voxel).
        max_radius: profile distances 0..max_radius voxels.
        ring: (inner, outer) radius in voxels of the surrounding-tissue reference.
        patch_radius: half-width of the classifier patch.
        return_sizes: also return the lesions' sizes.
        subvoxel: sample each classifier patch (trilinear) on the grid centred at the lesion's exact centre of
            mass instead of taking the voxels around its rounded centre (profiles and the ring are unchanged).

    Returns:
        ``profiles`` (L, max_radius + 1) float64 relative intensities and ``patches``
        (L, (2 patch_radius + 1)^3) float32, for the L lesions whose window fits inside the patch and whose
        reference ring holds at least 10 tissue voxels; with ``return_sizes`` also ``sizes`` (L,) int64, the
        voxel count of each lesion's 26-connected component.
    """
    img, m = _np3(image), _np3(mask) > 0
    brain = np.ones_like(m) if brainmask is None else _np3(brainmask) > 0
    if img.shape != m.shape or img.shape != brain.shape:
        raise ValueError(f"image {img.shape}, mask {m.shape} and brain mask {brain.shape} differ in shape")
    labels, n = ndimage.label(m, structure=np.ones((3, 3, 3), bool))
    k = (2 * patch_radius + 1) ** 3
    if n == 0:
        empty = (np.zeros((0, max_radius + 1)), np.zeros((0, k), np.float32))
        return empty + (np.zeros(0, np.int64),) if return_sizes else empty
    component_sizes = np.bincount(labels.ravel(), minlength=n + 1)
    near_lesion = ndimage.binary_dilation(m, structure=np.ones((3, 3, 3), bool))
    reach = int(np.ceil(max(ring[1], max_radius, patch_radius)))
    g = np.arange(-reach, reach + 1)
    dist = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    shells = [np.abs(dist - d) < 0.5 for d in range(max_radius + 1)]
    ring_sel = (dist >= ring[0]) & (dist <= ring[1])
    pr = slice(reach - patch_radius, reach + patch_radius + 1)
    profiles, patches, sizes = [], [], []
    q = np.arange(-patch_radius, patch_radius + 1)
    for label, exact in enumerate(ndimage.center_of_mass(m, labels, range(1, n + 1)), start=1):
        c = np.rint(exact).astype(int)
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
        if subvoxel:
            grid = np.stack(np.meshgrid(*[q + v for v in exact], indexing="ij")).reshape(3, -1)
            patches.append((ndimage.map_coordinates(img, grid, order=1) / ref).astype(np.float32))
        else:
            patches.append((wi[pr, pr, pr] / ref).astype(np.float32).ravel())
        sizes.append(int(component_sizes[label]))
    out = (np.asarray(profiles, np.float64).reshape(-1, max_radius + 1), np.asarray(patches, np.float32).reshape(-1, k))
    return out + (np.asarray(sizes, np.int64),) if return_sizes else out


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


def two_sample_auc(
    real: np.ndarray, synthetic: np.ndarray, n_splits: int = 5, seed: int = 0, C: float = 1.0, n_repeats: int = 1
) -> float:
    """Cross-validated ROC AUC of a logistic regression telling synthetic (1) from real (0) feature rows.

    Stratified ``n_splits``-fold CV (fewer folds when a class has fewer rows), features standardised inside
    each fold; the AUC is computed on the pooled out-of-fold scores. With ``n_repeats`` > 1 the CV is repeated
    with the fold seeds ``seed, seed + 1, ...`` and the AUCs averaged: with a few dozen lesions per class the
    fold assignment alone moved one model's AUC by up to 0.12 (0.738 / 0.856). NaN when a class has fewer than 2
    rows.
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
    if int(n_repeats) < 1:
        raise ValueError(f"n_repeats must be >= 1, got {n_repeats}")
    x = np.concatenate([real, synthetic])
    y = np.concatenate([np.zeros(len(real)), np.ones(len(synthetic))])
    aucs = []
    for r in range(int(n_repeats)):
        scores = np.zeros(len(y))
        for train, test in StratifiedKFold(folds, shuffle=True, random_state=int(seed) + r).split(x, y):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
            clf.fit(x[train], y[train])
            scores[test] = clf.predict_proba(x[test])[:, 1]
        aucs.append(roc_auc_score(y, scores))
    return float(np.mean(aucs))


def realism_report(
    real_profiles: Sequence[np.ndarray], synthetic_profiles: Sequence[np.ndarray],
    real_patches: Sequence[np.ndarray], synthetic_patches: Sequence[np.ndarray], seed: int = 0, n_repeats: int = 1,
) -> dict[str, Any]:
    """:func:`profile_summary` plus ``realism_auc`` (:func:`two_sample_auc` on the patches, ``n_repeats`` CV
    repetitions) of collected lesions."""
    def cat(parts: Sequence[np.ndarray], width: int) -> np.ndarray:
        parts = [np.asarray(p) for p in parts if len(p)]
        return np.concatenate(parts) if parts else np.zeros((0, width))

    rp, sp = cat(real_profiles, len(PROFILE_RADII)), cat(synthetic_profiles, len(PROFILE_RADII))
    out = profile_summary(rp, sp)
    width = max([np.asarray(p).shape[1] for p in list(real_patches) + list(synthetic_patches) if len(p)] or [1])
    out["realism_auc"] = two_sample_auc(cat(real_patches, width), cat(synthetic_patches, width), seed=seed,
                                        n_repeats=n_repeats)
    return out


def batch_measurements(images: Any, masks: Any, brainmasks: Any | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`lesion_measurements` of every sample of a (B, 1, X, Y, Z) batch, concatenated."""
    profs, pats = [], []
    for i in range(len(images)):
        p, q = lesion_measurements(images[i], masks[i], None if brainmasks is None else brainmasks[i])
        profs.append(p)
        pats.append(q)
    return np.concatenate(profs), np.concatenate(pats)


def pathological_volumes(datalist: PathLike, split: str) -> Iterator[dict[str, Any]]:
    """The pathological scans of ``split`` that have a lesion map and a brain mask, one at a time, preprocessed as
    in training: dicts with ``image``, ``label`` and ``brainmask``, each (1, X, Y, Z)."""
    _, patho = split_groups(load_split(datalist, split))
    pre = preprocessing(keys=("image",), mask_keys=("brainmask",), label_keys=("label",))
    for item in patho:
        if item.get("label") and item.get("brainmask"):
            yield pre({k: item[k] for k in ("image", "brainmask", "label")})


def split_lesions(
    datalist: PathLike, split: str = "validation", max_radius: int = 4, ring: tuple[float, float] = (5.0, 7.0)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`lesion_measurements` (with sizes) of every real lesion of the pathological scans of ``split``, on
    whole volumes preprocessed as in training (each lesion counted once).

    Returns ``(profiles (L, max_radius + 1), patches (L, 343), sizes (L,))``; empty arrays when the split has no
    lesion.
    """
    profs, pats, sizes = [np.zeros((0, int(max_radius) + 1))], [np.zeros((0, 343), np.float32)], [np.zeros(0, np.int64)]
    for d in pathological_volumes(datalist, split):
        p, q, s = lesion_measurements(d["image"], d["label"], d["brainmask"], max_radius, ring, return_sizes=True)
        profs.append(p)
        pats.append(q)
        sizes.append(s)
    return np.concatenate(profs), np.concatenate(pats), np.concatenate(sizes)


def reference_lesions(datalist: PathLike, split: str = "validation") -> tuple[np.ndarray, np.ndarray]:
    """The fixed reference of :class:`RealismMetric`: :func:`split_lesions` of ``split`` without the sizes.

    Returns ``(profiles (L, 5), patches (L, 343))``; empty arrays when the split has no lesion.
    """
    profiles, patches, _ = split_lesions(datalist, split)
    return profiles, patches


def size_binned_profiles(
    datalist: PathLike, split: str = "training", n_bins: int = 4, max_radius: int = 4, ring: tuple[float, float] = (5.0, 7.0),
    n_levels: int = 11,
) -> dict[str, np.ndarray]:
    """Mean radial profile of the real lesions of ``split`` per lesion-size bin (the target of
    :class:`cmb_synthesis.synthesis.losses.LesionProfileLoss` with a reference).

    Every real lesion of the pathological scans of ``split`` is measured by :func:`split_lesions` (whole
    preprocessed volumes). The size bins are ``n_bins`` quantile bins of the lesion sizes (voxels of the
    26-connected component), so they follow the data's resolution and lesion sizes; equal edges are merged.

    Returns:
        ``{"edges": (n - 1,) float64 inner bin edges (a lesion of size s is in bin ``searchsorted(edges, s,
        "right")``), "profiles": (n, max_radius + 1) float64 mean profiles, "counts": (n,) int64 lesions per
        bin, "sizes": (L,) int64}``.

    Raises:
        ValueError: ``n_bins < 1``, or no measurable lesion in ``split``.
    """
    if int(n_bins) < 1:
        raise ValueError(f"size_binned_profiles needs n_bins >= 1, got {n_bins}")
    profiles, _, sizes_all = split_lesions(datalist, split, max_radius, ring)
    if not len(profiles):
        raise ValueError(f"{datalist}: no measurable real lesion in split {split!r} (a profile reference needs one)")
    q = np.quantile(sizes_all, np.linspace(0, 1, int(n_bins) + 1)[1:-1]) if int(n_bins) > 1 else np.zeros(0)
    edges = np.unique(q)
    bins = np.searchsorted(edges, sizes_all, side="right")
    counts = np.bincount(bins, minlength=len(edges) + 1)
    means = np.stack([profiles[bins == b].mean(0) if counts[b] else profiles.mean(0) for b in range(len(edges) + 1)])
    quantiles = np.stack([quantile_profiles(profiles[bins == b] if counts[b] else profiles, n_levels)
                          for b in range(len(edges) + 1)])
    return {"edges": edges.astype(np.float64), "profiles": means, "quantiles": quantiles,
            "counts": counts.astype(np.int64), "sizes": sizes_all}


class RealismMetric(Metric):
    """Ignite metric of the synthesis evaluator: one of :data:`REALISM_METRICS` over a validation round.

    The evaluator's output carries ``realism`` = ``{"synthetic": (profiles, patches), "real": (profiles,
    patches)}`` per batch (lesions painted by ``G_HP`` on the healthy patches, and the real lesions of the
    pathological patches). The synthetic lesions are compared with ``reference`` (``(profiles, patches)`` of
    fixed real lesions, e.g. :func:`reference_lesions` of the validation split) or, when None, with the real
    lesions seen in the patches. ``realism_auc`` is the classifier two-sample test (``seed`` fixed, so a round
    is reproducible; ``n_repeats`` repeated cross-validations averaged). Under DDP every rank evaluates the whole validation set, so no gathering is needed.
    """

    def __init__(self, name: str = "realism_auc", reference: tuple[np.ndarray, np.ndarray] | None = None,
                 seed: int = 0, output_transform: Callable = lambda x: x, device: str = "cpu",
                 n_repeats: int = 1) -> None:
        if name not in REALISM_METRICS:
            raise ValueError(f"unknown realism metric {name!r}; choose from {REALISM_METRICS}")
        self.metric_name, self.reference, self.seed, self.n_repeats = name, reference, int(seed), int(n_repeats)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._parts: dict[str, list[list[np.ndarray]]] = {"real": [[], []], "synthetic": [[], []]}

    def update(self, output: Mapping[str, Any]) -> None:
        for kind in ("real", "synthetic"):
            profiles, patches = output["realism"][kind]
            self._parts[kind][0].append(np.asarray(profiles))
            self._parts[kind][1].append(np.asarray(patches))

    def iteration_completed(self, engine: Any) -> None:
        self.update(self._output_transform(engine.state.output))

    def compute(self) -> float:
        real_p, real_x = ([self.reference[0]], [self.reference[1]]) if self.reference is not None else self._parts["real"]
        syn_p, syn_x = self._parts["synthetic"]
        if self.metric_name == "realism_auc":
            return realism_report(real_p, syn_p, real_x, syn_x, seed=self.seed, n_repeats=self.n_repeats)["realism_auc"]
        rep = realism_report(real_p, syn_p, [], [], seed=self.seed)
        if self.metric_name.startswith("profile_real_"):
            return float(rep["profile_real"][int(self.metric_name.rsplit("_", 1)[1])])
        if self.metric_name.startswith("profile_synthetic_"):
            return float(rep["profile_synthetic"][int(self.metric_name.rsplit("_", 1)[1])])
        return float(rep[self.metric_name])

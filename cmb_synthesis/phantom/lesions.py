"""Cerebral microbleeds: where they go, how big, how many, and how they look on SWI.

Each CMB is an ellipsoid (sphere for most, elongated for about a third: traumatic brain injury) whose nominal
surface defines its instance label; on the image it is a dark core with a soft "blooming" rim that extends
beyond the label (susceptibility blooming). Placement: white matter, the grey-white junction, corpus callosum
and brainstem only (never CSF, deep nuclei or outside the brain), with the whole lesion inside that tissue,
at least ``vein_gap_mm`` from any vein and never touching another CMB.

The ``benchmark`` lesion model (:func:`sample_benchmark_specs`, ``place_lesions(partial_volume=True)``) draws
small haemosiderin deposits with a per-lesion blooming factor (the dark profile reaches ``bloom`` times the
deposit's radius), rendered with partial volume (the profile averaged over 2 x 2 x 2 sub-voxel samples), and a
spread of contrast with some faint lesions. Its label is what a reader outlines: the bloomed ellipsoid
(``rho <= LABEL_RHO * bloom``, about the half-maximum of the dark profile), so the labelled (apparent)
diameters are ``bloom`` times the deposit's: many of 2-3 mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cmb_synthesis.phantom.anatomy import Anatomy

__all__ = ["LesionSpec", "sample_count", "sample_lesion_specs", "sample_benchmark_specs", "place_lesions", "LABEL_RHO"]

LABEL_RHO = 1.025       # the half-maximum of the bloomed profile, in units of bloom * deposit radius


@dataclass
class LesionSpec:
    diameter_mm: float      # equivalent-sphere diameter of the nominal ellipsoid
    elongation: float       # long axis / short axis (1 = sphere)
    depth: float            # darkening at the core (core intensity = 1 - depth relative to tissue)
    bloom: float = 1.0      # extent of the dark profile relative to the nominal ellipsoid (1 to 2.3)


def sample_count(rng: np.random.Generator, median: float = 5.0, sigma: float = 0.75, maximum: int = 30) -> int:
    """Lesions per pathological subject: a right-skewed log-normal count in [1, maximum] (median ~ ``median``)."""
    return int(np.clip(np.rint(np.exp(rng.normal(np.log(median), sigma))), 1, maximum))


def sample_lesion_specs(rng: np.random.Generator, n: int) -> list[LesionSpec]:
    """Diameters log-normal (median 3.4 mm, 2-10 mm, ~80 % under 5 mm); ~30 % elongated (1.4-2.5)."""
    d = np.clip(np.exp(rng.normal(np.log(3.4), 0.33, n)), 2.0, 10.0)
    elong = np.where(rng.random(n) < 0.3, rng.uniform(1.4, 2.5, n), 1.0)
    depth = rng.uniform(0.6, 0.8, n)
    return [LesionSpec(float(a), float(b), float(c)) for a, b, c in zip(d, elong, depth)]


def sample_benchmark_specs(rng: np.random.Generator, n: int, faint_fraction: float = 0.25,
                           deposit_median_mm: float = 2.0, depth: tuple[float, float] = (0.45, 0.8),
                           faint_depth: tuple[float, float] = (0.25, 0.45)) -> list[LesionSpec]:
    """Harder lesions. Deposit diameters log-normal (median ``deposit_median_mm``, 2.0 mm by default) within
    [2, 9.5] mm / bloom, blooming 1.1-1.7, so the apparent (labelled) diameter ``bloom * diameter`` lies in
    2-9.5 mm (at 2.0 mm: median ~2.8 mm, ~50 % of 2-3 mm and ~90 % under 5 mm); 30 % of those of 3 mm or more
    elongated (1.4-2.5: the linear shear lesions of TBI are not the smallest); core darkening uniform in
    ``faint_depth`` (faint) for ``faint_fraction`` of them, else in ``depth``. The defaults draw exactly as
    before these arguments existed."""
    if not deposit_median_mm > 0:
        raise ValueError(f"deposit_median_mm must be > 0, got {deposit_median_mm!r}")
    for name, (lo, hi) in (("depth", depth), ("faint_depth", faint_depth)):
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"{name} must be (low, high) with 0 <= low <= high < 1, got {(lo, hi)!r}")
    bloom = rng.uniform(1.1, 1.7, n)
    d = np.clip(np.exp(rng.normal(np.log(deposit_median_mm), 0.38, n)), 2.0 / bloom, 9.5 / bloom)
    elong = np.where((rng.random(n) < 0.3) & (d * bloom >= 3.0), rng.uniform(1.4, 2.5, n), 1.0)
    faint = rng.random(n) < faint_fraction
    depth = np.where(faint, rng.uniform(*faint_depth, n), rng.uniform(*depth, n))
    return [LesionSpec(float(a), float(b), float(c), float(e)) for a, b, c, e in zip(d, elong, depth, bloom)]


def _blooming_profile(spec: LesionSpec, rot: np.ndarray, spacing: np.ndarray, reach: int,
                      frac: np.ndarray) -> np.ndarray:
    """Dark profile in [0, 1] (1 = full ``depth``) averaged over 2 x 2 x 2 sub-voxel samples per voxel."""
    acc = np.zeros((2 * reach + 1,) * 3)
    b = spec.bloom
    for off in np.stack(np.meshgrid(*[(-0.25, 0.25)] * 3, indexing="ij"), -1).reshape(-1, 3):
        rho = _rho(spec, rot, spacing, reach, frac - off)
        p = np.clip((1.35 * b - rho) / (0.65 * b), 0.0, 1.0)
        acc += p * p * (3 - 2 * p)
    return acc / 8.0


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
    ])


def _rho(spec: LesionSpec, rot: np.ndarray, spacing: np.ndarray, reach: int, frac: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid radius on a (2*reach+1)^3 box whose centre is offset by ``frac`` voxels."""
    r = spec.diameter_mm / 2.0
    e = spec.elongation
    axes = np.array([r * e ** (2 / 3), r / e ** (1 / 3), r / e ** (1 / 3)])   # volume-preserving
    g = np.stack(np.meshgrid(*[np.arange(-reach, reach + 1)] * 3, indexing="ij"), -1).astype(np.float64)
    mm = (g - frac) * spacing
    local = mm @ rot                       # coordinates in the lesion frame
    return np.sqrt(((local / axes) ** 2).sum(-1))


def place_lesions(
    rng: np.random.Generator,
    anat: Anatomy,
    veins: np.ndarray,
    specs: list[LesionSpec],
    vein_gap_mm: float = 2.0,
    max_tries: int = 200,
    partial_volume: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Place the lesions; return (uint16 instance labels, float32 intensity factor (1 = unchanged), rows).

    ``veins`` is the mask to keep ``vein_gap_mm`` away from (veins, and any other mimic). With
    ``partial_volume`` the dark profile follows each spec's ``bloom`` with sub-voxel sampling
    (:func:`_blooming_profile`), the label is the bloomed ellipsoid (``rho <= LABEL_RHO * bloom``) and lesions
    keep ``1.6 * bloom`` deposit radii apart; otherwise the profile is sampled at voxel centres and reaches
    1.35 radii, the label being the ellipsoid itself.

    A lesion that cannot be placed after ``max_tries`` random positions is dropped (rare; the rows list the
    placed ones). Rows hold ``label``, centre voxel ``i, j, k`` (a labelled voxel), ``diameter_mm`` and
    ``volume_mm3`` of the label, ``elongation``; with ``partial_volume`` also ``deposit_diameter_mm``, ``bloom``
    and ``contrast`` (the core darkening).
    """
    shape = anat.brain.shape
    spacing = np.asarray(anat.spacing)
    brain = anat.brain > 0.5
    deep = anat.deep > 0.2
    # tissue a lesion may occupy (every labelled voxel) and where its centre may fall
    tissue_ok = brain & ~deep & (anat.csf < 0.35) & ((anat.wm > 0.4) | ((anat.gm > 0.3) & (anat.wm > 0.15)) | anat.brainstem)
    tissue_ok &= ndimage.binary_erosion(brain, iterations=3)
    reach_v = np.ceil(vein_gap_mm / spacing).astype(int)
    ball = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach_v], indexing="ij"), -1) * spacing
    ball = np.linalg.norm(ball, axis=-1) < vein_gap_mm
    far_from_veins = ~ndimage.binary_dilation(veins > 0, structure=ball)
    allowed = tissue_ok & far_from_veins
    wm_core = allowed & (anat.wm > 0.6)
    junction = allowed & (anat.gm > 0.3) & (anat.wm > 0.15) & ~wm_core
    stem = allowed & anat.brainstem
    pools = [np.argwhere(p) for p in (wm_core, junction, stem)]
    probs = np.array([0.6, 0.3, 0.1]) * np.array([len(p) > 0 for p in pools])
    labels = np.zeros(shape, dtype=np.uint16)
    factor = np.ones(shape, dtype=np.float32)
    rows: list[dict] = []
    if probs.sum() == 0:
        return labels, factor, rows
    probs /= probs.sum()
    occupied = np.zeros(shape, dtype=bool)      # lesions dilated by one voxel: no touching
    for spec in specs:
        reach = int(np.ceil(spec.diameter_mm * 1.6 * max(spec.elongation ** (2 / 3), 1) / spacing.min())) + 1
        for _ in range(max_tries):
            pool = pools[rng.choice(3, p=probs)]
            c = pool[rng.integers(len(pool))]
            lo, hi = c - reach, c + reach + 1
            if np.any(lo < 0) or np.any(hi > np.asarray(shape)):
                continue
            frac = rng.uniform(-0.5, 0.5, 3)
            rot = _random_rotation(rng)
            rho = _rho(spec, rot, spacing, reach, frac)
            core = rho <= (LABEL_RHO * spec.bloom if partial_volume else 1.0)
            if core.sum() == 0:
                continue
            sl = tuple(slice(a, b) for a, b in zip(lo, hi))
            gap = 1.6 * spec.bloom if partial_volume else 1.6
            if not allowed[sl][core].all() or occupied[sl][rho <= gap].any():
                continue
            lab = len(rows) + 1
            labels[sl][core] = lab
            occupied[sl] |= ndimage.binary_dilation(core, iterations=1)
            if partial_volume:
                profile = _blooming_profile(spec, rot, spacing, reach, frac)
            else:
                # dark core up to rho 0.7, smooth blooming falloff to rho 1.35
                profile = np.clip((1.35 - rho) / 0.65, 0.0, 1.0)
                profile = profile * profile * (3 - 2 * profile)
            np.minimum(factor[sl], 1.0 - spec.depth * profile, out=factor[sl])
            n_vox = int(core.sum())
            vol = n_vox * float(np.prod(spacing))
            centre = np.rint(np.argwhere(core).mean(0) + lo).astype(int)
            if partial_volume and labels[tuple(centre)] != lab:     # a labelled voxel, the nearest to the centroid
                vox = np.argwhere(core) + lo
                centre = vox[np.argmin(np.linalg.norm(vox - (np.argwhere(core).mean(0) + lo), axis=1))]
            rows.append({
                "label": lab, "i": int(centre[0]), "j": int(centre[1]), "k": int(centre[2]),
                "diameter_mm": round((6 * vol / np.pi) ** (1 / 3), 3), "volume_mm3": round(vol, 3),
                "elongation": round(spec.elongation, 3),
            })
            if partial_volume:
                rows[-1].update(deposit_diameter_mm=round(spec.diameter_mm, 3), bloom=round(spec.bloom, 3),
                                contrast=round(spec.depth, 3))
            break
    return labels, factor, rows

"""Cerebral microbleeds: where they go, how big, how many, and how they look on SWI.

Each CMB is an ellipsoid (sphere for most, elongated for about a third: traumatic brain injury) whose nominal
surface defines its instance label; on the image it is a dark core with a soft "blooming" rim that extends
beyond the label (susceptibility blooming). Placement: white matter, the grey-white junction, corpus callosum
and brainstem only (never CSF, deep nuclei or outside the brain), with the whole lesion inside that tissue,
at least ``vein_gap_mm`` from any vein and never touching another CMB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cmb_synthesis.phantom.anatomy import Anatomy

__all__ = ["LesionSpec", "sample_count", "sample_lesion_specs", "place_lesions"]


@dataclass
class LesionSpec:
    diameter_mm: float      # equivalent-sphere diameter of the nominal ellipsoid
    elongation: float       # long axis / short axis (1 = sphere)
    depth: float            # darkening at the core (core intensity = 1 - depth relative to tissue)


def sample_count(rng: np.random.Generator, median: float = 5.0, sigma: float = 0.75, maximum: int = 30) -> int:
    """Lesions per pathological subject: a right-skewed log-normal count in [1, maximum] (median ~ ``median``)."""
    return int(np.clip(np.rint(np.exp(rng.normal(np.log(median), sigma))), 1, maximum))


def sample_lesion_specs(rng: np.random.Generator, n: int) -> list[LesionSpec]:
    """Diameters log-normal (median 3.4 mm, 2-10 mm, ~80 % under 5 mm); ~30 % elongated (1.4-2.5)."""
    d = np.clip(np.exp(rng.normal(np.log(3.4), 0.33, n)), 2.0, 10.0)
    elong = np.where(rng.random(n) < 0.3, rng.uniform(1.4, 2.5, n), 1.0)
    depth = rng.uniform(0.6, 0.8, n)
    return [LesionSpec(float(a), float(b), float(c)) for a, b, c in zip(d, elong, depth)]


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
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Place the lesions; return (uint16 instance labels, float32 intensity factor (1 = unchanged), rows).

    A lesion that cannot be placed after ``max_tries`` random positions is dropped (rare; the rows list the
    placed ones). Rows hold ``label``, centre voxel ``i, j, k``, ``diameter_mm``, ``volume_mm3``, ``elongation``.
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
            core = rho <= 1.0
            if core.sum() == 0:
                continue
            sl = tuple(slice(a, b) for a, b in zip(lo, hi))
            if not allowed[sl][core].all() or occupied[sl][rho <= 1.6].any():
                continue
            lab = len(rows) + 1
            labels[sl][core] = lab
            occupied[sl] |= ndimage.binary_dilation(core, iterations=1)
            # dark core up to rho 0.7, smooth blooming falloff to rho 1.35
            profile = np.clip((1.35 - rho) / 0.65, 0.0, 1.0)
            profile = profile * profile * (3 - 2 * profile)
            np.minimum(factor[sl], 1.0 - spec.depth * profile, out=factor[sl])
            n_vox = int(core.sum())
            vol = n_vox * float(np.prod(spacing))
            centre = np.rint(np.argwhere(core).mean(0) + lo).astype(int)
            rows.append({
                "label": lab, "i": int(centre[0]), "j": int(centre[1]), "k": int(centre[2]),
                "diameter_mm": round((6 * vol / np.pi) ** (1 / 3), 3), "volume_mm3": round(vol, 3),
                "elongation": round(spec.elongation, 3),
            })
            break
    return labels, factor, rows

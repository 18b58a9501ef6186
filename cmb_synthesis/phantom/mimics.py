"""CMB mimics other than veins: dark focal structures and artefacts that are never CMBs.

Opt-in through phantom options (the ``benchmark`` preset). Each is placed at its anatomical site in MNI
coordinates, mapped to the subject grid through the subject's own MNI coordinate map (:func:`mni_to_voxel`):

- basal-ganglia mineralisation: 2-5 mm dark foci in the globus pallidus (70 %) or putamen, half of them
  bilateral and symmetric (physiological calcification);
- pineal and choroid-plexus (glomus, in the atria) calcifications: 3-7 mm clustered dark blobs centred on the
  CSF voxel nearest their MNI site;
- flow voids: the basilar artery, both internal carotids (running through the axial slices: dark dots),
  M1 segments of the middle cerebral arteries and the posterior cerebral arteries, 75-90 % darker;
- air-bone susceptibility artefacts: a streaky dark smear with a faint bright fringe above it (along B0) at the
  orbitofrontal base (frontal/ethmoid sinuses) and the inferior temporal lobes (mastoid / petrous bone).

:data:`MIMIC_TYPES` are the types recorded per subject (with the vessel types of ``veins.py``); the mimic map
holds their codes (:data:`MIMIC_CODES`, 0 = none). Intensity factors are multiplicative (1 = unchanged).
"""

from __future__ import annotations

import numpy as np

from cmb_synthesis.phantom.anatomy import DEEP_NUCLEI, Anatomy
from cmb_synthesis.phantom.veins import rasterize_tubes

__all__ = ["MIMIC_TYPES", "MIMIC_CODES", "mni_to_voxel", "focal_mimics", "artefact_field"]

MIMIC_TYPES = (
    "cross_section_vessel", "vessel_bifurcation", "basal_ganglia_mineralisation", "choroid_plexus_calcification",
    "pineal_calcification", "flow_void", "air_bone_artefact",
)
MIMIC_CODES = {t: n + 1 for n, t in enumerate(MIMIC_TYPES)}

# (name, start, end in MNI mm for the right side or the midline, radius range mm, bilateral)
ARTERIES = (
    ("basilar", (0.0, -22.0, -42.0), (0.0, -14.0, -14.0), (1.3, 1.8), False),
    ("internal_carotid", (13.0, 2.0, -30.0), (14.0, 2.0, -14.0), (1.6, 2.0), True),
    ("middle_cerebral_m1", (14.0, 2.0, -14.0), (40.0, 6.0, -8.0), (1.1, 1.5), True),
    ("posterior_cerebral", (3.0, -14.0, -13.0), (22.0, -34.0, -6.0), (0.9, 1.2), True),
)
# (name, centre in MNI mm (right side or midline), Gaussian SD per axis mm, probability, bilateral)
ARTEFACT_SOURCES = (
    ("frontal_sinus", (0.0, 46.0, -22.0), (16.0, 9.0, 6.0), 1.0, False),
    ("temporal_base", (44.0, -20.0, -34.0), (8.0, 14.0, 6.0), 0.8, True),
)
PINEAL_MNI = (0.0, -32.0, 2.0)
CHOROID_MNI = (27.0, -42.0, 14.0)


def mni_to_voxel(anat: Anatomy, points: np.ndarray, tol_mm: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Voxel coordinates (float, (n, 3)) of MNI points and a bool (n,) of those found on the grid.

    Nearest voxel by a coarse (stride 4) then a local search of the subject's MNI map, refined to sub-voxel
    precision with the local Jacobian; a point whose nearest voxel is more than ``tol_mm`` away (outside the
    slab) is flagged False.
    """
    pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
    mni = anat.mni
    shape = np.asarray(mni.shape[1:])
    coarse = mni[:, ::4, ::4, ::4]
    out = np.zeros((len(pts), 3))
    ok = np.zeros(len(pts), dtype=bool)
    for n, p in enumerate(pts):
        d2 = ((coarse - p[:, None, None, None].astype(np.float32)) ** 2).sum(0)
        v = np.asarray(np.unravel_index(np.argmin(d2), d2.shape)) * 4
        lo = np.clip(v - 4, 0, shape - 1)
        hi = np.clip(v + 5, 1, shape)
        win = mni[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        d2 = ((win - p[:, None, None, None].astype(np.float32)) ** 2).sum(0)
        v = np.asarray(np.unravel_index(np.argmin(d2), d2.shape)) + lo
        v1 = np.minimum(v + 1, shape - 1)
        base = mni[(slice(None), *v)].astype(np.float64)
        jac = np.stack([mni[(slice(None), *np.where(np.arange(3) == a, v1, v))] - base for a in range(3)], 1)
        step = np.linalg.solve(jac, p - base) if abs(np.linalg.det(jac)) > 1e-6 else np.zeros(3)
        out[n] = v + np.clip(step, -1.0, 1.0)
        ok[n] = np.sqrt(float(d2.min())) <= tol_mm
    return out, ok


def _blob(rng: np.random.Generator, anat: Anatomy, centre: np.ndarray, diameter_mm: float, n_lobes: int):
    """Partial-volume occupancy of a cluster of ``n_lobes`` spheres around ``centre`` (voxel coordinates):
    (tuple of slices, occupancy in [0, 1]) on a box clipped to the grid, or None when the box is empty."""
    spacing = np.asarray(anat.spacing)
    shape = np.asarray(anat.brain.shape)
    half = np.ceil(diameter_mm / spacing).astype(int) + 2
    c = np.rint(centre).astype(int)
    lo, hi = np.maximum(c - half, 0), np.minimum(c + half + 1, shape)
    if np.any(hi <= lo):
        return None
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1).astype(float)
    occ = np.zeros(grid.shape[:3])
    r0 = diameter_mm / 2.0
    for k in range(n_lobes):
        shift_mm = rng.normal(0, r0 / 2.5, 3) if k else np.zeros(3)
        r = r0 * (rng.uniform(0.55, 0.8) if n_lobes > 1 else 1.0)
        d = np.linalg.norm((grid - centre - shift_mm / spacing) * spacing, axis=-1)
        np.maximum(occ, np.clip(r + 0.5 - d, 0.0, 1.0), out=occ)
    return tuple(slice(a, b) for a, b in zip(lo, hi)), occ


def _row(kind: str, anat: Anatomy, vox: np.ndarray, size_mm: float, darkening: float) -> dict:
    i, j, k = (int(v) for v in np.rint(vox))
    x, y, z = (round(float(v), 3) for v in anat.affine[:3, :3] @ [i, j, k] + anat.affine[:3, 3])
    return {"type": kind, "i": i, "j": j, "k": k, "x": x, "y": y, "z": z, "size_mm": round(float(size_mm), 2),
            "darkening": round(float(darkening), 3)}


def focal_mimics(
    rng: np.random.Generator,
    anat: Anatomy,
    mineralisation_rate: float = 0.0,
    pineal_prob: float = 0.0,
    choroid_prob: float = 0.0,
    flow_void_prob: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Mineralisation, calcifications and flow voids: (float32 intensity factor, uint8 mimic map, rows).

    The factor multiplies the tissue signal before the partial-volume blur; the map marks voxels with
    occupancy > 0.3 by type code; rows hold ``type``, centre voxel ``i, j, k``, ``x, y, z`` mm, ``size_mm``
    (diameter) and ``darkening`` (peak, 0-1).
    """
    shape = anat.brain.shape
    factor = np.ones(shape, dtype=np.float32)
    code = np.zeros(shape, dtype=np.uint8)
    rows: list[dict] = []
    nuclei = {name: (np.asarray(c), np.asarray(ax)) for name, c, ax, _ in DEEP_NUCLEI}

    csf = anat.csf > 0.5

    def paint(kind: str, mni_centre, diameter: float, lobes: int, depth: float, in_csf: bool = False) -> None:
        vox, ok = mni_to_voxel(anat, mni_centre)
        if not ok[0]:
            return
        if in_csf:                        # snap to the nearest CSF voxel within 8 voxels (ventricle, cistern)
            c = np.rint(vox[0]).astype(int)
            lo, hi = np.maximum(c - 8, 0), np.minimum(c + 9, shape)
            near = np.argwhere(csf[tuple(slice(a, b) for a, b in zip(lo, hi))]) + lo
            if len(near):
                vox = near[[np.argmin(np.linalg.norm(near - vox[0], axis=1))]].astype(float)
        blob = _blob(rng, anat, vox[0], diameter, lobes)
        if blob is None:
            return
        sl, occ = blob
        np.minimum(factor[sl], (1.0 - depth * occ).astype(np.float32), out=factor[sl])
        code[sl][occ > 0.3] = MIMIC_CODES[kind]
        rows.append(_row(kind, anat, vox[0], diameter, depth))

    for _ in range(int(rng.poisson(mineralisation_rate))):
        centre, axes = nuclei["globus_pallidus" if rng.random() < 0.7 else "putamen"]
        p = centre + rng.uniform(-0.5, 0.5, 3) * axes
        side = rng.choice([-1.0, 1.0])
        diameter, lobes, depth = rng.uniform(2.0, 5.0), int(rng.integers(1, 4)), rng.uniform(0.35, 0.7)
        paint("basal_ganglia_mineralisation", p * [side, 1, 1], diameter, lobes, depth)
        if rng.random() < 0.5:            # symmetric counterpart
            paint("basal_ganglia_mineralisation", p * [-side, 1, 1], diameter * rng.uniform(0.8, 1.2), lobes, depth)
    if rng.random() < pineal_prob:
        paint("pineal_calcification", np.asarray(PINEAL_MNI) + rng.normal(0, 1.5, 3), rng.uniform(3, 7),
              int(rng.integers(2, 5)), rng.uniform(0.6, 0.85), in_csf=True)
    if rng.random() < choroid_prob:
        for side in (1.0, -1.0):
            if rng.random() < 0.9:
                paint("choroid_plexus_calcification", np.asarray(CHOROID_MNI) * [side, 1, 1] + rng.normal(0, 2, 3),
                      rng.uniform(3, 6), int(rng.integers(2, 5)), rng.uniform(0.55, 0.85), in_csf=True)

    tubes, mids = [], []
    for name, start, end, radii, bilateral in ARTERIES:
        for side in ((1.0, -1.0) if bilateral else (1.0,)):
            if rng.random() >= flow_void_prob:
                continue
            a, b = np.asarray(start) * [side, 1, 1], np.asarray(end) * [side, 1, 1]
            ctrl = a + np.linspace(0, 1, max(2, int(np.linalg.norm(b - a) / 3) + 1))[:, None] * (b - a)
            ctrl = ctrl + rng.normal(0, 0.7, ctrl.shape)
            vox, ok = mni_to_voxel(anat, ctrl)
            vox = vox[ok]
            if len(vox) < 2:
                continue
            t = np.linspace(0, len(vox) - 1, (len(vox) - 1) * 8 + 1)
            line = np.stack([np.interp(t, np.arange(len(vox)), vox[:, k]) for k in range(3)], -1)
            r = float(rng.uniform(*radii))
            tubes.append((line, r))
            mids.append((line[len(line) // 2], 2 * r))
    if tubes:
        depth = float(rng.uniform(0.75, 0.9))
        occ = rasterize_tubes(shape, anat.spacing, tubes)
        np.minimum(factor, (1.0 - depth * occ).astype(np.float32), out=factor)
        code[occ > 0.3] = MIMIC_CODES["flow_void"]
        rows.extend(_row("flow_void", anat, m, d, depth) for m, d in mids)
    return factor, code, rows


def artefact_field(
    rng: np.random.Generator,
    anat: Anatomy,
    depth: tuple[float, float] = (0.35, 0.7),
    scale: float = 1.0,
) -> tuple[np.ndarray, list[dict]]:
    """Air-bone susceptibility artefacts: (float32 multiplicative field, 1 elsewhere; rows).

    Each source is a streaky anisotropic Gaussian darkening (peak ``U(depth) * scale``, at most 0.9) with a
    faint bright fringe (30 % of the peak) 1.8 SD above it along the slice normal (B0).
    """
    shape = np.asarray(anat.brain.shape)
    spacing = np.asarray(anat.spacing)
    field = np.ones(tuple(shape), dtype=np.float32)
    rows: list[dict] = []
    for name, centre, sd, prob, bilateral in ARTEFACT_SOURCES:
        for side in ((1.0, -1.0) if bilateral else (1.0,)):
            if rng.random() >= prob:
                continue
            c = np.asarray(centre) * [side, 1, 1] + rng.normal(0, 2.0, 3)
            s = np.asarray(sd) * rng.uniform(0.8, 1.25, 3)
            amp = float(min(0.9, rng.uniform(*depth) * scale))
            kvec = rng.normal(size=3)
            kvec *= 2 * np.pi / (np.linalg.norm(kvec) * rng.uniform(8.0, 14.0))
            phase = rng.uniform(0, 2 * np.pi)
            vox, ok = mni_to_voxel(anat, c, tol_mm=6.0)
            if not ok[0]:
                continue
            half = np.ceil(3.0 * s / spacing).astype(int) + 2     # MNI mm are >= grid mm (brain scaled < 1)
            v = np.rint(vox[0]).astype(int)
            lo, hi = np.maximum(v - half, 0), np.minimum(v + half + 1, shape)
            if np.any(hi <= lo):
                continue
            sl = tuple(slice(a, b) for a, b in zip(lo, hi))
            rel = anat.mni[(slice(None), *sl)].astype(np.float64) - c[:, None, None, None]
            q = ((rel / s[:, None, None, None]) ** 2).sum(0)
            streak = 0.85 + 0.15 * np.cos(np.tensordot(kvec, rel, axes=(0, 0)) + phase)
            rel[2] -= 1.8 * s[2]
            fringe = 0.3 * amp * np.exp(-0.5 * ((rel / s[:, None, None, None]) ** 2).sum(0))
            local = 1.0 - amp * np.exp(-0.5 * q) * streak + fringe
            field[sl] *= local.astype(np.float32)
            rows.append(_row("air_bone_artefact", anat, vox[0], 2.355 * float(s.max()), amp))
    return field, rows

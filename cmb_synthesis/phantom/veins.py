"""Veins, the CMB mimics: thin, curved, continuous hypointense tubes.

Two families, traced as smooth random walks (momentum + jitter) in voxel coordinates and rasterised with
partial volume:

- cortical (pial) veins run along the brain surface at about 1 mm depth, radius 0.6-1.5 mm, 20-60 mm long;
- deep medullary veins start next to the lateral ventricles and run outwards through the white matter along
  the direction away from the ventricles (mostly vertical above them), radius 0.4-0.8 mm, 10-35 mm long.

Seen end-on in one axial slice either kind is a dark dot the size of a CMB: the reason 2-D reading confuses
them and why the detector needs 3-D context. Two harder kinds are opt-in (the ``benchmark`` preset):

- :func:`branch_veins`: short branches leaving existing veins at 30-70 degrees; the junction is a dark blob;
- :func:`cross_section_vessels`: short (6-16 mm), nearly straight vessels running through the axial slices in
  the white matter, dots in 2-D over a few slices only.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cmb_synthesis.phantom.anatomy import Anatomy

__all__ = ["trace_veins", "rasterize_tubes", "branch_veins", "cross_section_vessels"]


def _sample(field: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(field, pts.T, order=1, mode="nearest")


def _walk(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    n_steps: int,
    step_vox: np.ndarray,
    guide,
    jitter: float,
    inertia: float,
) -> np.ndarray:
    """Trace all walks at once: positions (n_walks, n_steps, 3) in voxel coordinates."""
    pos = start.astype(np.float64).copy()
    d = direction / np.linalg.norm(direction, axis=1, keepdims=True)
    out = np.empty((len(pos), n_steps, 3))
    for s in range(n_steps):
        out[:, s] = pos
        g = guide(pos, d)
        d = inertia * d + (1 - inertia) * g + rng.normal(0, jitter, size=d.shape)
        d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
        pos = pos + d * step_vox
    return out


def trace_veins(
    rng: np.random.Generator,
    anat: Anatomy,
    n_cortical: int = 160,
    n_medullary: int = 160,
) -> list[tuple[np.ndarray, float]]:
    """Centre lines (points in voxel coordinates, ~0.4 mm apart) and radii (mm) of the subject's veins."""
    spacing = np.asarray(anat.spacing)
    brain = anat.brain > 0.5
    tubes: list[tuple[np.ndarray, float]] = []
    step_mm = 0.8                      # tracing step; centre lines are resampled to 0.4 mm for rasterising
    step_vox = step_mm / spacing

    # --- cortical veins: follow the surface at ~1 mm depth
    depth = ndimage.distance_transform_edt(brain, sampling=spacing).astype(np.float32)
    grad = np.stack(np.gradient(ndimage.gaussian_filter(depth, 1.5)), -1)  # points inwards
    surface = np.argwhere((depth > 0.5) & (depth < 1.8))
    if len(surface) and n_cortical:
        starts = surface[rng.choice(len(surface), n_cortical, replace=False)].astype(np.float64)
        gs = np.stack([_sample(grad[..., a], starts) for a in range(3)], -1)
        tang = np.cross(gs, rng.normal(size=gs.shape))

        def cortical_guide(pos, d):
            g = np.stack([_sample(grad[..., a], pos) for a in range(3)], -1)
            gn = g / (np.linalg.norm(g, axis=1, keepdims=True) + 1e-9)
            dep = _sample(depth, pos)
            d_t = d - (d * gn).sum(1, keepdims=True) * gn            # keep tangent to the surface
            return d_t + gn[:, :] * (1.0 - dep)[:, None] * 0.6        # pull back to ~1 mm depth

        lengths = rng.uniform(20, 60, n_cortical)
        walks = _walk(rng, starts, tang, int(lengths.max() / step_mm), step_vox, cortical_guide, 0.08, 0.85)
        radii = rng.uniform(0.6, 1.5, n_cortical)
        for w, length, r in zip(walks, lengths, radii):
            tubes.append((w[: int(length / step_mm)], float(r)))

    # --- deep medullary veins: from the ventricle walls outwards through WM
    csf_deep = (anat.csf > 0.5) & (np.abs(anat.mni[0]) < 25) & (np.abs(anat.mni[1] + 5) < 35) & (anat.mni[2] > -5)
    if csf_deep.any() and n_medullary:
        wall = np.argwhere(ndimage.binary_dilation(csf_deep, iterations=2) & ~csf_deep & (anat.wm > 0.5))
        if len(wall):
            starts = wall[rng.choice(len(wall), min(n_medullary, len(wall)), replace=False)].astype(np.float64)
            vdist = ndimage.distance_transform_edt(~csf_deep, sampling=spacing).astype(np.float32)
            vgrad = np.stack(np.gradient(ndimage.gaussian_filter(vdist, 2.0)), -1)  # away from ventricles

            def medullary_guide(pos, d):
                g = np.stack([_sample(vgrad[..., a], pos) for a in range(3)], -1)
                return g / (np.linalg.norm(g, axis=1, keepdims=True) + 1e-9)

            d0 = np.stack([_sample(vgrad[..., a], starts) for a in range(3)], -1) + rng.normal(0, 0.3, starts.shape)
            lengths = rng.uniform(10, 35, len(starts))
            walks = _walk(rng, starts, d0, int(lengths.max() / step_mm), step_vox, medullary_guide, 0.06, 0.8)
            radii = rng.uniform(0.4, 0.8, len(starts))
            wm = anat.wm
            for w, length, r in zip(walks, lengths, radii):
                w = w[: int(length / step_mm)]
                inside = _sample(wm, w) > 0.3                # stop where the WM ends (cortex reached)
                stop = np.argmin(inside) if not inside.all() else len(w)
                if stop > 10:
                    tubes.append((w[:stop], float(r)))
    return tubes


def _straight(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, length_mm: float,
              spacing: np.ndarray, wobble_mm: float = 0.3) -> np.ndarray:
    """Centre line (voxel coordinates, 0.4 mm steps) from ``start`` along unit ``direction`` (mm space) with
    a small smooth sideways wobble."""
    t = np.arange(0.0, length_mm, 0.4)
    side = np.cross(direction, rng.normal(size=3))
    side /= np.linalg.norm(side) + 1e-9
    bend = wobble_mm * np.sin(np.pi * t / max(length_mm, 1e-6) * rng.uniform(0.5, 1.5) + rng.uniform(0, np.pi))
    mm = t[:, None] * direction[None] + bend[:, None] * side[None]
    return start[None] + mm / spacing[None]


def branch_veins(
    rng: np.random.Generator,
    anat: Anatomy,
    tubes: list[tuple[np.ndarray, float]],
    n_branches: int,
) -> tuple[list[tuple[np.ndarray, float]], np.ndarray]:
    """Branches leaving random interior points of ``tubes`` (chosen in proportion to length).

    Each branch leaves at 30-70 degrees from the parent's direction, 5-15 mm long, radius 0.6-0.9 of the
    parent's (at least 0.4 mm), and stops where it leaves the brain. Returns the branch tubes and the branch
    points ((n, 3) voxel coordinates, one per branch kept).
    """
    spacing = np.asarray(anat.spacing)
    long_enough = [t for t in tubes if len(t[0]) >= 10]
    if not long_enough or n_branches <= 0:
        return [], np.zeros((0, 3))
    lengths = np.array([len(t[0]) for t in long_enough], dtype=float)
    parents = rng.choice(len(long_enough), size=n_branches, p=lengths / lengths.sum())
    out, points = [], []
    for pi in parents:
        line, r = long_enough[pi]
        k = int(rng.integers(int(0.2 * len(line)), int(0.8 * len(line))))
        d = (line[k + 1] - line[k - 1]) * spacing
        d /= np.linalg.norm(d) + 1e-9
        axis = np.cross(d, rng.normal(size=3))
        axis /= np.linalg.norm(axis) + 1e-9
        ang = np.deg2rad(rng.uniform(30, 70))
        nd = d * np.cos(ang) + np.cross(axis, d) * np.sin(ang)       # Rodrigues, axis perpendicular to d
        branch = _straight(rng, line[k], nd, rng.uniform(5, 15), spacing)
        inside = _sample(anat.brain, branch) > 0.5
        stop = int(np.argmin(inside)) if not inside.all() else len(branch)
        if stop < 8:
            continue
        out.append((branch[:stop], float(max(0.4, r * rng.uniform(0.6, 0.9)))))
        points.append(line[k])
    return out, np.asarray(points, dtype=float).reshape(-1, 3)


def cross_section_vessels(
    rng: np.random.Generator,
    anat: Anatomy,
    n_vessels: int,
) -> list[tuple[np.ndarray, float]]:
    """Short vessels through the axial slices: start in white matter (WM > 0.6), direction within ~15 degrees
    of the slice normal, 6-16 mm long, radius 0.45-0.9 mm, cut where the WM ends."""
    spacing = np.asarray(anat.spacing)
    pool = np.argwhere(anat.wm > 0.6)
    if not len(pool) or n_vessels <= 0:
        return []
    starts = pool[rng.choice(len(pool), n_vessels, replace=False)].astype(float)
    out = []
    for start in starts:
        d = np.array([rng.normal(0, 0.25), rng.normal(0, 0.25), rng.choice([-1.0, 1.0])])
        line = _straight(rng, start, d / np.linalg.norm(d), rng.uniform(6, 16), spacing)
        inside = _sample(anat.wm, line) > 0.3
        stop = int(np.argmin(inside)) if not inside.all() else len(line)
        if stop >= 10:
            out.append((line[:stop], float(rng.uniform(0.45, 0.9))))
    return out


def _densify(line: np.ndarray) -> np.ndarray:
    """Insert midpoints so consecutive centre-line points are at most half a voxel apart."""
    if len(line) < 2:
        return line
    mid = (line[1:] + line[:-1]) / 2
    out = np.empty((2 * len(line) - 1, 3))
    out[0::2], out[1::2] = line, mid
    return out


def rasterize_tubes(shape: tuple[int, int, int], spacing, tubes: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """Partial-volume occupancy in [0, 1] (float32) of the union of tubes.

    Each centre-line point splats onto the voxels it can reach; a voxel's occupancy is
    ``clip(r + 0.5 - d, 0, 1)`` with ``d`` its distance (mm) to the nearest centre-line point (max over tubes).
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    occ = np.zeros(int(np.prod(shape)), dtype=np.float32)
    if not tubes:
        return occ.reshape(shape)
    dense = [_densify(t[0]) for t in tubes]
    pts = np.concatenate(dense)
    rad = np.concatenate([np.full(len(d), t[1]) for d, t in zip(dense, tubes)])
    # per-point reach (voxels) covering every voxel with occupancy > 0: |offset| < (r + 0.5) / spacing + 0.5
    reach_of = np.ceil((rad + 0.5) / spacing.min() + 0.5).astype(np.int64)
    for reach in np.unique(reach_of):
        sel = reach_of == reach
        g_pts, g_rad = pts[sel], rad[sel]
        off = np.stack(np.meshgrid(*[np.arange(-reach, reach + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
        base = np.rint(g_pts).astype(np.int64)
        step = max(1, 1_400_000 // len(off))
        for chunk in range(0, len(g_pts), step):
            b = base[chunk:chunk + step][:, None, :] + off[None]            # (n, m, 3)
            d = np.linalg.norm((b - g_pts[chunk:chunk + step][:, None, :]) * spacing, axis=-1)
            v = np.clip(g_rad[chunk:chunk + step][:, None] + 0.5 - d, 0, 1).astype(np.float32)
            ok = (v > 0) & np.all((b >= 0) & (b < np.asarray(shape)), axis=-1)
            np.maximum.at(occ, np.ravel_multi_index(tuple(b[ok].T), shape), v[ok])      # max over tubes
    return occ.reshape(shape)

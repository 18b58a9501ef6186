"""Subject anatomy from the MNI152 2009 templates shipped in nilearn's wheel (no download).

Each subject is the template under its own random similarity transform (scale, small rotations, translation)
and a smooth random elastic displacement, resampled onto the SWI grid (default 160 x 146 x 112 voxels of
0.98 x 0.98 x 1.0 mm, axial slices on the third axis, RAS). Grey matter, white matter and the brain mask come
from the templates' probability maps; CSF is brain minus GM minus WM. The iron-rich deep grey nuclei have no
atlas in the wheel and are modelled as soft ellipsoids at their MNI coordinates (see :data:`DEEP_NUCLEI`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["DEEP_NUCLEI", "Anatomy", "mni_templates", "sample_anatomy", "grid_affine"]

# (name, centre in MNI mm (x, y, z) for the right hemisphere (mirrored for the left), half-axes mm, SWI factor).
# Centres/extents after the MNI152 2009 atlases (CIT168 / Harvard-Oxford subcortical, Keuken 2014 for the
# midbrain nuclei), rounded; the SWI factor is the relative intensity at the nucleus centre (iron: GP darkest,
# then red nucleus / substantia nigra / dentate, putamen, caudate, thalamus), after Haacke et al. 2005.
DEEP_NUCLEI: tuple[tuple[str, tuple[float, float, float], tuple[float, float, float], float], ...] = (
    ("putamen", (25.0, 2.0, 0.0), (5.5, 13.0, 8.0), 0.72),
    ("globus_pallidus", (19.0, -3.0, -1.0), (3.5, 7.5, 5.0), 0.52),
    ("caudate_head", (13.0, 12.0, 9.0), (4.0, 8.0, 7.0), 0.80),
    ("thalamus", (11.0, -18.0, 7.0), (6.5, 11.0, 7.0), 0.88),
    ("red_nucleus", (5.0, -20.0, -9.0), (2.8, 3.5, 3.5), 0.55),
    ("substantia_nigra", (10.0, -17.0, -12.0), (2.5, 6.0, 2.5), 0.55),
    ("dentate", (14.0, -56.0, -34.0), (5.5, 7.0, 4.5), 0.62),
)


@functools.lru_cache(maxsize=1)
def mni_templates() -> dict[str, np.ndarray]:
    """The MNI152 2009 1 mm templates as float32 arrays (197 x 233 x 189) plus their affine (cached)."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    brain = datasets.load_mni152_brain_mask(resolution=1)
    out = {
        "t1": np.asarray(t1.dataobj, dtype=np.float32),
        "gm": np.asarray(gm.dataobj, dtype=np.float32),
        "wm": np.asarray(wm.dataobj, dtype=np.float32),
        "brain": np.asarray(brain.dataobj, dtype=np.float32),
        "affine": np.asarray(t1.affine, dtype=np.float64),
    }
    for k in ("t1", "gm", "wm", "brain"):
        if out[k].shape != out["t1"].shape:
            raise RuntimeError(f"nilearn MNI152 {k} template has shape {out[k].shape}, expected {out['t1'].shape}")
    return out


def grid_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS affine of the SWI grid: voxel (i, j, k) -> mm, the grid centred on the world origin."""
    aff = np.diag([*spacing, 1.0]).astype(np.float64)
    aff[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spacing)
    return aff


@dataclass
class Anatomy:
    """One subject's anatomy on the SWI grid. Probabilities in [0, 1], float32, shape ``shape``."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray            # brain probability (template brain mask resampled)
    iron: np.ndarray             # multiplicative SWI factor of the deep nuclei (1 elsewhere)
    deep: np.ndarray             # deep grey nuclei weight in [0, 1]
    brainstem: np.ndarray        # bool: brainstem region (midbrain/pons/medulla)
    mni: np.ndarray              # (3, X, Y, Z) MNI coordinates of each voxel (mm), float32
    affine: np.ndarray           # 4 x 4 RAS affine of the grid
    spacing: tuple[float, float, float]


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _interp_matrix(n: int, g: int) -> np.ndarray:
    """(n, g) linear interpolation weights from g control points spanning [0, n-1] to n samples (float32)."""
    pos = np.linspace(0, g - 1, n)
    lo = np.clip(np.floor(pos).astype(int), 0, g - 2)
    frac = pos - lo
    w = np.zeros((n, g), dtype=np.float32)
    w[np.arange(n), lo] = 1 - frac
    w[np.arange(n), lo + 1] += frac
    return w


def sample_anatomy(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (160, 146, 112),
    spacing: tuple[float, float, float] = (0.98, 0.98, 1.0),
    rotation_deg: float = 6.0,
    elastic_mm: float = 2.5,
    elastic_grid: int = 7,
) -> Anatomy:
    """Resample the templates onto the subject grid under a random similarity + smooth elastic warp.

    The scale makes the brain's axial plane fit inside ``shape[:2]`` (about 0.78-0.84 of MNI in-plane; the
    third axis is scaled alike, so an inferior part of the cerebellum may fall below the slab, as in clinical
    SWI). ``rotation_deg`` bounds each rotation angle; ``elastic_mm`` is the displacement standard deviation
    on a ``elastic_grid``^3 control grid, upsampled linearly after Gaussian smoothing.
    """
    tpl = mni_templates()
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    affine = grid_affine(shape, spacing)

    # in-plane fit: MNI brain is ~140 mm (LR) x ~175 mm (AP); the grid is shape*spacing mm with a margin
    fov = np.asarray(shape[:2]) * np.asarray(spacing[:2])
    fit = float(min((fov[0] - 12) / 150.0, (fov[1] - 10) / 180.0))
    scale = fit * rng.uniform(0.93, 1.0) * np.array([rng.uniform(0.97, 1.03), 1.0, rng.uniform(0.97, 1.03)])
    rot = _rotation(rng.uniform(-rotation_deg, rotation_deg, size=3))
    # MNI point that lands on the grid centre: slightly above the AC so the cerebrum fills the slab
    centre_mni = np.array([0.0, -18.0, 16.0]) + rng.normal(0, 1.5, size=3)
    shift = rng.normal(0, 2.0, size=3)

    # world coords of every voxel (float32 to save memory), then world -> MNI: mni = R^T (w - shift) / s + c
    ii = [np.arange(n, dtype=np.float32) * np.float32(sp) + np.float32(affine[a, 3]) for a, (n, sp) in
          enumerate(zip(shape, spacing))]
    lin = np.linalg.inv(rot @ np.diag(scale)).astype(np.float32)   # world -> MNI linear part
    mni = np.empty((3,) + shape, dtype=np.float32)
    for r in range(3):
        mni[r] = (lin[r, 0] * (ii[0][:, None, None] - shift[0]) + lin[r, 1] * (ii[1][None, :, None] - shift[1])
                  + lin[r, 2] * (ii[2][None, None, :] - shift[2]) + centre_mni[r])

    # smooth elastic displacement (mm in MNI space): control grid -> voxels by separable linear interpolation
    weights = [_interp_matrix(n, elastic_grid) for n in shape]
    for r in range(3):
        coarse = ndimage.gaussian_filter(rng.normal(0.0, elastic_mm, size=(elastic_grid,) * 3), 0.8, mode="nearest")
        field = np.tensordot(weights[0], coarse, axes=(1, 0))               # (X, g, g)
        field = np.tensordot(weights[1], field, axes=(1, 1)).transpose(1, 0, 2)  # (X, Y, g)
        mni[r] += np.tensordot(field, weights[2], axes=(2, 1)).astype(np.float32)

    inv_tpl = np.linalg.inv(tpl["affine"]).astype(np.float32)
    vox = np.empty_like(mni)
    for r in range(3):
        vox[r] = inv_tpl[r, 0] * mni[0] + inv_tpl[r, 1] * mni[1] + inv_tpl[r, 2] * mni[2] + inv_tpl[r, 3]

    brain = np.clip(ndimage.map_coordinates(tpl["brain"], vox, order=1, mode="constant", cval=0.0), 0, 1)
    brain = brain.astype(np.float32)
    inside = np.nonzero(brain > 0)
    pts = vox[(slice(None),) + inside]

    def warp_inside(name: str) -> np.ndarray:
        out = np.zeros(shape, dtype=np.float32)
        out[inside] = np.clip(ndimage.map_coordinates(tpl[name], pts, order=1, mode="constant", cval=0.0), 0, 1)
        return out

    gm = warp_inside("gm") * brain
    wm = warp_inside("wm") * brain
    tot = gm + wm
    over = tot > 1
    gm[over] /= tot[over]
    wm[over] /= tot[over]
    csf = np.clip(brain - gm - wm, 0, 1)
    del vox

    iron = np.ones(shape, dtype=np.float32)
    deep = np.zeros(shape, dtype=np.float32)
    x, y, z = mni
    for _, (cx, cy, cz), (ax, ay, az), factor in DEEP_NUCLEI:
        for side in (1.0, -1.0):
            sel = (np.abs(x - side * cx) < ax * 1.6) & (np.abs(y - cy) < ay * 1.6) & (np.abs(z - cz) < az * 1.6)
            idx = np.nonzero(sel)
            if not len(idx[0]):
                continue
            rho = np.sqrt(((x[idx] - side * cx) / ax) ** 2 + ((y[idx] - cy) / ay) ** 2 + ((z[idx] - cz) / az) ** 2)
            w = np.clip((1.35 - rho) / 0.7, 0.0, 1.0)       # soft edge around rho = 1
            w = w * brain[idx]
            deep[idx] = np.maximum(deep[idx], w)
            iron[idx] = np.minimum(iron[idx], 1.0 - (1.0 - factor) * w)
    # deep nuclei are grey matter: move their WM/CSF share to GM
    gm = np.where(deep > 0, gm + deep * (wm + csf) * 0.8, gm)
    wm = np.where(deep > 0, wm * (1 - 0.8 * deep), wm)
    csf = np.where(deep > 0, csf * (1 - 0.8 * deep), csf)
    brainstem = (np.abs(x) < 13) & (y > -42) & (y < -10) & (z < -8) & (z > -60) & (brain > 0.5)
    return Anatomy(gm.astype(np.float32), wm.astype(np.float32), csf.astype(np.float32), brain, iron, deep,
                   brainstem, mni, affine, spacing)

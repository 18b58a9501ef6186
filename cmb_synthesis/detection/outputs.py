"""What detection inference hands to a hospital, per scan: the detections (world and input-voxel positions),
an instance-label NIfTI of small spheres in the input's grid, a probability map in the input's grid and a QC
picture (axial minimum-intensity-projection montage with each detection circled and numbered).

Geometry: candidates are found on the detector's grid (the scan reoriented to RAS and resampled to the
training spacing, affine ``A_d``). A candidate voxel ``v`` is at world ``w = A_d @ v`` (RAS mm); its voxel in
the input file is ``rint(inv(A_in) @ w)`` (``A_in``: the input file's affine), clipped to the input volume.
Spheres are drawn directly in the input grid around ``w`` (no interpolation of labels back).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.affines import apply_affine

from cmb_synthesis.data.io import PathLike, save_nifti, write_csv

__all__ = ["DETECTION_COLUMNS", "to_world", "world_to_voxels", "draw_balls", "detection_rows", "write_detections_csv",
           "read_detections_csv", "write_in_input_grid", "qc_montage"]

#: columns of ``<id>_detections.csv`` and of the folder's ``detections.csv``: the scan id, the detection's
#: instance label in ``<id>_detections.nii.gz`` (= its row number, 1 = most probable), world RAS mm, the input
#: file's voxel indices, the CMB probability
DETECTION_COLUMNS = ("id", "label", "x", "y", "z", "i", "j", "k", "probability")


def to_world(coords: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices -> (N, 3) world mm through a 4x4 ``affine``."""
    coords = np.asarray(coords, np.float64).reshape(-1, 3)
    return apply_affine(np.asarray(affine, np.float64), coords) if len(coords) else np.zeros((0, 3))


def world_to_voxels(world: np.ndarray, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(N, 3) world mm -> (N, 3) int64 nearest voxel of the grid (``affine``, ``shape``), clipped to it."""
    world = np.asarray(world, np.float64).reshape(-1, 3)
    if not len(world):
        return np.zeros((0, 3), np.int64)
    v = np.rint(apply_affine(np.linalg.inv(np.asarray(affine, np.float64)), world)).astype(np.int64)
    return np.clip(v, 0, np.asarray(shape[:3], np.int64) - 1)


def draw_balls(shape: Sequence[int], affine: np.ndarray, centres: np.ndarray, values: Sequence[float],
               radius_mm: float, dtype: Any = np.float32, combine: str = "max") -> np.ndarray:
    """Balls of ``radius_mm`` (world distance, any affine: oblique, anisotropic) around world ``centres``.

    Args:
        shape, affine: the grid (X, Y, Z) and its voxel-to-world matrix.
        centres: (N, 3) world mm.
        values: (N,) value of each ball.
        combine: ``"max"`` (overlaps keep the larger value, e.g. probabilities) or ``"first"`` (overlaps keep the
            earlier ball, e.g. instance labels ordered by probability).

    Returns:
        (X, Y, Z) array of ``dtype``, 0 outside the balls. A ball holds the voxels within ``radius_mm`` of its
        centre (boundary included, relative tolerance 1e-5) and at least the centre's nearest voxel.
    """
    if combine not in ("max", "first"):
        raise ValueError(f"combine must be 'max' or 'first', got {combine!r}")
    shape = tuple(int(s) for s in shape[:3])
    out = np.zeros(shape, dtype)
    centres = np.asarray(centres, np.float64).reshape(-1, 3)
    values = np.asarray(values).reshape(-1)
    if len(centres) != len(values):
        raise ValueError(f"draw_balls: {len(centres)} centres but {len(values)} values")
    a = np.asarray(affine, np.float64)
    lin, inv = a[:3, :3], np.linalg.inv(a)
    half = np.ceil(float(radius_mm) * np.sqrt((inv[:3, :3] ** 2).sum(axis=1))).astype(int) + 1
    offsets = np.stack(np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij"), -1).reshape(-1, 3)
    # boundary included, with a relative tolerance: float32 noise in a header's voxel size (1.00000003 mm) does
    # not move a voxel exactly radius_mm away out of the ball
    r2 = (float(radius_mm) * (1.0 + 1e-5)) ** 2
    written = np.zeros(shape, bool) if combine == "first" else None
    order = np.argsort(values, kind="stable") if combine == "max" else np.arange(len(values))
    for n in order:
        c = apply_affine(inv, centres[n])
        base = np.rint(c).astype(np.int64)
        pts = base + offsets
        d = (pts - c) @ lin.T
        inside = (np.einsum("ij,ij->i", d, d) <= r2) | np.all(pts == base, axis=1)
        pts = pts[inside & np.all((pts >= 0) & (pts < np.array(shape)), axis=1)]
        if not len(pts):
            continue
        idx = (pts[:, 0], pts[:, 1], pts[:, 2])
        if combine == "max":
            out[idx] = np.maximum(out[idx], values[n])
        else:
            free = ~written[idx]
            sel = tuple(x[free] for x in idx)
            out[sel] = values[n]
            written[sel] = True
    return out


def detection_rows(scan_id: str, world: np.ndarray, probs: np.ndarray, source_affine: np.ndarray,
                   source_shape: Sequence[int]) -> list[dict[str, Any]]:
    """Rows of ``<id>_detections.csv``, sorted by decreasing probability; ``label`` = row number (1..N).

    Args:
        world: (N, 3) world RAS mm of the detections; probs: (N,).
        source_affine, source_shape: the input file's grid ((i, j, k) = its nearest voxel).
    """
    world = np.asarray(world, np.float64).reshape(-1, 3)
    probs = np.asarray(probs, np.float64).reshape(-1)
    order = np.argsort(-probs, kind="stable")
    ijk = world_to_voxels(world, source_affine, source_shape)
    return [{"id": scan_id, "label": n + 1, "x": round(float(world[o, 0]), 3), "y": round(float(world[o, 1]), 3),
             "z": round(float(world[o, 2]), 3), "i": int(ijk[o, 0]), "j": int(ijk[o, 1]), "k": int(ijk[o, 2]),
             "probability": float(probs[o])} for n, o in enumerate(order)]


def write_detections_csv(rows: Sequence[Mapping[str, Any]], path: PathLike) -> Path:
    """Write detection rows (:data:`DETECTION_COLUMNS`) atomically."""
    return write_csv([{c: r[c] for c in DETECTION_COLUMNS} for r in rows], path, DETECTION_COLUMNS)


def read_detections_csv(path: PathLike) -> list[dict[str, Any]]:
    """Rows of a detections CSV (strings as written)."""
    import csv

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in DETECTION_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a detections CSV (missing columns {missing})")
        return list(reader)


def write_in_input_grid(array: np.ndarray, canonical: Any, path: PathLike) -> Path:
    """Save an (X, Y, Z) array drawn in the input file's grid with its affine and (for NIfTI) a copy of its
    header (data type set to the array's); ``canonical`` is the scan's :class:`CanonicalImage`."""
    header = canonical.source_header.copy() if canonical.source_header is not None else None
    if header is not None:
        header.set_data_dtype(array.dtype)
    return save_nifti(array, canonical.source_affine, path, header=header, overwrite=True)


def qc_montage(image: np.ndarray, spacing: Sequence[float], coords: np.ndarray, labels: Sequence[int],
               path: PathLike, title: str = "", n_slabs: int = 6, mask: np.ndarray | None = None,
               margin_mm: float = 5.0) -> Path:
    """Axial minimum-intensity-projection montage (PNG) with every detection circled and numbered.

    Each panel is one slab of axial slices (the minimum over the slab: veins and CMBs dark), within the brain
    mask's bounding box.

    Args:
        image: (X, Y, Z) RAS volume (the detector's grid; intensities in [0, 1]).
        spacing: its voxel size (mm), for the pixel aspect.
        coords: (N, 3) detections' voxel indices in ``image``; labels: (N,) their numbers.
        path: the PNG file (written as given: a temporary path of an atomic unit is fine).
        n_slabs: axial slabs (each a MinIP over its slices), at most the number of slices.
        mask: (X, Y, Z) brain mask: the montage shows its bounding box plus ``margin_mm`` (the slabs cover the
            brain, not the air around it); None or empty: the whole volume.

    The picture is in neurological convention (patient's right on the right, anterior up), as labelled.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    img = np.asarray(image, np.float32)
    if img.ndim != 3:
        raise ValueError(f"{path}: QC picture needs an (X, Y, Z) image, got shape {img.shape}")
    coords = np.asarray(coords, np.int64).reshape(-1, 3)
    if mask is not None and np.asarray(mask).any():
        idx = np.argwhere(np.asarray(mask) > 0)
        pad = np.ceil(float(margin_mm) / np.asarray(spacing, np.float64)).astype(int)
        lo = np.maximum(idx.min(axis=0) - pad, 0)
        hi = np.minimum(idx.max(axis=0) + pad + 1, img.shape)
        img = img[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        coords = coords - lo

    nz = img.shape[2]
    n = max(1, min(int(n_slabs), nz))
    edges = np.linspace(0, nz, n + 1).round().astype(int)
    cols = min(3, n)
    rows = int(np.ceil(n / cols))
    aspect = float(spacing[1]) / float(spacing[0])
    w = 4.0 * cols
    h = 4.0 * rows * aspect * img.shape[1] / max(1, img.shape[0]) + 0.6
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    radius = 4.0 / float(spacing[0])  # 4 mm circle
    lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0.0, 1.0)
    for s in range(n):
        ax = fig.add_subplot(rows, cols, s + 1)
        z0, z1 = int(edges[s]), int(max(edges[s + 1], edges[s] + 1))
        ax.imshow(img[:, :, z0:z1].min(axis=2).T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect,
                  interpolation="nearest")
        ax.set_title(f"slices {z0}-{z1 - 1} (MinIP)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.01, 0.5, "L", color="yellow", transform=ax.transAxes, fontsize=8, va="center")
        ax.text(0.97, 0.5, "R", color="yellow", transform=ax.transAxes, fontsize=8, va="center")
        for c, lab in zip(coords, labels):
            if z0 <= c[2] < z1:
                ax.add_patch(Circle((c[0], c[1]), radius, fill=False, edgecolor="red", linewidth=1.0))
                ax.text(c[0] + radius, c[1] + radius, str(int(lab)), color="red", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return Path(path)

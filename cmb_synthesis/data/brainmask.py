"""Brain mask for scans delivered without one (a fallback for external data)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from transforms.spacing import voxel_ratio

__all__ = ["estimate_brainmask"]


def estimate_brainmask(image: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), smooth_mm: float = 2.0,
                       erode_mm: float = 1.0) -> np.ndarray:
    """A simple brain (head foreground) mask for scans delivered without one.

    Gaussian smoothing (``smooth_mm``) -> Otsu threshold over all voxels -> largest 26-connected component ->
    3-D hole filling, then slice-wise (axial) hole filling (dark CMBs, veins and ventricles inside the brain
    are kept) -> erosion by ``erode_mm`` (drops the bright rim of partial-volume voxels). This is a fallback
    for external data: it is a head mask rather than a skull-stripped brain, so FRST candidates may appear at
    the scalp; supply ``<id>_brainmask.nii.gz`` beside the scan for better specificity.

    Args:
        image: (X, Y, Z) intensities (any positive scale).
        spacing: voxel size in mm.

    Returns:
        (X, Y, Z) uint8 mask in {0, 1}.

    Raises:
        ValueError: a constant image (no threshold exists) or an empty mask.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3:
        raise ValueError(f"estimate_brainmask: expected a 3-D image, got shape {img.shape}")
    sm = ndimage.gaussian_filter(img, [smooth_mm / s for s in spacing]) if smooth_mm > 0 else img
    lo, hi = float(sm.min()), float(sm.max())
    if hi <= lo:
        raise ValueError("estimate_brainmask: constant image, cannot threshold")
    hist, edges = np.histogram(sm, bins=256, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2  # Otsu: maximise the between-class variance
    thr = centres[int(np.argmax(between[:-1]))]
    fg = sm > thr
    lab, n = ndimage.label(fg, structure=np.ones((3, 3, 3)))
    if n == 0:
        raise ValueError("estimate_brainmask: no foreground above the Otsu threshold")
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    fg = lab == int(np.argmax(sizes))
    fg = ndimage.binary_fill_holes(fg)
    for k in range(fg.shape[2]):
        fg[..., k] = ndimage.binary_fill_holes(fg[..., k])
    if erode_mm > 0:
        r = [max(1, int(v)) for v in np.rint(voxel_ratio(erode_mm, spacing))]
        fg = ndimage.binary_erosion(fg, structure=np.ones([2 * x + 1 for x in r], bool))
    if not fg.any():
        raise ValueError("estimate_brainmask: the estimated mask is empty")
    return fg.astype(np.uint8)

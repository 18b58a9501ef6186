"""Brain mask for scans delivered without one (a fallback for external data).

:func:`estimate_brainmask` with ``method="mni"`` (default) registers nilearn's MNI152 T1 template to the scan
with ITK and warps the template's brain mask onto it (:mod:`cmb_synthesis.data.registration`; Dice and timing
on deformed phantom scans in ``docs/brainmask.md``); ``method="otsu"`` is the older head mask.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from transforms.spacing import voxel_ratio

__all__ = ["estimate_brainmask", "otsu_head_mask", "METHODS"]

logger = logging.getLogger(__name__)

METHODS = ("mni", "otsu")


def _checked_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3:
        raise ValueError(f"estimate_brainmask: expected a 3-D (X, Y, Z) image, got shape {img.shape}")
    if min(img.shape) < 2:
        raise ValueError(f"estimate_brainmask: image of shape {img.shape} has an axis shorter than 2 voxels")
    if not np.all(np.isfinite(img)):
        raise ValueError("estimate_brainmask: the image holds NaN or infinite values")
    if float(img.max()) <= float(img.min()):
        raise ValueError("estimate_brainmask: constant image, no brain to find")
    return img


def estimate_brainmask(
    image: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    affine: np.ndarray | None = None,
    method: str = "mni",
    *,
    grid_mm: float = 3.0,
    bspline_mesh: int | None = 4,
    output_mm: float = 1.5,
    smooth_mm: float = 2.0,
    erode_mm: float = 1.0,
) -> np.ndarray:
    """Brain mask of an SWI magnitude scan delivered without one.

    ``method="mni"``: nilearn's MNI152 T1 template is registered to the scan with ITK (Mattes mutual
    information on a ``grid_mm`` grid, restricted to the template's brain dilated by 10 mm; affine, then a
    coarse B-spline step with ``bspline_mesh`` cells per axis, None: affine only) and its brain mask warped onto the
    scan grid (trilinear on an ``output_mm`` grid, upsampled, threshold 0.5); see
    :mod:`cmb_synthesis.data.registration`. ``method="otsu"``: :func:`otsu_head_mask` (``smooth_mm``,
    ``erode_mm``), a head rather than a brain mask.

    Args:
        image: (X, Y, Z) intensities of an SWI magnitude in closest-RAS voxel order (any positive scale).
        spacing: voxel size in mm (used when ``affine`` is None).
        affine: 4 x 4 voxel -> world (RAS mm) matrix of ``image``; None: ``diag(spacing)`` (the scan is then
            taken as axial RAS; its position does not matter, the registration starts from the head's centre
            of mass).
        method: ``"mni"`` or ``"otsu"``.

    Returns:
        (X, Y, Z) uint8 mask in {0, 1} on the image's grid.

    Raises:
        ValueError: an unknown method, an image that is not 3-D, constant or non-finite, a bad affine, a
            registration that diverged, or an empty mask.
    """
    if method not in METHODS:
        raise ValueError(f"estimate_brainmask: method must be one of {METHODS}, got {method!r}")
    img = _checked_image(image)
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(np.isfinite(sp)) or min(sp) <= 0:
        raise ValueError(f"estimate_brainmask: spacing must be 3 positive numbers (mm), got {spacing}")
    if affine is None:
        affine = np.diag([*sp, 1.0])
    else:
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise ValueError(f"estimate_brainmask: affine must be a finite, invertible 4 x 4 matrix, got {affine!r}")
        sp = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    if method == "otsu":
        return otsu_head_mask(img, sp, smooth_mm=smooth_mm, erode_mm=erode_mm)
    from cmb_synthesis.data.registration import register_template, warp_template_mask

    try:
        reg = register_template(img, affine, grid_mm=grid_mm, bspline_mesh=bspline_mesh)
    except ValueError as e:
        raise ValueError(f"estimate_brainmask: {e}") from e
    mask = warp_template_mask(reg, img.shape, affine, output_mm=output_mm)
    if not mask.any():
        raise ValueError("estimate_brainmask: the registered template brain mask misses the scan (registration "
                         "diverged or the scan holds no head)")
    logger.debug("estimate_brainmask: MNI registration %s, metric %.3f", reg.seconds, reg.metric)
    return mask


def otsu_head_mask(image: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), smooth_mm: float = 2.0,
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
    img = _checked_image(image)
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

"""Millimetre-to-voxel conversions that do not depend on floating-point noise in the voxel spacing.

Clinical affines are rarely exact: an oblique scan's column norms give spacings such as ``1.00000003`` or
``0.99999997`` mm for a nominal 1 mm. Integer conversions of a length in mm then flip at exact ratios
(``floor(3.0 / 1.00000003) == 2``, not 3), and so do distance tests at the boundary of a ball
(``(3 * 1.00000003) ** 2 <= 9`` is False), which changes footprints, paddings and kernel sizes, and with them
detector candidates. Two rules remove that dependence:

* :func:`snap_spacing` rounds spacings to :data:`SPACING_DECIMALS` decimals (1 nm), far below any physical
  meaning, so that noisy and clean spacings give the same computation;
* :func:`voxel_ratio` rounds a length/spacing ratio to :data:`RATIO_DECIMALS` decimals before it is floored,
  ceiled or rounded to an integer, and :func:`within_radius` compares distances with the same relative
  tolerance, so exact ratios (``0.3 / 0.1``) stay exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["SPACING_DECIMALS", "RATIO_DECIMALS", "snap_spacing", "voxel_ratio", "half_widths", "within_radius"]

#: decimals (mm) kept of a voxel spacing: 1e-6 mm.
SPACING_DECIMALS: int = 6
#: decimals kept of a length/spacing ratio before an integer conversion, and relative tolerance 1e-6 of
#: :func:`within_radius`.
RATIO_DECIMALS: int = 6


def snap_spacing(spacing: Sequence[float]) -> tuple[float, ...]:
    """``spacing`` (mm, any length) rounded to :data:`SPACING_DECIMALS` decimals, as Python floats.

    Raises:
        ValueError: a non-finite or non-positive value (also after rounding).
    """
    out = tuple(round(float(s), SPACING_DECIMALS) for s in spacing)
    if not all(np.isfinite(s) and s > 0 for s in out):
        raise ValueError(f"spacing must be positive finite numbers (mm), got {tuple(spacing)}")
    return out


def voxel_ratio(length_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """``length_mm / spacing`` per axis (float64), rounded to :data:`RATIO_DECIMALS` decimals: the argument
    to give ``floor``/``ceil``/``rint`` when converting a length in mm to a number of voxels."""
    return np.round(float(length_mm) / np.asarray(spacing, dtype=np.float64), RATIO_DECIMALS)


def half_widths(radius_mm: float, spacing: Sequence[float], minimum: int = 0) -> tuple[int, ...]:
    """Whole voxels within ``radius_mm`` along each axis: ``max(minimum, floor(radius / spacing))``."""
    return tuple(max(int(minimum), int(v)) for v in np.floor(voxel_ratio(radius_mm, spacing)))


def within_radius(offsets: np.ndarray, spacing: Sequence[float], radius_mm: float) -> np.ndarray:
    """Which voxel offsets (..., D) lie within ``radius_mm`` of the origin in mm (boundary included, with a
    relative tolerance of ``10 ** -RATIO_DECIMALS``). Returns a boolean array of shape ``offsets.shape[:-1]``."""
    scaled = np.asarray(offsets, dtype=np.float64) * (np.asarray(spacing, dtype=np.float64) / float(radius_mm))
    return (scaled**2).sum(-1) <= 1.0 + 10.0**-RATIO_DECIMALS

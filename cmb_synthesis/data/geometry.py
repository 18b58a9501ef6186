"""Voxel-size sanity of input scans: refuse implausible spacings before anything is allocated, warn when a
scan's spacing is far from the model's training spacing.

A header in the wrong units (micrometres read as millimetres: 0.001 mm voxels) makes resampling to the model's
spacing and the FRST's padded accumulation allocate hundreds of GiB; 50 mm "slices" are no SWI volume. Both
are refused here with the file and the spacing named, before the voxels are even read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from nibabel.orientations import io_orientation

from cmb_synthesis.data.io import PathLike

logger = logging.getLogger(__name__)

__all__ = ["PLAUSIBLE_SPACING_MM", "SPACING_WARN_RATIO", "canonical_spacing", "check_spacing"]

#: voxel sizes (mm) accepted on every axis by default (clinical SWI: ~0.2-5 mm).
PLAUSIBLE_SPACING_MM: tuple[float, float] = (0.1, 10.0)
#: :func:`check_spacing` warns when an axis differs from the training spacing by more than this factor.
SPACING_WARN_RATIO: float = 1.5


def canonical_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) of ``affine`` along the R, A, S axes of its closest canonical orientation."""
    zooms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    out = np.empty(3)
    out[io_orientation(affine)[:, 0].astype(int)] = zooms
    return tuple(float(z) for z in out)  # type: ignore[return-value]


def check_spacing(
    affine: np.ndarray,
    source: PathLike,
    spacing_range: tuple[float, float] | None = PLAUSIBLE_SPACING_MM,
    expected_spacing: Sequence[float] | None = None,
    max_ratio: float = SPACING_WARN_RATIO,
) -> tuple[float, float, float]:
    """Refuse implausible voxel sizes before anything is allocated; warn when far from the training spacing.

    Args:
        affine: 4x4 voxel-to-world matrix of the scan.
        source: the file or folder, for messages.
        spacing_range: ``(low, high)`` mm accepted on every axis (None: no check). Wrong header units
            (0.001 mm voxels) would make resampling and FRST allocate hundreds of GiB; 50 mm slices are no SWI.
        expected_spacing: the model's training spacing (R, A, S order, mm); None: no warning.
        max_ratio: warn when an axis differs from ``expected_spacing`` by more than this factor either way.

    Returns:
        The voxel size in canonical (R, A, S) order, mm.

    Raises:
        ValueError: a voxel size outside ``spacing_range``, naming ``source`` and the spacing.
    """
    spacing = canonical_spacing(affine)
    if spacing_range is not None:
        low, high = (float(v) for v in spacing_range)
        if not all(low <= s <= high for s in spacing):
            raise ValueError(
                f"{source}: implausible voxel spacing {tuple(round(s, 6) for s in spacing)} mm (R, A, S); expected "
                f"{low:g}-{high:g} mm per axis (wrong units in the header? pass spacing_range to override)")
    if expected_spacing is not None:
        exp = np.asarray(expected_spacing, dtype=np.float64)
        ratio = np.maximum(np.asarray(spacing) / exp, exp / np.asarray(spacing))
        if np.any(ratio > max_ratio):
            logger.warning("%s: voxel spacing %s mm (R, A, S) differs from the training spacing %s mm by up to "
                           "%.2fx; results may be unreliable", source, tuple(round(s, 4) for s in spacing),
                           tuple(float(e) for e in exp), float(ratio.max()))
    return spacing

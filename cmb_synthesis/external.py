"""External SWI: any orientation, anisotropic spacing, NIfTI or DICOM in; results written back in the input's space.

The models are trained on RAS-oriented phantom/clinical SWI at 0.98 x 0.98 x 1.0 mm. Scans from other scanners
come in other axis orders (LPS, axial slices on the first axis, ...), other spacings, and as DICOM series.
:func:`to_canonical` brings a scan into the closest canonical (RAS) orientation, optionally resampled to the
model's spacing, and remembers the source geometry; :func:`write_like` takes an array computed in that
canonical grid back to the input's voxel grid and writes it with the input's affine and NIfTI header
(qform/sform codes, units, description), atomically, never over an input.

Pure reorientation (no ``spacing``) is an exact axis permutation/flip both ways (no interpolation), and it is
the same grid as MONAI's ``Orientationd(axcodes="RAS")`` used by ``transforms.pipelines.preprocessing``, so
an inference pipeline can do::

    data = preprocessing(...)({"image": path})           # (1, X, Y, Z) RAS, intensities in [0, 1]
    out = model(data["image"][None])[0]                  # canonical grid
    write_like(out, path, out_path)                      # input's grid, affine and header

DICOM series (a folder, or one ``.dcm`` file of it) are read with ITK (GDCM) through MONAI's ``ITKReader``;
their outputs are NIfTI files in the series' patient space (DICOM has no NIfTI header to copy).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from cmb_synthesis.io import check_not_input, save_nifti

PathLike = str | os.PathLike

__all__ = ["CanonicalImage", "is_dicom", "read_image", "to_canonical", "from_canonical", "write_like", "main"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr")


@dataclass
class CanonicalImage:
    """A scan in closest-canonical RAS orientation plus what is needed to go back.

    Attributes:
        array: (X, Y, Z) voxel data in RAS orientation (resampled to ``spacing`` if that was asked for).
        affine: 4x4 voxel-to-world (RAS mm) matrix of ``array``.
        spacing: voxel size of ``array`` in mm.
        source: the input path (NIfTI file or DICOM folder).
        source_shape, source_affine: the input's voxel grid.
        source_header: the input's ``Nifti1Header`` (None for DICOM).
        resampled: whether ``array`` was interpolated to ``spacing`` (else it is an exact reorientation).
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source: str
    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    source_header: Any = None
    resampled: bool = False
    meta: dict = field(default_factory=dict)


def is_dicom(path: PathLike) -> bool:
    """True for a folder (a DICOM series) or a ``.dcm``/``.ima`` file."""
    p = Path(path)
    return p.is_dir() or p.suffix.lower() in (".dcm", ".ima")


def _read_dicom(path: Path) -> nib.Nifti1Image:
    from monai.data import ITKReader

    folder = path if path.is_dir() else path.parent
    try:
        reader = ITKReader(affine_lps_to_ras=True)  # (X, Y, Z) array, RAS affine
        img = reader.read(str(folder))
        arr, meta = reader.get_data(img)
    except Exception as e:  # ITK raises RuntimeError with GDCM messages
        raise ValueError(f"{folder}: not a readable DICOM series ({e})") from e
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"{folder}: expected a 3-D DICOM series, got shape {arr.shape}")
    return nib.Nifti1Image(arr, np.asarray(meta["affine"], dtype=np.float64))


def read_image(path: PathLike) -> nib.Nifti1Image:
    """Read a 3-D NIfTI file (nibabel, header kept) or DICOM series (ITK) as a ``Nifti1Image``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a readable image, not 3-D (4-D with one volume is squeezed), or NaN/Inf voxels.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: input image does not exist")
    if is_dicom(p):
        img = _read_dicom(p)
    else:
        try:
            img = nib.load(str(p))
            shape = img.shape
        except Exception as e:
            raise ValueError(f"{p}: not a readable NIfTI image ({e})") from e
        if len(shape) == 4 and shape[3] == 1:
            img = img.slicer[..., 0]
        if len(img.shape) != 3:
            raise ValueError(f"{p}: expected a 3-D volume, got shape {shape}")
    data = np.asanyarray(img.dataobj)
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise ValueError(f"{p}: contains NaN or Inf voxels")
    if not np.isfinite(img.affine).all() or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise ValueError(f"{p}: invalid (singular or non-finite) voxel-to-world affine")
    return img


def _resampling_grid(shape: tuple[int, ...], affine: np.ndarray, spacing: tuple[float, ...]) -> tuple:
    """Grid of the same field of view as (shape, affine) with voxel size ``spacing`` (axes kept)."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ratio = np.asarray(spacing, dtype=np.float64) / zooms
    new_shape = tuple(max(1, int(round(s / r))) for s, r in zip(shape, ratio))
    scale = np.eye(4)
    scale[:3, :3] = np.diag(ratio)
    scale[:3, 3] = 0.5 * ratio - 0.5  # keep the outer voxel edges where they were
    return new_shape, affine @ scale


def to_canonical(
    path: PathLike, spacing: tuple[float, float, float] | None = None, order: int = 1, dtype: Any = np.float32
) -> CanonicalImage:
    """Load ``path`` in closest-canonical RAS orientation, optionally resampled to ``spacing`` (mm).

    Args:
        path: NIfTI file or DICOM series folder.
        spacing: target voxel size, e.g. ``(0.98, 0.98, 1.0)``; None keeps the input's voxels (exact).
        order: spline order for resampling (1 linear for images, 0 nearest for labels).
        dtype: data type of the returned array (None keeps the stored type).

    Raises:
        FileNotFoundError / ValueError: see :func:`read_image`; a non-positive spacing.
    """
    img = read_image(path)
    can = nib.as_closest_canonical(img)
    arr = np.asanyarray(can.dataobj)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    affine = can.affine.copy()
    resampled = False
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"{path}: spacing must be 3 positive numbers, got {spacing}")
        if not np.allclose(can.header.get_zooms()[:3], spacing, atol=1e-4):
            from nibabel.processing import resample_from_to

            new_shape, new_affine = _resampling_grid(arr.shape, affine, spacing)
            out = resample_from_to(nib.Nifti1Image(arr.astype(np.float32), affine), (new_shape, new_affine), order=order, mode="nearest")
            res = np.asarray(out.dataobj)
            if dtype is not None:
                arr = res.astype(dtype, copy=False)
            elif np.issubdtype(arr.dtype, np.integer):  # labels (order 0) keep their type, interpolated -> float32
                arr = np.rint(res).astype(arr.dtype) if order == 0 else res.astype(np.float32)
            else:
                arr = res.astype(arr.dtype, copy=False)
            affine, resampled = new_affine, True
    zooms = tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    header = None if is_dicom(path) else img.header.copy()
    return CanonicalImage(
        array=np.asarray(arr),
        affine=affine,
        spacing=zooms,  # type: ignore[arg-type]
        source=str(path),
        source_shape=tuple(int(s) for s in img.shape[:3]),  # type: ignore[arg-type]
        source_affine=img.affine.copy(),
        source_header=header,
        resampled=resampled,
    )


def _as_3d(array: Any, what: str) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)  # NIfTI has no boolean type
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"{what}: expected a (X, Y, Z) or (1, X, Y, Z) array, got shape {arr.shape}")
    return arr


def from_canonical(array: Any, reference: CanonicalImage, order: int | None = None) -> np.ndarray:
    """Map ``array`` from ``reference``'s canonical grid back to its source voxel grid.

    Exact (axis permutation/flip) when ``reference`` was not resampled; otherwise interpolated with spline
    ``order`` (default: 0 nearest for integer/bool arrays, 1 linear for floats) onto the source voxels.

    Raises:
        ValueError: ``array``'s shape is not the canonical grid's.
    """
    arr = _as_3d(array, reference.source)
    if arr.shape != reference.array.shape:
        raise ValueError(
            f"{reference.source}: array of shape {arr.shape} does not match the canonical grid {reference.array.shape}"
        )
    if order is None:
        order = 0 if np.issubdtype(arr.dtype, np.integer) else 1
    if not reference.resampled:
        ornt = ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(reference.source_affine))
        back = nib.Nifti1Image(arr, reference.affine).as_reoriented(ornt)
        if not np.allclose(back.affine, reference.source_affine, atol=1e-4):  # pragma: no cover - nibabel invariant
            raise ValueError(f"{reference.source}: reorientation did not restore the input affine")
        return np.asarray(back.dataobj)
    from nibabel.processing import resample_from_to

    src = nib.Nifti1Image(arr.astype(np.float32), reference.affine)
    out = resample_from_to(src, (reference.source_shape, reference.source_affine), order=order, mode="nearest")
    data = np.asarray(out.dataobj)
    if np.issubdtype(arr.dtype, np.integer):
        data = np.rint(data).astype(arr.dtype)
    return data.astype(arr.dtype, copy=False)


def write_like(
    array: Any,
    reference: PathLike | CanonicalImage,
    out_path: PathLike,
    spacing: tuple[float, float, float] | None = None,
    order: int | None = None,
    dtype: Any = None,
    overwrite: bool = False,
    inputs: tuple[PathLike, ...] = (),
) -> Path:
    """Write ``array`` (computed in the canonical grid of ``reference``) in the reference's space and header.

    Args:
        array: (X, Y, Z) or (1, X, Y, Z) numpy array or tensor in the canonical grid of ``reference``.
        reference: the input scan (path) or its :class:`CanonicalImage`.
        out_path: NIfTI file to write (``.nii.gz``); written to a temporary file, then renamed.
        spacing: the spacing ``reference`` was resampled to (only when ``reference`` is a path).
        order: interpolation order back onto the source grid (see :func:`from_canonical`).
        dtype: output data type (default: the array's).
        overwrite: replace an existing output (otherwise ``FileExistsError``).
        inputs: further input files that must never be overwritten.

    Returns:
        ``out_path``. The file has the input's shape and affine and, for NIfTI inputs, a copy of its header
        (qform/sform codes, units, description) with the output's data type.

    Raises:
        ValueError: ``out_path`` is the reference or one of ``inputs``; the shape does not match.
        FileExistsError: ``out_path`` exists and ``overwrite`` is False.
    """
    out_path = Path(out_path)
    ref = reference if isinstance(reference, CanonicalImage) else to_canonical(reference, spacing=spacing, dtype=None)
    check_not_input(out_path, [ref.source, *inputs])
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path}: output exists (pass overwrite=True / --overwrite to replace it)")
    data = from_canonical(array, ref, order=order)
    if dtype is not None:
        data = data.astype(dtype)
    header = ref.source_header.copy() if ref.source_header is not None else None
    if header is not None:
        header.set_data_dtype(data.dtype)
    return save_nifti(data, ref.source_affine, out_path, header=header, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    """Command line: bring an external scan to the model's frame, and results back to the scan's.

    ``python -m cmb_synthesis.external to-canonical INPUT OUT.nii.gz [--spacing 0.98 0.98 1.0] [--order 1]``
        INPUT (NIfTI file or DICOM series folder) as a NIfTI in closest-canonical RAS orientation, resampled
        to ``--spacing`` when given (e.g. thick-slice SWI to the paper's 0.98 x 0.98 x 1 mm).
    ``python -m cmb_synthesis.external back RESULT.nii.gz REFERENCE OUT.nii.gz [--spacing ...] [--order 0]``
        a result computed on ``to-canonical``'s output (same ``--spacing``) written in REFERENCE's voxel grid,
        affine and header.

    Outputs are written atomically; existing outputs are kept unless ``--overwrite``; inputs are never
    overwritten. Returns the exit status (1 with a message naming the file on bad input).
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m cmb_synthesis.external", description=main.__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-canonical", help="NIfTI/DICOM -> canonical RAS NIfTI (optionally resampled)")
    to.add_argument("input")
    to.add_argument("output")
    back = sub.add_parser("back", help="canonical-grid result -> the reference scan's grid and header")
    back.add_argument("result")
    back.add_argument("reference")
    back.add_argument("output")
    for p in (to, back):
        p.add_argument("--spacing", type=float, nargs=3, default=None, help="voxel size in mm of the canonical grid")
        p.add_argument("--order", type=int, default=None, help="interpolation order (default: 1 images, 0 labels)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-canonical":
            out = Path(args.output)
            check_not_input(out, [args.input])
            if out.exists() and not args.overwrite:
                raise FileExistsError(f"{out}: output exists (use --overwrite to replace it)")
            can = to_canonical(args.input, spacing=args.spacing, order=1 if args.order is None else args.order, dtype=None)
            data = can.array
            save_nifti(data, can.affine, out, overwrite=True)
            print(f"wrote {out}: shape {data.shape}, spacing {tuple(round(s, 4) for s in can.spacing)} mm, RAS")
        else:
            ref = to_canonical(args.reference, spacing=args.spacing, dtype=None)
            res = nib.load(str(args.result))
            if not np.allclose(res.affine, ref.affine, atol=1e-3):
                raise ValueError(
                    f"{args.result}: not on the canonical grid of {args.reference} (affine differs; same --spacing?)"
                )
            out = write_like(np.asanyarray(res.dataobj), ref, args.output, order=args.order, overwrite=args.overwrite,
                             inputs=(args.result,))
            print(f"wrote {out}: in the space of {args.reference}")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

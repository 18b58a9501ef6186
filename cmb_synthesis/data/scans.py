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

DICOM series (a folder, or one ``.dcm`` file of it) are read with ITK (GDCM) by
:func:`cmb_synthesis.data.dicom.read_dicom_series`, which refuses a folder of several series unless
``series_uid`` picks one and refuses unevenly spaced slices (a missing or corrupt slice); their outputs are
NIfTI files in the series' patient space (DICOM has no NIfTI header to copy). Every input's voxel size is
checked against a plausible range before its voxels are read (:func:`cmb_synthesis.data.geometry.check_spacing`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from cmb_synthesis.data.brainmask import estimate_brainmask
from cmb_synthesis.data.dicom import read_dicom_series
from cmb_synthesis.data.geometry import PLAUSIBLE_SPACING_MM, SPACING_WARN_RATIO, canonical_spacing, check_spacing
from transforms.labels import as_instance_labels
from cmb_synthesis.data.io import PathLike, check_not_input, save_nifti
from cmb_synthesis.data.naming import scan_id_of
from transforms.pipelines import preprocessing

logger = logging.getLogger(__name__)

__all__ = ["PLAUSIBLE_SPACING_MM", "SPACING_WARN_RATIO", "CanonicalImage", "is_dicom", "canonical_spacing",
           "check_spacing", "read_image", "to_canonical", "from_canonical", "write_like", "as_meta_tensor",
           "load_lesion_labels", "resample_to_spacing", "load_scan"]


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


def _read_dicom(path: Path, series_uid: str | None = None) -> nib.Nifti1Image:
    """One DICOM series (a folder, or one file selecting its series), slice geometry checked: see
    :func:`cmb_synthesis.data.dicom.read_dicom_series`."""
    return read_dicom_series(path, series_uid=series_uid)


def read_image(
    path: PathLike,
    series_uid: str | None = None,
    spacing_range: tuple[float, float] | None = PLAUSIBLE_SPACING_MM,
    expected_spacing: Sequence[float] | None = None,
) -> nib.Nifti1Image:
    """Read a 3-D NIfTI file (nibabel, header kept) or DICOM series (ITK) as a ``Nifti1Image``.

    Args:
        path: NIfTI file, DICOM folder or one DICOM file (which selects its series).
        series_uid: SeriesInstanceUID to read from a DICOM folder holding several series.
        spacing_range, expected_spacing: voxel size checks, see :func:`check_spacing` (done before the voxels
            are read).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a readable image, not 3-D (4-D with one volume is squeezed), NaN/Inf voxels, an
            implausible voxel size, several DICOM series without ``series_uid``, uneven DICOM slice positions.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: input image does not exist")
    if is_dicom(p):
        img = _read_dicom(p, series_uid)
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
    if not np.isfinite(img.affine).all() or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise ValueError(f"{p}: invalid (singular or non-finite) voxel-to-world affine")
    check_spacing(img.affine, p, spacing_range, expected_spacing)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # a truncated or corrupt file: gzip EOFError, short read, zlib error
        raise ValueError(f"{p}: truncated or corrupt voxel data ({type(e).__name__}: {e})") from e
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise ValueError(f"{p}: contains NaN or Inf voxels")
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
    path: PathLike,
    spacing: tuple[float, float, float] | None = None,
    order: int = 1,
    dtype: Any = np.float32,
    series_uid: str | None = None,
    spacing_range: tuple[float, float] | None = PLAUSIBLE_SPACING_MM,
    expected_spacing: Sequence[float] | None = None,
) -> CanonicalImage:
    """Load ``path`` in closest-canonical RAS orientation, optionally resampled to ``spacing`` (mm).

    Args:
        path: NIfTI file, DICOM series folder or one file of a series.
        spacing: target voxel size, e.g. ``(0.98, 0.98, 1.0)``; None keeps the input's voxels (exact).
        order: spline order for resampling (1 linear for images, 0 nearest for labels).
        dtype: data type of the returned array (None keeps the stored type).
        series_uid: SeriesInstanceUID to read from a DICOM folder holding several series.
        spacing_range: ``(low, high)`` mm accepted for the input's and the target's voxel size (None: any).
        expected_spacing: the model's training spacing; a warning is logged when the input differs much.

    Raises:
        FileNotFoundError / ValueError: see :func:`read_image`; a non-positive or implausible ``spacing``.
    """
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"{path}: spacing must be 3 positive numbers, got {spacing}")
        if spacing_range is not None and not all(spacing_range[0] <= s <= spacing_range[1] for s in spacing):
            raise ValueError(f"{path}: implausible target spacing {spacing} mm; expected "
                             f"{spacing_range[0]:g}-{spacing_range[1]:g} mm per axis")
    img = read_image(path, series_uid=series_uid, spacing_range=spacing_range, expected_spacing=expected_spacing)
    can = nib.as_closest_canonical(img)
    arr = np.asanyarray(can.dataobj)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    affine = can.affine.copy()
    resampled = False
    if spacing is not None:
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


def as_meta_tensor(array: np.ndarray, affine: np.ndarray, source: str) -> MetaTensor:
    """An (X, Y, Z) array with its affine as a channel-less MetaTensor (``load=False`` input of preprocessing)."""
    return MetaTensor(torch.as_tensor(np.ascontiguousarray(array)), affine=torch.as_tensor(affine, dtype=torch.float64),
                      meta={"filename_or_obj": source, "original_channel_dim": "no_channel"})


def load_lesion_labels(path: PathLike) -> tuple[MetaTensor, bool]:
    """A lesion mask file (NIfTI or DICOM) in closest-RAS orientation as int32 instance labels.

    A binary mask is split into connected components (:func:`transforms.labels.as_instance_labels`, logged).
    Returns ``(labels, split)``: the (X, Y, Z) MetaTensor and whether the mask was split.
    """
    lab = to_canonical(path, dtype=None)
    instances, split = as_instance_labels(lab.array, str(path))
    if split:
        logger.warning("%s: binary lesion mask split into %d connected components (one lesion each)", path,
                       int(instances.max()))
    return as_meta_tensor(instances.astype(np.int32), lab.affine, str(path)), split


def _channel_first(array: Any, affine: np.ndarray, source: str) -> MetaTensor:
    """(X, Y, Z) array -> (1, X, Y, Z) MetaTensor with ``original_channel_dim`` 0 (channel already first)."""
    mt = as_meta_tensor(np.asarray(array)[None], affine, source)
    mt.meta["original_channel_dim"] = 0
    return mt


def _on_grid(affine: np.ndarray, target: Sequence[float] | None, rtol: float = 1e-3) -> bool:
    """True when a RAS ``affine`` already is the detector's grid: voxel size ``target`` (within ``rtol``: float32
    header noise is not resampled) and axes along the world's R, A, S (no obliquity)."""
    if target is None:
        return True
    lin = np.asarray(affine, np.float64)[:3, :3]
    zooms = np.sqrt((lin ** 2).sum(axis=0))
    direction = lin / zooms
    return bool(np.allclose(zooms, np.asarray(target, np.float64), rtol=rtol, atol=0.0)
                and np.allclose(direction, np.eye(3), atol=1e-4))


def resample_to_spacing(data: dict[str, Any], spacing: Sequence[float], image_keys: Sequence[str] = ("image",),
                        nearest_keys: Sequence[str] = ()) -> dict[str, Any]:
    """Resample channel-first MetaTensors to ``spacing`` (mm) on a world-aligned RAS grid (MONAI ``Spacingd``,
    ``diagonal=True``).

    Images bilinearly (border padding), masks and labels (``nearest_keys``) by nearest neighbour, keeping their
    integer values and dtype. The grid's axes are the world's R, A, S (an oblique acquisition is resampled onto
    axis-aligned voxels, like the training scans) and it covers the input's whole field of view; its affine is
    the MetaTensor's ``affine``. Keys absent from ``data`` are skipped.
    """
    from monai.transforms import Spacingd

    keys = [k for k in (*image_keys, *nearest_keys) if data.get(k) is not None]
    modes = ["bilinear" if k in image_keys else "nearest" for k in keys]
    dtypes = {k: data[k].dtype for k in keys}
    out = Spacingd(keys, pixdim=tuple(float(s) for s in spacing), diagonal=True, mode=modes,
                   padding_mode="border")(dict(data))
    for k in keys:
        if k in nearest_keys:
            out[k] = torch.round(out[k]).to(dtypes[k])
        else:
            out[k] = out[k].to(torch.float32)
    return out


def _estimate_mask(image: np.ndarray, spacing: Sequence[float], affine: np.ndarray) -> np.ndarray:
    """:func:`estimate_brainmask` on an (X, Y, Z) RAS image with its voxel-to-world ``affine`` (mm), passed as a
    keyword where the estimator takes it (the template registration places the MNI152 mask with it)."""
    import inspect

    if "affine" in inspect.signature(estimate_brainmask).parameters:
        return estimate_brainmask(image, spacing, affine=affine)
    return estimate_brainmask(image, spacing)


def load_scan(
    image: PathLike,
    brainmask: PathLike | None = None,
    label: PathLike | None = None,
    scan_id: str | None = None,
    lower: float = 0.0,
    upper: float = 99.5,
    estimate_mask: bool = True,
    series_uid: str | None = None,
    spacing: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Load and preprocess one scan for the detector, on the model's grid.

    Steps: read (NIfTI or DICOM) -> closest-canonical RAS (exact) -> grid checks of the brain mask and label
    files against the image (a mask on another grid is an error, never silently resampled) -> resampled to
    ``spacing`` on world-aligned RAS axes with MONAI ``Spacingd`` (image bilinear, mask and labels nearest;
    nothing is done when the scan already has that spacing within 0.1 % and no obliquity) -> brain mask estimated on the resampled RAS image when none is
    given (:func:`cmb_synthesis.data.brainmask.estimate_brainmask`) -> ``transforms.pipelines.preprocessing``
    (checks, brain-mask percentile clip, rescale to [0, 1]).

    Args:
        image: SWI NIfTI file or DICOM series (folder).
        brainmask: 0/1 brain mask on the image's grid; ``None``: :func:`estimate_brainmask` (if
            ``estimate_mask``, else a ``ValueError``).
        label: CMB instance labels on the image's grid (optional; training/evaluation).
        scan_id: identifier (default from the file name, see :func:`scan_id_of`).
        lower, upper: intensity percentiles (inside the brain mask) mapped to 0 and 1.
        series_uid: SeriesInstanceUID of ``image`` when it is a DICOM folder holding several series.
        spacing: the detector's grid (mm, e.g. the training spacing ``(0.98, 0.98, 1.0)``); None keeps the
            input's voxels.

    Returns:
        dict with ``image`` (1, X, Y, Z) float32 MetaTensor in [0, 1], RAS, at ``spacing``; ``brainmask``
        (1, X, Y, Z) uint8; ``label`` (1, X, Y, Z) int32 or None; ``spacing`` (3,) mm and ``affine`` (4, 4)
        voxel-to-world (RAS mm) of that grid; ``canonical`` (:class:`CanonicalImage` of the input, exact RAS
        reorientation: ``canonical.source_affine`` / ``source_shape`` / ``source_header`` are the input file's
        grid, to map results back); ``resampled`` (bool); ``id``, ``source`` (path), ``mask_source``
        ("file" or "estimated"), ``label_split``.

    Raises:
        FileNotFoundError / ValueError naming the file (missing, unreadable, NaN, masks on another grid, ...).
    """
    from transforms.checks import CheckSWId

    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"{image}: spacing must be 3 positive numbers (mm), got {spacing}")
    can = to_canonical(image, dtype=np.float32, series_uid=series_uid)
    data: dict[str, Any] = {"image": _channel_first(can.array, can.affine, str(image))}
    if brainmask is not None:
        bm = to_canonical(brainmask, dtype=None)
        data["brainmask"] = _channel_first(bm.array, bm.affine, str(brainmask))
        mask_source = "file"
    elif not estimate_mask:
        raise ValueError(f"{image}: no brain mask given")
    else:
        mask_source = "estimated"
    label_split = False
    if label is not None:
        lab, label_split = load_lesion_labels(label)
        data["label"] = _channel_first(lab, lab.affine.numpy(), str(label))
    mask_keys = ("brainmask",) if "brainmask" in data else ()
    label_keys = ("label",) if "label" in data else ()
    if mask_keys or label_keys:  # mask and label on the image's grid, checked before any resampling
        CheckSWId(("image",), mask_keys=mask_keys, label_keys=label_keys)(data)
    resampled = not _on_grid(can.affine, spacing)
    if resampled:
        data = resample_to_spacing(data, spacing, ("image",), mask_keys + label_keys)  # type: ignore[arg-type]
    affine = np.asarray(data["image"].affine, dtype=np.float64)
    if mask_source == "estimated":
        try:
            estimated = _estimate_mask(np.asarray(data["image"][0]), canonical_spacing(affine), affine)
        except ValueError as e:
            raise ValueError(f"{image}: no brain mask beside it and none can be estimated ({e})") from e
        data["brainmask"] = _channel_first(estimated.astype(np.uint8), affine, f"{image} (estimated mask)")
    d = preprocessing(keys=("image",), mask_keys=("brainmask",), label_keys=label_keys, lower=lower, upper=upper,
                      load=False)(data)
    return {
        "image": d["image"],
        "brainmask": d["brainmask"],
        "label": d.get("label"),
        "spacing": tuple(float(s) for s in canonical_spacing(affine)),
        "affine": affine,
        "canonical": can,
        "resampled": resampled,
        "id": scan_id or scan_id_of(image),
        "source": str(image),
        "mask_source": mask_source,
        "label_split": label_split,
    }

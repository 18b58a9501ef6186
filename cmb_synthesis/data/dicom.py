"""DICOM series with their geometry checked: one series per read, evenly spaced slices, no silent choices.

A folder from a real exam often holds several series (magnitude, phase, minimum-intensity projection, SWI)
and a series may have lost a slice (an incomplete transfer, a corrupt file). ITK's series reader then reads
the first series it finds and spreads the remaining slices evenly over the gap (a warning on stderr, exit 0),
which gives a volume with a wrong slice spacing and misplaced anatomy. Here:

* every readable file's header (Series Instance UID, Series Description, Image Position/Orientation Patient)
  is read with ITK's GDCM reader and the files are grouped by Series Instance UID;
* a folder with several series is refused, listing them (UID, description, number of files), unless
  ``series_uid`` selects one (a single file given as the path selects its own series);
* the slices of the chosen series are sorted along the slice normal (the cross product of the Image
  Orientation Patient's row and column directions) and their positions must be evenly spaced: a gap (a
  missing or unreadable slice), two slices at one position (echoes/acquisitions mixed in one series) or
  mixed slice orientations are refused with the folder, the expected spacing and where the problem is.

The volume is then read from exactly those files, in that order, with ITK (GDCM) and converted to a
``Nifti1Image`` in RAS world coordinates by MONAI's ``ITKReader.get_data``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from cmb_synthesis.data.io import PathLike

logger = logging.getLogger(__name__)

__all__ = ["SLICE_SPACING_TOLERANCE", "DicomSeries", "list_series", "slice_spacing", "read_dicom_series"]

#: largest accepted deviation of one slice-to-slice distance from the series' median distance, as a fraction
#: of that median (scanners write positions with ~1e-3 mm jitter; a missing slice doubles a distance).
SLICE_SPACING_TOLERANCE: float = 0.05

_UID, _DESCRIPTION, _POSITION, _ORIENTATION = "0020|000e", "0008|103e", "0020|0032", "0020|0037"


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder.

    Attributes:
        uid: Series Instance UID (0020,000E).
        description: Series Description (0008,103E), "" when absent.
        files: the series' files (unsorted; see :func:`slice_spacing` for the slice order).
        positions: (N, 3) Image Position Patient (LPS mm) of each file, NaN when absent.
        orientations: (N, 6) Image Orientation Patient (row and column direction cosines), NaN when absent.
    """

    uid: str
    description: str
    files: tuple[str, ...]
    positions: np.ndarray
    orientations: np.ndarray

    def summary(self) -> str:
        """``uid ("description", N files)`` for messages."""
        return f"{self.uid} ({self.description!r}, {len(self.files)} files)"


def _numbers(value: str | None, n: int) -> np.ndarray:
    """A backslash-separated DICOM decimal string as ``n`` floats (NaN when absent or malformed)."""
    try:
        out = np.array([float(v) for v in str(value).strip(" \0").split("\\")], dtype=np.float64)
    except ValueError:
        return np.full(n, np.nan)
    return out if out.shape == (n,) else np.full(n, np.nan)


def _header(path: Path) -> dict[str, str] | None:
    """The tags of one file that this module needs, or None when ITK/GDCM cannot read it as DICOM."""
    import itk  # lazy: heavy optional dependency

    io = itk.GDCMImageIO.New()
    if not io.CanReadFile(str(path)):
        return None
    try:
        io.SetFileName(str(path))
        io.ReadImageInformation()
    except RuntimeError:
        return None
    md = io.GetMetaDataDictionary()
    return {k: str(md[k]).strip(" \0") for k in (_UID, _DESCRIPTION, _POSITION, _ORIENTATION) if md.HasKey(k)}


def list_series(folder: PathLike) -> tuple[list[DicomSeries], list[str]]:
    """The DICOM series of ``folder`` (its files, not its subfolders) and the files that are not readable DICOM.

    Returns:
        ``(series, unreadable)``: series sorted by UID; names of the files ITK/GDCM could not read.
    """
    folder = Path(folder)
    groups: dict[str, list[tuple[str, dict[str, str]]]] = defaultdict(list)
    unreadable = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        h = _header(p)
        if h is None:
            if p.name.upper() != "DICOMDIR":
                unreadable.append(p.name)
            continue
        groups[h.get(_UID, "")].append((str(p), h))
    series = []
    for uid in sorted(groups):
        items = groups[uid]
        descriptions = sorted({h.get(_DESCRIPTION, "") for _, h in items})
        series.append(DicomSeries(
            uid=uid,
            description=" / ".join(descriptions),
            files=tuple(f for f, _ in items),
            positions=np.stack([_numbers(h.get(_POSITION), 3) for _, h in items]),
            orientations=np.stack([_numbers(h.get(_ORIENTATION), 6) for _, h in items]),
        ))
    return series, unreadable


def slice_spacing(series: DicomSeries, folder: PathLike, unreadable: tuple[str, ...] = (),
                  tolerance: float = SLICE_SPACING_TOLERANCE) -> tuple[list[str], float]:
    """Sort ``series``' slices along the slice normal and check that they are evenly spaced.

    Args:
        series: from :func:`list_series`.
        folder: the folder, for messages.
        unreadable: files of the folder that could not be read (named in the gap message).
        tolerance: accepted deviation of a slice distance from the median, as a fraction of the median.

    Returns:
        ``(files, spacing)``: the files in increasing position along the normal, and the median slice
        distance in mm (0.0 for a single file, e.g. an enhanced multi-frame object).

    Raises:
        ValueError: missing positions/orientations, mixed orientations, two slices at one position or an
            uneven slice distance (a gap), naming the folder, the expected spacing and the slices concerned.
    """
    if len(series.files) == 1:
        return list(series.files), 0.0
    where = f"{folder}: DICOM series {series.uid}"
    if not (np.isfinite(series.positions).all() and np.isfinite(series.orientations).all()):
        raise ValueError(f"{where}: some slices lack Image Position/Orientation Patient; cannot check their spacing")
    if np.abs(series.orientations - series.orientations[0]).max() > 1e-3:
        raise ValueError(f"{where}: slices with different orientations (Image Orientation Patient) in one series")
    row, col = series.orientations[0, :3], series.orientations[0, 3:]
    normal = np.cross(row, col)
    if np.linalg.norm(normal) < 0.5:
        raise ValueError(f"{where}: invalid Image Orientation Patient {series.orientations[0].tolist()}")
    normal /= np.linalg.norm(normal)
    along = series.positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    files = [series.files[i] for i in order]
    steps = np.diff(along)
    expected = float(np.median(steps))
    names = [Path(f).name for f in files]
    if expected <= 1e-6 or steps.min() <= 1e-3 * max(expected, 1.0):
        i = int(np.argmin(steps))
        raise ValueError(f"{where}: two slices at the same position {along[i]:.3f} mm along the slice normal "
                         f"({names[i]}, {names[i + 1]}); several acquisitions or echoes in one series?")
    bad = np.flatnonzero(np.abs(steps - expected) > tolerance * expected)
    if len(bad):
        i = int(bad[0])
        missing = f"; unreadable files in the folder: {', '.join(unreadable)}" if unreadable else ""
        raise ValueError(
            f"{where}: slices are not evenly spaced: expected {expected:.4g} mm between slices, found "
            f"{steps[i]:.4g} mm between {names[i]} ({along[i]:.3f} mm) and {names[i + 1]} ({along[i + 1]:.3f} mm) "
            f"along the slice normal ({len(bad)} uneven step(s) of {len(steps)}): a missing or corrupt slice?{missing}")
    return files, expected


def read_dicom_series(path: PathLike, series_uid: str | None = None) -> nib.Nifti1Image:
    """Read one DICOM series as a ``Nifti1Image`` with a RAS affine, its slice geometry checked.

    Args:
        path: a folder holding the series, or one file of it (which selects that file's series).
        series_uid: Series Instance UID to read when the folder holds several series.

    Returns:
        A (X, Y, Z) ``Nifti1Image`` (the stored pixel type, rescale slope/intercept applied by GDCM) whose
        affine maps voxels to RAS mm.

    Raises:
        ValueError: no readable DICOM file, several series and no (or an unknown) ``series_uid``, uneven slice
            positions (see :func:`slice_spacing`), or a read/shape error; each message names the folder.
    """
    import itk  # lazy: heavy optional dependency
    from monai.data import ITKReader

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    series, unreadable = list_series(folder)
    if not series:
        raise ValueError(f"{folder}: not a readable DICOM series (no DICOM file among {len(unreadable)} file(s))")
    listing = "; ".join(s.summary() for s in series)
    if series_uid is None and not path.is_dir():
        series_uid = next((s.uid for s in series if str(path) in s.files), None)
        if series_uid is None:
            raise ValueError(f"{path}: not a readable DICOM file")
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            raise ValueError(f"{folder}: no DICOM series with SeriesInstanceUID {series_uid}; series found: {listing}")
        s = chosen[0]
    elif len(series) > 1:
        raise ValueError(f"{folder}: {len(series)} DICOM series in one folder; choose one with series_uid: {listing}")
    else:
        s = series[0]
    files, spacing = slice_spacing(s, folder, tuple(unreadable))
    if unreadable:
        logger.warning("%s: skipped %d file(s) that are not readable DICOM: %s", folder, len(unreadable),
                       ", ".join(unreadable[:5]))
    try:
        img = itk.imread(files if len(files) > 1 else files[0], imageio=itk.GDCMImageIO.New())
        arr, meta = ITKReader(affine_lps_to_ras=True).get_data(img)  # (X, Y, Z) array, RAS affine
    except Exception as e:  # ITK raises RuntimeError with GDCM messages
        raise ValueError(f"{folder}: not a readable DICOM series {s.uid} ({e})") from e
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"{folder}: expected a 3-D DICOM series, got shape {arr.shape}")
    affine = np.asarray(meta["affine"], dtype=np.float64)
    z = float(np.linalg.norm(affine[:3, 2]))
    if spacing > 0 and abs(z - spacing) > SLICE_SPACING_TOLERANCE * spacing:  # pragma: no cover - ITK invariant
        raise ValueError(f"{folder}: ITK slice spacing {z:.4g} mm differs from the slice positions' {spacing:.4g} mm")
    return nib.Nifti1Image(arr, affine)

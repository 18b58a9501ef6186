"""Test helper: write a volume as an MR DICOM series with ITK/GDCM (one file per slice)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_dicom_series(
    volume: np.ndarray,
    folder: Path,
    affine_ras: np.ndarray | None = None,
    series_uid: str = "1.2.826.0.1.3680043.8.498.77001",
    description: str = "SWI phantom",
    prefix: str = "IM",
    spacing: tuple[float, float, float] = (0.9, 0.8, 1.5),
) -> list[Path]:
    """Write a (X, Y, Z) int16 volume as a DICOM series in ``folder`` and return the file paths.

    ``affine_ras`` (4x4 voxel-to-RAS) sets the geometry (stored as LPS patient coordinates); without it the series
    is axial with ``spacing`` and a fixed origin. Slice positions (0020,0032) follow the slice normal.
    """
    import itk

    folder.mkdir(parents=True, exist_ok=True)
    if affine_ras is None:
        lps = np.eye(4)[:3]
        lps[:, :3] = np.diag(spacing)
        lps[:, 3] = (-10.0, -20.0, 5.0)
    else:
        lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine_ras, float)[:3]  # RAS -> LPS patient coordinates
    sp = np.sqrt((lps[:, :3] ** 2).sum(axis=0))
    direction, origin = lps[:, :3] / sp, lps[:, 3]
    img = itk.image_from_array(np.ascontiguousarray(volume.transpose(2, 1, 0)))  # ITK arrays are (z, y, x)
    img.SetSpacing([float(s) for s in sp])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    dicts = itk.vector[itk.MetaDataDictionary]()
    keep, names = [], []  # the vector holds raw pointers: keep the dictionaries alive until the write is done
    for k in range(volume.shape[2]):
        md = itk.MetaDataDictionary()
        md["0008|0060"] = "MR"
        md["0008|103e"] = description
        md["0020|000d"] = series_uid.rsplit(".", 1)[0] + ".0"
        md["0020|000e"] = series_uid
        md["0020|0013"] = str(k + 1)
        md["0020|0032"] = "\\".join(f"{v:.6f}" for v in origin + direction[:, 2] * sp[2] * k)
        md["0020|0037"] = "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1]))
        md["0028|0030"] = f"{sp[1]:.6f}\\{sp[0]:.6f}"
        md["0018|0050"] = f"{sp[2]:.6f}"
        keep.append(md)
        dicts.push_back(md)
        names.append(str(folder / f"{prefix}{k + 1:04d}.dcm"))
    io = itk.GDCMImageIO.New()
    io.KeepOriginalUIDOn()
    writer = itk.ImageSeriesWriter[type(img), itk.Image[itk.SS, 2]].New(Input=img, ImageIO=io, FileNames=names)
    writer.SetMetaDataDictionaryArray(dicts)
    writer.Update()
    return [Path(n) for n in names]

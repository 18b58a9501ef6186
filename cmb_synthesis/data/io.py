"""Safe file output and checked volume input.

Every file this project writes goes through :func:`atomic_output` (or :func:`atomic_directory` for a whole
folder): the content is written to a temporary sibling and renamed into place only once it is complete, so a
crash never leaves a half-written file, and :func:`check_not_input` refuses to write over an input.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PathLike = str | os.PathLike

__all__ = [
    "atomic_output",
    "atomic_directory",
    "check_not_input",
    "save_nifti",
    "write_json",
    "write_csv",
    "load_nifti",
]


def _nifti_suffix(path: Path) -> str:
    name = path.name
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix


@contextlib.contextmanager
def atomic_output(path: PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block ends without error.

    The temporary name keeps the file's extension (``.nii.gz`` included) so writers that dispatch on the
    suffix work. On an exception the temporary file is removed and ``path`` is left as it was.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: output exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{_nifti_suffix(path)}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_directory(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; move it to ``path`` when the block succeeds.

    Raises:
        FileExistsError: ``path`` exists, is not empty and ``overwrite`` is False.
        NotADirectoryError: ``path`` exists and is a file.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path}: exists and is not a directory")
        if any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path}: directory exists and is not empty (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_not_input(output: PathLike, inputs: Iterable[PathLike]) -> None:
    """Raise ``ValueError`` if ``output`` resolves to one of ``inputs`` (inputs are never overwritten)."""
    out = Path(output).resolve()
    for item in inputs:
        if item is not None and Path(item).resolve() == out:
            raise ValueError(f"{output}: refusing to write over an input file")


def save_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: PathLike,
    dtype: np.dtype | type | None = None,
    header: Any = None,
    overwrite: bool = True,
) -> Path:
    """Write a 3-D ``array`` (spatial axes only) with ``affine`` to ``path`` (NIfTI-1) atomically.

    ``header`` (a ``nibabel.Nifti1Header``), when given, carries the input's geometry codes and units into
    the output; its data type is replaced by ``dtype`` (default: the array's).
    """
    import nibabel as nib

    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64), header=hdr)
    img.set_data_dtype(arr.dtype)
    if hdr is None:
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
    img.header["scl_slope"], img.header["scl_inter"] = np.nan, np.nan
    with atomic_output(path, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def write_json(obj: Any, path: PathLike, overwrite: bool = True) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return Path(path)


def write_csv(rows: Sequence[dict[str, Any]], path: PathLike, fieldnames: Sequence[str], overwrite: bool = True) -> Path:
    """Write dictionaries as CSV rows with the given column order, atomically."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fieldnames))
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def load_nifti(path: PathLike, dtype: np.dtype | type = np.float32) -> tuple[np.ndarray, np.ndarray, Any]:
    """Load a 3-D NIfTI volume as ``(array, affine, header)`` with checks that name the file.

    A 4-D file with a single volume is squeezed to 3-D.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image, is not 3-D (or 4-D with one volume), or has NaN/Inf.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file does not exist")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as e:  # nibabel raises several types for non-images
        raise ValueError(f"{path}: not a readable NIfTI image ({e})") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise ValueError(f"{path}: contains NaN or Inf voxels")
    return data, img.affine, img.header

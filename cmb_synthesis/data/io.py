"""Safe file output and checked volume input.

Every file this project writes goes through :func:`atomic_output` (:func:`atomic_outputs` for several files
that belong together, :func:`atomic_directory` for a whole folder): the content is written to a hidden temporary
sibling (``.<name>.<random>.tmp...``) and renamed into place only once it is complete, so a crash never leaves a
half-written file; the published file or folder gets the mode the user's umask gives new files (0644 / 0755 under
umask 022), not the private mode of the temporary. :func:`check_not_input` refuses to write over an input,
:func:`prepare_output_dir` checks an output folder before any work and removes the temporaries a killed run
left there (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PathLike = str | os.PathLike

logger = logging.getLogger(__name__)

__all__ = [
    "atomic_output",
    "atomic_outputs",
    "atomic_directory",
    "is_temporary",
    "remove_stale_temporaries",
    "prepare_output_dir",
    "check_not_input",
    "save_nifti",
    "write_json",
    "write_csv",
    "load_nifti",
]


# the hidden temporaries made below: ".<name>.<8 random chars>.tmp[<ext>]" (files, folders) or ".old" (folders)
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.(tmp(\..+)?|old)$")


def _nifti_suffix(path: Path) -> str:
    name = path.name
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix


def _umask() -> int:
    """The process umask (read without changing it where ``/proc`` tells it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(tmp: Path, path: Path, directory: bool = False) -> None:
    """Give ``tmp`` the umask-derived mode of a new file (0o666) or folder (0o777) and rename it to ``path``."""
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
    os.replace(tmp, path)


def _temporary_file(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{_nifti_suffix(path)}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_outputs(paths: Mapping[str, PathLike], overwrite: bool = True) -> Iterator[dict[str, Path]]:
    """Yield temporary paths (same keys) beside ``paths``; rename ALL of them into place only when the block
    ends without error, so files that belong together (an image and its label map) are replaced together.

    Each temporary name keeps its file's extension (``.nii.gz`` included) so writers that dispatch on the
    suffix work. On an exception every temporary file is removed and every ``path`` is left as it was.

    Raises:
        FileExistsError: one of ``paths`` exists and ``overwrite`` is False (all named).
    """
    targets = {k: Path(p) for k, p in paths.items()}
    if not overwrite:
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing:
            raise FileExistsError(f"{', '.join(existing)}: output exists (pass overwrite=True to replace it)")
    tmps: dict[str, Path] = {}
    try:
        for key, path in targets.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmps[key] = _temporary_file(path)
        yield dict(tmps)
        for key, path in targets.items():
            _publish(tmps[key], path)
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def atomic_output(path: PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block ends without error.

    The temporary name keeps the file's extension (``.nii.gz`` included) so writers that dispatch on the
    suffix work. On an exception the temporary file is removed and ``path`` is left as it was.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    with atomic_outputs({"file": path}, overwrite=overwrite) as tmps:
        yield tmps["file"]


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
            _publish(tmp, path, directory=True)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _publish(tmp, path, directory=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_temporary(path: PathLike) -> bool:
    """True for the hidden temporaries of :func:`atomic_output` / :func:`atomic_directory`
    (``.<name>.<random>.tmp[.ext]`` / ``.<name>.<random>.old``)."""
    return bool(_TEMPORARY.match(Path(path).name))


def remove_stale_temporaries(folder: PathLike) -> list[Path]:
    """Remove the temporaries (see :func:`is_temporary`) directly inside ``folder``, e.g. those a killed run
    left behind; other files, hidden or not, are kept. Returns the removed paths.

    Only one run may write into a folder at a time: the temporaries of a run still going would be removed too.
    """
    removed = []
    for p in sorted(Path(folder).iterdir()):
        if not is_temporary(p):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def prepare_output_dir(output_dir: PathLike, inputs: Iterable[PathLike] = ()) -> Path:
    """Check an output folder before any work: create it if missing, refuse it when it is (or lies under) a
    file, is not writable or is one of the ``inputs`` folders; then remove stale temporaries in it.

    Returns:
        ``output_dir`` as a ``Path``.

    Raises:
        ValueError: ``output_dir`` is one of ``inputs``. NotADirectoryError: it is a file or cannot be created
        (a parent is a file). PermissionError: it cannot be created or written to.
    """
    out = Path(output_dir)
    for item in inputs:
        if item is not None and Path(item).resolve() == out.resolve():
            raise ValueError(f"{out}: output folder must differ from the input folder")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: output folder is an existing file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise NotADirectoryError(f"{out}: cannot create the output folder, a parent is a file ({e})") from e
    except PermissionError as e:
        raise PermissionError(f"{out}: cannot create the output folder, permission denied ({e})") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"{out}: output folder is not writable")
    try:  # os.access does not see everything (e.g. some network file systems): try a real file
        probe = _temporary_file(out / "write-test")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{out}: output folder is not writable ({e})") from e
    for p in remove_stale_temporaries(out):
        logger.info("%s: removed a temporary file left by an interrupted run", p)
    return out


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

"""File naming: scan ids, derived-file suffixes, files beside a scan, the inputs of a folder.

One convention for every command: a scan ``<id>_swi.nii.gz`` (or ``<id>.nii.gz``, or a DICOM series folder
``<id>/``) may have ``<id>_brainmask``, ``<id>_mask``, ``<id>_cmb`` (instance labels), ``<id>_tissue`` ...
beside it (``.nii.gz`` or ``.nii``). Files whose name ends in one of :data:`DERIVED_SUFFIXES` are never taken
as scans, and neither are temporary files (names starting with a dot).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from cmb_synthesis.data.io import PathLike

__all__ = ["NIFTI_SUFFIXES", "DERIVED_SUFFIXES", "strip_nifti", "scan_id_of", "unique_scan_ids", "find_beside",
           "find_brainmask", "find_inputs"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# masks, labels and the outputs of this project's commands: never inputs
DERIVED_SUFFIXES = ("_brainmask", "_mask", "_cmb", "_tissue", "_veins", "_label", "_lesions", "_cmb_prob",
                    "_synthetic", "_synthetic_cmb", "_pseudohealthy", "_detections")


def strip_nifti(name: str) -> str:
    """``sub-001_swi`` for ``sub-001_swi.nii.gz`` or ``sub-001_swi.nii``; other names unchanged."""
    for suf in NIFTI_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def scan_id_of(path: PathLike) -> str:
    """``sub-001`` for ``sub-001_swi.nii.gz`` (the ``_swi`` suffix dropped), a folder's name for DICOM."""
    stem = strip_nifti(Path(path).name)
    return stem[: -len("_swi")] if stem.endswith("_swi") else stem


def unique_scan_ids(images: Sequence[PathLike], given: Sequence[str | None] | None = None) -> list[str]:
    """One unique id per image, so that no two scans of a batch share output names.

    An image's id is its ``given`` id when it has one (e.g. a datalist item's ``id``), else :func:`scan_id_of`.
    Derived ids that clash are made longer from the path, first the whole file stem (``x.nii.gz`` -> ``x``,
    ``x_swi.nii.gz`` -> ``x_swi``), then with the parent folder's name in front (``s1/swi.nii.gz`` ->
    ``s1_swi``, ``s2/swi.nii.gz`` -> ``s2_swi``). Given ids are never changed.

    Raises:
        ValueError: ids that still clash (given ids that repeat, or the same path twice), listing each id
            with its images.
    """
    paths = [Path(p) for p in images]
    given = list(given) if given is not None else [None] * len(paths)
    if len(given) != len(paths):
        raise ValueError(f"unique_scan_ids: {len(paths)} images but {len(given)} given ids")
    fixed = [bool(g) for g in given]
    ids = [str(g) if g else scan_id_of(p) for g, p in zip(given, paths)]
    longer = (lambda p: strip_nifti(p.name), lambda p: f"{p.parent.name}_{strip_nifti(p.name)}")
    for rename in longer:
        counts = Counter(ids)
        clashing = [n for n, sid in enumerate(ids) if counts[sid] > 1 and not fixed[n]]
        for n in clashing:
            ids[n] = rename(paths[n])
    counts = Counter(ids)
    clashes = {sid: [str(p) for p, i in zip(paths, ids) if i == sid] for sid, c in counts.items() if c > 1}
    if clashes:
        listed = "; ".join(f"id {sid!r} for {', '.join(files)}" for sid, files in clashes.items())
        raise ValueError(f"scan ids must be unique (outputs are named after them): {listed}")
    return ids


def find_beside(image_path: PathLike, suffix: str) -> Path | None:
    """``<id><suffix>.nii.gz`` (or ``.nii``) beside ``image_path`` (``<id>_swi.nii.gz`` or ``<id>.nii.gz``)."""
    p = Path(image_path)
    for base in dict.fromkeys((scan_id_of(p), strip_nifti(p.name))):
        for ext in NIFTI_SUFFIXES:
            cand = p.parent / f"{base}{suffix}{ext}"
            if cand.is_file():
                return cand
    return None


def find_brainmask(image_path: PathLike) -> Path | None:
    """``<id>_brainmask.nii.gz`` (or ``.nii``) beside ``image_path``."""
    return find_beside(image_path, "_brainmask")


def _holds_nifti(folder: Path) -> bool:
    return any(p.name.endswith(NIFTI_SUFFIXES) for p in folder.iterdir())


def find_inputs(dataset_dir: PathLike, exclude: tuple[PathLike, ...] = ()) -> list[Path]:
    """SWI inputs of a folder, sorted by name: NIfTI files that are not derived files (see
    :data:`DERIVED_SUFFIXES`) and sub-folders (DICOM series). Hidden/temporary entries (``.name``), the
    folders in ``exclude`` (e.g. this run's output folder inside the input folder) and sub-folders holding NIfTI
    files (not a DICOM series: e.g. an earlier run's output folder) are skipped."""
    d = Path(dataset_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: dataset folder does not exist")
    skip = {Path(e).resolve() for e in exclude}
    found = []
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or p.resolve() in skip:
            continue
        if p.is_dir():
            if not _holds_nifti(p):
                found.append(p)
        elif p.name.endswith(NIFTI_SUFFIXES) and not strip_nifti(p.name).endswith(DERIVED_SUFFIXES):
            found.append(p)
    return found

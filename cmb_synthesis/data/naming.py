"""File naming: scan ids, derived-file suffixes, files beside a scan, the inputs of a folder.

One convention for every command: a scan ``<id>_swi.nii.gz`` (or ``<id>.nii.gz``, or a DICOM series folder
``<id>/``) may have ``<id>_brainmask``, ``<id>_mask``, ``<id>_cmb`` (instance labels), ``<id>_tissue`` ...
beside it (``.nii.gz`` or ``.nii``). Files whose name ends in one of :data:`DERIVED_SUFFIXES` are never taken
as scans, and neither are temporary files (names starting with a dot).
"""

from __future__ import annotations

from pathlib import Path

from cmb_synthesis.data.io import PathLike

__all__ = ["NIFTI_SUFFIXES", "DERIVED_SUFFIXES", "strip_nifti", "scan_id_of", "find_beside", "find_brainmask",
           "find_inputs"]

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


def find_inputs(dataset_dir: PathLike, exclude: tuple[PathLike, ...] = ()) -> list[Path]:
    """SWI inputs of a folder, sorted by name: NIfTI files that are not derived files (see
    :data:`DERIVED_SUFFIXES`) and sub-folders (DICOM series). Hidden/temporary entries (``.name``) and the
    folders in ``exclude`` (e.g. an output folder inside the input folder) are skipped."""
    d = Path(dataset_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: dataset folder does not exist")
    skip = {Path(e).resolve() for e in exclude}
    found = []
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or p.resolve() in skip:
            continue
        if p.is_dir():
            found.append(p)
        elif p.name.endswith(NIFTI_SUFFIXES) and not strip_nifti(p.name).endswith(DERIVED_SUFFIXES):
            found.append(p)
    return found

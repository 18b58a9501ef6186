"""Phantom cohorts on disk: subjects as NIfTI + CSV, and a MONAI decathlon ``datalist.json``."""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cmb_synthesis.data.io import atomic_directory
from cmb_synthesis.phantom.subject import DEFAULT_OPTIONS, simulate_subject

__all__ = ["PRESETS", "SPLIT_KEYS", "generate_cohort", "ensure_cohort", "write_subject"]

FORMAT_VERSION = 1
SPLIT_KEYS = (
    "n_train_pathological", "n_train_healthy", "n_val_pathological", "n_val_healthy",
    "n_test_pathological", "n_test_healthy",
)
# paper: Faryna et al., section 2 (46 + 14 training, 11 + 4 validation, 10 pathological test scans)
PRESETS: dict[str, dict[str, int]] = {
    "paper": dict(n_train_pathological=46, n_train_healthy=14, n_val_pathological=11, n_val_healthy=4,
                  n_test_pathological=10, n_test_healthy=0),
    "default": dict(n_train_pathological=12, n_train_healthy=6, n_val_pathological=3, n_val_healthy=2,
                    n_test_pathological=8, n_test_healthy=0),
}
LESION_FIELDS = ["label", "i", "j", "k", "x", "y", "z", "diameter_mm", "volume_mm3", "elongation"]


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """NIfTI with a fixed header and a gzip stream without timestamp: same array, same bytes."""
    import gzip

    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_data_dtype(array.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    raw = img.to_bytes()
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="", compresslevel=6) as gz:
        gz.write(raw)


def write_subject(subject, sid: str, folder: Path) -> dict[str, Any]:
    """Write one subject's files into ``folder``; return its datalist item (paths relative to ``folder``)."""
    files = {
        "image": (f"{sid}_swi.nii.gz", subject.swi.astype(np.float32)),
        "brainmask": (f"{sid}_brainmask.nii.gz", subject.brainmask.astype(np.uint8)),
        "label": (f"{sid}_cmb.nii.gz", subject.cmb.astype(np.uint16)),
        "tissue": (f"{sid}_tissue.nii.gz", subject.tissue.astype(np.uint8)),
        "veins": (f"{sid}_veins.nii.gz", subject.veins.astype(np.uint8)),
    }
    item: dict[str, Any] = {}
    for key, (name, arr) in files.items():
        _save(arr, subject.affine, folder / name)
        item[key] = name
    csv_name = f"{sid}_cmb.csv"
    with open(folder / csv_name, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LESION_FIELDS)
        w.writeheader()
        for row in subject.lesions:
            w.writerow({k: row[k] for k in LESION_FIELDS})
    item["lesions"] = csv_name
    item["group"] = "pathological" if subject.pathological else "healthy"
    item["id"] = sid
    item["n_lesions"] = len(subject.lesions)
    return item


def _make(args: tuple) -> dict[str, Any]:
    seed_seq, pathological, sid, folder, options = args
    subject = simulate_subject(seed_seq, pathological, **options)
    return write_subject(subject, sid, Path(folder))


def _counts(preset: str, overrides: Mapping[str, int | None]) -> dict[str, int]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    counts = dict(PRESETS[preset])
    for k, v in overrides.items():
        if k not in SPLIT_KEYS:
            raise ValueError(f"unknown split count {k!r}; expected one of {SPLIT_KEYS}")
        if v is None:
            continue
        if isinstance(v, bool) or int(v) != v or int(v) < 0:
            raise ValueError(f"{k} must be a non-negative integer, got {v!r}")
        counts[k] = int(v)
    if sum(counts.values()) == 0:
        raise ValueError("the cohort would be empty: every split count is 0")
    if counts["n_train_pathological"] + counts["n_train_healthy"] == 0:
        raise ValueError("the training split would be empty")
    return counts


def generate_cohort(
    output_dir: str | os.PathLike,
    preset: str = "default",
    seed: int = 0,
    overwrite: bool = False,
    workers: int = 1,
    options: Mapping[str, Any] | None = None,
    **split_counts: int | None,
) -> Path:
    """Simulate a cohort into ``output_dir`` and return the path of its ``datalist.json``.

    Args:
        output_dir: the cohort folder; built in a temporary sibling and moved into place when complete.
        preset: ``"default"`` (12 + 6 training, 3 + 2 validation, 8 test; about a minute) or ``"paper"``
            (the paper's 46 + 14 / 11 + 4 / 10 split).
        seed: cohort seed; subject ``n`` uses ``SeedSequence(seed).spawn`` child ``n``: same seed, same bytes.
        overwrite: replace a non-empty ``output_dir``.
        workers: processes for simulation (1 = in this process).
        options: phantom options (see ``cmb_synthesis.phantom.subject.DEFAULT_OPTIONS``).
        split_counts: ``n_train_pathological`` ... ``n_test_healthy`` overriding the preset.

    Raises:
        ValueError: unknown preset, negative/non-integer counts, an empty cohort.
        FileExistsError: ``output_dir`` is not empty and ``overwrite`` is False.
        FileNotFoundError / PermissionError: the parent folder does not exist / is not writable.
    """
    counts = _counts(preset, split_counts)
    if isinstance(seed, bool) or int(seed) != seed or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    options = dict(options or {})
    out = Path(output_dir)
    parent = out.resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{out}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{out}: parent folder {parent} is not writable")
    plan = []
    for split, short in (("training", "train"), ("validation", "val"), ("test", "test")):
        for group in ("pathological", "healthy"):
            for _ in range(counts[f"n_{short}_{group}"]):
                plan.append((split, group))
    children = np.random.SeedSequence(int(seed)).spawn(len(plan))
    with atomic_directory(out, overwrite=overwrite) as tmp:
        jobs = [(children[n], group == "pathological", f"sub-{n:03d}_{group[0].upper()}", str(tmp), options)
                for n, (_, group) in enumerate(plan)]
        if int(workers) > 1:
            with ProcessPoolExecutor(int(workers)) as pool:
                items = list(pool.map(_make, jobs))
        else:
            items = [_make(j) for j in jobs]
        datalist: dict[str, Any] = {
            "name": "cmb-synthesis SWI phantom cohort",
            "description": "SWI-like phantoms on MNI152 anatomy with veins and ground-truth cerebral microbleeds",
            "tensorImageSize": "3D",
            "modality": {"0": "SWI"},
            "labels": {"0": "background", "1": "cerebral microbleed (instance labels > 0)"},
            "training": [], "validation": [], "test": [],
        }
        for (split, _), item in zip(plan, items):
            datalist[split].append(item)
        with open(tmp / "datalist.json", "w") as f:
            json.dump(datalist, f, indent=2)
        meta = {"format_version": FORMAT_VERSION, "preset": preset, "seed": int(seed), "counts": counts,
                "options": {**DEFAULT_OPTIONS, **options},
                "lesions_per_split": {s: int(sum(i["n_lesions"] for i in datalist[s])) for s in ("training", "validation", "test")}}
        with open(tmp / "cohort.json", "w") as f:
            json.dump(meta, f, indent=2, default=list)
    return out / "datalist.json"


def ensure_cohort(dataset_dir: str | os.PathLike, preset: str = "default", seed: int = 0, **split_counts) -> str:
    """Return ``dataset_dir/datalist.json``, generating the cohort first when it does not exist.

    Bundles call this from their configs (``datalist: "$cmb_synthesis.phantom.ensure_cohort(@dataset_dir)"``)
    so the embedded default cohort is materialised on first use. A ``dataset_dir`` that already holds a
    ``datalist.json`` (a user's own data, say) is used as it is.
    """
    d = Path(dataset_dir)
    datalist = d / "datalist.json"
    if datalist.is_file():
        return str(datalist)
    if d.exists() and any(d.iterdir()):
        raise FileExistsError(f"{d}: folder exists without a datalist.json; point dataset_dir at a cohort "
                              "folder or an empty/new folder")
    d.parent.mkdir(parents=True, exist_ok=True)
    if d.exists():
        shutil.rmtree(d)
    return str(generate_cohort(d, preset=preset, seed=seed, **split_counts))

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
from cmb_synthesis.phantom.benchmark import (BENCHMARK_COUNTS, REALISM_PRESETS, assign_sites, plan_lesion_counts,
                                             site_options)
from cmb_synthesis.phantom.mimics import MIMIC_CODES, MIMIC_TYPES
from cmb_synthesis.phantom.subject import DEFAULT_OPTIONS, REALISM_OPTIONS, simulate_subject
from cmb_synthesis.progress import progress

__all__ = ["PRESETS", "SPLIT_KEYS", "generate_cohort", "ensure_cohort", "write_subject", "planned_lesions"]

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
    # harder, two sites, >= 320 planned test CMBs (benchmark.py)
    "benchmark": dict(BENCHMARK_COUNTS),
}
LESION_FIELDS = ["label", "i", "j", "k", "x", "y", "z", "diameter_mm", "volume_mm3", "elongation"]
LESION_EXTRA_FIELDS = ["deposit_diameter_mm", "bloom", "contrast"]    # benchmark lesion model
MIMIC_FIELDS = ["type", "i", "j", "k", "x", "y", "z", "size_mm", "darkening"]
SPLITS = (("training", "train"), ("validation", "val"), ("test", "test"))


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
    extra = [k for k in LESION_EXTRA_FIELDS if subject.lesions and k in subject.lesions[0]]
    with open(folder / csv_name, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LESION_FIELDS + extra)
        w.writeheader()
        for row in subject.lesions:
            w.writerow({k: row[k] for k in LESION_FIELDS + extra})
    item["lesions"] = csv_name
    item["group"] = "pathological" if subject.pathological else "healthy"
    item["id"] = sid
    item["n_lesions"] = len(subject.lesions)
    if subject.mimics is not None:            # realism options: site, mimic map and table, counts per type
        item["site"] = subject.site
        item["mimic_map"] = f"{sid}_mimics.nii.gz"
        _save(subject.mimics.astype(np.uint8), subject.affine, folder / item["mimic_map"])
        item["mimics"] = f"{sid}_mimics.csv"
        with open(folder / item["mimics"], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=MIMIC_FIELDS)
            w.writeheader()
            for row in subject.mimic_rows:
                w.writerow({k: row[k] for k in MIMIC_FIELDS})
        item["mimic_counts"] = {t: sum(r["type"] == t for r in subject.mimic_rows) for t in MIMIC_TYPES}
    return item


def _make(args: tuple) -> dict[str, Any]:
    seed_seq, pathological, sid, folder, options = args
    subject = simulate_subject(seed_seq, pathological, **options)
    return write_subject(subject, sid, Path(folder))


def _merged_sites(preset: str, realism: Mapping[str, Any] | None, overrides: Mapping[str, Mapping[str, Any]] | None,
                  known: Mapping[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The preset's sites with ``overrides`` (site -> options) merged in; None for presets without sites."""
    if not overrides:
        return None if realism is None else {k: dict(v) for k, v in realism["sites"].items()}
    if realism is None:
        raise ValueError(f"site overrides {sorted(overrides)} given, but preset {preset!r} has no sites "
                         f"(realism presets: {sorted(REALISM_PRESETS)})")
    sites = {k: dict(v) for k, v in realism["sites"].items()}
    for site, opts in overrides.items():
        if site not in sites:
            raise ValueError(f"site override for unknown site {site!r}; preset {preset!r} has {sorted(sites)}")
        bad = sorted(set(opts) - set(known))
        if bad:
            raise ValueError(f"site {site!r}: unknown phantom options {bad}; expected keys of {sorted(known)}")
        sites[site].update(opts)
    return sites


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


def planned_lesions(preset: str, seed: int = 0, min_mean_lesions: float | None = None,
                    **split_counts: int | None) -> dict[str, list[int]] | None:
    """Planned CMB counts of the pathological subjects of each split (plan order) for a realism preset
    (``benchmark``), ``None`` for presets whose counts are drawn per subject (``default``, ``paper``).

    Cheap (no simulation): the counts a cohort of this preset, seed and split counts is generated with. A
    lesion that cannot be placed is dropped, so the ``n_lesions`` of the datalist items can only fall below.
    ``min_mean_lesions`` overrides the preset's floor of planned CMBs per pathological scan.
    """
    counts = _counts(preset, split_counts)
    if preset not in REALISM_PRESETS:
        return None
    cfg = REALISM_PRESETS[preset]
    floor = cfg["min_mean_lesions"] if min_mean_lesions is None else float(min_mean_lesions)
    return {split: plan_lesion_counts(int(seed), split, counts[f"n_{short}_pathological"], floor,
                                      maximum=int(DEFAULT_OPTIONS["max_lesions"]))
            for split, short in SPLITS}


def generate_cohort(
    output_dir: str | os.PathLike,
    preset: str = "default",
    seed: int = 0,
    overwrite: bool = False,
    workers: int = 1,
    options: Mapping[str, Any] | None = None,
    site_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    min_mean_lesions: float | None = None,
    **split_counts: int | None,
) -> Path:
    """Simulate a cohort into ``output_dir`` and return the path of its ``datalist.json``.

    Args:
        output_dir: the cohort folder; built in a temporary sibling and moved into place when complete.
        preset: ``"default"`` (12 + 6 training, 3 + 2 validation, 8 test; about a minute), ``"paper"``
            (the paper's 46 + 14 / 11 + 4 / 10 split) or ``"benchmark"`` (12 + 6 / 10 + 3 / 40, two sites,
            harder lesions and mimics, planned lesion counts: ``benchmark.py``; items also get ``site``,
            ``mimic_map``, ``mimics`` and ``mimic_counts``).
        seed: cohort seed; subject ``n`` uses ``SeedSequence(seed).spawn`` child ``n``: same seed, same bytes.
        overwrite: replace a non-empty ``output_dir``.
        workers: processes for simulation (1 = in this process).
        options: phantom options (``subject.DEFAULT_OPTIONS`` / ``REALISM_OPTIONS``), over the preset's.
        site_overrides: realism presets only: per-site phantom options over the preset's ``sites``
            (``{"B": {"snr": [18, 26]}}``), applied to that site's subjects only (``options`` still win).
        min_mean_lesions: realism presets only: the floor of planned CMBs per pathological scan of every split
            (``benchmark.plan_lesion_counts``) instead of the preset's.
        split_counts: ``n_train_pathological`` ... ``n_test_healthy`` overriding the preset.

    Raises:
        ValueError: unknown preset, negative/non-integer counts, an empty cohort, an unknown option, a site
            override for an unknown site or for a preset without sites.
        FileExistsError: ``output_dir`` is not empty and ``overwrite`` is False.
        FileNotFoundError / PermissionError: the parent folder does not exist / is not writable.
    """
    counts = _counts(preset, split_counts)
    if isinstance(seed, bool) or int(seed) != seed or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    options = dict(options or {})
    known = {**DEFAULT_OPTIONS, **REALISM_OPTIONS}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown phantom options {unknown}; expected keys of {sorted(known)}")
    realism = REALISM_PRESETS.get(preset)
    sites_cfg = _merged_sites(preset, realism, site_overrides, known)
    if min_mean_lesions is not None and realism is None:
        raise ValueError(f"min_mean_lesions given, but preset {preset!r} plans no lesion counts "
                         f"(realism presets: {sorted(REALISM_PRESETS)})")
    out = Path(output_dir)
    parent = out.resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{out}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{out}: parent folder {parent} is not writable")
    plan = []
    for split, short in SPLITS:
        for group in ("pathological", "healthy"):
            for _ in range(counts[f"n_{short}_{group}"]):
                plan.append((split, group))
    children = np.random.SeedSequence(int(seed)).spawn(len(plan))
    subject_options = [options] * len(plan)
    if realism is not None:
        lesion_plan = {k: list(v) for k, v in planned_lesions(preset, seed, min_mean_lesions, **counts).items()}
        sites = {(split, group): iter(assign_sites(counts[f"n_{short}_{group}"], sorted(sites_cfg)))
                 for split, short in SPLITS for group in ("pathological", "healthy")}
        subject_options = []
        for split, group in plan:
            planned = {"n_lesions": lesion_plan[split].pop(0)} if group == "pathological" else {}
            subject_options.append({**realism["options"], **site_options(next(sites[split, group]), sites_cfg),
                                    **planned, **options})
    with atomic_directory(out, overwrite=overwrite) as tmp:
        jobs = [(children[n], group == "pathological", f"sub-{n:03d}_{group[0].upper()}", str(tmp), subject_options[n])
                for n, (_, group) in enumerate(plan)]
        # i/N subjects with elapsed / remaining time (a bar on a terminal, log lines otherwise)
        if int(workers) > 1:
            with ProcessPoolExecutor(int(workers)) as pool:
                items = list(progress(pool.map(_make, jobs), "phantom subjects", total=len(jobs)))
        else:
            items = [_make(j) for j in progress(jobs, "phantom subjects")]
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
        if realism is not None:
            meta["options"] = {**DEFAULT_OPTIONS, **REALISM_OPTIONS, **realism["options"], **options}
            meta["sites"] = sites_cfg
            meta["min_mean_lesions"] = realism["min_mean_lesions"] if min_mean_lesions is None else float(min_mean_lesions)
            meta["lesions_planned_per_split"] = {s: sum(v) for s, v in
                                                 planned_lesions(preset, seed, min_mean_lesions, **counts).items()}
            meta["mimic_codes"] = MIMIC_CODES
            meta["mimics_per_split"] = {s: {t: int(sum(i["mimic_counts"][t] for i in datalist[s])) for t in MIMIC_TYPES}
                                        for s, _ in SPLITS}
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

"""FROC reports and candidate files: ``metrics.json`` / ``froc.csv`` / ``froc.png``, the FROC figure with CI
bands, and ``candidates.csv`` (written, read and validated, and evaluated against a datalist split).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmb_synthesis.data.datalist import load_split
from transforms.labels import as_instance_labels
from cmb_synthesis.data.io import PathLike, atomic_output, write_csv, write_json
from cmb_synthesis.evaluation.froc import FP_RATES, evaluate
from cmb_synthesis.evaluation.hits import ScanResult, match_candidates

__all__ = ["CANDIDATE_COLUMNS", "plot_froc", "plot_froc_panels", "write_report", "candidate_rows",
           "write_candidates_csv", "read_candidates_csv", "scan_results_from_csv", "evaluate_csv"]

logger = logging.getLogger(__name__)

CANDIDATE_COLUMNS = ("image", "i", "j", "k", "x", "y", "z", "probability")


def plot_froc(metrics: Mapping[str, Any], ax: Any, label: str | None = None, color: Any = None) -> None:
    """Draw one FROC curve (step) with its 95 % CI band on a matplotlib axis (log FP axis)."""
    curve, band = metrics["curve"], metrics["curve_ci95"]
    fp = np.asarray(curve["fp_per_scan"], dtype=float)
    sens = np.asarray(curve["sensitivity"], dtype=float)
    keep = fp > 0
    line = ax.step(np.r_[band["fp_per_scan"][0], fp[keep]], np.r_[sens[~keep].max(initial=0.0), sens[keep]],
                   where="post", label=label, color=color)[0]
    ax.fill_between(band["fp_per_scan"], band["low"], band["high"], step="post", alpha=0.2, color=line.get_color(),
                    linewidth=0)
    ax.set_xscale("log")
    ax.set_xlim(band["fp_per_scan"][0], max(band["fp_per_scan"][-1], 1.0))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.grid(True, which="both", alpha=0.3)


def _save_figure(fig: Any, out_png: PathLike) -> Path:
    import matplotlib.pyplot as plt

    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(out_png)


def plot_froc_panels(
    curves: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Mapping[str, Any]]],
    out_png: PathLike | Any,
    title: str | Sequence[str] | None = None,
) -> Path | None:
    """FROC curves with CI bands, several models per panel (the study's Figure 3).

    Args:
        curves: ``{name: metrics}`` for one panel, or a list of such dicts for several panels side by side.
        out_png: output PNG path (written atomically), or a matplotlib axis / sequence of axes to draw on.
        title: panel title, or one title per panel.

    Returns:
        The PNG path, or None when drawing on given axes.
    """
    import matplotlib

    panels = [curves] if isinstance(curves, Mapping) else list(curves)
    titles = [title] * len(panels) if (title is None or isinstance(title, str)) else list(title)
    if isinstance(out_png, (str, Path)):
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
        axes = list(axes[0])
    else:
        fig, axes = None, list(out_png) if isinstance(out_png, Sequence) else [out_png]
    for ax, panel, t in zip(axes, panels, titles):
        for name, m in panel.items():
            plot_froc(m, ax, label=name)
        for r in (1, 10):
            ax.axvline(r, color="grey", linestyle=":", linewidth=0.8)
        ax.legend(loc="lower right")
        if t:
            ax.set_title(t)
    if fig is None:
        return None
    fig.tight_layout()
    return _save_figure(fig, out_png)


def write_report(metrics: Mapping[str, Any], out_dir: PathLike, title: str | None = None) -> dict[str, Path]:
    """Write ``metrics.json``, ``froc.csv`` (the curve) and ``froc.png`` (curve + CI band) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "csv": out / "froc.csv", "png": out / "froc.png"}
    write_json(dict(metrics), paths["metrics"])
    c = metrics["curve"]
    rows = [{"threshold": "inf" if t is None else repr(float(t)), "fp_per_scan": repr(float(f)),
             "sensitivity": repr(float(s))} for t, f, s in zip(c["threshold"], c["fp_per_scan"], c["sensitivity"])]
    write_csv(rows, paths["csv"], ["threshold", "fp_per_scan", "sensitivity"])
    s10 = metrics["sensitivity_at_fp"].get("10")
    default_title = f"FROC ({metrics['n_scans']} scans, {metrics['n_lesions']} lesions" + (
        f", sens@10FP {s10:.3f})" if s10 is not None else ")")
    plot_froc_panels({"detector": metrics}, paths["png"], title=title or default_title)
    return paths


# ------------------------------------------------------------------------------------- candidates CSV
def candidate_rows(image: str, coords: np.ndarray, probs: np.ndarray, affine: np.ndarray) -> list[dict[str, Any]]:
    """Rows of ``candidates.csv`` for one image: voxel (i, j, k), world (x, y, z) = affine @ (i, j, k, 1)."""
    from nibabel.affines import apply_affine

    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 3)
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if len(coords) != len(probs):
        raise ValueError(f"{image}: {len(coords)} candidates but {len(probs)} probabilities")
    world = apply_affine(np.asarray(affine, dtype=np.float64), coords) if len(coords) else np.zeros((0, 3))
    return [{"image": str(image), "i": int(c[0]), "j": int(c[1]), "k": int(c[2]), "x": round(float(w[0]), 4),
             "y": round(float(w[1]), 4), "z": round(float(w[2]), 4), "probability": float(p)}
            for c, w, p in zip(coords, world, probs)]


def write_candidates_csv(rows: Iterable[Mapping[str, Any]], path: PathLike) -> Path:
    """Write candidate rows (dicts with :data:`CANDIDATE_COLUMNS`) atomically."""
    rows = list(rows)
    for n, r in enumerate(rows):
        missing = [c for c in CANDIDATE_COLUMNS if c not in r]
        if missing:
            raise ValueError(f"{path}: candidate row {n} lacks columns {missing}")
    return write_csv([{c: r[c] for c in CANDIDATE_COLUMNS} for r in rows], path, CANDIDATE_COLUMNS)


def read_candidates_csv(
    path: PathLike,
    shapes: Mapping[str, Sequence[int]] | None = None,
    affines: Mapping[str, np.ndarray] | None = None,
    world_tolerance_mm: float | None = None,
) -> list[dict[str, Any]]:
    """Read and validate ``candidates.csv``.

    Checks the columns, that i, j, k are integers, probability a finite number and, when ``shapes``
    ({image: (X, Y, Z)}) is given, that (i, j, k) lies inside the image; with ``affines`` also that x, y, z
    equal ``affine @ (i, j, k)`` within ``world_tolerance_mm`` (default: half the largest voxel size).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming the CSV, the row (1-based data row, header excluded) and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: candidates CSV does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in CANDIDATE_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: candidates CSV lacks columns {missing} (has {header}; expected "
                             f"{list(CANDIDATE_COLUMNS)})")
        raw = list(reader)
    rows = []
    for n, r in enumerate(raw, start=1):
        try:
            ijk = [float(r[c]) for c in ("i", "j", "k")]
            xyz = [float(r[c]) for c in ("x", "y", "z")]
            prob = float(r["probability"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: row {n}: non-numeric value ({e})") from e
        if any(v != round(v) for v in ijk):
            raise ValueError(f"{path}: row {n}: voxel indices i, j, k must be integers, got {ijk}")
        if not (math.isfinite(prob) and all(math.isfinite(v) for v in xyz)):
            raise ValueError(f"{path}: row {n}: probability and x, y, z must be finite numbers")
        image = (r["image"] or "").strip()
        if not image:
            raise ValueError(f"{path}: row {n}: empty image name")
        ijk = [int(v) for v in ijk]
        if shapes is not None:
            if image not in shapes:
                raise ValueError(f"{path}: row {n}: image {image!r} is not one of the evaluated images")
            shape = tuple(shapes[image])
            if any(v < 0 or v >= s for v, s in zip(ijk, shape)):
                raise ValueError(f"{path}: row {n}: voxel {ijk} lies outside image {image!r} of shape {shape}")
        if affines is not None and image in affines:
            from nibabel.affines import apply_affine

            aff = np.asarray(affines[image], dtype=np.float64)
            tol = world_tolerance_mm
            if tol is None:
                tol = 0.5 * float(np.sqrt((aff[:3, :3] ** 2).sum(axis=0)).max())
            expect = apply_affine(aff, ijk)
            if np.abs(expect - np.asarray(xyz)).max() > tol:
                raise ValueError(f"{path}: row {n}: world coordinates {xyz} do not match voxel {ijk} of "
                                 f"{image!r} (affine gives {np.round(expect, 3).tolist()})")
        rows.append({"image": image, "i": ijk[0], "j": ijk[1], "k": ijk[2], "x": xyz[0], "y": xyz[1], "z": xyz[2],
                     "probability": prob})
    return rows


def _image_keys(item: Mapping[str, Any]) -> list[str]:
    """Names by which a candidates CSV may refer to a datalist item: file name, path, and id."""
    p = Path(item["image"])
    keys = [p.name, str(p)]
    if item.get("id"):
        keys.append(str(item["id"]))
    return keys


def scan_results_from_csv(candidates_csv: PathLike, datalist: PathLike, split: str = "test") -> list[ScanResult]:
    """Match a ``candidates.csv`` against the instance labels of a datalist split: one :class:`ScanResult` per
    item of the split (in datalist order; a scan without candidates has all its lesions missed).

    The CSV's ``image`` column names a split item by file name (e.g. ``sub-001_swi.nii.gz``), path, or ``id``;
    voxel indices refer to the image file's voxel grid as stored, which the label must share.
    """
    import nibabel as nib

    items = load_split(datalist, split, required=("image", "label"))
    if not items:
        raise ValueError(f"{datalist}: split {split!r} is empty")
    name_to_item: dict[str, int] = {}
    shapes, affines, labels = {}, {}, []
    label_split: list[bool] = []
    for n, it in enumerate(items):
        try:
            img = nib.load(it["image"])
            lab_img = nib.load(it["label"])
            lab = np.asarray(lab_img.dataobj)
        except Exception as e:
            raise ValueError(f"{it['image']}: cannot read the image or its label {it['label']} ({e})") from e
        if lab.ndim == 4 and lab.shape[3] == 1:
            lab = lab[..., 0]
        if tuple(lab.shape) != tuple(img.shape[:3]):
            raise ValueError(f"{it['label']}: label shape {lab.shape} differs from image {it['image']} shape {img.shape}")
        lab, split_up = as_instance_labels(lab, str(it["label"]))
        if split_up:
            logger.warning("%s: binary lesion mask split into %d connected components (one lesion each)",
                           it["label"], int(lab.max()))
        label_split.append(split_up)
        labels.append(lab)
        for key in _image_keys(it):
            name_to_item.setdefault(key, n)
            shapes[key] = lab.shape
            affines[key] = img.affine
    rows = read_candidates_csv(candidates_csv, shapes=shapes, affines=affines)
    per_scan: list[list[dict[str, Any]]] = [[] for _ in items]
    for r in rows:
        per_scan[name_to_item[r["image"]]].append(r)
    results = []
    for it, lab, rs, split_up in zip(items, labels, per_scan, label_split):
        coords = np.array([[r["i"], r["j"], r["k"]] for r in rs], dtype=np.int64).reshape(-1, 3)
        probs = np.array([r["probability"] for r in rs], dtype=np.float64)
        result = match_candidates(str(it.get("id") or Path(it["image"]).name), coords, probs, lab)
        result.label_split = split_up
        results.append(result)
    return results


def evaluate_csv(
    candidates_csv: PathLike,
    datalist: PathLike,
    split: str = "test",
    out_dir: PathLike | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    fp_rates: Sequence[float] = FP_RATES,
) -> dict[str, Any]:
    """Evaluate a ``candidates.csv`` against the instance labels of a datalist split.

    The CSV's ``image`` column names a split item by file name (e.g. ``sub-001_swi.nii.gz``), path, or
    ``id``. Every item of the split is a scan (one without candidates has all its lesions missed). Voxel
    indices refer to the image file's voxel grid as stored; the label must share it. With ``out_dir`` the
    report is written there (:func:`write_report`).
    """
    results = scan_results_from_csv(candidates_csv, datalist, split)
    metrics = evaluate(results, n_bootstrap=n_bootstrap, seed=seed, fp_rates=fp_rates)
    metrics["candidates_csv"] = str(candidates_csv)
    metrics["datalist"] = str(datalist)
    metrics["split"] = split
    if out_dir is not None:
        write_report(metrics, out_dir)
    return metrics

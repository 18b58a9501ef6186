"""Detection of CMBs on whole scans with a trained classifier: evaluation on a labelled split (FROC report)
and batch inference on external SWI (NIfTI files or DICOM series).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmb_synthesis.data.batch import BatchInferenceError, BatchJob, run_batch
from cmb_synthesis.data.datalist import load_split
from cmb_synthesis.data.io import PathLike
from cmb_synthesis.data.naming import find_brainmask, find_inputs, unique_scan_ids
from cmb_synthesis.data.scans import load_scan, write_like
from cmb_synthesis.detection.candidates import scan_candidates, to_source_voxels
from cmb_synthesis.evaluation.froc import evaluate
from cmb_synthesis.evaluation.hits import match_candidates
from cmb_synthesis.evaluation.report import candidate_rows, read_candidates_csv, write_candidates_csv, write_report
from cmb_synthesis.training.weights import load_network_weights
from transforms.patches import CandidatePatchesd
from transforms.spacing import half_widths, snap_spacing, within_radius

__all__ = ["load_classifier", "predict_patches", "detect_scan", "probability_map", "run_evaluation",
           "run_inference", "BatchInferenceError"]

logger = logging.getLogger(__name__)


def load_classifier(network: torch.nn.Module, path: PathLike, device: Any = "cpu") -> torch.nn.Module:
    """Load the best-model weights (``models/model.pt``, weights-only, hash-checked when listed) into
    ``network``, move it to ``device`` and set eval mode.

    Raises:
        FileNotFoundError: no such file (train first). ValueError: not a weights-only checkpoint, or weights
        that do not fit ``network`` (the network settings differ from the training run's).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: classifier weights not found (run the bundle's `training` first)")
    try:
        load_network_weights(network, path, map_location="cpu")
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the configured network (network settings differ from the "
                         f"training run's?): {e}") from e
    return network.to(device).eval()


@torch.no_grad()
def predict_patches(network: torch.nn.Module, patches: torch.Tensor, batch_size: int = 128, device: Any = "cpu") -> np.ndarray:
    """Sigmoid probabilities (N,) of (N, 1, PX, PY, PZ) patches, in batches."""
    network.eval()
    out = []
    for s in range(0, len(patches), int(batch_size)):
        x = patches[s:s + int(batch_size)].to(device=device, dtype=torch.float32)
        out.append(torch.sigmoid(network(x).float()).reshape(-1).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def detect_scan(
    network: torch.nn.Module,
    scan: Mapping[str, Any],
    patch_size: Sequence[int] = (32, 32, 16),
    frst: Mapping[str, Any] | None = None,
    cache_dir: PathLike | None = None,
    batch_size: int = 128,
    device: Any = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates and their CMB probabilities for one preprocessed scan.

    Returns:
        ``(coords (N, 3) int64 in the scan's RAS grid, probabilities (N,) in [0, 1], FRST scores (N,))``.
    """
    coords, scores = scan_candidates(scan, frst, cache_dir)
    patches = CandidatePatchesd(keys=("image",), patch_size=patch_size)({"image": scan["image"], "candidates": coords})["image"]
    return coords, predict_patches(network, patches, batch_size, device), scores


def probability_map(shape: Sequence[int], coords: np.ndarray, probs: np.ndarray, spacing: Sequence[float],
                    radius_mm: float = 1.5) -> np.ndarray:
    """(X, Y, Z) float32 map: each candidate's probability on a ball of ``radius_mm`` around it (max where
    balls overlap), 0 elsewhere."""
    out = np.zeros(tuple(int(s) for s in shape), np.float32)
    spacing = snap_spacing(spacing)  # floating-point noise in the spacing does not change the ball
    half = half_widths(radius_mm, spacing)
    grid = np.stack(np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij"), -1).reshape(-1, 3)
    ball = grid[within_radius(grid, spacing, radius_mm)]
    order = np.argsort(probs, kind="stable")  # ascending: higher probabilities written last (max)
    for c, p in zip(np.asarray(coords)[order], np.asarray(probs)[order]):
        pts = c[None] + ball
        ok = np.all((pts >= 0) & (pts < np.array(out.shape)), axis=1)
        pts = pts[ok]
        out[pts[:, 0], pts[:, 1], pts[:, 2]] = np.maximum(out[pts[:, 0], pts[:, 1], pts[:, 2]], p)
    return out


def _rows(scan: Mapping[str, Any], coords: np.ndarray, probs: np.ndarray) -> list[dict[str, Any]]:
    """candidates.csv rows in the input file's voxel grid and world coordinates."""
    can = scan["canonical"]
    src = to_source_voxels(coords, scan["affine"], can.source_affine)
    return candidate_rows(Path(scan["source"]).name, src, probs, can.source_affine)


def run_evaluation(
    network: torch.nn.Module,
    datalist: PathLike,
    output_dir: PathLike,
    split: str = "test",
    patch_size: Sequence[int] = (32, 32, 16),
    frst: Mapping[str, Any] | None = None,
    cache_dir: PathLike | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 128,
    device: Any = "cpu",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Detect on every scan of ``split`` and write the FROC report.

    Writes into ``output_dir`` (atomically): ``candidates.csv`` (image, i, j, k in the image file's voxel grid,
    x, y, z world mm, probability), ``metrics.json`` (``cmb_synthesis.froc.evaluate`` plus a ``candidate_stage``
    block: candidate sensitivity and candidates per scan, and ``extra``), ``froc.csv`` and ``froc.png``.
    A datalist naming a missing file raises ``FileNotFoundError`` naming it before anything is computed.
    """
    items = load_split(datalist, split)
    if not items:
        raise ValueError(f"{datalist}: split {split!r} is empty")
    results, rows, n_cand = [], [], []
    for it in items:
        scan = load_scan(it["image"], it.get("brainmask"), it.get("label"), scan_id=it.get("id"))
        if scan["label"] is None:
            raise ValueError(f"{datalist}: {split} item {it['image']} has no label to evaluate against")
        coords, probs, _ = detect_scan(network, scan, patch_size, frst, cache_dir, batch_size, device)
        result = match_candidates(scan["id"], coords, probs, np.asarray(scan["label"][0]))
        result.label_split = bool(scan["label_split"])
        results.append(result)
        rows += _rows(scan, coords, probs)
        n_cand.append(len(coords))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_candidates_csv(rows, out / "candidates.csv")
    metrics = evaluate(results, n_bootstrap=n_bootstrap, seed=seed)
    n_les = sum(len(r.lesion_scores) for r in results)
    hit = sum(int((~np.isnan(r.lesion_scores)).sum()) for r in results)
    metrics["candidate_stage"] = {"candidate_sensitivity": hit / n_les if n_les else None, "n_lesions_hit": hit,
                                  "candidates_per_scan_mean": float(np.mean(n_cand)),
                                  "candidates_per_scan_max": int(np.max(n_cand))}
    metrics.update({"split": split, "datalist": str(datalist), **dict(extra or {})})
    write_report(metrics, out)
    logger.info("evaluation on %s (%d scans, %d lesions): sensitivity at 10 FP/scan %s, CPM %.3f; report in %s",
                split, metrics["n_scans"], metrics["n_lesions"], metrics["sensitivity_at_fp"].get("10"),
                metrics["cpm"], out)
    return metrics


def _rows_of(job: BatchJob) -> dict[str, Any]:
    """Summary info of a skipped scan: the candidates in its existing ``<id>_candidates.csv``."""
    return {"n": len(read_candidates_csv(job.outputs["candidates"]))}


def run_inference(
    network: torch.nn.Module,
    dataset_dir: PathLike,
    output_dir: PathLike,
    patch_size: Sequence[int] = (32, 32, 16),
    frst: Mapping[str, Any] | None = None,
    cache_dir: PathLike | None = None,
    batch_size: int = 128,
    device: Any = "cpu",
    prob_radius_mm: float = 1.5,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Detect CMBs on every SWI in ``dataset_dir`` (NIfTI files or DICOM series folders).

    Per scan ``<id>`` (``<id>_swi.nii.gz`` -> ``<id>``; ids that clash, e.g. ``x.nii.gz`` beside
    ``x_swi.nii.gz``, are made unique from the file name, see :func:`cmb_synthesis.data.naming.unique_scan_ids`):
    brain mask ``<id>_brainmask.nii.gz`` beside it when present, else :func:`estimate_brainmask`; writes
    ``<id>_cmb_prob.nii.gz`` (float32 candidate probabilities on balls of ``prob_radius_mm``, in the input's
    voxel grid, affine and header) and ``<id>_candidates.csv`` (that scan's rows), together (one unit). The
    batch (output folder checks, skip unless ``overwrite``, ``inference_summary.json`` and ``summary.csv``,
    ``n`` = candidates) is :func:`cmb_synthesis.data.batch.run_batch`; an output folder inside ``dataset_dir``
    is not read as an input. After all scans ``candidates.csv`` is rebuilt from the ``<id>_candidates.csv`` of
    every scan that has one (written now or by an earlier run), so a failed rerun never loses rows. If any scan
    failed, :class:`BatchInferenceError` is raised at the end (non-zero exit of ``monai.bundle run``).
    """
    out = Path(output_dir)
    inputs = find_inputs(dataset_dir, exclude=(out,))
    if not inputs:
        raise ValueError(f"{dataset_dir}: no SWI inputs (NIfTI files or DICOM folders) found")
    jobs = []
    for sid, path in zip(unique_scan_ids(inputs), inputs):
        mask = find_brainmask(path) if path.is_file() else None
        jobs.append(BatchJob(sid, str(path), {"probability_map": out / f"{sid}_cmb_prob.nii.gz",
                                               "candidates": out / f"{sid}_candidates.csv"},
                             inputs=tuple(str(p) for p in (path, mask) if p is not None), extra={"mask": mask}))

    def process(job: BatchJob, tmp: dict[str, Path]) -> dict[str, Any]:
        scan = load_scan(job.image, job.extra["mask"], scan_id=job.id)
        coords, probs, _ = detect_scan(network, scan, patch_size, frst, cache_dir, batch_size, device)
        pmap = probability_map(scan["image"].shape[1:], coords, probs, scan["spacing"], prob_radius_mm)
        write_like(pmap, scan["canonical"], tmp["probability_map"], dtype=np.float32, overwrite=True, inputs=job.inputs)
        write_candidates_csv(_rows(scan, coords, probs), tmp["candidates"])
        top = float(probs.max()) if len(probs) else 0.0
        return {"n": int(len(coords)), "mask": scan["mask_source"], "max_probability": top,
                "message": f"{len(coords)} candidates, max probability {top:.3f}, {scan['mask_source']} brain mask"}

    def combine(summary: dict[str, Any]) -> None:
        rows: list[dict[str, Any]] = []
        for job in jobs:
            if job.outputs["candidates"].is_file():
                rows += read_candidates_csv(job.outputs["candidates"])
        write_candidates_csv(rows, out / "candidates.csv")

    return run_batch(jobs, process, out, overwrite=overwrite, input_dirs=(dataset_dir,), existing=_rows_of,
                     finalize=combine)

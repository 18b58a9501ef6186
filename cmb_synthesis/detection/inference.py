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

from cmb_synthesis.data.batch import SUMMARY_JSON, BatchInferenceError, BatchJob, run_batch
from cmb_synthesis.data.datalist import load_split
from cmb_synthesis.data.io import PathLike
from cmb_synthesis.data.naming import find_brainmask, find_inputs, unique_scan_ids
from cmb_synthesis.data.scans import load_scan
from cmb_synthesis.progress import progress
from cmb_synthesis.detection.candidates import scan_candidates
from cmb_synthesis.detection.operating_point import detections_at, load_operating_point, resolve_threshold
from cmb_synthesis.detection.outputs import (detection_rows, draw_balls, qc_montage, read_detections_csv, to_world,
                                             world_to_voxels, write_detections_csv, write_in_input_grid)
from cmb_synthesis.evaluation.froc import evaluate
from cmb_synthesis.evaluation.hits import match_candidates
from cmb_synthesis.evaluation.report import candidate_rows, read_candidates_csv, write_candidates_csv, write_report
from cmb_synthesis.training.weights import load_network_weights
from transforms.patches import CandidatePatchesd

__all__ = ["load_classifier", "predict_patches", "detect_scan", "probability_map", "run_evaluation", "run_inference",
           "BatchInferenceError", "SUMMARY_COLUMNS"]

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
    """(X, Y, Z) float32 map on a grid of voxel size ``spacing`` (mm): each candidate's probability on a ball of
    ``radius_mm`` around its voxel ``coords`` (max where balls overlap), 0 elsewhere
    (:func:`cmb_synthesis.detection.outputs.draw_balls` with ``diag(spacing)``; noise in the spacing does not
    change the ball)."""
    affine = np.diag([*(float(v) for v in spacing), 1.0])
    return draw_balls(shape, affine, to_world(coords, affine), probs, radius_mm, np.float32, "max")


def _mapped(scan: Mapping[str, Any], coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidates of the detector's grid -> ``(world (N, 3) RAS mm, input-file voxels (N, 3) int64)``."""
    can = scan["canonical"]
    world = to_world(coords, scan["affine"])
    return world, world_to_voxels(world, can.source_affine, can.source_shape)


def _rows(scan: Mapping[str, Any], coords: np.ndarray, probs: np.ndarray) -> list[dict[str, Any]]:
    """candidates.csv rows in the input file's voxel grid (nearest voxel) and world coordinates of that voxel."""
    _, src = _mapped(scan, coords)
    return candidate_rows(Path(scan["source"]).name, src, probs, scan["canonical"].source_affine)


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
    spacing: Sequence[float] | None = None,
    operating_point: PathLike | None = None,
    model_path: PathLike | None = None,
) -> dict[str, Any]:
    """Detect on every scan of ``split`` and write the FROC report.

    Every scan is resampled to ``spacing`` (the training grid, None: its own voxels) as in training and
    inference. Writes into ``output_dir`` (atomically): ``candidates.csv`` (image, i, j, k in the image file's
    voxel grid, x, y, z world mm, probability), ``metrics.json`` (``cmb_synthesis.froc.evaluate`` plus a
    ``candidate_stage`` block: candidate sensitivity and candidates per scan, ``extra``, and, when the model's
    ``operating_point`` file exists, an ``operating_point`` block: the saved threshold with its validation
    sensitivity / FP per scan and the sensitivity / FP per scan it gives on this split), ``froc.csv`` and
    ``froc.png``. A datalist naming a missing file raises ``FileNotFoundError`` naming it before anything is
    computed.
    """
    items = load_split(datalist, split)
    if not items:
        raise ValueError(f"{datalist}: split {split!r} is empty")
    results, rows, n_cand = [], [], []
    for it in progress(items, f"evaluation ({split})"):
        scan = load_scan(it["image"], it.get("brainmask"), it.get("label"), scan_id=it.get("id"), spacing=spacing)
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
    metrics["spacing"] = None if spacing is None else [float(v) for v in spacing]
    if operating_point is not None and Path(operating_point).is_file():
        op = load_operating_point(operating_point, model_path)
        metrics["operating_point"] = {
            "source": str(operating_point), "threshold": float(op["threshold"]),
            "fp_per_scan_target": op.get("fp_per_scan_target"),
            "validation": {"sensitivity": op.get("sensitivity"), "fp_per_scan": op.get("fp_per_scan")},
            split: detections_at(results, float(op["threshold"]))}
    metrics.update({"split": split, "datalist": str(datalist), **dict(extra or {})})
    write_report(metrics, out)
    logger.info("evaluation on %s (%d scans, %d lesions): sensitivity at 10 FP/scan %s, CPM %.3f; report in %s",
                split, metrics["n_scans"], metrics["n_lesions"], metrics["sensitivity_at_fp"].get("10"),
                metrics["cpm"], out)
    return metrics


def _counts_of(job: BatchJob) -> dict[str, Any]:
    """Summary info of a skipped scan: the rows of its existing ``<id>_detections.csv`` / ``_candidates.csv``."""
    n_det = len(read_detections_csv(job.outputs["detections"]))
    n_cand = len(read_candidates_csv(job.outputs["candidates"]))
    return {"n_detections": n_det, "n_candidates": n_cand, "n": n_cand,
            "message": f"outputs exist ({n_det} detections; use overwrite to replace them)"}


def _check_previous_threshold(out: Path, threshold: float, overwrite: bool) -> None:
    """Refuse to mix detections of two thresholds in one output folder (skipped scans keep their outputs)."""
    import json

    prev = out / SUMMARY_JSON
    if overwrite or not prev.is_file():
        return
    try:
        before = json.loads(prev.read_text()).get("threshold")
    except (OSError, ValueError):
        return
    if before is not None and not np.isclose(float(before), threshold, rtol=0, atol=1e-12):
        raise ValueError(f"{out}: holds detections at threshold {float(before):.6g}, this run uses {threshold:.6g}; "
                         "pass --overwrite true to redo every scan, or another --output_dir")


SUMMARY_COLUMNS = ("id", "status", "n_detections", "n_candidates", "message")


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
    spacing: Sequence[float] | None = None,
    threshold: float | None = None,
    fp_per_scan: float | None = None,
    operating_point: PathLike | None = None,
    model_path: PathLike | None = None,
    detection_radius_mm: float = 1.5,
    qc_slabs: int = 6,
) -> dict[str, Any]:
    """Detect CMBs on every SWI in ``dataset_dir`` (NIfTI files or DICOM series folders).

    Per scan ``<id>`` (``<id>_swi.nii.gz`` -> ``<id>``; ids that clash, e.g. ``x.nii.gz`` beside
    ``x_swi.nii.gz``, are made unique from the file name, see :func:`cmb_synthesis.data.naming.unique_scan_ids`):
    the scan is reoriented to RAS and resampled to ``spacing`` (the training grid); brain mask
    ``<id>_brainmask.nii.gz`` beside it when present (resampled, nearest neighbour), else
    :func:`cmb_synthesis.data.brainmask.estimate_brainmask` on the resampled image; FRST candidates and the
    classifier run on that grid; candidates with probability ``>= threshold`` are the detections. Outputs,
    written together as one unit (:func:`cmb_synthesis.data.batch.run_batch`):

    - ``<id>_detections.csv``: one row per detection, by decreasing probability (``id, label, x, y, z, i, j, k,
      probability``: world RAS mm of the candidate, the input file's nearest voxel, ``label`` = row number);
    - ``<id>_detections.nii.gz``: uint16 instance labels (label k = row k) on balls of ``detection_radius_mm``,
      in the input's grid, affine and header;
    - ``<id>_qc.png``: axial MinIP montage (``qc_slabs`` slabs over the brain mask's extent) of the resampled
      scan, detections circled and numbered;
    - ``<id>_cmb_prob.nii.gz``: float32 probability of every candidate on balls of ``prob_radius_mm`` in the
      input's grid, and ``<id>_candidates.csv`` (all candidates, ``image, i, j, k, x, y, z, probability``).

    Threshold (:func:`cmb_synthesis.detection.operating_point.resolve_threshold`): ``threshold`` as given,
    else ``fp_per_scan`` looked up on the validation FROC saved in ``operating_point``, else the saved
    operating point; neither a file nor ``threshold`` is an error before any scan is read. The file must
    belong to ``model_path`` (sha256) and its training spacing must be ``spacing``.

    The batch: ``summary.csv`` (``id, status, n_detections, n_candidates, message``), ``inference_summary.json``
    (the threshold, its source, the spacing, per-scan entries with ``n_detections``, ``n_candidates`` and ``n``
    = ``n_candidates`` as before), and, after all scans, ``detections.csv`` and
    ``candidates.csv`` rebuilt from every scan's files in the folder (written now or by an earlier run). A scan
    whose outputs all exist is skipped unless ``overwrite`` (a folder made at another threshold is refused). If
    any scan failed, :class:`BatchInferenceError` is raised at the end (non-zero exit of ``monai.bundle run``).
    """
    out = Path(output_dir)
    decision = resolve_threshold(threshold, fp_per_scan, operating_point, model_path)
    if spacing is not None and decision.get("spacing") is not None and not np.allclose(
            np.asarray(decision["spacing"], float), np.asarray(spacing, float), rtol=1e-3):
        raise ValueError(f"{decision['operating_point']}: the model was trained at spacing {decision['spacing']} mm, "
                         f"this run resamples to {list(spacing)} mm; use the training spacing (--spacing)")
    thr = float(decision["threshold"])
    inputs = find_inputs(dataset_dir, exclude=(out,))
    if not inputs:
        raise ValueError(f"{dataset_dir}: no SWI inputs (NIfTI files or DICOM folders) found")
    _check_previous_threshold(out, thr, overwrite)
    logger.info("detection threshold %.4f (%s)", thr, decision["source"])
    jobs = []
    for sid, path in zip(unique_scan_ids(inputs), inputs):
        mask = find_brainmask(path) if path.is_file() else None
        jobs.append(BatchJob(sid, str(path), {"detections": out / f"{sid}_detections.csv",
                                               "detection_labels": out / f"{sid}_detections.nii.gz",
                                               "qc": out / f"{sid}_qc.png",
                                               "probability_map": out / f"{sid}_cmb_prob.nii.gz",
                                               "candidates": out / f"{sid}_candidates.csv"},
                             inputs=tuple(str(p) for p in (path, mask) if p is not None), extra={"mask": mask}))

    def process(job: BatchJob, tmp: dict[str, Path]) -> dict[str, Any]:
        scan = load_scan(job.image, job.extra["mask"], scan_id=job.id, spacing=spacing)
        can = scan["canonical"]
        coords, probs, _ = detect_scan(network, scan, patch_size, frst, cache_dir, batch_size, device)
        world, _ = _mapped(scan, coords)
        pmap = draw_balls(can.source_shape, can.source_affine, world, probs, prob_radius_mm, np.float32, "max")
        write_in_input_grid(pmap, can, tmp["probability_map"])
        write_candidates_csv(_rows(scan, coords, probs), tmp["candidates"])
        keep = probs >= thr
        order = np.argsort(-probs[keep], kind="stable")
        det_coords, det_world, det_probs = coords[keep][order], world[keep][order], probs[keep][order]
        rows = detection_rows(job.id, det_world, det_probs, can.source_affine, can.source_shape)
        write_detections_csv(rows, tmp["detections"])
        n = len(rows)
        if n > np.iinfo(np.uint16).max:  # pragma: no cover - at most max_candidates detections
            raise ValueError(f"{job.image}: {n} detections do not fit uint16 labels")
        labels = draw_balls(can.source_shape, can.source_affine, det_world, np.arange(1, n + 1), detection_radius_mm,
                            np.uint16, "first")
        write_in_input_grid(labels, can, tmp["detection_labels"])
        qc_montage(np.asarray(scan["image"][0]), scan["spacing"], det_coords, np.arange(1, n + 1), tmp["qc"],
                   title=f"{job.id}: {n} detection(s) at p >= {thr:.3f} ({decision['source']}); "
                         f"{scan['mask_source']} brain mask", n_slabs=qc_slabs, mask=np.asarray(scan["brainmask"][0]))
        top = float(probs.max()) if len(probs) else 0.0
        return {"n_detections": n, "n_candidates": int(len(coords)), "n": int(len(coords)), "mask": scan["mask_source"],
                "resampled": bool(scan["resampled"]), "max_probability": top,
                "message": f"{n} detections, {len(coords)} candidates (max probability {top:.3f}), "
                           f"{scan['mask_source']} brain mask"}

    def combine(summary: dict[str, Any]) -> None:
        cand: list[dict[str, Any]] = []
        det: list[dict[str, Any]] = []
        for job in jobs:
            if job.outputs["candidates"].is_file():
                cand += read_candidates_csv(job.outputs["candidates"])
            if job.outputs["detections"].is_file():
                det += read_detections_csv(job.outputs["detections"])
        write_candidates_csv(cand, out / "candidates.csv")
        write_detections_csv(det, out / "detections.csv")

    extra = {"threshold": thr, "threshold_source": decision["source"], "decision": decision,
             "spacing": None if spacing is None else [float(v) for v in spacing]}
    return run_batch(jobs, process, out, overwrite=overwrite, input_dirs=(dataset_dir,), existing=_counts_of,
                     finalize=combine, summary_extra=extra, summary_columns=SUMMARY_COLUMNS, desc="detection")

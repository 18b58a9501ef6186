"""The detector's operating point: a probability threshold chosen on the validation split at a stated FP/scan
rate, saved with the model (``models/operating_point.json``) and used by inference to turn candidate
probabilities into detections.

- :func:`operating_point` computes it from per-scan validation results (the hit rule,
  :mod:`cmb_synthesis.evaluation.hits`; the curve, :func:`cmb_synthesis.evaluation.froc.froc_curve`).
- :class:`OperatingPointWriter` is the Ignite handler that writes it whenever the best model (``model.pt``)
  is saved, from the same validation round's candidate probabilities (:class:`CandidateCPM`).
- :func:`resolve_threshold` picks the threshold of an inference run: ``--threshold``, ``--fp_per_scan``
  (looked up on the saved validation FROC) or the saved operating point.

Threshold rule (the same step rule as :mod:`cmb_synthesis.evaluation.froc`): among the curve's points (one
per distinct probability, from high to low) the last one whose mean FP/scan is ``<= rate``; a candidate is
detected when its probability is ``>= threshold``. When even the highest probability gives more FPs than the
rate, the threshold lies just above it (nothing is detected).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Engine, Events

from cmb_synthesis.data.io import PathLike, write_json
from cmb_synthesis.evaluation.froc import froc_curve
from cmb_synthesis.evaluation.hits import ScanResult

__all__ = ["OPERATING_POINT_FILE", "DEFAULT_FP_PER_SCAN", "file_sha256", "threshold_at", "operating_point",
           "detections_at", "OperatingPointWriter", "load_operating_point", "resolve_threshold"]

logger = logging.getLogger(__name__)

OPERATING_POINT_FILE = "operating_point.json"
DEFAULT_FP_PER_SCAN = 2.0
FORMAT_VERSION = 1


def file_sha256(path: PathLike) -> str:
    """sha256 hex digest of a file (ties ``operating_point.json`` to the ``model.pt`` it was computed for)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _above(p: float) -> float:
    """The smallest float above ``p`` (a threshold that detects nothing of a curve whose top score is ``p``)."""
    return float(np.nextafter(float(p), np.inf))


def threshold_at(fp_per_scan: Sequence[float], sensitivity: Sequence[float], thresholds: Sequence[float | None],
                 rate: float) -> tuple[float, float, float]:
    """``(threshold, fp_per_scan, sensitivity)`` of the curve's last point with FP/scan ``<= rate``.

    Args:
        fp_per_scan, sensitivity, thresholds: the curve (P,), by decreasing threshold, as
            :func:`froc_curve` returns it (the first point is ``inf`` or ``None``: nothing detected).
        rate: FP/scan (>= 0).

    Raises:
        ValueError: a negative or non-finite rate, an empty curve.
    """
    rate = float(rate)
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"fp_per_scan must be a finite number >= 0, got {rate}")
    fp = np.asarray(fp_per_scan, np.float64)
    if not len(fp):
        raise ValueError("operating point: empty FROC curve")
    sens = np.asarray([np.nan if s is None else s for s in sensitivity], np.float64)
    thr = [math.inf if t is None else float(t) for t in thresholds]
    idx = int((fp <= rate + 1e-12).sum()) - 1
    finite = [t for t in thr if math.isfinite(t)]
    if idx <= 0 or not math.isfinite(thr[idx]):
        t = _above(max(finite) if finite else 1.0)
        return t, 0.0, float(sens[0]) if len(sens) else float("nan")
    return thr[idx], float(fp[idx]), float(sens[idx])


def operating_point(results: Sequence[ScanResult], fp_per_scan: float = DEFAULT_FP_PER_SCAN,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The operating point of a detector on per-scan validation results.

    Returns:
        dict: ``threshold`` (probability; detected when ``>=``), ``fp_per_scan_target``, ``fp_per_scan``
        and ``sensitivity`` at that threshold on these scans, ``n_scans``, ``n_lesions``, ``froc``
        (``threshold``, ``fp_per_scan``, ``sensitivity`` lists: the whole validation curve, the first point
        ``threshold: null`` = nothing detected, for ``--fp_per_scan`` lookups) and ``extra`` merged in.
    """
    fp, sens, thr = froc_curve(results)
    threshold, fp_at, sens_at = threshold_at(fp, sens, thr, fp_per_scan)
    n_les = int(sum(len(r.lesion_scores) for r in results))
    out = {
        "format_version": FORMAT_VERSION,
        "threshold": threshold,
        "fp_per_scan_target": float(fp_per_scan),
        "fp_per_scan": fp_at,
        "sensitivity": None if math.isnan(sens_at) else sens_at,
        "split": "validation",
        "n_scans": len(results),
        "n_lesions": n_les,
        "froc": {"threshold": [None if not math.isfinite(t) else float(t) for t in thr],
                 "fp_per_scan": [float(v) for v in fp],
                 "sensitivity": [None if math.isnan(v) else float(v) for v in sens]},
    }
    out.update(dict(extra or {}))
    return out


def detections_at(results: Sequence[ScanResult], threshold: float) -> dict[str, Any]:
    """Sensitivity and mean FP/scan of ``results`` when candidates with probability ``>= threshold`` are
    detections (e.g. the saved operating point on the test split)."""
    n_les = sum(len(r.lesion_scores) for r in results)
    tp = sum(int((np.nan_to_num(r.lesion_scores, nan=-np.inf) >= threshold).sum()) for r in results)
    fp = sum(int((r.fp_scores >= threshold).sum()) for r in results)
    return {"threshold": float(threshold), "sensitivity": tp / n_les if n_les else None,
            "fp_per_scan": fp / len(results) if results else None, "n_lesions_detected": tp, "n_false_positives": fp}


class OperatingPointWriter:
    """Ignite handler on the validator: whenever this round's model became ``model.pt``, write
    ``operating_point.json`` beside it (atomically) from the same round's validation probabilities.

    Attach it after the key-metric ``CheckpointSaver`` (later in ``val_handlers``): MONAI updates the
    evaluator's ``best_metric_epoch`` before the handlers run, and the saver writes ``model.pt`` exactly when
    the key metric improved, so ``best_metric_epoch == epoch`` means the file just written belongs to this
    round. A resumed run that does not improve keeps both files; the file records ``model_sha256``, so an
    operating point that does not belong to the ``model.pt`` beside it (a crash between the two writes) is
    refused at inference (:func:`load_operating_point`). In a distributed run only rank 0 writes.

    Args:
        metric: the validator's :class:`~cmb_synthesis.detection.training.CandidateCPM` (its
            ``last_results`` are this round's per-scan results).
        model_path: the key-metric saver's ``model.pt``; the JSON is written to ``output`` (default
            ``operating_point.json`` beside it).
        fp_per_scan: the FP/scan rate of the operating point (default 2).
        extra: recorded in the file (training spacing, patch size, FRST settings, ...).
    """

    def __init__(self, metric: Any, model_path: PathLike, fp_per_scan: float = DEFAULT_FP_PER_SCAN,
                 extra: Mapping[str, Any] | None = None, output: PathLike | None = None) -> None:
        self.metric = metric
        self.model_path = Path(model_path)
        self.output = Path(output) if output is not None else self.model_path.parent / OPERATING_POINT_FILE
        self.fp_per_scan = float(fp_per_scan)
        threshold_at([0.0], [0.0], [None], self.fp_per_scan)  # refuses a bad rate at construction
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        import ignite.distributed as idist

        if idist.get_rank() != 0:  # like Ignite's checkpoint saving: rank 0 writes (all ranks validate alike)
            return
        st = engine.state
        if int(getattr(st, "best_metric_epoch", -1)) != int(st.epoch):
            return  # model.pt was not replaced this round
        results = getattr(self.metric, "last_results", None)
        if not results:
            logger.warning("operating point: no validation results this round; %s not written", self.output)
            return
        if not self.model_path.is_file():
            logger.warning("operating point: %s not found; %s not written", self.model_path, self.output)
            return
        op = operating_point(results, self.fp_per_scan, {
            **self.extra, "epoch": int(st.epoch), "val_metric": float(st.best_metric),
            "model": self.model_path.name, "model_sha256": file_sha256(self.model_path)})
        write_json(op, self.output)
        logger.info("operating point at %g FP/scan on validation: threshold %.4f, sensitivity %s (%s)",
                    self.fp_per_scan, op["threshold"], op["sensitivity"], self.output)


def load_operating_point(path: PathLike, model_path: PathLike | None = None) -> dict[str, Any]:
    """Read ``operating_point.json``; with ``model_path``, check it was computed for that ``model.pt``.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable, or written for another model file.
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no operating point saved with the model")
    try:
        op = json.loads(path.read_text())
        float(op["threshold"])
        op["froc"]["fp_per_scan"]
    except Exception as e:  # noqa: BLE001 - any malformed file is the same error for the user
        raise ValueError(f"{path}: not a valid operating point file ({type(e).__name__}: {e})") from e
    if model_path is not None and op.get("model_sha256") and Path(model_path).is_file():
        if file_sha256(model_path) != op["model_sha256"]:
            raise ValueError(f"{path}: computed for another model than {model_path} (sha256 differs); retrain, or "
                             "give --threshold P or --fp_per_scan R with the validation FROC of this model")
    return op


def resolve_threshold(threshold: float | None = None, fp_per_scan: float | None = None,
                      operating_point_path: PathLike | None = None,
                      model_path: PathLike | None = None) -> dict[str, Any]:
    """The probability threshold of an inference run.

    Precedence: ``threshold`` (``--threshold``, used as given), else ``fp_per_scan`` (``--fp_per_scan``, looked
    up on the saved validation FROC), else the saved operating point.

    Returns:
        ``{"threshold", "source" ("--threshold" | "--fp_per_scan" | "saved operating point"), "fp_per_scan",
        "validation_sensitivity", "operating_point" (path or None), "spacing", "patch_size"}`` (the last two
        from the file, None without one).

    Raises:
        ValueError: both overrides given, a threshold outside [0, 1], a bad rate, or no operating point file
            and no ``threshold`` (the error says what to do).
    """
    if threshold is not None and fp_per_scan is not None:
        raise ValueError("give either --threshold or --fp_per_scan, not both")
    if threshold is not None:
        t = float(threshold)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"--threshold must be a probability in [0, 1], got {threshold}")
        return {"threshold": t, "source": "--threshold", "fp_per_scan": None, "validation_sensitivity": None,
                "operating_point": None, "spacing": None, "patch_size": None}
    path = Path(operating_point_path) if operating_point_path else None
    if path is None or not path.is_file():
        raise ValueError(f"{path}: no operating point saved with the model (models/{OPERATING_POINT_FILE} is written "
                         "by the training run of this version); give --threshold P (a probability in [0, 1])")
    op = load_operating_point(path, model_path)
    if fp_per_scan is not None:
        c = op["froc"]
        t, fp_at, sens_at = threshold_at(c["fp_per_scan"], c["sensitivity"], c["threshold"], float(fp_per_scan))
        source = "--fp_per_scan"
    else:
        t, fp_at, sens_at = float(op["threshold"]), op.get("fp_per_scan"), op.get("sensitivity")
        source = "saved operating point"
    return {"threshold": float(t), "source": source,
            "fp_per_scan": float(fp_per_scan) if fp_per_scan is not None else op.get("fp_per_scan_target"),
            "validation_fp_per_scan": fp_at,
            "validation_sensitivity": None if sens_at is None or (isinstance(sens_at, float) and math.isnan(sens_at))
            else float(sens_at),
            "operating_point": str(path), "spacing": op.get("spacing"), "patch_size": op.get("patch_size")}

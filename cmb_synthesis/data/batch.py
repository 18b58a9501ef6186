"""One driver for batch inference over many scans (the ``inference`` runs of both bundles).

A batch is a list of :class:`BatchJob` (a scan id, its input files and the output paths planned for it) and a
``process(job, tmp_outputs) -> info`` function that computes one scan and writes each of its outputs to the
temporary path it is given. :func:`run_batch`:

- checks the whole plan before any scan is computed (:func:`check_jobs`): ids are plain, unique file-name
  parts, every output lies inside the output folder, no output is an input or another scan's output;
- checks the output folder (created if missing, writable, not an input folder) and removes the temporaries an
  interrupted run left in it (:func:`cmb_synthesis.data.io.prepare_output_dir`);
- treats a scan's outputs as one unit: they are renamed into place together, only once the process returned
  (:func:`cmb_synthesis.data.io.atomic_outputs`), so a failed ``overwrite`` rerun keeps the previous outputs;
  a scan is skipped (unless ``overwrite``) only when ALL its outputs exist;
- reports a bad scan and goes on; at the end writes ``inference_summary.json`` (``n_inputs``, ``written`` /
  ``skipped``: ``[{"id", "image", "outputs", ...info}]``, ``failed``: ``[{"id", "image", "error"}]``) and
  ``summary.csv`` (``id, status, n, message`` by default, or the caller's columns), atomically, and raises :class:`BatchInferenceError` if any
  scan failed.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmb_synthesis.data.io import PathLike, atomic_outputs, prepare_output_dir, write_csv, write_json
from cmb_synthesis.progress import progress

__all__ = ["BatchJob", "BatchInferenceError", "check_jobs", "run_batch", "SUMMARY_JSON", "SUMMARY_CSV",
           "SUMMARY_COLUMNS"]

logger = logging.getLogger(__name__)

SUMMARY_JSON = "inference_summary.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_COLUMNS = ("id", "status", "n", "message")

# process(job, temporary output paths by name) -> info ("n": candidates / lesions, "message", anything JSON-able)
Process = Callable[["BatchJob", dict[str, Path]], Mapping[str, Any] | None]


@dataclass
class BatchJob:
    """One scan of a batch.

    Attributes:
        id: the scan id; the outputs are named after it, so it must be a plain file-name part (no folder
            separator, not ``.``/``..``, not hidden).
        image: the input scan (NIfTI file or DICOM series folder).
        outputs: output name -> planned path inside the batch's output folder.
        inputs: every input file of the scan (image, masks, ...); none may be an output of the batch.
        extra: whatever ``process`` needs besides (mask paths, ...).
    """

    id: str
    image: str
    outputs: dict[str, Path]
    inputs: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


class BatchInferenceError(RuntimeError):
    """Some scans of a batch failed; the others were processed.

    Attributes:
        failures: ``[{"id", "image", "error"}]``; summary: the batch summary (see :func:`run_batch`).
    """

    def __init__(self, failures: Sequence[Mapping[str, str]], n_total: int, summary: Mapping[str, Any] | None = None):
        self.failures = [dict(f) for f in failures]
        self.summary = dict(summary or {})
        lines = "\n".join(f"  {f['image']}: {f['error']}" for f in self.failures)
        super().__init__(f"{len(self.failures)} of {n_total} scans failed (the others were processed):\n{lines}")


def _id_problem(sid: Any) -> str | None:
    if not isinstance(sid, str) or not sid:
        return "is empty or not a string"
    if sid in (".", "..") or "/" in sid or "\\" in sid or (os.altsep and os.altsep in sid) or "\0" in sid:
        return "is not a plain name (folder separators or '..' would put outputs outside the output folder)"
    if sid.startswith("."):
        return "starts with '.' (hidden names are reserved for temporary files)"
    return None


def check_jobs(jobs: Sequence[BatchJob], output_dir: PathLike) -> None:
    """Check a batch plan before anything is computed or written.

    Raises:
        ValueError: listing every problem: an id that is not a plain file-name part, ids that repeat, an output
            outside ``output_dir``, two scans planning the same output, an output that is an input of the batch.
    """
    out = Path(output_dir).resolve()
    problems = [f"{job.image}: id {job.id!r} {why}" for job in jobs if (why := _id_problem(job.id))]
    counts = Counter(job.id for job in jobs)
    for sid in sorted(k for k, c in counts.items() if c > 1):
        problems.append(f"id {sid!r} is used by {', '.join(j.image for j in jobs if j.id == sid)}")
    inputs = {Path(p).resolve() for job in jobs for p in (job.image, *job.inputs) if p}
    planned: dict[Path, str] = {}
    for job in jobs:
        for name, path in job.outputs.items():
            target = Path(path).resolve()
            if not target.is_relative_to(out) or target == out:
                problems.append(f"{job.image}: output {name} {path} is outside the output folder {output_dir}")
            elif target in inputs:
                problems.append(f"{path}: refusing to write over an input file")
            elif target in planned:
                problems.append(f"{path}: planned for both {planned[target]} and {job.image}")
            planned[target] = job.image
    if problems:
        raise ValueError(f"batch refused before any scan was processed ({len(problems)} problem(s)):\n  "
                         + "\n  ".join(problems))


def _entry(job: BatchJob, info: Mapping[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": job.id, "image": str(job.image), "outputs": {k: str(p) for k, p in job.outputs.items()}}
    entry.update({k: v for k, v in info.items() if k not in entry})
    return entry


def run_batch(
    jobs: Sequence[BatchJob],
    process: Process,
    output_dir: PathLike,
    overwrite: bool = False,
    input_dirs: Sequence[PathLike] = (),
    existing: Callable[[BatchJob], Mapping[str, Any]] | None = None,
    finalize: Callable[[dict[str, Any]], None] | None = None,
    raise_on_error: bool = True,
    summary_extra: Mapping[str, Any] | None = None,
    summary_columns: Sequence[str] = SUMMARY_COLUMNS,
    desc: str = "inference",
) -> dict[str, Any]:
    """Process every job, one scan at a time; a bad scan is reported and the batch goes on.

    Args:
        jobs: the scans (see :class:`BatchJob`), checked with :func:`check_jobs` before anything is done.
        process: ``process(job, tmp)`` computes one scan and writes each output ``name`` to ``tmp[name]``;
            returns info for the summary (``"n"``: lesions / candidates, ``"message"``, anything JSON-able).
            All outputs are renamed into place together when it returns; an output left empty fails the scan.
        output_dir: the output folder: created if missing, must be writable and differ from ``input_dirs``;
            stale temporaries in it are removed first.
        overwrite: reprocess scans whose outputs all exist (default: skip them). Partial outputs are always
            redone.
        existing: ``existing(job) -> info`` for a skipped scan (e.g. its candidate count).
        finalize: ``finalize(summary)`` after all scans, before the error is raised (e.g. combined tables).
        raise_on_error: raise :class:`BatchInferenceError` when a scan failed (after the others ran).
        summary_extra: more top-level entries of ``inference_summary.json`` (e.g. the direction).
        summary_columns: columns of ``summary.csv``: ``id``, ``status``, ``message`` and any info key of the
            scans (e.g. ``n_detections``; empty for a failed scan); default ``id, status, n, message``.
        desc: name of the loop in the progress bar / log lines (``i/N``, elapsed, remaining).

    Returns:
        the summary: ``n_inputs``, ``written`` and ``skipped`` (``[{"id", "image", "outputs", ...info}]``; a
        written scan's info has ``seconds``, its processing time),
        ``failed`` (``[{"id", "image", "error"}]``), also written to ``output_dir/inference_summary.json``,
        with one row per scan in ``output_dir/summary.csv`` (``summary_columns``).

    Raises:
        ValueError / NotADirectoryError / PermissionError: a refused plan or output folder (nothing computed).
        BatchInferenceError: some scans failed (``raise_on_error``).
    """
    check_jobs(jobs, output_dir)
    out = prepare_output_dir(output_dir, inputs=input_dirs)
    summary: dict[str, Any] = {"n_inputs": len(jobs), **dict(summary_extra or {}), "written": [], "skipped": [],
                               "failed": []}
    rows: list[dict[str, Any]] = []
    columns = tuple(summary_columns)
    for c in ("id", "status", "message"):
        if c not in columns:
            raise ValueError(f"summary_columns must include {c!r}, got {columns}")

    def row(job: BatchJob, status: str, info: Mapping[str, Any], message: str) -> dict[str, Any]:
        r = {c: info.get(c, "") for c in columns}
        r.update({"id": job.id, "status": status, "message": message})
        return r

    for job in progress(list(jobs), desc):
        try:
            if not overwrite and all(Path(p).exists() for p in job.outputs.values()):
                info = dict(existing(job) if existing is not None else {})
                summary["skipped"].append(_entry(job, info))
                rows.append(row(job, "skipped", info,
                                info.get("message") or "outputs exist (use overwrite to replace them)"))
                logger.info("%s: outputs exist, skipped (use --overwrite true to replace them)", job.id)
                continue
            start = time.perf_counter()
            with atomic_outputs(job.outputs) as tmp:
                info = dict(process(job, tmp) or {})
                missing = [name for name, p in tmp.items() if not p.is_file() or p.stat().st_size == 0]
                if missing:
                    raise RuntimeError(f"{job.image}: output {', '.join(missing)} was not written")
            info.setdefault("seconds", round(time.perf_counter() - start, 2))
            summary["written"].append(_entry(job, info))
            rows.append(row(job, "written", info, info.get("message", "")))
            logger.info("%s: written in %.1f s (%s)", job.id, info["seconds"],
                        ", ".join(Path(p).name for p in job.outputs.values()))
        except Exception as e:  # noqa: BLE001 - a batch job reports every bad scan and goes on
            error = f"{type(e).__name__}: {e}"
            summary["failed"].append({"id": job.id, "image": str(job.image), "error": error})
            rows.append(row(job, "failed", {}, error))
            logger.error("%s: FAILED (%s)", job.image, error)
    write_json(summary, out / SUMMARY_JSON)
    write_csv(rows, out / SUMMARY_CSV, columns)
    if finalize is not None:
        finalize(summary)
    logger.info("inference: %d written, %d skipped, %d failed; summary in %s", len(summary["written"]),
                len(summary["skipped"]), len(summary["failed"]), out / SUMMARY_JSON)
    if summary["failed"] and raise_on_error:
        raise BatchInferenceError(summary["failed"], len(jobs), summary)
    return summary

"""Pack a study's finished evaluations small enough for git, and unpack them in a later checkout.

A study run kept under ``docs/results/study/<run>/`` (its ``--output_dir``) resumes in a later checkout when its
finished evaluation stages are there (stages run on demand: :mod:`cmb_synthesis.study.stages`). Each evaluation
writes ``candidates.csv`` (~850 KB for 40 test scans) and ``metrics.json`` (~700 KB, most of it the full-resolution
FROC curve): 72 evaluations would add ~110 MB. ``pack`` stores per evaluation stage only

- ``packed.npz``: the candidates' probabilities (float32, which the CSV's values are) and
- ``packed.json``: the name of the study-level candidate table (image, i, j, k, x, y, z: the FRST candidates of
  the test scans, the same for every detector; ``packed/candidates-<sha>.csv.gz``) and ``metrics.json`` with the
  FROC curve reduced to its step corners (where the sensitivity changes: the same step curve),

about 90 KB per stage, after checking that ``unpack`` gives back ``candidates.csv`` byte for byte. ``unpack``
writes ``candidates.csv`` and ``metrics.json`` where they are missing. ``pack`` also makes the paths recorded
in every ``stage.json`` and in the packed metrics relative to the repository root (the study reads none of them:
it finds its files by stage key). What the study reads from them (the
per-scan hits and scores, the summary metrics, the curve of Figure 3) is unchanged.

    python scripts/study_records.py pack docs/results/study/benchmark
    python scripts/study_records.py unpack docs/results/study/benchmark
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np

from cmb_synthesis.data.io import atomic_output, write_json

COORDS = ["image", "i", "j", "k", "x", "y", "z"]


def _read_candidates(path: Path) -> tuple[str, list[str]]:
    """(the coordinate columns as CSV text, the probability strings) of a ``candidates.csv``."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COORDS + ["probability"]:
            raise ValueError(f"{path}: unexpected columns {reader.fieldnames}")
        rows = list(reader)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(COORDS)
    for r in rows:
        w.writerow([r[c] for c in COORDS])
    return buf.getvalue(), [r["probability"] for r in rows]


def _candidates_text(table: str, probabilities: np.ndarray) -> str:
    """``candidates.csv`` from a coordinate table and float32 probabilities (``csv`` module's line endings)."""
    lines = table.split("\r\n")
    out = [lines[0] + ",probability"]
    for line, p in zip(lines[1:], probabilities):
        out.append(f"{line},{float(p)!r}")
    return "\r\n".join(out) + "\r\n"


def step_corners(curve: dict) -> dict:
    """The FROC step curve reduced to the points around each change of sensitivity (and both ends)."""
    sens = np.asarray(curve["sensitivity"], dtype=float)
    n = len(sens)
    if n <= 2:
        return dict(curve)
    change = np.flatnonzero(np.diff(sens) != 0)
    keep = np.unique(np.concatenate([[0, n - 1], change, change + 1]))
    return {k: [v[i] for i in keep] for k, v in curve.items()}


def repository_root(path: Path) -> Path:
    """The nearest folder above ``path`` holding ``.git`` (else the current folder)."""
    for folder in [path.resolve(), *path.resolve().parents]:
        if (folder / ".git").exists():
            return folder
    return Path.cwd().resolve()


def relative_paths(obj, root: Path):
    """``obj`` with every string naming a path under ``root`` made relative to it (the records' paths are
    informational: the study finds its files by stage key, so a record read elsewhere is unaffected)."""
    prefix = str(root).rstrip("/") + "/"
    if isinstance(obj, dict):
        return {k: relative_paths(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relative_paths(v, root) for v in obj]
    if isinstance(obj, str) and obj.startswith(prefix):
        return obj[len(prefix):]
    return obj


def pack(study: Path, root: Path | None = None) -> int:
    """Pack every finished evaluation of ``study``; make the paths in every ``stage.json`` (and in the packed
    metrics) relative to ``root`` (default: the repository holding ``study``), so committed records name no
    machine's folders."""
    root = repository_root(study) if root is None else Path(root).resolve()
    for done in sorted((study / "stages").glob("*/stage.json")):
        record = json.loads(done.read_text())
        rel = relative_paths(record, root)
        if rel != record:
            write_json(rel, done)
    tables = study / "packed"
    n = 0
    for folder in sorted((study / "stages").glob("evaluate-*")):
        cand, metrics_path = folder / "candidates.csv", folder / "metrics.json"
        if not (folder / "stage.json").is_file() or not cand.is_file() or not metrics_path.is_file():
            continue
        table, probs = _read_candidates(cand)
        p32 = np.array([float(s) for s in probs], dtype=np.float32)
        if _candidates_text(table, p32).encode() != cand.read_bytes():
            raise ValueError(f"{cand}: cannot be packed losslessly (its probabilities are not float32 values)")
        name = f"candidates-{hashlib.sha256(table.encode()).hexdigest()[:12]}.csv.gz"
        if not (tables / name).is_file():
            tables.mkdir(parents=True, exist_ok=True)
            with atomic_output(tables / name) as tmp:
                with gzip.GzipFile(tmp, "wb", mtime=0) as f:
                    f.write(table.encode())
        metrics = relative_paths(json.loads(metrics_path.read_text()), root)
        if "curve" in metrics:
            metrics["curve"] = step_corners(metrics["curve"])
            metrics["curve_packed"] = "step corners only (scripts/study_records.py)"
        with atomic_output(folder / "packed.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, probability=p32)
        write_json({"candidates_table": name, "n_candidates": int(len(p32)), "metrics": metrics}, folder / "packed.json")
        n += 1
    print(f"packed {n} evaluation stages of {study}")
    return n


def unpack(study: Path) -> int:
    n = 0
    for folder in sorted((study / "stages").glob("evaluate-*")):
        meta_path = folder / "packed.json"
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        if not (folder / "candidates.csv").is_file():
            table_path = study / "packed" / meta["candidates_table"]
            if not table_path.is_file():
                raise FileNotFoundError(f"{folder}: its candidate table {table_path} is missing")
            table = gzip.decompress(table_path.read_bytes()).decode()
            with np.load(folder / "packed.npz") as z:
                p32 = z["probability"]
            n_rows = len(table.split("\r\n")) - 2   # a header line and a final line break
            if len(p32) != meta["n_candidates"] or n_rows != len(p32):
                raise ValueError(f"{folder}: {len(p32)} probabilities for a table of {n_rows} rows")
            with atomic_output(folder / "candidates.csv") as tmp:
                tmp.write_bytes(_candidates_text(table, p32).encode())
        if not (folder / "metrics.json").is_file():
            write_json(meta["metrics"], folder / "metrics.json")
        n += 1
    print(f"unpacked {n} evaluation stages of {study}")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["pack", "unpack"])
    ap.add_argument("study_dir", type=Path)
    a = ap.parse_args(argv)
    if not (a.study_dir / "stages").is_dir():
        print(f"{a.study_dir}: no stages/ folder (not a study output folder)", file=sys.stderr)
        return 2
    (pack if a.action == "pack" else unpack)(a.study_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

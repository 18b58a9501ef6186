"""Content-addressed, resumable stages for long pipelines (the augmentation study).

A :class:`Stage` is a unit of work whose output folder is named by a hash of everything that determines its
result: its own parameters, the keys of the stages it consumes, and the bytes of the config files and code it
runs. A finished stage writes ``stage.json`` last; a folder without it is an interrupted attempt and is redone.
Rerunning a pipeline after a change therefore redoes only the stages whose inputs changed, and a pipeline
killed half-way resumes from the last finished stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmb_synthesis.data.io import write_json
from cmb_synthesis.progress import format_seconds

__all__ = ["Stage", "StageRunner", "hash_files", "run_bundle", "bundle_kwargs", "command_line_args"]

logger = logging.getLogger(__name__)

DONE_FILE = "stage.json"
# a config expression for None: MONAI drops None-valued overrides, which would keep the config's own value
NONE_EXPRESSION = "$None"


def _canonical(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def hash_files(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over the names and bytes of ``paths`` (folders are walked in sorted order)."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            if "__pycache__" in f.parts:
                continue
            h.update(str(f.name).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@dataclass
class Stage:
    """One cacheable step.

    Args:
        name: short name, also the folder prefix (``<name>-<hash12>``).
        params: JSON-serialisable parameters that determine the result.
        run: ``run(workdir: Path) -> dict`` doing the work inside ``workdir`` and returning a JSON summary.
        depends: stages whose outputs this one reads (their keys enter the hash).
        files: config/code files whose bytes enter the hash.
    """

    name: str
    params: Mapping[str, Any]
    run: Callable[[Path], Mapping[str, Any]]
    depends: Sequence["Stage"] = ()
    files: Sequence[str | os.PathLike] = ()
    _key: str | None = field(default=None, init=False, repr=False)

    @property
    def key(self) -> str:
        if self._key is None:
            payload = json.dumps(
                {
                    "name": self.name,
                    "params": _canonical(self.params),
                    "depends": [d.key for d in self.depends],
                    "files": hash_files(self.files) if self.files else "",
                },
                sort_keys=True,
            )
            self._key = hashlib.sha256(payload.encode()).hexdigest()[:12]
        return self._key


class StageRunner:
    """Runs stages under ``root/stages/`` and prints progress with an ETA.

    Args:
        root: the study output folder.
        total: number of stages expected (for the progress line and ETA), ``None`` if unknown.
        log: callable receiving progress lines (default: ``logging`` at INFO and ``print``).
    """

    def __init__(self, root: str | os.PathLike, total: int | None = None, log: Callable[[str], None] | None = None):
        self.root = Path(root)
        (self.root / "stages").mkdir(parents=True, exist_ok=True)
        self.total = total
        self.done = 0
        self.t0 = time.monotonic()
        self.spent_running = 0.0
        self.n_ran = 0
        self._log = log or (lambda s: (logger.info(s), print(s, flush=True)))

    def folder(self, stage: Stage) -> Path:
        return self.root / "stages" / f"{stage.name}-{stage.key}"

    def is_done(self, stage: Stage) -> bool:
        return (self.folder(stage) / DONE_FILE).is_file()

    def result(self, stage: Stage) -> dict[str, Any]:
        return json.loads((self.folder(stage) / DONE_FILE).read_text())["result"]

    def _eta(self) -> str:
        """``elapsed 12m05s, remaining ~1h02m00s``: wall time since the runner started, and the stages still to
        run times the mean duration of the stages run so far (cached stages cost nothing)."""
        elapsed = f"elapsed {format_seconds(time.monotonic() - self.t0)}"
        if self.total is None or self.n_ran == 0:
            return f"{elapsed}, remaining unknown"
        remaining = max(self.total - self.done, 0)
        return f"{elapsed}, remaining ~{format_seconds(remaining * self.spent_running / self.n_ran)}"

    def __call__(self, stage: Stage) -> dict[str, Any]:
        """Run ``stage`` unless a finished copy with the same key exists; return its summary."""
        folder = self.folder(stage)
        position = f"[{self.done + 1}/{self.total}]" if self.total else f"[{self.done + 1}]"
        if self.is_done(stage):
            self.done += 1
            self._log(f"{position} {stage.name}: cached ({folder.name})")
            return self.result(stage)
        if folder.exists():  # an interrupted attempt: start this stage again
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        self._log(f"{position} {stage.name}: running in {folder} ({self._eta()})")
        start = time.monotonic()
        result = dict(stage.run(folder))
        elapsed = time.monotonic() - start
        write_json(
            {"name": stage.name, "key": stage.key, "params": _canonical(stage.params), "seconds": elapsed, "result": result},
            folder / DONE_FILE,
        )
        self.done += 1
        self.n_ran += 1
        self.spent_running += elapsed
        self._log(f"{position} {stage.name}: done in {format_seconds(elapsed)} ({self._eta()})")
        return result


def bundle_kwargs(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides for ``monai.bundle.run(**kwargs)``: ``None`` becomes ``"$None"`` (an expression evaluating to
    None), since MONAI ignores ``None`` keyword arguments and would keep the config's value."""
    return {str(k): (NONE_EXPRESSION if v is None else v) for k, v in overrides.items()}


def command_line_args(overrides: Mapping[str, Any]) -> list[str]:
    """``--key value`` arguments of ``python -m monai.bundle run`` that reach the config with their types.

    Numbers, booleans, lists and dicts are written as Python literals (``True``, ``[24, 24, 16]``,
    ``{'a': None}``), which the bundle's command line (Fire) parses back; ``None`` as ``"$None"``; strings as
    they are. Nested ids use ``#`` (``--evaluate#n_bootstrap 200``).
    """
    args: list[str] = []
    for key, value in bundle_kwargs(overrides).items():
        if isinstance(value, tuple):
            value = list(value)
        args += [f"--{key}", repr(value) if isinstance(value, (bool, int, float, list, dict)) else str(value)]
    return args


def run_bundle(
    config_files: Sequence[str | os.PathLike],
    run_id: str,
    overrides: Mapping[str, Any],
    log_file: str | os.PathLike,
    cwd: str | os.PathLike | None = None,
) -> None:
    """Run ``python -m monai.bundle run <run_id>`` in a subprocess, logging to ``log_file``.

    ``config_files`` are merged in order (an overlay after the configs it extends). Each override becomes
    ``--key value`` (:func:`command_line_args`: the config receives the value with its type). A failing run
    raises ``RuntimeError`` with the command and the last lines of its log.
    """
    files = [str(Path(f).resolve()) for f in config_files]
    config_arg = files[0] if len(files) == 1 else json.dumps(files)
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_arg]
    cmd += command_line_args(overrides)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_file, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    if proc.returncode != 0:
        tail = Path(log_file).read_text().splitlines()[-40:]
        raise RuntimeError(
            f"bundle run '{run_id}' failed (exit {proc.returncode}); log: {log_file}\n" + "\n".join(tail)
        )

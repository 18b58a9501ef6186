"""Content-addressed, resumable stages for long pipelines (the augmentation study).

A :class:`Stage` is a unit of work whose output folder is named by a hash of everything that determines its
result: its own parameters, the keys of the stages it consumes, and the bytes of the config files and code it
runs. A finished stage writes ``stage.json`` last; a folder without it is an interrupted attempt and is redone.
Rerunning a pipeline after a change therefore redoes only the stages whose inputs changed, and a pipeline
killed half-way resumes from the last finished stage.

Stages run on demand: :class:`StageRunner` runs a stage's unfinished dependencies first and never visits the
dependencies of a finished stage, so a pipeline asks only for its end products (the evaluations) and a copy of
the finished stages' small files (without the weights they consumed) is enough to resume it elsewhere. A stage
that names its ``outputs`` counts as finished only while they exist (a record whose weights were not kept is
redone when something downstream needs it). A lock file per stage lets several runners (threads or processes)
share one stage folder: a stage runs once, the others wait for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

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
        depends: stages whose outputs this one reads (their keys enter the hash); the runner finishes them
            first.
        files: config/code files whose bytes enter the hash.
        outputs: files (relative to the stage folder) that must exist for a finished stage to count as
            finished, e.g. ``["models/model.pt"]``; a callable ``outputs(folder) -> list[str]`` for outputs
            known only after the run (read from a file the stage wrote). Not part of the key.
        resumable: an interrupted attempt's folder is kept (not emptied) and ``run`` is called on it again, to
            continue from what it left, e.g. a training bundle's newest interval checkpoint (the study's training
            stages: a 40-minute synthesis stage killed at 80 % resumes there). Not part of the key.
    """

    name: str
    params: Mapping[str, Any]
    run: Callable[[Path], Mapping[str, Any]]
    depends: Sequence["Stage"] = ()
    files: Sequence[str | os.PathLike] = ()
    outputs: Sequence[str] | Callable[[Path], Sequence[str]] = ()
    resumable: bool = False
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

    def missing_outputs(self, folder: Path) -> list[str]:
        """The declared outputs absent from ``folder`` (relative paths)."""
        try:
            names = self.outputs(folder) if callable(self.outputs) else self.outputs
        except (OSError, ValueError, KeyError) as e:  # the file listing the outputs is gone or unreadable
            return [f"(outputs unreadable: {e})"]
        return [str(n) for n in names if not (folder / n).exists()]


class StageRunner:
    """Runs stages under ``root/stages/`` on demand and prints progress with an ETA.

    ``runner(stage)`` returns the stage's summary: from its ``stage.json`` when it is finished (and its declared
    outputs exist), else after running its unfinished dependencies and then the stage. Thread- and
    process-safe: a stage is run under a lock file (``root/locks/<folder name>.lock``), and a runner that
    waited for another one finds the stage finished.

    Args:
        root: the study output folder.
        total: number of stages expected (for the progress line), ``None`` if unknown; :meth:`expect` sets it
            (and what the ETA needs) from the targets that will be asked for.
        log: callable receiving progress lines (default: ``logging`` at INFO and ``print``).
        parallel: stages expected to run at the same time (divides the remaining-time estimate).
    """

    def __init__(self, root: str | os.PathLike, total: int | None = None, log: Callable[[str], None] | None = None,
                 parallel: int = 1):
        self.root = Path(root)
        (self.root / "stages").mkdir(parents=True, exist_ok=True)
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        self.total = total
        self.to_run: int | None = None
        self.parallel = max(1, int(parallel))
        self.done = 0
        self.t0 = time.monotonic()
        self.spent_running = 0.0
        self.n_ran = 0
        self._left: dict[str, int] = {}                       # stage name -> unfinished stages (expect)
        self._spent: dict[str, tuple[float, int]] = {}         # stage name -> (seconds, stages run)
        self._count = threading.Lock()
        self._log = log or (lambda s: (logger.info(s), print(s, flush=True)))

    def folder(self, stage: Stage) -> Path:
        return self.root / "stages" / f"{stage.name}-{stage.key}"

    def is_done(self, stage: Stage) -> bool:
        """``stage.json`` written and every declared output present."""
        folder = self.folder(stage)
        return (folder / DONE_FILE).is_file() and not stage.missing_outputs(folder)

    def result(self, stage: Stage) -> dict[str, Any]:
        return json.loads((self.folder(stage) / DONE_FILE).read_text())["result"]

    def plan(self, targets: Iterable[Stage]) -> tuple[int, int]:
        """``(visits, to_run)`` for asking ``targets`` in order: the stages :meth:`__call__` will visit (each
        once) and how many of them are unfinished now."""
        visits, left = self._walk(targets)
        return visits, sum(left.values())

    def expect(self, targets: Iterable[Stage]) -> tuple[int, int]:
        """:meth:`plan` of ``targets``, remembered for the progress line (``[done/total]``) and the ETA (the
        unfinished stages of each kind, each at the mean duration of that kind so far)."""
        visits, left = self._walk(targets)
        with self._count:
            self.total, self.to_run, self._left = self.done + visits, sum(left.values()), dict(left)
        return visits, self.to_run

    def _walk(self, targets: Iterable[Stage]) -> tuple[int, dict[str, int]]:
        seen: set[str] = set()
        visits = 0
        left: dict[str, int] = {}

        def walk(st: Stage) -> None:
            nonlocal visits
            if st.key in seen:
                return
            seen.add(st.key)
            visits += 1
            if self.is_done(st):
                return
            left[st.name] = left.get(st.name, 0) + 1
            for d in st.depends:
                walk(d)

        for t in targets:
            walk(t)
        return visits, left

    def _eta(self) -> str:
        """``elapsed 12m05s, remaining ~1h02m00s``: wall time since the runner started, and the stages still to
        run, each at the mean duration of the stages of its kind (name) run so far, or of all stages run so far
        for a kind not run yet, divided by ``parallel`` (cached stages cost nothing). The kinds differ by orders
        of magnitude (a datalist: 0.04 s; a synthesis model: up to 1.6 h), so one mean over all was far off."""
        elapsed = f"elapsed {format_seconds(time.monotonic() - self.t0)}"
        if self.n_ran == 0 or (self.total is None and self.to_run is None):
            return f"{elapsed}, remaining unknown"
        mean = self.spent_running / self.n_ran
        if self._left:
            seconds = sum(n * (self._spent[k][0] / self._spent[k][1] if k in self._spent else mean)
                          for k, n in self._left.items() if n > 0)
        else:
            left = self.to_run - self.n_ran if self.to_run is not None else self.total - self.done
            seconds = max(left, 0) * mean
        return f"{elapsed}, remaining ~{format_seconds(seconds / self.parallel)}"

    def _position(self) -> str:
        return f"[{self.done + 1}/{self.total}]" if self.total else f"[{self.done + 1}]"

    def __call__(self, stage: Stage) -> dict[str, Any]:
        """Run ``stage`` unless a finished copy with the same key exists; return its summary."""
        folder = self.folder(stage)
        if self.is_done(stage):
            with self._count:
                self._log(f"{self._position()} {stage.name}: cached ({folder.name})")
                self.done += 1
            return self.result(stage)
        for dep in stage.depends:
            self(dep)
        with FileLock(str(self.root / "locks" / f"{folder.name}.lock")):
            if self.is_done(stage):  # another runner finished it while this one waited
                with self._count:
                    self._log(f"{self._position()} {stage.name}: cached ({folder.name}, run by another runner)")
                    self.done += 1
                return self.result(stage)
            resuming = False
            if folder.exists():  # an interrupted attempt, or a record whose outputs are gone
                recorded = (folder / DONE_FILE).is_file()
                if recorded:
                    missing = stage.missing_outputs(folder)
                    self._log(f"{stage.name}: {folder.name} lacks {', '.join(missing)}: running it again")
                resuming = stage.resumable and not recorded
                if not resuming:  # start again
                    shutil.rmtree(folder)
            folder.mkdir(parents=True, exist_ok=True)
            with self._count:
                how = "resuming the interrupted attempt" if resuming else "running"
                self._log(f"{self._position()} {stage.name}: {how} in {folder} ({self._eta()})")
            start = time.monotonic()
            result = dict(stage.run(folder))
            elapsed = time.monotonic() - start
            write_json(
                {"name": stage.name, "key": stage.key, "params": _canonical(stage.params), "seconds": elapsed,
                 "result": result},
                folder / DONE_FILE,
            )
            missing = stage.missing_outputs(folder)
            if missing:
                (folder / DONE_FILE).unlink()
                raise RuntimeError(f"stage {stage.name} ({folder}) finished without its outputs {missing}")
        with self._count:
            self.n_ran += 1
            self.spent_running += elapsed
            spent, n = self._spent.get(stage.name, (0.0, 0))
            self._spent[stage.name] = (spent + elapsed, n + 1)
            if self._left.get(stage.name, 0) > 0:
                self._left[stage.name] -= 1
            self._log(f"{self._position()} {stage.name}: done in {format_seconds(elapsed)} ({self._eta()})")
            self.done += 1
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
    threads: int | None = None,
) -> None:
    """Run ``python -m monai.bundle run <run_id>`` in a subprocess, logging to ``log_file``.

    ``config_files`` are merged in order (an overlay after the configs it extends). Each override becomes
    ``--key value`` (:func:`command_line_args`: the config receives the value with its type). ``threads`` sets
    the run's ``OMP_NUM_THREADS`` (runs side by side must not oversubscribe the cores); ``None`` inherits it.
    A failing run raises ``RuntimeError`` with the command and the last lines of its log. The log is appended
    to: a resumed stage keeps the interrupted attempt's lines above the new ones.
    """
    files = [str(Path(f).resolve()) for f in config_files]
    config_arg = files[0] if len(files) == 1 else json.dumps(files)
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_arg]
    cmd += command_line_args(overrides)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(int(threads))
    with open(log_file, "a") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    if proc.returncode != 0:
        tail = Path(log_file).read_text().splitlines()[-40:]
        raise RuntimeError(
            f"bundle run '{run_id}' failed (exit {proc.returncode}); log: {log_file}\n" + "\n".join(tail)
        )

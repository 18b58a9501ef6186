"""Fault tolerance: training that is killed (even with SIGKILL) and resumed ends where an uninterrupted run would.

Two Ignite handlers, attached by a bundle's ``train.yaml`` like any MONAI handler:

- :class:`EpochReseed` reseeds python, NumPy, torch and the random transforms of the data loader's dataset from
  ``(seed, epoch, rank)`` at every ``EPOCH_STARTED``. The random stream of epoch ``e`` then depends only on the
  seed and ``e`` (not on what ran before in this process), so a run resumed from the checkpoint of epoch
  ``e - 1`` replays epoch ``e`` exactly. Data loader iterators are created lazily by Ignite after
  ``EPOCH_STARTED``, so shuffling (``RandomSampler``), samplers with their own generator (e.g. a seeded
  ``WeightedRandomSampler``), worker seeds (``num_workers > 0``) and MONAI's ``Randomizable`` transforms are all
  covered. ``DistributedSampler`` is reseeded by MONAI's ``set_epoch``.
- :class:`ResumeFromLatest` loads, at ``STARTED``, the newest *complete* checkpoint of a folder (see
  :func:`find_latest_checkpoint`) through MONAI's :class:`~monai.handlers.CheckpointLoader`
  (``torch.load(..., weights_only=True)``), restoring networks, optimisers and the trainer's epoch/iteration;
  if the folder has none it does nothing (a fresh start).

With a MONAI ``CheckpointSaver`` writing every epoch, a run killed mid-epoch loses at most that epoch's work.
MONAI's saver writes in place (not atomically), so a kill during a save can leave a truncated file:
:func:`find_latest_checkpoint` checks each candidate's zip structure and CRCs and skips broken ones.

Exact equality holds for deterministic kernels (CPU; on GPU pass ``deterministic=True``, which sets
``torch.backends.cudnn.deterministic``). ``persistent_workers=True`` loaders keep worker RNG state across
epochs and are therefore not reproducible across a resume (a warning is logged).
"""

from __future__ import annotations

import logging
import os
import random
import re
import types
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader
from monai.utils import MAX_SEED

PathLike = str | os.PathLike

__all__ = ["epoch_seed", "reseed_tree", "EpochReseed", "ResumeFromLatest", "find_latest_checkpoint", "is_complete_checkpoint"]

_STEP_RE = re.compile(r"(epoch|iteration)=(\d+)")


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 31-bit seed derived from ``(seed, epoch, rank)`` with NumPy's ``SeedSequence`` (no overlap between
    neighbouring seeds or epochs, different per distributed rank)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1, np.uint32)[0] >> 1)


_LEAF_TYPES = (
    str, bytes, int, float, bool, complex, type(None), np.ndarray, np.generic, torch.Tensor, type, logging.Logger,
    types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType,
)  # fmt: skip


def reseed_tree(obj: Any, seed: int, _visited: set | None = None) -> int:
    """Seed every random-state holder reachable from ``obj``; return the next unused seed.

    Like MONAI's :func:`monai.data.utils.set_rnd` (it walks lists/tuples and object attributes and calls
    ``set_random_state`` on ``Randomizable`` objects), but it also descends *into* randomizable objects (a
    ``Randomizable`` dataset that wraps datasets with random transforms gets all of them reseeded) and it
    seeds ``torch.Generator`` / NumPy generators it meets. Each holder gets its own seed (``seed``, ``seed+1``,
    ... in attribute order, which is deterministic); cycles are visited once.
    """
    visited = set() if _visited is None else _visited
    if isinstance(obj, _LEAF_TYPES) or id(obj) in visited:
        return seed
    visited.add(id(obj))
    if isinstance(obj, torch.Generator):
        obj.manual_seed(seed)
        return seed + 1
    if isinstance(obj, np.random.RandomState):
        obj.seed(seed % MAX_SEED)
        return seed + 1
    if isinstance(obj, np.random.Generator):
        obj.bit_generator.state = np.random.PCG64(seed).state
        return seed + 1
    if isinstance(obj, (list, tuple)):
        for item in obj:
            seed = reseed_tree(item, seed, visited)
        return seed
    if isinstance(obj, dict) or not hasattr(obj, "__dict__"):
        return seed  # MONAI caches are lists of dicts of arrays: nothing random inside
    randomizable = hasattr(obj, "set_random_state")
    if randomizable:
        obj.set_random_state(seed=seed % MAX_SEED)
        seed += 1
    for key, value in list(vars(obj).items()):
        if key.startswith("__") or (randomizable and key == "R"):
            continue
        seed = reseed_tree(value, seed, visited)
    return seed


def _dist_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


class EpochReseed:
    """Ignite handler: at ``EPOCH_STARTED`` reseed everything random from ``(seed, epoch, rank)``.

    Args:
        seed: the run's seed (a config setting).
        rank: distributed rank mixed into the seed (each rank augments differently); default: the process
            group's rank, else ``$RANK``, else 0.
        loaders: extra data loaders (or datasets) whose random transforms to reseed; the engine's own
            ``data_loader`` is always included.
        extra: further objects with random state (MONAI ``Randomizable`` transforms, objects holding them,
            ``torch.Generator`` or ``numpy.random.Generator``/``RandomState``).
        deterministic: also make cuDNN deterministic (``cudnn.deterministic=True, benchmark=False``).

    After the call ``engine.state.epoch_seed`` holds the seed used for the epoch.
    """

    def __init__(
        self,
        seed: int = 0,
        rank: int | None = None,
        loaders: Sequence[Any] = (),
        extra: Sequence[Any] = (),
        deterministic: bool = False,
    ) -> None:
        self.seed = int(seed)
        self.rank = rank
        self.loaders = list(loaders)
        self.extra = list(extra)
        self.deterministic = bool(deterministic)
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        """Register at ``EPOCH_STARTED`` (before Ignite creates the epoch's data iterator)."""
        engine.add_event_handler(Events.EPOCH_STARTED, self)
        for loader in self._all_loaders(engine):
            if getattr(loader, "persistent_workers", False):
                self.logger.warning(
                    "EpochReseed: a data loader uses persistent_workers=True; its workers keep their random state "
                    "across epochs, so a resumed run will not replay the same augmentations."
                )

    def _all_loaders(self, engine: Engine) -> list[Any]:
        own = getattr(engine, "data_loader", None)
        return ([own] if own is not None else []) + self.loaders

    def __call__(self, engine: Engine) -> None:
        rank = _dist_rank() if self.rank is None else int(self.rank)
        s = epoch_seed(self.seed, engine.state.epoch, rank)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)  # also seeds every CUDA device
        if self.deterministic:
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        # the loaders' datasets (their random transforms), the loaders' own generators, then any extras
        # (a sampler's own generator, e.g. a seeded WeightedRandomSampler, included)
        nxt, visited = s + 1, set()
        for loader in self._all_loaders(engine):
            nxt = reseed_tree(getattr(loader, "dataset", loader), nxt, visited)
            for attr in ("sampler", "batch_sampler", "generator"):
                nxt = reseed_tree(getattr(loader, attr, None), nxt, visited)
        reseed_tree(self.extra, nxt, visited)
        engine.state.epoch_seed = s


def is_complete_checkpoint(path: PathLike) -> bool:
    """True if ``path`` is a complete ``torch.save`` zip archive (structure and every member's CRC check out).

    A file truncated by a kill during saving fails this check. Legacy (non-zip) pickles return False.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None and len(zf.namelist()) > 0
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def _step_of(path: Path) -> tuple[int, int]:
    """Sort key: (epoch-or-iteration number from the name, 1 if it is an epoch count), then mtime decides."""
    found = _STEP_RE.findall(path.name)
    if not found:
        return (-1, 0)
    kind, value = found[-1]
    return (int(value), 1 if kind == "epoch" else 0)


def find_latest_checkpoint(
    directory: PathLike, pattern: str = "*checkpoint_epoch=*.pt", validate: bool = True
) -> str | None:
    """Return the newest complete checkpoint in ``directory`` matching ``pattern``, or ``None``.

    "Newest" is the largest ``epoch=N`` (or ``iteration=N``) number in the file name (MONAI ``CheckpointSaver``
    names epoch checkpoints ``<prefix>_checkpoint_epoch=N.pt``), ties broken by modification time. With
    ``validate`` a truncated or corrupt file (e.g. the process was killed while saving) is skipped and the
    previous one is returned. Hidden and temporary files (``.name``) are ignored. A missing folder gives None.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = [p for p in directory.glob(pattern) if p.is_file() and not p.name.startswith(".")]
    candidates.sort(key=lambda p: (_step_of(p), p.stat().st_mtime), reverse=True)
    for p in candidates:
        if not validate or is_complete_checkpoint(p):
            return str(p)
        logging.getLogger(__name__).warning(f"{p}: incomplete or corrupt checkpoint, skipped")
    return None


class ResumeFromLatest:
    """Ignite handler: at ``STARTED`` resume from the newest complete checkpoint in ``checkpoint_dir``, if any.

    Args:
        checkpoint_dir: where a MONAI ``CheckpointSaver`` writes the epoch checkpoints.
        load_dict: objects to restore, as saved, e.g. ``{"trainer": @trainer, "G_HP": @G_HP, ...}``; include the
            trainer so the epoch/iteration counters resume.
        pattern: file-name glob of the resumable checkpoints (see :func:`find_latest_checkpoint`).
        enabled: ``False`` turns the handler into a no-op (e.g. a ``resume`` config flag).
        map_location: passed to ``torch.load`` (weights-only).
        strict: passed to ``load_state_dict``.

    After the call ``engine.state.resumed_from`` is the loaded path or ``None``.
    """

    def __init__(
        self,
        checkpoint_dir: PathLike,
        load_dict: Mapping[str, Any],
        pattern: str = "*checkpoint_epoch=*.pt",
        enabled: bool = True,
        map_location: Any = "cpu",
        strict: bool = True,
    ) -> None:
        if not load_dict:
            raise ValueError("ResumeFromLatest: load_dict must name at least one object to restore")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.load_dict = dict(load_dict)
        self.pattern = pattern
        self.enabled = bool(enabled)
        self.map_location = map_location
        self.strict = strict
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.resumed_from = None
        if not self.enabled:
            return
        path = find_latest_checkpoint(self.checkpoint_dir, self.pattern)
        if path is None:
            self.logger.info(f"no checkpoint matching {self.pattern} in {self.checkpoint_dir}: starting fresh")
            return
        CheckpointLoader(
            load_path=path, load_dict=self.load_dict, map_location=self.map_location, strict=self.strict
        )(engine)
        engine.state.resumed_from = path
        self.logger.info(f"resumed from {path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")


class KeyMetricState:
    """The best-so-far of a validation run, as a checkpointable object: put it in the trainer's
    ``CheckpointSaver`` ``save_dict`` and ``CheckpointLoader`` ``load_dict`` (e.g. as ``best``).

    Without it a resumed run forgets which validation score the saved best model (``model.pt``) had: the
    evaluator's ``best_metric`` restarts at -1 and the key-metric saver's list is empty, so the first validation
    after the resume overwrites ``model.pt`` even when it is worse. ``state_dict()`` holds the evaluator's
    ``best_metric``/``best_metric_epoch`` and the saver's tracking list (Ignite ``Checkpoint.state_dict``: scores
    and file names, plain Python types, loadable with ``weights_only=True``); ``load_state_dict`` restores both
    (the saver through MONAI's ``CheckpointSaver.load_state_dict``).

    Args:
        saver: the evaluator's MONAI ``CheckpointSaver`` with ``save_key_metric=True``.
        evaluator: the MONAI evaluator whose ``state.best_metric`` it tracks.
    """

    def __init__(self, saver: Any, evaluator: Engine) -> None:
        if getattr(saver, "_key_metric_checkpoint", None) is None:
            raise ValueError("KeyMetricState needs a CheckpointSaver created with save_key_metric=True")
        self.saver, self.evaluator = saver, evaluator

    def state_dict(self) -> dict[str, Any]:
        st = self.evaluator.state
        return {
            "best_metric": float(getattr(st, "best_metric", -1)),
            "best_metric_epoch": int(getattr(st, "best_metric_epoch", -1)),
            "saver": self.saver._key_metric_checkpoint.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state_dict["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state_dict["best_metric_epoch"])
        self.saver.load_state_dict(dict(state_dict["saver"]))

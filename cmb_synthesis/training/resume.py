"""Fault tolerance: training that is killed (even with SIGKILL) and resumed ends where an uninterrupted run would.

Attached by a bundle's ``train.yaml`` like any MONAI handler, or called from it:

- :class:`EpochReseed` reseeds python, NumPy, torch and the random transforms of the data loader's dataset from
  ``(seed, epoch, rank)`` at every ``EPOCH_STARTED``. The random stream of epoch ``e`` then depends only on the
  seed and ``e`` (not on what ran before in this process), so a run resumed from the checkpoint of epoch
  ``e - 1`` replays epoch ``e`` exactly. Data loader iterators are created lazily by Ignite after
  ``EPOCH_STARTED``, so shuffling (``RandomSampler``), samplers with their own generator (e.g. a seeded
  ``WeightedRandomSampler``), worker seeds (``num_workers > 0``) and MONAI's ``Randomizable`` transforms are all
  covered. ``DistributedSampler`` is reseeded by MONAI's ``set_epoch``.
- :func:`latest_checkpoint` finds the newest *complete* checkpoint of a folder; the bundles' ``--resume true``
  loads it with MONAI's :class:`~monai.handlers.CheckpointLoader` (``torch.load(..., weights_only=True)``),
  restoring networks, optimisers and the trainer's epoch/iteration.
- :class:`KeyMetricState` keeps the best validation score across a resume.

With a MONAI ``CheckpointSaver`` writing every epoch, a run killed mid-epoch loses at most that epoch's work.
MONAI's saver writes in place (not atomically), so a kill during a save can leave a truncated file:
:func:`latest_checkpoint` checks each candidate's zip structure and CRCs and skips broken ones.

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
from monai.utils import MAX_SEED

PathLike = str | os.PathLike

__all__ = ["epoch_seed", "reseed_tree", "EpochReseed", "KeyMetricState", "latest_checkpoint", "is_complete_checkpoint"]

logger = logging.getLogger(__name__)



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


_CKPT_RE = re.compile(r"checkpoint_(?:[a-z_]*_)?(iteration|epoch)=(\d+)\.pt$")


def latest_checkpoint(ckpt_dir: PathLike | None, required: bool = False, validate: bool = True) -> str:
    """The newest complete MONAI ``CheckpointSaver`` interval checkpoint in ``ckpt_dir`` (the bundles' resume).

    Candidates are ``checkpoint_iteration=N.pt`` / ``checkpoint_epoch=N.pt`` (any ``<prefix>_`` before
    ``iteration``/``epoch``); the largest N wins, or the most recently written file when both kinds are
    present. With ``validate`` a truncated or corrupt file (the process was killed while saving) is skipped
    with a warning and the previous one is returned. Hidden and temporary files (``.name``) are ignored.

    Returns:
        the path, or ``""`` when there is none and not ``required``.

    Raises:
        FileNotFoundError: ``required`` and there is no complete checkpoint (naming the folder).
    """
    folder = Path(ckpt_dir) if ckpt_dir else None
    found = []
    if folder is not None and folder.is_dir():
        for p in folder.iterdir():
            m = _CKPT_RE.search(p.name)
            if m and p.is_file() and not p.name.startswith("."):
                found.append((m.group(1), int(m.group(2)), p.stat().st_mtime, p))
    one_kind = len({f[0] for f in found}) == 1
    found.sort(key=(lambda f: (f[1], f[2])) if one_kind else (lambda f: f[2]), reverse=True)
    for *_, p in found:
        if not validate or is_complete_checkpoint(p):
            return str(p)
        logger.warning("%s: incomplete or corrupt checkpoint, skipped", p)
    if required:
        raise FileNotFoundError(f"{folder}: no complete checkpoint_iteration=N.pt or checkpoint_epoch=N.pt to resume from")
    return ""


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

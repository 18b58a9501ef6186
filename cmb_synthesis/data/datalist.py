"""The one datalist reader: MONAI decathlon-style ``datalist.json`` files.

A datalist holds lists (``training``, ``validation``, ``test``) of items; each item names its files
(``image``, and optionally ``label`` (CMB instance labels), ``brainmask``, ``tissue``, ``mask``) relative to the
datalist's folder or as absolute paths, a ``group`` (``healthy`` or ``pathological``) and an optional ``id``.
Every command reads datalists through :func:`load_split`, so paths, checks and error messages are the same
everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.data import load_decathlon_datalist

from cmb_synthesis.data.io import PathLike

__all__ = ["FILE_KEYS", "SPLITS", "read_datalist", "load_split", "split_groups", "load_groups"]

# item keys that name files (resolved against the datalist's folder and checked)
FILE_KEYS = ("image", "label", "brainmask", "tissue", "mask", "veins", "lesions")
SPLITS = ("training", "validation", "test")


def read_datalist(datalist: PathLike) -> dict[str, Any]:
    """The parsed JSON object of ``datalist``.

    Raises:
        FileNotFoundError: the file does not exist. ValueError: not a JSON object.
    """
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: datalist does not exist")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object with lists such as 'training', got {type(raw).__name__}")
    return raw


def load_split(
    datalist: PathLike,
    split: str,
    required: Sequence[str] = ("image",),
    check_files: bool = True,
    missing_ok: bool = False,
    nonempty: bool = False,
) -> list[dict[str, Any]]:
    """Items of ``split`` with absolute paths (relative ones are taken from the datalist's folder).

    Args:
        datalist: the ``datalist.json`` path.
        split: list name, e.g. ``"training"``.
        required: keys every item must have.
        check_files: every file named by a :data:`FILE_KEYS` entry must exist.
        missing_ok: a datalist without ``split`` gives ``[]`` instead of an error (unless ``nonempty``).
        nonempty: the split must hold at least one item (e.g. the validation list of a training run).

    Raises:
        FileNotFoundError: the datalist or a file it names is missing (both named).
        ValueError: not JSON, no such split, an empty split with ``nonempty``, an item that is not an object or
            lacks a ``required`` key.
    """
    path = Path(datalist).absolute()  # MONAI joins relative paths to the folder: make the result absolute
    raw = read_datalist(path)
    if split not in raw:
        if missing_ok and not nonempty:
            return []
        raise ValueError(f"{path}: no {split!r} list (has {sorted(raw)})")
    if not isinstance(raw[split], list):
        raise ValueError(f"{path}: {split!r} must be a list of items")
    if nonempty and not raw[split]:
        raise ValueError(f"{path}: the {split!r} list is empty; it needs at least one item")
    for n, item in enumerate(raw[split]):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: {split}[{n}] is not an object")
        missing = [k for k in required if not item.get(k)]
        if missing:
            raise ValueError(f"{path}: {split}[{n}] has no {' / '.join(repr(k) for k in missing)}")
    items = load_decathlon_datalist(str(path), True, split, base_dir=str(path.parent))
    for n, it in enumerate(items):
        for key in FILE_KEYS:
            v = it.get(key)
            if isinstance(v, str) and v:
                p = Path(v)
                it[key] = str(p if p.is_absolute() else (path.parent / p))
                if check_files and not Path(it[key]).exists():
                    raise FileNotFoundError(f"{path}: {split}[{n}] names {key} file {it[key]}, which does not exist")
    return [dict(it) for it in items]


def split_groups(items: Sequence[dict[str, Any]], default: str = "pathological") -> tuple[list[dict], list[dict]]:
    """(healthy items, pathological items); an item without ``group`` counts as ``default``."""
    healthy = [dict(i) for i in items if i.get("group", default) == "healthy"]
    patho = [dict(i) for i in items if i.get("group", default) == "pathological"]
    return healthy, patho


def load_groups(datalist: PathLike, split: str = "training") -> tuple[list[dict], list[dict]]:
    """(healthy items, pathological items) of ``split`` (absolute paths); both groups must be present.

    Raises:
        FileNotFoundError: the datalist or a named file does not exist.
        ValueError: the split is missing or has no healthy or no pathological item.
    """
    healthy, patho = split_groups(load_split(datalist, split), default="")
    if not healthy or not patho:
        raise ValueError(
            f"{datalist}: split {split!r} needs healthy and pathological items, has {len(healthy)} healthy and "
            f"{len(patho)} pathological"
        )
    return healthy, patho

"""The learning-curve protocol: which real pathological training scans each (K, seed) run sees.

Strict low-data protocol (issue 12): for a seed, the pathological training scans are shuffled once
(``numpy.random.default_rng(seed).permutation``) and the run with K scans keeps the first K of that order, so
subsets are nested across K (the K = 2 subset lies inside the K = 4 one, ...) and deterministic in the seed.
Every healthy training scan is kept, validation and test are kept whole. The synthesis model of the run trains
on exactly that subset datalist (its K pathological scans + the healthy ones) and the detectors of the run
train on the same K scans (+ that synthesis model's synthetic scans).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmb_synthesis.data.datalist import load_split, read_datalist
from cmb_synthesis.data.io import write_json

__all__ = ["ALL", "k_label", "resolve_k_values", "pathological_ids", "nested_subsets", "subset_datalist",
           "training_ids"]

ALL = "all"


def k_label(k: int | None) -> str:
    """``"2"``, ``"4"``, ... or ``"all"`` for ``None`` (the keys of ``results.json``)."""
    return ALL if k is None else str(int(k))


def _item_id(it: Mapping[str, Any]) -> str:
    return str(it.get("id") or Path(str(it["image"])).name)


def _split_training(datalist: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    items = load_split(datalist, "training", missing_ok=True)
    path = [it for it in items if it.get("group") == "pathological"]
    healthy = [it for it in items if it.get("group") != "pathological"]
    return path, healthy


def pathological_ids(datalist: str | os.PathLike) -> list[str]:
    """Ids of the pathological training scans of ``datalist``, in datalist order."""
    return [_item_id(it) for it in _split_training(datalist)[0]]


def resolve_k_values(k_values: Sequence[int | str | None], n_pathological: int, datalist: str | os.PathLike = "")\
        -> list[int | None]:
    """Check and order the learning curve's K values: integers in ``[1, n_pathological]``, ``None`` (or
    ``"all"``/``"null"``) for every scan; duplicates (including an integer equal to ``n_pathological`` beside
    ``None``) are dropped, ``None`` comes last.

    Raises:
        ValueError: an empty list, a K out of range or not an integer (the message names ``datalist``).
    """
    if not k_values:
        raise ValueError("k_values: give at least one K (an integer, or null for every pathological scan)")
    out: list[int | None] = []
    for k in k_values:
        if k is None or (isinstance(k, str) and k.strip().lower() in (ALL, "null", "none")):
            k = None
        else:
            try:
                if isinstance(k, bool) or int(k) != float(k):
                    raise ValueError
                k = int(k)
            except (TypeError, ValueError):
                raise ValueError(f"k_values: {k!r} is not an integer or null") from None
            if not 1 <= k <= n_pathological:
                raise ValueError(f"k_values: K={k} is out of [1, {n_pathological}] (the pathological training "
                                 f"scans of {datalist})")
            if k == n_pathological:
                k = None
        if k not in out:
            out.append(k)
    return sorted([k for k in out if k is not None]) + ([None] if None in out else [])


def nested_subsets(ids: Sequence[str], k_values: Sequence[int | None], seed: int) -> dict[str, list[str]]:
    """``{k_label: sorted ids}``: the first K scans of one seeded permutation of ``ids`` (nested across K).

    Args:
        ids: the pathological training scan ids (their order is part of the input: datalist order).
        k_values: resolved K values (:func:`resolve_k_values`).
        seed: the repeat's seed.
    """
    order = [ids[i] for i in np.random.default_rng(int(seed)).permutation(len(ids))]
    return {k_label(k): sorted(order if k is None else order[: int(k)]) for k in k_values}


def subset_datalist(datalist: str | os.PathLike, out: str | os.PathLike, n_real_pathological: int | None = None,
                    seed: int = 0, keep_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Write a datalist (absolute paths) keeping some of the pathological training scans.

    Args:
        datalist: the cohort's decathlon datalist (training with ``group`` healthy/pathological, validation, test).
        out: the subset datalist written (atomically).
        n_real_pathological: keep this many, drawn with ``seed`` (the first K of the seed's permutation, as
            :func:`nested_subsets`); ``None`` keeps every scan. Ignored when ``keep_ids`` is given.
        keep_ids: keep exactly these pathological scan ids.

    Returns:
        Counts (``n_real_pathological``, ``n_healthy``, ``n_validation``, ``n_test``) and the ids kept
        (``pathological_ids``, ``healthy_ids``).

    Raises:
        ValueError: K out of range, unknown ids, or no healthy training scans (nothing to paint CMBs on).
    """
    src = Path(datalist)
    data = {k: v for k, v in read_datalist(src).items() if not isinstance(v, list)}
    for split in ("training", "validation", "test"):
        data[split] = load_split(src, split, missing_ok=True)
    path, healthy = _split_training(src)
    ids = [_item_id(it) for it in path]
    if keep_ids is None and n_real_pathological is not None:
        k = int(n_real_pathological)
        if not 1 <= k <= len(path):
            raise ValueError(f"n_real_pathological must be in [1, {len(path)}] for {src}, got {k}")
        keep_ids = nested_subsets(ids, [k], seed)[str(k)]
    if keep_ids is not None:
        unknown = sorted(set(keep_ids) - set(ids))
        if unknown:
            raise ValueError(f"{src}: no pathological training scans with ids {unknown[:5]}")
        path = [it for it in path if _item_id(it) in set(keep_ids)]
    if not healthy:
        raise ValueError(f"{src}: the training split has no healthy scans to synthesise CMBs on")
    data["training"] = path + healthy
    write_json(data, out)
    return {"n_real_pathological": len(path), "n_healthy": len(healthy),
            "n_validation": len(data["validation"]), "n_test": len(data["test"]),
            "pathological_ids": [_item_id(it) for it in path], "healthy_ids": [_item_id(it) for it in healthy]}


def training_ids(datalist: str | os.PathLike) -> dict[str, list[str]]:
    """``{"pathological": ids, "healthy": ids}`` of a datalist's training split (what a run trained on)."""
    path, healthy = _split_training(datalist)
    return {"pathological": [_item_id(it) for it in path], "healthy": [_item_id(it) for it in healthy]}

"""Stage 1 of the detector: FRST candidates of a preprocessed scan, cached on disk by content, and the
mapping of candidate voxels between the canonical grid and the input file's grid.

Candidate targets (which lesion a candidate hits) come from the one hit rule,
:func:`cmb_synthesis.evaluation.hits.hit_lesions`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmb_synthesis.data.io import PathLike, atomic_output
from cmb_synthesis.evaluation.hits import hit_lesions
from transforms.candidates import FRSTCandidatesd

__all__ = ["CANDIDATE_CACHE_VERSION", "scan_candidates", "label_candidates"]

logger = logging.getLogger(__name__)

CANDIDATE_CACHE_VERSION = 3  # 2: spacing-noise-robust FRST footprint; 3: float32 fast FRST (scores differ ~1e-7)


def _frst_settings(frst: Mapping[str, Any] | None) -> dict[str, Any]:
    s = dict(frst or {})
    for k, v in list(s.items()):
        if isinstance(v, (list, tuple)):
            s[k] = [float(x) for x in v]
    return s


def _cache_key(image: np.ndarray, mask: np.ndarray, spacing: Sequence[float], settings: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CANDIDATE_CACHE_VERSION, "spacing": [round(float(s), 6) for s in spacing],
                         "shape": list(image.shape), "frst": settings}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(image, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    return h.hexdigest()


def scan_candidates(
    scan: Mapping[str, Any], frst: Mapping[str, Any] | None = None, cache_dir: PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """FRST candidates of a preprocessed scan (from :func:`load_scan`), cached by content.

    Args:
        scan: dict with ``image`` and ``brainmask`` (1, X, Y, Z) and ``spacing``.
        frst: keyword arguments of ``transforms.candidates.FRSTCandidatesd`` (radii_mm, beta, max_candidates, ...);
            empty: the FRST defaults tuned on the phantom training split.
        cache_dir: folder of ``<sha256>.npz`` files (None: no cache). The key covers the image and mask
            voxels, the spacing and the settings, so a changed scan or setting never reuses a stale result.

    Returns:
        ``(coords, scores)``: (N, 3) int64 voxel indices in the RAS grid of ``scan`` and (N,) FRST scores,
        strongest first.
    """
    settings = _frst_settings(frst)
    img = np.asarray(scan["image"][0], dtype=np.float32)
    mask = np.asarray(scan["brainmask"][0], dtype=np.uint8)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{_cache_key(img, mask, scan['spacing'], settings)}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    return z["coords"].astype(np.int64), z["scores"].astype(np.float64)
            except Exception:  # truncated/corrupt cache file: recompute and replace it
                logger.warning("%s: unreadable candidate cache file, recomputing", path)
    out = FRSTCandidatesd(keys="image", mask_key="brainmask", spacing=scan["spacing"], **settings)(
        {"image": img[None], "brainmask": mask[None]})
    coords, scores = np.asarray(out["candidates"], np.int64).reshape(-1, 3), np.asarray(out["candidates_score"], np.float64)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, coords=coords, scores=scores)
    return coords, scores


def label_candidates(coords: np.ndarray, instance_labels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Hit rule per candidate (:func:`cmb_synthesis.evaluation.hits.hit_lesions`):
    ``(targets (N,) float32 in {0, 1}, lesion_ids (N,) int64, 0 for none)``.

    ``instance_labels`` is (X, Y, Z) or (1, X, Y, Z) instance labels.
    """
    ids = hit_lesions(coords, instance_labels, "label_candidates")
    return (ids > 0).astype(np.float32), ids

"""The lesion bank behind the semi-random pathology masks (the paper's ``y_p`` input of ``G_HP``).

:class:`LesionBank` is built once from the pathological training label maps (``from_items`` /
``from_arrays``): every lesion (instance) cut out as the bounding-box crop of its binary mask, the
lesions-per-scan counts, a location prior (a coarse 3-D histogram of lesion centres in brain-bounding-box
coordinates, Gaussian-smoothed, plus a floor) and, when tissue maps exist, the tissue class at the lesion
centres. It is saved as ``.npz`` (no pickle) so inference on external data needs no training data.
:class:`transforms.lesion_mask.RandLesionMaskd` samples masks from it.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from .labels import as_instance_labels

__all__ = ["LesionBank", "TISSUE_CLASSES"]

logger = logging.getLogger(__name__)

TISSUE_CLASSES = ("background", "csf", "gm", "wm", "deep_gm")


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.as_tensor() if hasattr(x, "as_tensor") else x).numpy()
    return np.asarray(x)


def _spatial(x: Any) -> np.ndarray:
    """(1, X, Y, Z) or (X, Y, Z) -> (X, Y, Z) numpy."""
    a = _np(x)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"expected one channel, got shape {a.shape}")
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {a.shape}")
    return a


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.nonzero(mask)
    return np.array([i.min() for i in idx]), np.array([i.max() for i in idx])


def _normalised(coords: np.ndarray, bb_min: np.ndarray, bb_max: np.ndarray) -> np.ndarray:
    """Voxel coords -> [0, 1) position inside the brain bounding box."""
    return np.clip((coords - bb_min + 0.5) / (bb_max - bb_min + 1.0), 0.0, 1.0 - 1e-9)


class LesionBank:
    """Lesion shapes, size/count distributions and a location prior cut from pathological training scans.

    Attributes:
        shapes: list of (a, b, c) bool arrays, the bounding-box crop of each lesion's binary mask.
        sizes: (K,) int voxels per lesion (= ``shapes[k].sum()``).
        counts: (S,) int lesions per pathological scan.
        prior: (B, B, B) float probabilities (sum 1) over the brain bounding box split in B bins per axis.
        tissue_fraction: (5,) fraction of lesion centres per tissue class (0 bg, 1 CSF, 2 GM, 3 WM, 4 deep GM),
            all zero when no tissue maps were given.
        spacing: (3,) mm voxel size of the source scans (shapes are rescaled for other spacings).
    """

    def __init__(
        self,
        shapes: Sequence[np.ndarray],
        counts: Sequence[int],
        prior: np.ndarray,
        tissue_fraction: np.ndarray | None = None,
        spacing: Sequence[float] = (0.98, 0.98, 1.0),
        sources: Sequence[str] = (),
    ) -> None:
        self.shapes = [np.asarray(s, dtype=bool) for s in shapes]
        if not self.shapes:
            raise ValueError("LesionBank needs at least one lesion")
        if any(s.ndim != 3 or not s.any() for s in self.shapes):
            raise ValueError("LesionBank shapes must be non-empty 3-D masks")
        self.sizes = np.array([int(s.sum()) for s in self.shapes], dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        if self.counts.ndim != 1 or self.counts.size == 0 or (self.counts < 0).any():
            raise ValueError("LesionBank counts must be a non-empty list of non-negative integers")
        prior = np.asarray(prior, dtype=np.float64)
        if prior.ndim != 3 or (prior < 0).any() or prior.sum() <= 0:
            raise ValueError("LesionBank prior must be a non-negative 3-D histogram with positive sum")
        self.prior = prior / prior.sum()
        self.tissue_fraction = np.zeros(len(TISSUE_CLASSES)) if tissue_fraction is None else np.asarray(tissue_fraction, float)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.sources = [str(s) for s in sources]
        self.split_sources: list[str] = []  # label maps that were binary masks, split into components

    def __len__(self) -> int:
        return len(self.shapes)

    def __repr__(self) -> str:
        return (
            f"LesionBank({len(self)} lesions from {self.counts.size} scans, sizes {self.sizes.min()}-{self.sizes.max()} "
            f"voxels, counts {self.counts.min()}-{self.counts.max()}, prior {self.prior.shape})"
        )

    # ------------------------------------------------------------------ building
    @classmethod
    def from_arrays(
        cls,
        labels: Sequence[np.ndarray],
        brainmasks: Sequence[np.ndarray],
        tissues: Sequence[np.ndarray | None] | None = None,
        spacing: Sequence[float] = (0.98, 0.98, 1.0),
        bins: int = 8,
        sigma: float = 1.0,
        floor: float = 0.02,
        sources: Sequence[str] = (),
    ) -> LesionBank:
        """Build from instance label maps (X, Y, Z) (0 background), their brain masks and tissue maps.

        A label map with a single non-zero value (a binary 0/1 or 0/255 mask) is split into connected components
        (logged; the names are kept in ``split_sources``), so several CMBs never become one "lesion".

        ``bins``: prior histogram bins per axis; ``sigma``: Gaussian smoothing (bins); ``floor``: added to
        every bin as a fraction of the mean bin value, so no in-brain region has zero probability.
        """
        shapes: list[np.ndarray] = []
        counts: list[int] = []
        centres: list[np.ndarray] = []
        tissue_hist = np.zeros(len(TISSUE_CLASSES))
        split_sources: list[str] = []
        tissues = list(tissues) if tissues is not None else [None] * len(labels)
        for n, (lab, bm, tis) in enumerate(zip(labels, brainmasks, tissues)):
            name = sources[n] if n < len(sources) else f"scan {n}"
            lab, split_up = as_instance_labels(_spatial(lab), name)
            bm = _spatial(bm) > 0
            if split_up:
                logger.warning("%s: binary lesion mask split into %d connected components (one lesion each)", name,
                               int(lab.max()))
                split_sources.append(name)
            if lab.shape != bm.shape:
                raise ValueError(f"{name}: label shape {lab.shape} != brain mask shape {bm.shape}")
            if not bm.any():
                raise ValueError(f"{name}: brain mask is empty")
            bb_min, bb_max = _bbox(bm)
            ids = [int(i) for i in np.unique(lab) if i > 0]
            counts.append(len(ids))
            objs = ndimage.find_objects(lab)
            tis_arr = None if tis is None else _spatial(tis)
            for i in ids:
                sl = objs[i - 1]
                crop = lab[sl] == i
                shapes.append(crop)
                com = np.array(ndimage.center_of_mass(crop)) + np.array([s.start for s in sl])
                centres.append(_normalised(com, bb_min, bb_max))
                if tis_arr is not None:
                    c = np.clip(np.round(com).astype(int), 0, np.array(lab.shape) - 1)
                    t = int(tis_arr[tuple(c)])
                    if 0 <= t < len(TISSUE_CLASSES):
                        tissue_hist[t] += 1
        if not shapes:
            raise ValueError(f"no lesions found in {len(labels)} label maps ({', '.join(sources[:3])}...)")
        hist, _ = np.histogramdd(np.array(centres), bins=(bins,) * 3, range=[(0, 1)] * 3)
        hist = ndimage.gaussian_filter(hist, sigma=sigma, mode="constant") if sigma > 0 else hist
        hist = hist / hist.sum()
        hist = hist + floor / hist.size
        tf = tissue_hist / tissue_hist.sum() if tissue_hist.sum() > 0 else None
        bank = cls(shapes, counts, hist, tf, spacing, sources)
        bank.split_sources = split_sources
        return bank

    @classmethod
    def from_items(
        cls, items: Sequence[Mapping[str, Any]], label_key: str = "label", brainmask_key: str = "brainmask",
        tissue_key: str | None = "tissue", **kwargs: Any,
    ) -> LesionBank:
        """Build from pathological items: dicts naming ``label`` (instance labels), ``brainmask`` and optionally
        ``tissue`` files (e.g. the pathological items of a datalist split).

        Files are loaded and reoriented to RAS like :func:`transforms.pipelines.preprocessing`. ``kwargs`` go
        to :meth:`from_arrays` (bins, sigma, floor).

        Raises:
            ValueError: no item has a ``label``.
        """
        from monai.transforms import Compose, EnsureChannelFirstd, Orientationd

        from .checks import LoadImageCheckedd

        items = [i for i in items if i.get(label_key)]
        if not items:
            raise ValueError(f"LesionBank.from_items: no item has a {label_key!r} map")
        labels, masks, tissues, sources = [], [], [], []
        spacing = None
        for item in items:
            keys = [label_key, brainmask_key] + ([tissue_key] if tissue_key and item.get(tissue_key) else [])
            load = Compose(
                [
                    LoadImageCheckedd(keys, dtype=None, image_only=True),
                    EnsureChannelFirstd(keys, channel_dim=None),
                    Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
                ]
            )
            d = load({k: item[k] for k in keys})
            labels.append(_spatial(d[label_key]))
            masks.append(_spatial(d[brainmask_key]))
            tissues.append(_spatial(d[tissue_key]) if len(keys) == 3 else None)
            sources.append(str(item[label_key]))
            if spacing is None:
                spacing = np.sqrt((_np(d[label_key].affine)[:3, :3] ** 2).sum(0))
        if any(t is None for t in tissues):
            tissues = [None] * len(tissues)
        return cls.from_arrays(labels, masks, tissues, spacing=spacing, sources=sources, **kwargs)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank to ``path`` (``.npz``; a temporary file renamed into place); returns the path."""
        path = Path(path)
        dims = np.array([s.shape for s in self.shapes], dtype=np.int64)
        flat = np.concatenate([s.ravel() for s in self.shapes]).astype(np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
        # os.open with 0o666 lets the user's umask decide the mode (mkstemp would make it private)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(
                    f, shape_dims=dims, shape_data=flat, counts=self.counts, prior=self.prior,
                    tissue_fraction=self.tissue_fraction, spacing=self.spacing,
                    sources=np.array(json.dumps(self.sources)),
                )  # fmt: skip
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LesionBank:
        """Read a bank written by :meth:`save` (``allow_pickle=False``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: lesion bank not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                dims, flat = z["shape_dims"], z["shape_data"].astype(bool)
                ends = np.cumsum(dims.prod(axis=1))
                starts = np.concatenate([[0], ends[:-1]])
                shapes = [flat[a:b].reshape(d) for a, b, d in zip(starts, ends, dims)]
                return cls(
                    shapes, z["counts"], z["prior"], z["tissue_fraction"], z["spacing"],
                    json.loads(str(z["sources"])) if "sources" in z else (),
                )  # fmt: skip
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{path}: not a valid lesion bank ({e})") from e

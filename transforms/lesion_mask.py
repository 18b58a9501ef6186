"""Semi-random pathology masks for healthy scans (the paper's ``y_p`` input of ``G_HP``).

:class:`LesionBank` is built once from the pathological training label maps (``from_items``): every lesion
(instance) cut out as the bounding-box crop of its binary mask, the lesions-per-scan counts, a location prior
(a coarse 3-D histogram of lesion centres in brain-bounding-box coordinates, Gaussian-smoothed, plus a floor)
and, when tissue maps exist, the tissue class at the lesion centres. It is saved as ``.npz`` (no pickle) so
inference on external data needs no training data.

:class:`RandLesionMaskd` draws a lesion count from the bank's count distribution and, per lesion, a bank shape
(random flips / 90-degree rotations in the axial plane / scale jitter), a centre from the location prior
restricted to allowed tissue (eroded brain mask, not CSF, not background), rejecting placements that leave
allowed tissue or touch another lesion (1-voxel gap). It is a MONAI ``Randomizable``: ``set_random_state``
or ``monai.utils.set_determinism`` reproduce the same mask.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from monai.utils import get_seed
from scipy import ndimage

from .checks import filename_of
from .labels import as_instance_labels

__all__ = ["LesionBank", "RandLesionMaskd", "allowed_region", "TISSUE_CLASSES"]

logger = logging.getLogger(__name__)

TISSUE_CLASSES = ("background", "csf", "gm", "wm", "deep_gm")
DEFAULT_ALLOWED_TISSUE = (2, 3, 4)


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


def allowed_region(
    brainmask: np.ndarray,
    tissue: np.ndarray | None = None,
    image: np.ndarray | None = None,
    allowed_tissue: Sequence[int] = DEFAULT_ALLOWED_TISSUE,
    erosion: int = 1,
    csf_percentile: float = 92.0,
    csf_dilation: int = 1,
) -> np.ndarray:
    """Voxels where a lesion may lie: brain mask eroded by ``erosion`` voxels, then

    - with a tissue map: tissue class in ``allowed_tissue`` (GM, WM, deep GM: not CSF, not background);
    - without one: voxels brighter than the ``csf_percentile`` in-brain percentile of ``image``, grown by
      ``csf_dilation`` voxels, removed (CSF is bright on SWI; the margin also removes partial-volume CSF);
      ``image=None`` skips this.

    All arrays (X, Y, Z); returns bool (X, Y, Z).
    """
    bm = brainmask > 0
    allowed = ndimage.binary_erosion(bm, iterations=int(erosion)) if erosion > 0 else bm.copy()
    if tissue is not None:
        allowed &= np.isin(tissue, np.asarray(allowed_tissue))
    elif image is not None and bm.any():
        bright = image > np.percentile(image[bm], csf_percentile)
        if csf_dilation > 0:
            bright = ndimage.binary_dilation(bright, iterations=int(csf_dilation))
        allowed &= ~bright
    return allowed


class RandLesionMaskd(Randomizable, MapTransform):
    """Sample a semi-random instance mask of CMB-like lesions for a healthy scan.

    Input: ``data[keys[0]]`` (1, X, Y, Z) image (used for its grid/affine and, without a tissue map, to exclude
    bright CSF), ``data[brainmask_key]`` (1, X, Y, Z) 0/1, optional ``data[tissue_key]`` (1, X, Y, Z) classes.
    Output: ``data[output_key]`` (1, X, Y, Z) instance labels 1..n (``dtype``, default int32 like
    :func:`transforms.pipelines.preprocessing` labels), a MetaTensor with the image's meta; the number of
    lesions placed goes to ``data[f"{output_key}_n_lesions"]``.

    Args:
        bank: a :class:`LesionBank` or the path of a saved ``.npz``.
        n_lesions: fixed lesion count (None: drawn from ``bank.counts``, at least ``min_lesions``).
        scale_range: uniform scale jitter per lesion (nearest zoom; a lesion keeps at least one voxel).
        rotate90, flip: random 90-degree rotations / flips in the axial plane (axes 0, 1).
        gap: minimum distance in voxels between lesions (1: lesions never touch, not even diagonally).
        max_tries: placement attempts per lesion before giving up on it (logged).
        erosion, allowed_tissue, csf_percentile, csf_dilation: see :func:`allowed_region`.
        match_spacing: rescale bank shapes by ``bank.spacing / image spacing`` (from the image affine).
        tissue_prior: with a tissue map and a bank that has ``tissue_fraction``, also weight centres so the
            tissue class of the sampled centres follows the training lesions' (each allowed class keeps at
            least ``tissue_floor`` of the weight, so no allowed tissue is impossible).
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        brainmask_key: str = "brainmask",
        tissue_key: str | None = "tissue",
        output_key: str = "label",
        bank: LesionBank | str | os.PathLike | None = None,
        n_lesions: int | None = None,
        min_lesions: int = 1,
        scale_range: tuple[float, float] = (0.85, 1.15),
        rotate90: bool = True,
        flip: bool = True,
        gap: int = 1,
        max_tries: int = 50,
        erosion: int = 1,
        allowed_tissue: Sequence[int] = DEFAULT_ALLOWED_TISSUE,
        csf_percentile: float = 92.0,
        csf_dilation: int = 1,
        match_spacing: bool = True,
        tissue_prior: bool = True,
        tissue_floor: float = 0.05,
        dtype: torch.dtype = torch.int32,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if bank is None:
            raise ValueError("RandLesionMaskd needs a LesionBank (or the path of a saved one)")
        self.bank = bank if isinstance(bank, LesionBank) else LesionBank.load(bank)
        self.brainmask_key, self.tissue_key, self.output_key = brainmask_key, tissue_key, output_key
        self.n_lesions, self.min_lesions = n_lesions, int(min_lesions)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.rotate90, self.flip, self.gap, self.max_tries = rotate90, flip, int(gap), int(max_tries)
        self.erosion, self.allowed_tissue, self.csf_percentile = int(erosion), tuple(allowed_tissue), csf_percentile
        self.csf_dilation = int(csf_dilation)
        self.match_spacing, self.dtype = match_spacing, dtype
        self.tissue_prior, self.tissue_floor = tissue_prior, float(tissue_floor)
        counts = self.bank.counts[self.bank.counts >= self.min_lesions]
        self._counts = counts if counts.size else np.array([max(self.min_lesions, 1)])
        self.set_random_state(seed=get_seed())  # like monai Compose: honours monai.utils.set_determinism

    def randomize(self, data: Any = None) -> None:
        """Draw the lesion count (the per-lesion draws happen during placement, from the same ``self.R``)."""
        self._n = int(self.n_lesions) if self.n_lesions is not None else int(self.R.choice(self._counts))

    def _shape(self, zoom: np.ndarray) -> np.ndarray:
        s = self.bank.shapes[int(self.R.randint(len(self.bank)))]
        if self.flip:
            for ax in (0, 1):
                if self.R.rand() < 0.5:
                    s = np.flip(s, axis=ax)
        if self.rotate90:
            s = np.rot90(s, k=int(self.R.randint(4)), axes=(0, 1))
        f = zoom * self.R.uniform(*self.scale_range)
        if np.allclose(f, 1.0):
            return np.ascontiguousarray(s)
        z = ndimage.zoom(s.astype(np.uint8), f, order=0, mode="nearest", grid_mode=True) > 0
        return z if z.any() else np.ascontiguousarray(s)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.first_key(d)
        if key == []:
            raise ValueError(f"RandLesionMaskd: none of {self.keys} in the data")
        img = d[key]
        name = filename_of(img)
        if self.brainmask_key not in d:
            raise ValueError(f"{name}: RandLesionMaskd needs a brain mask ({self.brainmask_key!r})")
        bm = _spatial(d[self.brainmask_key])
        tissue = _spatial(d[self.tissue_key]) if self.tissue_key and self.tissue_key in d else None
        image = _spatial(img).astype(np.float32)
        if bm.shape != image.shape:
            raise ValueError(f"{name}: brain mask shape {bm.shape} != image shape {image.shape}")
        if not (bm > 0).any():
            raise ValueError(f"{name}: brain mask is empty, nowhere to place lesions")
        allowed = allowed_region(
            bm, tissue, image, self.allowed_tissue, self.erosion, self.csf_percentile, self.csf_dilation
        )
        if not allowed.any():
            raise ValueError(f"{name}: no allowed tissue for lesions (brain mask too small or all CSF)")
        zoom = np.ones(3)
        if self.match_spacing and getattr(img, "affine", None) is not None:
            sp = np.sqrt((_np(img.affine)[:3, :3] ** 2).sum(0))
            zoom = self.bank.spacing / np.where(sp > 0, sp, 1.0)
        self.randomize(d)
        out, n_placed = self.sample(allowed, bm > 0, zoom, self._n, tissue)
        if n_placed < self._n:
            logger.info("%s: placed %d of %d lesions", name, n_placed, self._n)
        t = torch.as_tensor(out[None]).to(self.dtype)
        d[self.output_key] = MetaTensor(t, meta=dict(img.meta)) if isinstance(img, MetaTensor) else t
        d[f"{self.output_key}_n_lesions"] = n_placed
        return d

    def _tissue_weights(self, coords: np.ndarray, tissue: np.ndarray | None) -> np.ndarray | None:
        tf = self.bank.tissue_fraction
        if not self.tissue_prior or tissue is None or tf.sum() <= 0:
            return None
        t = tissue[tuple(coords.T)].astype(np.int64)
        t = np.clip(t, 0, len(tf) - 1)
        share = np.bincount(t, minlength=len(tf)) / len(t)  # class shares among allowed voxels
        classes = np.unique(t)
        target = np.zeros(len(tf))
        target[classes] = tf[classes] / max(tf[classes].sum(), 1e-12)
        target[classes] = (1 - self.tissue_floor) * target[classes] + self.tissue_floor / len(classes)
        w = np.zeros(len(tf))
        w[classes] = target[classes] / share[classes]
        return w[t]

    def sample(
        self, allowed: np.ndarray, brain: np.ndarray, zoom: np.ndarray, n: int, tissue: np.ndarray | None = None
    ) -> tuple[np.ndarray, int]:
        """Place ``n`` lesions in ``allowed`` (X, Y, Z) bool; returns (instance map int32, number placed).

        Centre voxel probability: ``prior(bin) / (allowed voxels in the bin)`` (bins drawn with the location
        prior), times the tissue weight when a tissue map is given (see ``tissue_prior``).
        """
        shape = np.array(allowed.shape)
        bb_min, bb_max = _bbox(brain)
        coords = np.argwhere(allowed)
        bins = self.bank.prior.shape[0]
        b = np.floor(_normalised(coords, bb_min, bb_max) * bins).astype(int)
        p = self.bank.prior[b[:, 0], b[:, 1], b[:, 2]]
        # each voxel: prior(bin) / (allowed voxels in that bin) -> bins sampled with the prior
        flat_bin = np.ravel_multi_index(b.T, self.bank.prior.shape)
        per_bin = np.bincount(flat_bin, minlength=self.bank.prior.size)
        p = p / per_bin[flat_bin]
        tw = self._tissue_weights(coords, tissue)
        if tw is not None:
            p = p * tw
        p = p / p.sum()
        cdf = np.cumsum(p)
        out = np.zeros(allowed.shape, dtype=np.int32)
        blocked = np.zeros(allowed.shape, dtype=bool)  # lesions dilated by the gap
        struct = ndimage.generate_binary_structure(3, 3)
        placed = 0
        for _ in range(int(n)):
            for _try in range(self.max_tries):
                les = self._shape(zoom)
                c = coords[min(int(np.searchsorted(cdf, self.R.rand() * cdf[-1])), len(coords) - 1)]
                lo = c - np.array(les.shape) // 2
                hi = lo + np.array(les.shape)
                if (lo < 0).any() or (hi > shape).any():
                    continue
                sl = tuple(slice(a, b_) for a, b_ in zip(lo, hi))
                if not allowed[sl][les].all() or blocked[sl][les].any():
                    continue
                placed += 1
                out[sl][les] = placed
                g = self.gap
                glo, ghi = np.maximum(lo - g, 0), np.minimum(hi + g, shape)
                gsl = tuple(slice(a, b_) for a, b_ in zip(glo, ghi))
                region = out[gsl] == placed
                blocked[gsl] |= ndimage.binary_dilation(region, struct, iterations=g) if g > 0 else region
                break
        return out, placed

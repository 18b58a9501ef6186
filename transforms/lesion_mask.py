"""Semi-random pathology masks for healthy scans (the paper's ``y_p`` input of ``G_HP``).

:class:`RandLesionMaskd` samples from a :class:`transforms.lesion_bank.LesionBank`: it draws a lesion count
from the bank's count distribution and, per lesion, a bank shape (random flips / 90-degree rotations in the axial plane / scale jitter), a centre from the location prior
restricted to allowed tissue (eroded brain mask, not CSF, not background), rejecting placements that leave
allowed tissue or touch another lesion (1-voxel gap). It is a MONAI ``Randomizable``: ``set_random_state``
or ``monai.utils.set_determinism`` reproduce the same mask.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from monai.utils import get_seed
from scipy import ndimage

from .checks import filename_of
from .lesion_bank import TISSUE_CLASSES, LesionBank, _bbox, _normalised, _np, _spatial

__all__ = ["LesionBank", "LesionAllowedRegiond", "RandLesionMaskd", "allowed_region", "TISSUE_CLASSES"]

logger = logging.getLogger(__name__)

DEFAULT_ALLOWED_TISSUE = (2, 3, 4)


def allowed_region(
    brainmask: np.ndarray,
    tissue: np.ndarray | None = None,
    image: np.ndarray | None = None,
    allowed_tissue: Sequence[int] = DEFAULT_ALLOWED_TISSUE,
    erosion: int = 1,
    csf_percentile: float = 92.0,
    csf_dilation: int = 1,
    dark_percentile: float | None = None,
    dark_gap: int = 2,
    dark_smoothing: float = 1.0,
) -> np.ndarray:
    """Voxels where a lesion may lie: brain mask eroded by ``erosion`` voxels, then

    - with a tissue map: tissue class in ``allowed_tissue`` (GM, WM, deep GM: not CSF, not background);
    - without one: voxels brighter than the ``csf_percentile`` in-brain percentile of ``image``, grown by
      ``csf_dilation`` voxels, removed (CSF is bright on SWI; the margin also removes partial-volume CSF);
      ``image=None`` skips this.
    - with ``dark_percentile`` (and ``image``): dark structures and the ``dark_gap`` voxels around them removed,
      i.e. voxels of the image smoothed with a Gaussian of ``dark_smoothing`` voxels (so noise does not count)
      below its ``dark_percentile`` in-brain percentile. On SWI these are veins, existing CMBs and mineralisation:
      a CMB is not painted onto or against a vein (the phantom keeps its CMBs 2 mm from veins; on the default
      cohort the 5th percentile covers 86 % of the vein voxels and removes 8 % of the other tissue).

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
    if dark_percentile is not None and image is not None and bm.any():
        smooth = image.astype(np.float32)
        if dark_smoothing > 0:  # the dark background blurs into the brain's outer voxels: they are avoided too
            smooth = ndimage.gaussian_filter(smooth, float(dark_smoothing))
        dark = (smooth < np.percentile(smooth[bm], float(dark_percentile))) & bm
        if dark_gap > 0:
            dark = ndimage.binary_dilation(dark, iterations=int(dark_gap))
        allowed &= ~dark
    return allowed


def _require_some(allowed: np.ndarray, name: str) -> np.ndarray:
    """``allowed`` itself, or a ValueError naming the file when no voxel is allowed."""
    if not allowed.any():
        raise ValueError(f"{name}: no allowed tissue for lesions (brain mask too small, all CSF or all dark)")
    return allowed


class LesionAllowedRegiond(MapTransform):
    """Where lesions may be placed (:func:`allowed_region`), as a deterministic dictionary transform.

    Input: ``data[keys[0]]`` (1, X, Y, Z) image in [0, 1] (for the CSF and dark-structure rules),
    ``data[brainmask_key]`` (1, X, Y, Z) 0/1, optional ``data[tissue_key]`` (1, X, Y, Z) classes.
    Output: ``data[output_key]`` (1, X, Y, Z) uint8, 1 where a lesion may lie.

    Being deterministic, it runs once per volume inside a MONAI ``CacheDataset`` placed before
    :class:`RandLesionMaskd` (``allowed_key``), which then samples masks without recomputing the region (the
    region's erosions and smoothing were about 60 % of a sample's time). :class:`RandLesionMaskd` uses the same
    class for its own region when the data carry none, so the options mean the same in both places.

    Args: see :func:`allowed_region`.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        brainmask_key: str = "brainmask",
        tissue_key: str | None = "tissue",
        output_key: str = "lesion_allowed",
        allowed_tissue: Sequence[int] = DEFAULT_ALLOWED_TISSUE,
        erosion: int = 1,
        csf_percentile: float = 92.0,
        csf_dilation: int = 1,
        dark_percentile: float | None = None,
        dark_gap: int = 2,
        dark_smoothing: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.brainmask_key, self.tissue_key, self.output_key = brainmask_key, tissue_key, output_key
        self.erosion, self.allowed_tissue, self.csf_percentile = int(erosion), tuple(allowed_tissue), csf_percentile
        self.csf_dilation = int(csf_dilation)
        self.dark_percentile = None if dark_percentile is None else float(dark_percentile)
        self.dark_gap, self.dark_smoothing = int(dark_gap), float(dark_smoothing)

    def region(self, data: Mapping[Hashable, Any]) -> np.ndarray:
        """The allowed region of ``data`` as bool (X, Y, Z); ValueError naming the file when there is none."""
        key = self.first_key(data)
        if key == []:
            raise ValueError(f"{type(self).__name__}: none of {self.keys} in the data")
        img = data[key]
        name = filename_of(img)
        if self.brainmask_key not in data:
            raise ValueError(f"{name}: placing lesions needs a brain mask ({self.brainmask_key!r})")
        bm = _spatial(data[self.brainmask_key])
        tissue = _spatial(data[self.tissue_key]) if self.tissue_key and self.tissue_key in data else None
        image = _spatial(img).astype(np.float32)
        if bm.shape != image.shape:
            raise ValueError(f"{name}: brain mask shape {bm.shape} != image shape {image.shape}")
        if not (bm > 0).any():
            raise ValueError(f"{name}: brain mask is empty, nowhere to place lesions")
        allowed = allowed_region(
            bm, tissue, image, self.allowed_tissue, self.erosion, self.csf_percentile, self.csf_dilation,
            self.dark_percentile, self.dark_gap, self.dark_smoothing,
        )
        return _require_some(allowed, name)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d[self.output_key] = torch.as_tensor(self.region(d)[None].astype(np.uint8))
        return d


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
        erosion, allowed_tissue, csf_percentile, csf_dilation, dark_percentile, dark_gap, dark_smoothing: see
            :func:`allowed_region` (``dark_percentile`` None: dark structures are not avoided).
        allowed_key: a key holding the allowed region precomputed by :class:`LesionAllowedRegiond` with the same
            options (e.g. cached once per volume by a ``CacheDataset``); used when the data carry it, otherwise
            the region is computed here at every call.
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
        dark_percentile: float | None = None,
        dark_gap: int = 2,
        dark_smoothing: float = 1.0,
        match_spacing: bool = True,
        tissue_prior: bool = True,
        tissue_floor: float = 0.05,
        dtype: torch.dtype = torch.int32,
        allowed_key: str | None = None,
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
        self.allowed_key = allowed_key
        self.region = LesionAllowedRegiond(
            keys, brainmask_key, tissue_key, allowed_key or "lesion_allowed", allowed_tissue, erosion, csf_percentile,
            csf_dilation, dark_percentile, dark_gap, dark_smoothing, allow_missing_keys,
        )
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
        if self.allowed_key is not None and self.allowed_key in d:
            if self.brainmask_key not in d:
                raise ValueError(f"{name}: placing lesions needs a brain mask ({self.brainmask_key!r})")
            allowed = _spatial(d[self.allowed_key]) > 0
            if allowed.shape != _spatial(img).shape:
                raise ValueError(f"{name}: allowed region shape {allowed.shape} != image shape {_spatial(img).shape}")
            _require_some(allowed, name)
        else:
            allowed = self.region.region(d)
        bm = _spatial(d[self.brainmask_key])
        tissue = _spatial(d[self.tissue_key]) if self.tissue_key and self.tissue_key in d else None
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

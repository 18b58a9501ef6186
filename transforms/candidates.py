"""FRST-based CMB candidate proposal: local maxima of the 3-D FRST map inside the brain mask with non-maximum
suppression over ``min_distance_mm``, snapped to the darkest nearby voxel, sorted and capped
(:func:`find_candidates`), and :class:`FRSTCandidatesd`, the MONAI dictionary transform doing the map and the
candidates. Defaults (:mod:`transforms.frst`) were tuned on the phantom training split (``docs/frst.md``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from transforms.frst import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_MAX_CANDIDATES,
    DEFAULT_MIN_DISTANCE_MM,
    DEFAULT_PRESMOOTH_SIGMA_MM,
    DEFAULT_RADII_MM,
    DEFAULT_SNAP_RADIUS_MM,
    _mask_box,
    auto_backend,
    frst_3d,
)
from transforms.spacing import half_widths, snap_spacing, within_radius

__all__ = ["find_candidates", "snap_to_darkest", "spacing_from_affine", "FRSTCandidatesd"]


def _ellipsoid_footprint(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Boolean ellipsoid of ``radius_mm`` in voxel units of ``spacing`` (at least 3 voxels wide per axis).

    Robust to floating-point noise in ``spacing`` (snapped to 1e-6 mm; exact ratios and boundary voxels kept,
    see :mod:`transforms.spacing`)."""
    spacing = snap_spacing(spacing)
    half = half_widths(radius_mm, spacing, minimum=1)
    offsets = np.stack(np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij"), axis=-1)
    return within_radius(offsets, spacing, max(radius_mm, max(spacing)))


#: above this many voxels passing the face-neighbour test, a separable box maximum filter thins them first
_MANY_MAXIMA = 100_000


def _inscribed_box(fp: np.ndarray) -> tuple[int, int, int]:
    """Half-widths ``(a, b, c)`` of the largest centred box ``[-a, a] x [-b, b] x [-c, c]`` inside the
    footprint ``fp`` (odd shape, centred)."""
    h = [s // 2 for s in fp.shape]
    best, best_vol = (0, 0, 0), 0
    for a in range(h[0] + 1):
        for b in range(h[1] + 1):
            for c in range(h[2] + 1):
                if fp[h[0] - a:h[0] + a + 1, h[1] - b:h[1] + b + 1, h[2] - c:h[2] + c + 1].all():
                    if (2 * a + 1) * (2 * b + 1) * (2 * c + 1) > best_vol:
                        best, best_vol = (a, b, c), (2 * a + 1) * (2 * b + 1) * (2 * c + 1)
    return best


def _local_maxima(fmap: np.ndarray, fp: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(N, 3) int64 voxels, in C order, of ``candidates & (fmap >= maximum_filter(fmap, footprint=fp,
    mode='constant', cval=-inf))``, exactly.

    A voxel must first be at least as large as its face neighbours that lie in the footprint (six shifted
    comparisons over the candidates' bounding box); the few voxels that pass are then compared with the
    remaining footprint offsets one offset at a time, nearest first (a maximum is exact in any dtype, so
    this equals the full maximum filter, ties included). When very many voxels pass the first test (a map of
    noise), a separable maximum filter over the largest box inside the footprint thins them first."""
    h = np.array(fp.shape) // 2
    shape = np.array(fmap.shape)
    box = _mask_box(candidates, h)
    if box is None:
        return np.zeros((0, 3), np.int64)
    lo = np.array([b.start for b in box])
    sub, keep = fmap[box], candidates[box].copy()
    done = np.zeros(fp.shape, bool)
    done[tuple(h)] = True
    for ax in range(3):
        n = sub.shape[ax]
        for d in (-1, 1):
            nb = h.copy()
            nb[ax] += d
            if n < 2 or not fp[tuple(nb)]:
                continue
            done[tuple(nb)] = True
            a = tuple(slice(1, n) if i == ax else slice(None) for i in range(3))  # voxels with a neighbour at -1
            b = tuple(slice(0, n - 1) if i == ax else slice(None) for i in range(3))
            if d == -1:
                keep[a] &= sub[a] >= sub[b]
            else:
                keep[b] &= sub[b] >= sub[a]
    if np.count_nonzero(keep) > _MANY_MAXIMA:  # e.g. a noise-only map: first the largest box in the footprint
        a, b, c = _inscribed_box(fp)
        bmax = ndimage.maximum_filter(sub, size=(2 * a + 1, 2 * b + 1, 2 * c + 1), mode="constant", cval=-np.inf)
        keep &= sub >= bmax
        del bmax
        done[h[0] - a:h[0] + a + 1, h[1] - b:h[1] + b + 1, h[2] - c:h[2] + c + 1] = True
    pts = np.argwhere(keep) + lo  # full-volume coordinates, C order
    vals = fmap[tuple(pts.T)]
    offsets = np.argwhere(fp & ~done) - h
    offsets = offsets[np.argsort((offsets**2).sum(1), kind="stable")]
    for off in offsets:
        if not len(pts):
            break
        q = pts + off
        inside = np.all((q >= 0) & (q < shape), axis=1)
        ok = np.ones(len(pts), bool)
        ok[inside] = vals[inside] >= fmap[tuple(q[inside].T)]
        pts, vals = pts[ok], vals[ok]
    return pts.astype(np.int64)


def snap_to_darkest(
    coords: np.ndarray, image: np.ndarray, spacing: Sequence[float], radius_mm: float, mask: np.ndarray | None = None
) -> np.ndarray:
    """Move each candidate (N, 3) to the darkest voxel of ``image`` within ``radius_mm`` (inside ``mask``).

    Local FRST maxima of very small lesions can sit a voxel off the lesion; snapping puts the candidate on
    the hypointense core. Returns new (N, 3) int64 coordinates (candidates that coincide are kept, the
    caller may deduplicate).
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 3)
    if radius_mm <= 0 or len(coords) == 0:
        return coords
    fp = _ellipsoid_footprint(radius_mm, spacing)
    offs = np.argwhere(fp) - np.array(fp.shape) // 2  # (K, 3)
    pts = coords[:, None, :] + offs[None, :, :]  # (N, K, 3)
    shape = np.array(image.shape)
    inside = np.all((pts >= 0) & (pts < shape), axis=2)
    pts_c = np.clip(pts, 0, shape - 1)
    vals = image[pts_c[..., 0], pts_c[..., 1], pts_c[..., 2]].astype(np.float64)
    if mask is not None:
        inside &= mask[pts_c[..., 0], pts_c[..., 1], pts_c[..., 2]] > 0
    vals[~inside] = np.inf
    best = np.argmin(vals, axis=1)
    return pts_c[np.arange(len(coords)), best]


def find_candidates(
    frst_map: np.ndarray | torch.Tensor,
    brainmask: np.ndarray | torch.Tensor | None,
    spacing: Sequence[float] = (0.98, 0.98, 1.0),
    min_distance_mm: float = DEFAULT_MIN_DISTANCE_MM,
    max_candidates: int | None = DEFAULT_MAX_CANDIDATES,
    threshold: float = 0.0,
    image: np.ndarray | torch.Tensor | None = None,
    snap_radius_mm: float = DEFAULT_SNAP_RADIUS_MM,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate voxels: local maxima of ``frst_map`` inside ``brainmask``, strongest first.

    A voxel is a candidate when it equals the maximum of the map over an ellipsoid of radius
    ``min_distance_mm`` (non-maximum suppression: the result of ``scipy.ndimage.maximum_filter`` with the
    ellipsoid as footprint, computed exactly and much faster by :func:`_local_maxima`), lies inside the
    brain mask and scores above ``threshold``. Candidates are sorted by
    decreasing score and the first ``max_candidates`` kept. With ``image`` and ``snap_radius_mm > 0`` each
    kept candidate is moved to the darkest voxel within that radius (duplicates after snapping are merged,
    keeping the higher score).

    Args:
        frst_map: (X, Y, Z) or (1, X, Y, Z) map (e.g. from :func:`frst_3d`).
        brainmask: same shape, non-zero inside the brain; ``None`` means the whole volume.

    Returns:
        ``(coords, scores)``: (N, 3) int64 voxel indices and (N,) float64 scores, N <= max_candidates.
    """
    fmap = frst_map.detach().cpu().numpy() if isinstance(frst_map, torch.Tensor) else np.asarray(frst_map)
    if fmap.ndim == 4 and fmap.shape[0] == 1:
        fmap = fmap[0]
    if fmap.ndim != 3:
        raise ValueError(f"find_candidates: expected a 3-D map, got shape {fmap.shape}")
    if not np.issubdtype(fmap.dtype, np.floating):
        fmap = fmap.astype(np.float64)
    if brainmask is not None:
        bm = brainmask.detach().cpu().numpy() if isinstance(brainmask, torch.Tensor) else np.asarray(brainmask)
        if bm.ndim == 4 and bm.shape[0] == 1:
            bm = bm[0]
        if bm.shape != fmap.shape:
            raise ValueError(f"find_candidates: brain mask shape {bm.shape} differs from map shape {fmap.shape}")
        bm = bm > 0
    else:
        bm = np.ones(fmap.shape, dtype=bool)
    fp = _ellipsoid_footprint(min_distance_mm, spacing)
    coords = _local_maxima(fmap, fp, bm & (fmap > threshold))  # C order, as np.argwhere
    scores = fmap[tuple(coords.T)].astype(np.float64)
    order = np.argsort(-scores, kind="stable")
    coords, scores = coords[order], scores[order]
    if max_candidates is not None and len(coords) > max_candidates:
        coords, scores = coords[:max_candidates], scores[:max_candidates]
    if image is not None and snap_radius_mm > 0 and len(coords):
        img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if img.ndim == 4 and img.shape[0] == 1:
            img = img[0]
        coords = snap_to_darkest(coords, img, spacing, snap_radius_mm, bm)
        _, first = np.unique(coords, axis=0, return_index=True)  # sorted by score: first = best
        keep = np.sort(first)
        coords, scores = coords[keep], scores[keep]
    return coords, scores.astype(np.float64)


def spacing_from_affine(affine: Any) -> tuple[float, float, float]:
    """Voxel spacing (mm) of a 4x4 affine: the norms of its first three columns."""
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((a[:3, :3] ** 2).sum(axis=0)))


class FRSTCandidatesd(MapTransform):
    """Dictionary transform: FRST candidates of a channel-first image inside its brain mask.

    Reads ``data[key]`` (1, X, Y, Z) (a MetaTensor's affine gives the spacing unless ``spacing`` is set)
    and ``data[mask_key]`` (1, X, Y, Z) and writes ``data[output_key]`` (N, 3) int64 voxel indices and
    ``data[output_key + "_score"]`` (N,) float64 FRST scores, strongest first; with ``map_key`` also the
    FRST map (1, X, Y, Z) float32. The FRST and candidate settings are those of :func:`frst_3d` and
    :func:`find_candidates` (defaults: the tuned ones). Speed settings (they change the map by float noise
    at most, ~1e-7 relative, and the candidates at most by ties, see ``docs/frst.md``):

    * ``backend``: ``None``/``"auto"`` (default) runs the torch backend on CUDA when a GPU is available and
      the numpy backend otherwise; ``"torch"`` runs on the image's device, ``"numpy"`` on the CPU;
    * ``dtype``: ``None`` (default) computes in float32; ``numpy.float64`` is the exact reference;
    * ``workers``: numpy threads, ``None`` (default): :func:`transforms.frst.default_workers`;
    * ``crop``: compute over the brain mask's bounding box plus :func:`transforms.frst.frst_margin` only
      (default; exact).

    Only one image key is supported (the candidates belong to one scan).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str | None = "brainmask",
        output_key: str = "candidates",
        radii_mm: Sequence[float] = DEFAULT_RADII_MM,
        alpha: float = DEFAULT_ALPHA,
        beta: float = DEFAULT_BETA,
        presmooth_sigma_mm: float = DEFAULT_PRESMOOTH_SIGMA_MM,
        min_distance_mm: float = DEFAULT_MIN_DISTANCE_MM,
        max_candidates: int | None = DEFAULT_MAX_CANDIDATES,
        threshold: float = 0.0,
        snap_radius_mm: float = DEFAULT_SNAP_RADIUS_MM,
        spacing: Sequence[float] | None = None,
        backend: str | None = None,
        map_key: str | None = None,
        dtype: Any = None,
        workers: int | None = None,
        allow_missing_keys: bool = False,
        crop: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"FRSTCandidatesd: exactly one image key expected, got {self.keys}")
        self.mask_key = mask_key
        self.output_key = output_key
        if backend not in (None, "auto", "numpy", "torch"):
            raise ValueError(f"FRSTCandidatesd: backend must be None, 'auto', 'numpy' or 'torch', got {backend!r}")
        self.frst_kwargs = dict(radii_mm=tuple(radii_mm), alpha=alpha, beta=beta, presmooth_sigma_mm=presmooth_sigma_mm,
                                backend=backend or "auto", dtype=np.float32 if dtype is None else dtype,
                                workers=workers, crop=crop)
        self.cand_kwargs = dict(min_distance_mm=min_distance_mm, max_candidates=max_candidates, threshold=threshold,
                                snap_radius_mm=snap_radius_mm)
        self.spacing = tuple(spacing) if spacing is not None else None
        self.map_key = map_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = _source_name(img, key)
            if img.ndim != 4 or img.shape[0] != 1:
                raise ValueError(f"{name}: FRSTCandidatesd expects a channel-first (1, X, Y, Z) image, got {tuple(img.shape)}")
            spacing = self.spacing
            if spacing is None:
                affine = getattr(img, "affine", None)
                spacing = spacing_from_affine(affine) if affine is not None else (1.0, 1.0, 1.0)
            mask = None
            if self.mask_key is not None:
                if self.mask_key not in d:
                    raise ValueError(f"{name}: mask key {self.mask_key!r} missing from the data dictionary")
                mask = d[self.mask_key]
                if tuple(mask.shape[-3:]) != tuple(img.shape[-3:]):
                    raise ValueError(f"{name}: brain mask shape {tuple(mask.shape)} differs from image {tuple(img.shape)}")
            vol = img[0]
            backend = self.frst_kwargs["backend"]
            if backend == "auto":
                backend = auto_backend()[0]
            if backend == "numpy" and isinstance(vol, torch.Tensor):
                vol = vol.detach().cpu().numpy()
            mk = None
            if mask is not None:
                mk = mask[0] > 0
                if backend == "torch" and not isinstance(mk, torch.Tensor):
                    mk = torch.as_tensor(np.asarray(mk))
            fmap = frst_3d(vol, spacing=spacing, mask=mk, **self.frst_kwargs)
            coords, scores = find_candidates(fmap, mk, spacing, image=vol, **self.cand_kwargs)
            d[self.output_key] = coords
            d[f"{self.output_key}_score"] = scores
            if self.map_key is not None:
                m = fmap.detach().cpu().numpy() if isinstance(fmap, torch.Tensor) else fmap
                d[self.map_key] = m[None].astype(np.float32)
        return d


def _source_name(img: Any, key: Hashable) -> str:
    meta = getattr(img, "meta", None)
    if isinstance(meta, Mapping):
        src = meta.get("filename_or_obj")
        if src:
            return str(src)
    return f"data[{key!r}]"

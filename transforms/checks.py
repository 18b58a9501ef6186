"""Bad-input checks for SWI volumes and their masks; every error names the file and the problem.

:class:`LoadImageCheckedd` is MONAI's ``LoadImaged`` whose reader failures (file missing, not an image) are
re-raised naming the file; :class:`CheckSWId` runs after ``EnsureChannelFirstd`` (and ``Orientationd``) and
rejects what would silently break training or inference.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImaged, MapTransform

__all__ = ["CheckSWId", "LoadImageCheckedd", "filename_of"]


def filename_of(x: Any, default: str = "<array>") -> str:
    """``meta["filename_or_obj"]`` of a MetaTensor (the file it was loaded from), else ``default``."""
    meta = getattr(x, "meta", None) or {}
    return str(meta.get("filename_or_obj", default))


class LoadImageCheckedd(LoadImaged):
    """``monai.transforms.LoadImaged`` that names the file in every error.

    A missing file raises ``FileNotFoundError("<path>: file not found")``; a file no reader can read (not an
    image, truncated, wrong format) raises ``ValueError("<path>: cannot read image (...)")``.
    """

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        try:
            return super().__call__(data, reader)
        except Exception as e:
            names = [str(data[k]) for k in self.key_iterator(dict(data)) if isinstance(data[k], (str, bytes)) or hasattr(data[k], "__fspath__")]
            import os

            missing = [n for n in names if not os.path.exists(n)]
            if missing:
                raise FileNotFoundError(f"{missing[0]}: file not found") from e
            raise ValueError(f"{', '.join(names) or '<data>'}: cannot read image ({type(e).__name__}: {e})") from e


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _affine(x: Any) -> np.ndarray | None:
    aff = getattr(x, "affine", None)
    return None if aff is None else _np(aff).astype(np.float64)


class CheckSWId(MapTransform):
    """Validate channel-first SWI images and their masks; raise ``ValueError`` naming the file and problem.

    Expected after ``EnsureChannelFirstd``: ``data[key]`` of shape (1, X, Y, Z) (a single 3-D volume).

    Checks, for every image key: 3 spatial dims; one channel (a 4-D series with several volumes is refused);
    all voxels finite (no NaN / Inf); not constant. For every ``mask_keys`` entry (brain masks): same spatial
    shape and affine (``atol``) as the first image, values only 0/1, not empty. For every ``binary_keys``
    entry (other 0/1 masks, e.g. veins): same shape/affine, values only 0/1 (may be empty). ``label_keys``
    (instance maps): same shape/affine, non-negative integers.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        mask_keys: Sequence[str] = (),
        binary_keys: Sequence[str] = (),
        label_keys: Sequence[str] = (),
        atol: float = 1e-3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_keys, self.binary_keys, self.label_keys = tuple(mask_keys), tuple(binary_keys), tuple(label_keys)
        self.atol = float(atol)

    def _check_image(self, img: Any) -> None:
        name = filename_of(img)
        shape = tuple(img.shape)
        if len(shape) != 4:
            raise ValueError(f"{name}: expected a 3-D volume (channel-first shape (1, X, Y, Z)), got array shape {shape}")
        if shape[0] != 1:
            raise ValueError(
                f"{name}: 4-D series with {shape[0]} volumes (shape {shape}); give one 3-D volume per file"
            )
        if min(shape[1:]) < 2:
            raise ValueError(f"{name}: expected a 3-D volume, got spatial shape {shape[1:]} (a 2-D slice?)")
        arr = _np(img)
        finite = np.isfinite(arr)
        if not finite.all():
            n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
            raise ValueError(f"{name}: {n_nan} NaN and {n_inf} Inf voxels; image must be finite")
        if float(arr.max()) == float(arr.min()):
            raise ValueError(f"{name}: constant image (all voxels {float(arr.min())}); nothing to rescale")

    def _check_same_grid(self, ref: Any, other: Any, key: str) -> None:
        name, ref_name = filename_of(other, key), filename_of(ref)
        if tuple(other.shape[1:]) != tuple(ref.shape[1:]) or other.shape[0] != 1:
            raise ValueError(
                f"{name}: {key} shape {tuple(other.shape)} does not match image {ref_name} shape {tuple(ref.shape)}"
            )
        a, b = _affine(ref), _affine(other)
        if a is not None and b is not None and not np.allclose(a, b, atol=self.atol):
            raise ValueError(
                f"{name}: {key} affine differs from image {ref_name} (max difference {np.abs(a - b).max():.4g}); "
                "resample the mask onto the image grid"
            )

    def _check_binary(self, m: Any, key: str, allow_empty: bool) -> None:
        name = filename_of(m, key)
        arr = _np(m)
        bad = ~np.isin(arr, (0, 1))
        if bad.any():
            vals = np.unique(arr[bad])[:5].tolist()
            raise ValueError(f"{name}: {key} must be a binary 0/1 mask, found other values {vals}")
        if not allow_empty and not arr.any():
            raise ValueError(f"{name}: {key} is empty (no voxel is 1)")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = None
        for key in self.key_iterator(d):
            self._check_image(d[key])
            ref = d[key] if ref is None else ref
        if ref is None:
            return d
        for keys, kind in ((self.mask_keys, "mask"), (self.binary_keys, "binary"), (self.label_keys, "label")):
            for key in keys:
                if key not in d:
                    if self.allow_missing_keys:
                        continue
                    raise ValueError(f"{filename_of(ref)}: missing {key!r} for this image")
                self._check_same_grid(ref, d[key], key)
                if kind == "mask":
                    self._check_binary(d[key], key, allow_empty=False)
                elif kind == "binary":
                    self._check_binary(d[key], key, allow_empty=True)
                else:
                    arr = _np(d[key])
                    if arr.size and (float(arr.min()) < 0 or not np.array_equal(arr, np.round(arr))):
                        raise ValueError(f"{filename_of(d[key], key)}: {key} must hold non-negative integer labels")
        return d

"""Mask-restricted percentile intensity scaling (the paper's "clip to [0, 99.5] percentiles, rescale to [0, 1]").

MONAI's ``ScaleIntensityRangePercentilesd`` computes percentiles over the whole array and does not record the
values it used; here percentiles come from brain-mask voxels (when a mask is given) and the intensity values
``(lower_value, upper_value)`` are stored in the image's ``MetaTensor.meta["percentile_scale"]`` so a result
can be mapped back to the input's range with :func:`invert_percentile_scale`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform

__all__ = ["PercentileScaled", "percentile_scale", "invert_percentile_scale", "META_KEY"]

META_KEY = "percentile_scale"


def _name(x: Any) -> str:
    meta = getattr(x, "meta", None) or {}
    return str(meta.get("filename_or_obj", "<array>"))


def percentile_scale(
    image: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    lower: float = 0.0,
    upper: float = 99.5,
    clip: bool = True,
    name: str | None = None,
) -> tuple[np.ndarray | torch.Tensor, float, float]:
    """Clip ``image`` to its ``lower``/``upper`` percentiles and rescale that range linearly to [0, 1].

    Args:
        image: any shape, float; percentiles over ``image[mask > 0]`` if ``mask`` (broadcastable to
            ``image``'s shape, e.g. (1, X, Y, Z) for a (C, X, Y, Z) image) is given, else over all voxels.
        lower, upper: percentiles in [0, 100] (``numpy.percentile`` linear interpolation).
        clip: clip to [0, 1] after rescaling (the paper's setting).
        name: file name for error messages.

    Returns:
        (scaled image of the same type/shape as float32, lower_value, upper_value).

    Raises:
        ValueError: bad percentiles, an empty mask, or equal percentile values (constant image).
    """
    name = name or _name(image)
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"{name}: need 0 <= lower < upper <= 100 percentiles, got {lower}, {upper}")
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if mask is not None:
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        m = np.broadcast_to(m > 0, arr.shape)
        values = arr[m]
        if values.size == 0:
            raise ValueError(f"{name}: brain mask is empty, cannot compute intensity percentiles")
    else:
        values = arr.ravel()
    lo, hi = (float(v) for v in np.percentile(values.astype(np.float64), [lower, upper]))
    if not hi > lo:
        raise ValueError(
            f"{name}: constant image inside the mask ({lower}th and {upper}th percentiles both {lo}); "
            "cannot rescale intensities"
        )
    if isinstance(image, torch.Tensor):
        out = (image.float() - lo) / (hi - lo)
        out = out.clamp(0.0, 1.0) if clip else out
    else:
        out = (arr.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
        out = np.clip(out, 0.0, 1.0) if clip else out
    return out, lo, hi


def invert_percentile_scale(x: np.ndarray | torch.Tensor, lo: float, hi: float) -> np.ndarray | torch.Tensor:
    """Map a [0, 1] result back to the input's intensity range: ``x * (hi - lo) + lo``.

    Exact inverse of :func:`percentile_scale` for voxels that were not clipped. ``lo``/``hi`` are the values
    stored in ``meta["percentile_scale"]``.
    """
    return x * (hi - lo) + lo


class PercentileScaled(MapTransform, InvertibleTransform):
    """Dictionary transform: mask-restricted percentile clip + rescale to [0, 1], recording the values.

    Input ``data[key]``: (C, X, Y, Z) float (any positive scanner scale). Output: float32 in [0, 1]; when the
    input is a ``MetaTensor`` its ``meta["percentile_scale"] = (lower_value, upper_value)`` (intensity units of
    the input) and the operation is tracked, so ``inverse`` (or MONAI's ``Invertd`` on a network output that
    carries the image's ``applied_operations``) maps [0, 1] values back to the input's intensity range
    (clipped voxels come back at the clip values). ``mask_key`` (optional, (1, X, Y, Z) 0/1): percentiles over
    brain voxels only; when the key is absent from the data (or ``None``) the whole image is used.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        mask_key: str | None = "brainmask",
        lower: float = 0.0,
        upper: float = 99.5,
        clip: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key, self.lower, self.upper, self.clip = mask_key, float(lower), float(upper), clip

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = d.get(self.mask_key) if self.mask_key is not None else None
        for key in self.key_iterator(d):
            img = d[key]
            out, lo, hi = percentile_scale(img, mask, self.lower, self.upper, self.clip, name=_name(img))
            if isinstance(img, MetaTensor):
                out = MetaTensor(torch.as_tensor(out), meta=dict(img.meta), applied_operations=list(img.applied_operations))
                out.meta[META_KEY] = (lo, hi)
                self.push_transform(out, extra_info={"lo": lo, "hi": hi})
            d[key] = out
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Map [0, 1] values back to input intensities with the recorded ``(lo, hi)``."""
        d = dict(data)
        for key in self.key_iterator(d):
            op = self.pop_transform(d[key])
            info = op["extra_info"]
            d[key] = invert_percentile_scale(d[key], float(info["lo"]), float(info["hi"]))
        return d

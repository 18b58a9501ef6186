"""Classical data augmentation (the paper's cDA) as one MONAI Compose factory.

Flip in the axial plane (left-right, spatial axis 0), one ``RandAffined`` for rotation + shear + scale (the
same random geometry on image and every mask: bilinear for images, nearest for label maps, zero padding),
and intensity scaling and shifting on images only. Nothing here is new code: it only composes MONAI.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import CastToTyped, Compose, RandAffined, RandFlipd, RandScaleIntensityd, RandShiftIntensityd

__all__ = ["classical_augmentation", "RandAffineKeepLesionsd"]


class RandAffineKeepLesionsd(RandAffined):
    """MONAI ``RandAffined`` that never loses a lesion: a draw that drops any instance label of ``lesion_key``
    (rotated out of the field of view, or a 1-voxel lesion skipped by nearest-neighbour down-scaling) is redrawn,
    up to ``max_retries`` times; after that the item passes unchanged (tracked as an identity for ``Invertd``).

    ``lesion_key`` must be one of ``keys`` and hold integer instance labels (1, X, Y, Z), 0 = background.
    Other arguments: ``monai.transforms.RandAffined``.
    """

    def __init__(self, keys: KeysCollection, lesion_key: str = "label", max_retries: int = 10, **kwargs: Any) -> None:
        super().__init__(keys, **kwargs)
        self.lesion_key, self.max_retries = lesion_key, int(max_retries)

    @staticmethod
    def _ids(x: Any) -> set[int]:
        return set(torch.unique(torch.as_tensor(x).detach().cpu()).round().long().tolist()) - {0}

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:  # type: ignore[override]
        if self.lesion_key not in data:
            return super().__call__(data, lazy=lazy)
        before = self._ids(data[self.lesion_key])
        for _ in range(self.max_retries + 1):
            out = super().__call__(data, lazy=lazy)
            if before <= self._ids(out[self.lesion_key]):
                return out
        prob = self.prob
        try:
            self.prob = 0.0
            return super().__call__(data, lazy=lazy)
        finally:
            self.prob = prob


def _range3(v: float | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(v, (int, float)):
        return (float(v),) * 3
    v = tuple(float(x) for x in v)
    if len(v) != 3:
        raise ValueError(f"expected a number or 3 numbers, got {v}")
    return v  # type: ignore[return-value]


def classical_augmentation(
    image_keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = ("label",),
    prob: float = 0.5,
    flip: bool = True,
    rotate_deg: float | Sequence[float] = (0.0, 0.0, 10.0),
    shear: float | Sequence[float] = 0.05,
    scale: float | Sequence[float] = 0.1,
    intensity_scale: float = 0.1,
    intensity_shift: float = 0.05,
    padding_mode: str = "zeros",
    label_dtype: torch.dtype | None = torch.int32,
    lesion_key: str | None = "label",
    max_retries: int = 10,
    allow_missing_keys: bool = True,
) -> Compose:
    """The paper's cDA: axial-plane flip, rotation, shear, scale, intensity scale and shift.

    Args:
        image_keys: (C, X, Y, Z) float images in [0, 1] (bilinear interpolation; intensity changes).
        label_keys: label maps / masks (instance labels, brain mask, ...): nearest interpolation, geometry only.
        prob: probability of each random step (flip, affine, intensity scale, intensity shift).
        flip: flip left-right (spatial axis 0, which stays in the axial plane).
        rotate_deg: max absolute rotation (degrees) about each spatial axis; default 10 degrees in the axial
            plane (about the z axis) only.
        shear: max absolute shear factor(s) (MONAI ``shear_range``, 6 values or one for all).
        scale: max relative scale change per axis (0.1: factors in [0.9, 1.1]).
        intensity_scale: ``RandScaleIntensityd`` factors (image * (1 + f), f in [-s, s]).
        intensity_shift: ``RandShiftIntensityd`` offsets in [-s, s] (image units, [0, 1] scale).
        padding_mode: padding for voxels mapped from outside (``"zeros"`` for image and labels, or
            ``"border"``/``"reflection"`` for images; labels always use zeros so lesions are never duplicated).
        label_dtype: cast label keys to this dtype afterwards (None: leave float from the resampler).
        lesion_key: instance-label key whose lesions must all survive the affine step (redrawn up to
            ``max_retries`` times, see :class:`RandAffineKeepLesionsd`); None or not in ``label_keys``: plain
            ``RandAffined``.
        allow_missing_keys: keys absent from the data are skipped.

    Returns:
        a ``Compose`` (random; reproducible with ``set_random_state`` / ``monai.utils.set_determinism``).
    """
    image_keys, label_keys = tuple(image_keys), tuple(label_keys)
    keys = image_keys + label_keys
    amk = allow_missing_keys
    rot = tuple(math.radians(r) for r in _range3(rotate_deg))
    if isinstance(shear, (int, float)):
        shear_range: tuple[float, ...] = (float(shear),) * 6
    else:
        shear_range = tuple(float(s) for s in shear)
    steps = []
    if flip:
        steps.append(RandFlipd(keys, prob=prob, spatial_axis=0, allow_missing_keys=amk))
    affine_kw: dict[str, Any] = {}
    affine_cls: type = RandAffined
    if lesion_key is not None and lesion_key in label_keys:
        affine_cls, affine_kw = RandAffineKeepLesionsd, {"lesion_key": lesion_key, "max_retries": max_retries}
    steps.append(
        affine_cls(
            keys,
            **affine_kw,
            prob=prob,
            rotate_range=rot,
            shear_range=shear_range,
            scale_range=_range3(scale),
            mode=["bilinear"] * len(image_keys) + ["nearest"] * len(label_keys),
            padding_mode=[padding_mode] * len(image_keys) + ["zeros"] * len(label_keys),
            allow_missing_keys=amk,
        )
    )
    if intensity_scale > 0:
        steps.append(RandScaleIntensityd(image_keys, factors=intensity_scale, prob=prob, allow_missing_keys=amk))
    if intensity_shift > 0:
        steps.append(RandShiftIntensityd(image_keys, offsets=intensity_shift, prob=prob, allow_missing_keys=amk))
    if label_keys and label_dtype is not None:
        steps.append(CastToTyped(label_keys, dtype=label_dtype, allow_missing_keys=amk))
    return Compose(steps)

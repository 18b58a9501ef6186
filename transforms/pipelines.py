"""Named Compose factories so bundle configs stay short.

- :func:`preprocessing`: load (nibabel / ITK via MONAI's ``LoadImaged``) -> channel first -> RAS ->
  :class:`~transforms.checks.CheckSWId` -> masks to uint8, labels to int32 -> mask-restricted percentile
  clip + rescale to [0, 1] (values recorded in ``meta["percentile_scale"]``, so it is invertible).
- cDA is :func:`transforms.augment.classical_augmentation`; candidate patches are in :mod:`transforms.patches`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureChannelFirstd,
    Orientationd,
)

from .checks import CheckSWId, LoadImageCheckedd
from .intensity import PercentileScaled

__all__ = ["preprocessing", "CheckedCompose"]


class CheckedCompose(Compose):
    """``Compose`` that re-raises an input error (``ValueError`` / ``FileNotFoundError``) as itself.

    MONAI's ``Compose`` wraps every failure in ``RuntimeError("applying transform ...")``; for bad input the
    useful message (which file, what is wrong) is the cause, so it is raised directly instead.
    """

    def __call__(self, input_, *args, **kwargs):  # type: ignore[override]
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as e:
            cause = e
            while isinstance(cause, RuntimeError) and cause.__cause__ is not None:
                cause = cause.__cause__
            if isinstance(cause, (ValueError, FileNotFoundError)):
                raise cause from None
            raise


def preprocessing(
    keys: Sequence[str] = ("image",),
    mask_keys: Sequence[str] = ("brainmask",),
    label_keys: Sequence[str] = ("label",),
    lower: float = 0.0,
    upper: float = 99.5,
    load: bool = True,
    binary_keys: Sequence[str] = (),
    extra_keys: Sequence[str] = (),
    axcodes: str = "RAS",
    reader: Any = None,
    clip: bool = True,
    channel_dim: int | str | None = None,
    allow_missing_keys: bool = False,
) -> Compose:
    """SWI preprocessing Compose (the paper's: clip to [0, 99.5] percentiles, rescale to [0, 1]).

    Args:
        keys: SWI image keys -> float32 (1, X, Y, Z) in [0, 1] (MetaTensor, ``meta["percentile_scale"] =
            (lo, hi)`` in input units; invert with :func:`transforms.intensity.invert_percentile_scale`).
        mask_keys: brain masks (0/1, non-empty) -> uint8; the first one restricts the percentiles.
        label_keys: instance label maps (non-negative integers) -> int32.
        lower, upper: percentiles (default 0 and 99.5, the paper's).
        load: load file paths with ``LoadImaged`` (False: the values are already arrays/MetaTensors).
        binary_keys: other 0/1 masks (may be empty, e.g. veins) -> uint8.
        extra_keys: other integer maps carried along (e.g. ``tissue``) -> int32, grid-checked only.
        axcodes: target orientation (``Orientationd``); the affine in ``meta`` maps back to the input's space.
        reader: ``LoadImaged`` reader (None: MONAI picks nibabel for NIfTI, ITK for DICOM folders).
        clip: clip to [0, 1] after rescaling.
        channel_dim: ``EnsureChannelFirstd`` channel dim: None reads it from the loaded metadata; with
            ``load=False`` and plain (X, Y, Z) arrays pass ``"no_channel"``.
        allow_missing_keys: skip mask/label/extra keys absent from the data (images are always required).

    Raises (at call time): ``ValueError`` / ``FileNotFoundError`` naming the file, see :class:`CheckSWId`.
    """
    keys, mask_keys, label_keys = tuple(keys), tuple(mask_keys), tuple(label_keys)
    binary_keys, extra_keys = tuple(binary_keys), tuple(extra_keys)
    other = mask_keys + binary_keys + label_keys + extra_keys
    all_keys = keys + other
    amk = allow_missing_keys
    steps: list[Any] = []
    if load:
        steps.append(LoadImageCheckedd(keys, reader=reader, dtype=np.float32, image_only=True))
        if other:
            # native dtype, so a non-binary mask is seen by the checks before any cast
            steps.append(LoadImageCheckedd(other, reader=reader, dtype=None, image_only=True, allow_missing_keys=amk))
    steps.append(EnsureChannelFirstd(keys, channel_dim=channel_dim))
    if other:
        steps.append(EnsureChannelFirstd(other, channel_dim=channel_dim, allow_missing_keys=amk))
    steps.append(Orientationd(all_keys, axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=amk))
    steps.append(
        CheckSWId(keys, mask_keys=mask_keys, binary_keys=binary_keys, label_keys=label_keys + extra_keys, allow_missing_keys=amk)
    )
    if mask_keys + binary_keys:
        steps.append(CastToTyped(mask_keys + binary_keys, dtype=torch.uint8, allow_missing_keys=amk))
    if label_keys + extra_keys:
        steps.append(CastToTyped(label_keys + extra_keys, dtype=torch.int32, allow_missing_keys=amk))
    steps.append(PercentileScaled(keys, mask_key=mask_keys[0] if mask_keys else None, lower=lower, upper=upper, clip=clip))
    return CheckedCompose(steps)

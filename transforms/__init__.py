"""Custom MONAI transforms of the CMB synthesis/detection project (imported as ``transforms``).

Like a MONAI bundle's ``scripts`` package, bundle configs reach these by ``_target_: transforms.<Name>`` (the
names below, imported lazily on first use) or by their module, ``transforms.<module>.<Name>``.
See ``docs/transforms.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "preprocessing": "pipelines",
    "CheckedCompose": "pipelines",
    "PercentileScaled": "intensity",
    "percentile_scale": "intensity",
    "invert_percentile_scale": "intensity",
    "CheckSWId": "checks",
    "LoadImageCheckedd": "checks",
    "CandidatePatchesd": "patches",
    "extract_candidate_patches": "patches",
    "classical_augmentation": "augment",
    "RandAffineKeepLesionsd": "augment",
    "LesionBank": "lesion_bank",
    "RandLesionMaskd": "lesion_mask",
    "allowed_region": "lesion_mask",
    "frst_3d": "frst",
    "find_candidates": "candidates",
    "FRSTCandidatesd": "candidates",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'transforms' has no attribute {name!r}")

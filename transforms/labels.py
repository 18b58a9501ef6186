"""Lesion labels: CMBs are counted on instance labels (one positive value per lesion) everywhere: the lesion
bank, candidate labelling, FROC evaluation and synthesis outputs all call :func:`as_instance_labels`."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["as_instance_labels"]


def as_instance_labels(labels: Any, name: str = "label") -> tuple[np.ndarray, bool]:
    """Lesion instance labels (X, Y, Z) int64 of a label map, and whether it had to be split.

    An instance map (0 background, one positive value per lesion, at least two distinct values) is kept. A map
    with a single non-zero value (a binary 0/1 or 0/255 mask, where several CMBs would count as ONE lesion)
    is split into 26-connected components, one instance each, and ``True`` is returned so that callers can
    say so in their log and metrics. (1, X, Y, Z) inputs are squeezed.

    Raises:
        ValueError: not 3-D, negative or non-integer values (naming ``name``).
    """
    lab = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if lab.ndim == 4 and lab.shape[0] == 1:
        lab = lab[0]
    if lab.ndim != 3:
        raise ValueError(f"{name}: lesion labels must be 3-D, got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer) and lab.dtype != bool:
        if not np.all(np.isfinite(lab)) or not np.array_equal(lab, np.round(lab)):
            raise ValueError(f"{name}: lesion labels must be whole numbers (instance labels or a 0/1 mask)")
    lab = lab.astype(np.int64)
    if (lab < 0).any():
        raise ValueError(f"{name}: lesion labels must not be negative")
    values = np.unique(lab[lab > 0])
    if len(values) != 1:
        return lab, False
    comps, n = ndimage.label(lab > 0, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return lab, False
    return comps.astype(np.int64), True

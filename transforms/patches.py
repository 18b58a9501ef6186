"""Candidate-centred patches for the detection classifier.

- :func:`extract_candidate_patches`: (C, X, Y, Z) image + (N, 3) candidate voxels -> (N, C, px, py, pz)
  patches centred on them (zero or edge padded at borders); :class:`CandidatePatchesd` is its dictionary form.

The paper's whole-axial-plane 160 x 146 x 32 patches with 50 % overlap along z need no helper here: whole-volume
synthesis runs MONAI's ``SlidingWindowInferer(roi_size=(160, 146, 32), overlap=(0, 0, 0.5))``
(``cmb_synthesis.synthesis.inference.synthesize_volume``), and GAN training crops patches with MONAI's
``RandCropByPosNegLabeld`` (``cmb_synthesis.synthesis.data``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["CandidatePatchesd", "extract_candidate_patches"]


def extract_candidate_patches(
    image: torch.Tensor | np.ndarray,
    coords: np.ndarray | torch.Tensor,
    patch_size: Sequence[int] = (32, 32, 16),
    padding_mode: str = "constant",
    pad_value: float = 0.0,
) -> torch.Tensor:
    """Patches of a (C, X, Y, Z) image centred on voxel indices ``coords`` (N, 3).

    A patch of size p spans ``c - p // 2 .. c - p // 2 + p - 1`` on each axis, so the centre voxel sits at
    index ``p // 2``. Outside the image: ``padding_mode`` ``"constant"`` (``pad_value``) or ``"replicate"``
    (edge). Returns float (N, C, px, py, pz) (``(0, C, ...)`` when there are no candidates).
    """
    img = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image)
    if hasattr(img, "as_tensor"):
        img = img.as_tensor()
    if img.ndim != 4:
        raise ValueError(f"expected a channel-first (C, X, Y, Z) image, got shape {tuple(img.shape)}")
    ps = tuple(int(p) for p in patch_size)
    c = torch.as_tensor(np.asarray(coords), dtype=torch.long).reshape(-1, 3)
    if c.shape[0] == 0:
        return torch.zeros((0, img.shape[0], *ps), dtype=torch.float32)
    shape = torch.tensor(img.shape[1:])
    if (c < 0).any() or (c >= shape).any():
        raise ValueError(f"candidate coordinates outside the image of spatial shape {tuple(shape.tolist())}")
    half = [p // 2 for p in ps]
    pad = []
    for p, h in reversed(list(zip(ps, half))):
        pad += [h, p - h]  # before, after (F.pad order: last dim first)
    x = img.float()
    if padding_mode == "constant":
        x = F.pad(x, pad, value=pad_value)
    elif padding_mode == "replicate":
        x = F.pad(x[None], pad, mode="replicate")[0]
    else:
        raise ValueError(f"padding_mode must be 'constant' or 'replicate', got {padding_mode!r}")
    # after padding by h before, the patch of centre c starts at c (padded coords)
    ox, oy, oz = (torch.arange(p) for p in ps)
    ix = (c[:, 0, None] + ox)[:, :, None, None]
    iy = (c[:, 1, None] + oy)[:, None, :, None]
    iz = (c[:, 2, None] + oz)[:, None, None, :]
    out = x[:, ix, iy, iz]  # (C, N, px, py, pz)
    return out.permute(1, 0, 2, 3, 4).contiguous()


class CandidatePatchesd(MapTransform):
    """Candidate-centred patch stacks for the detection classifier.

    ``data[candidates_key]``: (N, 3) int voxel indices (e.g. from ``transforms.candidates.FRSTCandidatesd``).
    For every key, ``data[key]`` (C, X, Y, Z) is replaced (or written to ``output_key`` / ``f"{key}{suffix}"``
    when given) by the float tensor (N, C, px, py, pz) of patches centred on the candidates (centre voxel at
    index ``p // 2``), zero (``padding_mode="constant"``) or edge (``"replicate"``) padded at borders.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        candidates_key: str = "candidates",
        patch_size: Sequence[int] = (32, 32, 16),
        output_key: str | None = None,
        padding_mode: str = "constant",
        pad_value: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.candidates_key, self.patch_size = candidates_key, tuple(int(p) for p in patch_size)
        self.output_key, self.padding_mode, self.pad_value = output_key, padding_mode, pad_value
        if output_key is not None and len(self.keys) > 1:
            raise ValueError("output_key can only be used with a single key")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.candidates_key not in d:
            raise ValueError(f"CandidatePatchesd: no {self.candidates_key!r} in the data (run FRSTCandidatesd first)")
        coords = d[self.candidates_key]
        for key in self.key_iterator(d):
            out = self.output_key or key
            d[out] = extract_candidate_patches(d[key], coords, self.patch_size, self.padding_mode, self.pad_value)
        return d

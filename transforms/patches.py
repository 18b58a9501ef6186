"""Whole-axial-plane z patches with overlap (the paper's 160x146x32, 50 % in z) and candidate-centred patches.

For patch-wise *inference* with blending, MONAI already has what is needed:
``monai.inferers.SlidingWindowInferer(roi_size=(160, 146, 32), overlap=(0, 0, 0.5), mode="gaussian")``
(``cmb_synthesis.synthesis.inference.synthesize_volume`` builds on the same idea). The helpers here are the
explicit version used where the patches themselves are needed (GAN training items, tests, figures):

- :func:`z_patch_starts`: start slices of a grid whose neighbours overlap by ``patch_z * overlap`` slices
  (16 for 32 / 0.5) and which covers every slice; a volume whose depth does not fit the grid is padded at the
  end (so every overlap is exact), a volume smaller than a patch is padded to one patch.
- :class:`ZPatchSampler`: (C, X, Y, Z) volume -> (N, C, PX, PY, PZ) patches + starts (pads X, Y up to the
  patch's in-plane size); :func:`stitch_z_patches`: patches -> volume, overlaps averaged (uniform or linear
  ramp weights), cropped back to the original size.
- :class:`CandidatePatchesd`: (N, 3) candidate voxels -> (N, C, px, py, pz) patches centred on them.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = [
    "z_patch_starts",
    "padded_depth",
    "ZPatchSampler",
    "ZPatchesd",
    "stitch_z_patches",
    "CandidatePatchesd",
    "extract_candidate_patches",
    "PAPER_PATCH",
]

PAPER_PATCH = (160, 146, 32)


def z_patch_starts(depth: int, patch_z: int = 32, overlap: float = 0.5) -> list[int]:
    """Start indices along z of a patch grid covering ``depth`` slices.

    Neighbouring patches overlap by ``round(patch_z * overlap)`` slices (step ``patch_z - that``). The grid is
    ``starts = 0, step, 2 step, ...`` up to the first patch reaching ``depth``; it may extend past the volume
    (``padded_depth`` says how far), in which case the volume is padded at the end. ``depth <= patch_z``
    gives ``[0]`` (one padded patch).

    >>> z_patch_starts(112)
    [0, 16, 32, 48, 64, 80]
    """
    depth, patch_z = int(depth), int(patch_z)
    if depth < 1 or patch_z < 1:
        raise ValueError(f"depth and patch_z must be positive, got {depth}, {patch_z}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    step = patch_z - int(round(patch_z * overlap))
    step = max(step, 1)
    n = 1 if depth <= patch_z else 1 + math.ceil((depth - patch_z) / step)
    return [i * step for i in range(n)]


def padded_depth(depth: int, patch_z: int = 32, overlap: float = 0.5) -> int:
    """Depth the volume is padded to for :func:`z_patch_starts` (``>= depth``)."""
    return z_patch_starts(depth, patch_z, overlap)[-1] + int(patch_z)


class ZPatchSampler:
    """Split a channel-first volume into whole-plane patches overlapping in z.

    Args:
        patch_size: (PX, PY, PZ), default the paper's (160, 146, 32). In-plane sizes smaller than the volume's
            are not allowed (a patch captures the whole axial plane); volumes smaller are padded (centred).
        overlap: z overlap fraction (0.5: 16 slices for PZ = 32).
        pad_value: constant used for padding (0: background of the [0, 1]-scaled SWI).

    ``sampler(volume)`` with volume (C, X, Y, Z) returns ``(patches (N, C, PX, PY, PZ), starts list[int])``;
    ``sampler.stitch(patches, starts, volume_shape)`` reverses it.
    """

    def __init__(self, patch_size: Sequence[int] = PAPER_PATCH, overlap: float = 0.5, pad_value: float = 0.0):
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries, got {patch_size}")
        self.overlap, self.pad_value = float(overlap), float(pad_value)

    def _inplane_pad(self, shape: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
        pads = []
        for s, p, ax in zip(shape[:2], self.patch_size[:2], "XY"):
            if s > p:
                raise ValueError(f"volume {ax} size {s} exceeds the whole-plane patch size {p}")
            pads.append(((p - s) // 2, p - s - (p - s) // 2))
        return pads[0], pads[1]

    def __call__(self, volume: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, list[int]]:
        v = torch.as_tensor(np.asarray(volume) if isinstance(volume, np.ndarray) else volume)
        if v.ndim != 4:
            raise ValueError(f"expected a channel-first (C, X, Y, Z) volume, got shape {tuple(v.shape)}")
        (x0, x1), (y0, y1) = self._inplane_pad(v.shape[1:])
        depth = v.shape[3]
        starts = z_patch_starts(depth, self.patch_size[2], self.overlap)
        z1 = starts[-1] + self.patch_size[2] - depth
        v = F.pad(v, (0, z1, y0, y1, x0, x1), value=self.pad_value)
        patches = torch.stack([v[..., s : s + self.patch_size[2]] for s in starts])
        return patches, starts

    def stitch(self, patches: torch.Tensor, starts: Sequence[int], volume_shape: Sequence[int], mode: str = "mean") -> torch.Tensor:
        """Inverse of ``__call__``: ``volume_shape`` is the (C, X, Y, Z) or (X, Y, Z) shape of the original."""
        spatial = tuple(volume_shape[-3:])
        (x0, _), (y0, _) = self._inplane_pad(spatial)
        vol = stitch_z_patches(patches, starts, spatial[2], mode=mode)
        return vol[..., x0 : x0 + spatial[0], y0 : y0 + spatial[1], :]


def _blend_weights(pz: int, mode: str) -> torch.Tensor:
    if mode == "mean":
        return torch.ones(pz)
    if mode == "linear":  # triangular ramp, never zero, so every slice has weight
        i = torch.arange(pz, dtype=torch.float64)
        return (torch.minimum(i + 1, pz - i) / ((pz + 1) / 2)).float()
    raise ValueError(f"mode must be 'mean' or 'linear', got {mode!r}")


def stitch_z_patches(
    patches: torch.Tensor | np.ndarray, starts: Sequence[int], depth: int, mode: str = "mean"
) -> torch.Tensor:
    """Blend overlapping z patches back into a volume.

    Args:
        patches: (N, C, X, Y, PZ) (or (N, X, Y, PZ)); ``starts``: their z starts (from :func:`z_patch_starts`).
        depth: the original depth; the result is cropped to it (padding removed).
        mode: ``"mean"`` (uniform average in overlaps) or ``"linear"`` (triangular weights, smoother seams).

    Returns:
        float tensor (C, X, Y, depth) (or (X, Y, depth)). Patches that agree in their overlaps (e.g. cut from
        one volume) are reproduced exactly.
    """
    p = torch.as_tensor(patches)
    if p.shape[0] != len(starts):
        raise ValueError(f"{p.shape[0]} patches but {len(starts)} starts")
    pz = p.shape[-1]
    total = max(int(starts[-1]) + pz, int(depth))
    w = _blend_weights(pz, mode).to(torch.float32)
    acc = torch.zeros((*p.shape[1:-1], total), dtype=torch.float32)
    norm = torch.zeros(total, dtype=torch.float32)
    for patch, s in zip(p, starts):
        acc[..., s : s + pz] += patch.float() * w
        norm[s : s + pz] += w
    if (norm[:depth] == 0).any():
        raise ValueError("the patches do not cover every slice of the volume")
    return acc[..., :depth] / norm[:depth]


class ZPatchesd(MapTransform):
    """Dictionary form of :class:`ZPatchSampler`: ``data[key]`` (C, X, Y, Z) -> (N, C, PX, PY, PZ).

    The starts go to ``data[f"{key}_patch_starts"]`` and the original shape to ``data[f"{key}_shape"]``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        patch_size: Sequence[int] = PAPER_PATCH,
        overlap: float = 0.5,
        pad_value: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.sampler = ZPatchSampler(patch_size, overlap, pad_value)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            shape = tuple(d[key].shape)
            d[key], starts = self.sampler(d[key])
            d[f"{key}_patch_starts"], d[f"{key}_shape"] = starts, shape
        return d


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

    ``data[candidates_key]``: (N, 3) int voxel indices (e.g. from ``transforms.frst.FRSTCandidatesd``).
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

"""Lesion contrast codes (ours, beyond the paper): which of the real CMBs' contrasts ``G_HP`` should paint.

Real CMBs of one size are not equally dark: on the default phantom the centre intensity relative to the tissue
has a standard deviation of about 0.09 within each size bin (0.19 overall on the benchmark cohort). Given a
binary mask, ``G_HP`` can only paint one contrast per mask shape, the conditional mean: painted lesions had a
within-size standard deviation of 0.00-0.06, and a classifier told them from real ones by that alone.

A **contrast code** gives ``G_HP`` the missing input. The mask channel carries ``0.5 + q`` on the voxels of a
lesion (0 elsewhere), where ``q`` in [0, 1] is the lesion's **darkness rank** among the real training lesions of
its size: 0 the lightest, 1 the darkest. A binary mask (1 everywhere on the lesion) asks for the median. So:

- painting (``y_hp``, training and validation): ``q ~ U(0, 1)`` per lesion (:meth:`ContrastCode.random`), and the
  painted lesions, asked for every rank equally often, should have the real lesions' distribution of contrast;
- real lesions (``y_p``, the PHP cycle and ``L_ID``): ``q`` measured from the lesion itself
  (:meth:`ContrastCode.measure`), so "rebuild this lesion" and "leave this lesion alone" ask ``G_HP`` for the
  contrast the lesion has;
- the profile term (:class:`~cmb_synthesis.synthesis.losses.LesionProfileLoss` with ``code_targets``) pulls each
  painted lesion towards the profile of the real lesion of its size bin at its rank (:meth:`ContrastCode.target`);
- inference paints each lesion of a mask at a random rank, seeded per scan (``ranks`` of
  :func:`random_codes`), or at the ranks a caller gives.

The reference is :func:`cmb_synthesis.synthesis.realism.size_binned_profiles` (``edges`` and ``quantiles``: the
real profiles at ``n_levels`` evenly spaced darkness ranks per size bin). Masks are (B, 1, X, Y, Z); every
consumer of a mask other than ``G_HP`` reads ``mask > 0``, so code maps serve as masks everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["CODE_OFFSET", "CODE_MAX", "quantile_profiles", "code_map", "random_codes", "rank_at", "ContrastCode"]

CODE_OFFSET = 0.5  # a lesion voxel's code is CODE_OFFSET + q, q in [0, 1]: every lesion voxel stays > 0
CODE_MAX = CODE_OFFSET + 1.0


def quantile_profiles(profiles: np.ndarray, n_levels: int = 11) -> np.ndarray:
    """Profiles (L, R + 1) of real lesions at ``n_levels`` evenly spaced darkness ranks ``t = 0 .. 1``.

    The lesions are ordered by their centre intensity (column 0), lightest first; the profile at rank ``t`` is
    interpolated between the ordered rows at position ``t (L - 1)``. Returns (n_levels, R + 1) float64.
    """
    p = np.asarray(profiles, np.float64)
    if p.ndim != 2 or not len(p):
        raise ValueError(f"quantile_profiles needs a non-empty (L, R + 1) array, got shape {p.shape}")
    ordered = p[np.argsort(-p[:, 0], kind="stable")]
    pos = np.linspace(0.0, 1.0, int(n_levels)) * (len(ordered) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(ordered) - 1)
    w = (pos - lo)[:, None]
    return ordered[lo] * (1 - w) + ordered[hi] * w


def _instances(mask: torch.Tensor) -> torch.Tensor:
    """Integer lesion ids of a (B, 1, X, Y, Z) mask: instance labels as given (float ones rounded, every non-zero
    voxel at least 1), a bool or binary mask as 0/1."""
    if mask.dtype == torch.bool:
        return mask.long()
    if mask.is_floating_point():
        return torch.where(mask > 0, mask.round().clamp_min(1), torch.zeros((), dtype=mask.dtype, device=mask.device)).long()
    return mask.long().clamp_min(0)


def code_map(mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The code map of ``mask`` (B, 1, X, Y, Z; instance labels or binary) with ranks ``q``: (B,) one rank per
    sample, or (B, M + 1) one per instance id (column 0 unused). Returns (B, 1, X, Y, Z) float32, ``0.5 + q``
    on lesion voxels, 0 elsewhere."""
    ids = _instances(mask)
    q = torch.as_tensor(q, dtype=torch.float32, device=mask.device).clamp(0.0, 1.0)
    if q.ndim == 1:
        per_voxel = q.view(-1, *([1] * (mask.ndim - 1))).expand(mask.shape)
    else:
        flat = ids.reshape(ids.shape[0], -1).clamp_max(q.shape[1] - 1)
        per_voxel = torch.gather(q, 1, flat).view(mask.shape)
    return torch.where(ids > 0, CODE_OFFSET + per_voxel, torch.zeros((), device=mask.device))


def random_codes(mask: torch.Tensor, generator: torch.Generator | None = None, ranks: Any = None) -> torch.Tensor:
    """A code map with one rank per lesion (instance id; a binary mask is one lesion per sample): drawn from
    U(0, 1) with ``generator`` (torch's global stream when None), or the fixed ``ranks`` (a float, or one per id
    1..M). ``mask`` (B, 1, X, Y, Z) -> (B, 1, X, Y, Z) float32."""
    ids = _instances(mask)
    m = int(ids.max()) if ids.numel() else 0
    if ranks is None:
        q = torch.rand((ids.shape[0], m + 1), generator=generator, device="cpu" if generator is None else generator.device)
    else:
        r = torch.as_tensor(ranks, dtype=torch.float32).reshape(-1)
        if r.numel() not in (1, m):
            raise ValueError(f"ranks: one value or one per lesion id 1..{m}, got {r.numel()}")
        if not bool(torch.isfinite(r).all()) or bool(((r < 0) | (r > 1)).any()):
            raise ValueError(f"ranks must lie in [0, 1], got {r.tolist()}")
        q = torch.cat([torch.zeros(1), r.expand(m)]).expand(ids.shape[0], m + 1)
    return code_map(mask, q.to(mask.device))


class ContrastCode:
    """Contrast codes against a reference of real lesions (see the module docstring).

    Args:
        reference: a mapping with ``edges`` (n - 1,) inner size-bin edges (voxels) and ``quantiles``
            (n, n_levels, R + 1): real profiles per size bin at evenly spaced darkness ranks
            (:func:`cmb_synthesis.synthesis.realism.size_binned_profiles`).
        max_radius, ring: how :func:`~cmb_synthesis.synthesis.losses.radial_profiles` measures a lesion (as the
            evaluator: 4 and (5, 7) voxels).
    """

    def __init__(self, reference: Mapping[str, Any], max_radius: int = 4, ring: Sequence[float] = (5.0, 7.0)) -> None:
        if reference is None or "quantiles" not in reference or "edges" not in reference:
            raise ValueError("ContrastCode needs a reference with 'edges' and 'quantiles' (realism.size_binned_profiles)")
        self.edges = torch.as_tensor(np.asarray(reference["edges"], np.float64), dtype=torch.float32).reshape(-1)
        self.quantiles = torch.as_tensor(np.asarray(reference["quantiles"], np.float64), dtype=torch.float32)
        self.max_radius, self.ring = int(max_radius), tuple(float(r) for r in ring)
        q = self.quantiles
        if q.ndim != 3 or q.shape[0] != len(self.edges) + 1 or q.shape[1] < 2 or q.shape[2] != self.max_radius + 1:
            raise ValueError(
                f"ContrastCode reference: quantiles must be (len(edges) + 1, n_levels >= 2, max_radius + 1) = "
                f"({len(self.edges) + 1}, n, {self.max_radius + 1}), got {tuple(q.shape)}"
            )
        if not bool(torch.isfinite(q).all()):
            raise ValueError("ContrastCode reference: quantiles must be finite")

    def __repr__(self) -> str:
        return f"ContrastCode({len(self.edges) + 1} size bins, {self.quantiles.shape[1]} levels, edges {self.edges.tolist()})"

    def bins(self, sizes: torch.Tensor) -> torch.Tensor:
        """Size bin of each lesion size (voxels): (N,) -> (N,) long."""
        return torch.searchsorted(self.edges.to(sizes.device), sizes.to(torch.float32), right=True)

    def target(self, q: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """Real profile at darkness rank ``q`` (N,) for lesions of ``sizes`` (N,) voxels: (N, R + 1)."""
        quant = self.quantiles.to(q.device)
        n_levels = quant.shape[1]
        pos = q.float().clamp(0.0, 1.0) * (n_levels - 1)
        lo = pos.floor().long().clamp_max(n_levels - 2)
        w = (pos - lo.float())[:, None]
        b = self.bins(sizes)
        return quant[b, lo] * (1 - w) + quant[b, lo + 1] * w

    def rank(self, centre: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """Darkness rank in [0, 1] of lesions with relative centre intensity ``centre`` (N,) and ``sizes`` (N,)
        among the reference lesions of their size bin (piecewise-linear between the levels)."""
        centres = self.quantiles[:, :, 0].numpy()  # (n_bins, n_levels), non-increasing along the levels
        levels = np.linspace(0.0, 1.0, centres.shape[1])
        b = self.bins(sizes.cpu()).numpy()
        c = centre.detach().cpu().double().numpy()
        out = [float(np.interp(v, centres[k][::-1], levels[::-1])) for v, k in zip(c, b)]
        return torch.tensor(out, dtype=torch.float32, device=centre.device)

    def random(self, mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Code map with a U(0, 1) rank per lesion (:func:`random_codes`)."""
        return random_codes(mask, generator)

    @torch.no_grad()
    def measure(self, image: torch.Tensor, mask: torch.Tensor, brainmask: torch.Tensor | None = None) -> torch.Tensor:
        """Code map of real lesions: each sample's lesions get the rank of its centred lesion (the one
        :func:`~cmb_synthesis.synthesis.losses.radial_profiles` measures); the median (0.5) where it cannot be
        measured. ``image``, ``mask``, ``brainmask`` (B, 1, X, Y, Z) -> (B, 1, X, Y, Z) float32."""
        from cmb_synthesis.synthesis.losses import radial_profiles

        q = torch.full((mask.shape[0],), 0.5, device=mask.device)
        profiles, index, sizes = radial_profiles(image.float(), mask, brainmask, self.max_radius, self.ring, return_sizes=True)
        if len(index):
            q[index] = self.rank(profiles[:, 0], sizes).to(q.device)
        return code_map(mask, q)


def rank_at(code: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """The rank ``q`` a code map (X, Y, Z) asks for at the lesion around ``centre`` (3,): the code of the
    lesion voxel nearest the centre, minus the offset (0.5, the median, where the map has no lesion voxel or
    carries binary values)."""
    nz = (code > 0).nonzero()
    if not len(nz):
        return code.new_tensor(0.5)
    v = code[tuple(nz[((nz - centre.to(nz.device)).float() ** 2).sum(1).argmin()])]
    return (v.float() - CODE_OFFSET).clamp(0.0, 1.0)

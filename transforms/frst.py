"""3-D Fast Radial Symmetry Transform (FRST) for dark blobs (numpy and torch backends).

Loy and Zelinsky, "Fast radial symmetry for detecting points of interest", IEEE TPAMI 25(8), 2003, extended
to 3-D with the dark polarity only (cerebral microbleeds are hypointense on SWI), following the choices of
Kovesi's reference implementation (``fastradial.m``) for the clipping constant and the per-radius scaling:

1. gradient ``g`` by the 3-D Sobel operator (``scipy.ndimage.sobel`` per axis, normalised to intensity/mm by
   dividing by 32 and by the voxel spacing of that axis);
2. only voxels with ``|g| > beta * max|g|`` vote (the maximum is taken inside ``mask`` when one is given);
3. for every radius ``n`` (in mm; ``n / spacing`` voxels along each axis) the *negatively affected* voxel
   ``p - round(n_vox * g / |g|)`` (the point ``n`` mm down the gradient, i.e. into the dark side) collects one
   orientation vote ``O_n += 1`` and the magnitude ``M_n += |g|``. Accumulation uses ``np.bincount``
   (numpy backend) or ``Tensor.index_add_`` (torch backend), never ``np.add.at``. Votes falling outside the
   volume are dropped;
4. ``O_n`` is clipped at ``kappa_n`` (8 for n = 1, 9.9 otherwise) and
   ``F_n = (M_n / kappa_n) * (O~_n / kappa_n) ** alpha``;
5. ``F_n`` is smoothed with a Gaussian of sigma ``0.25 n`` (in voxels per axis, truncated at 4 sigma, mirror
   boundary as ``scipy.ndimage``), multiplied by ``n`` (mm) so that large radii keep their weight;
6. the map is the mean over radii. Because only negatively affected voxels vote, the map is ``>= 0`` and
   positive at dark blobs (Loy and Zelinsky's ``-S`` for a dark-only transform).

Both backends compute the same map (float64 by default; relative difference ~1e-12, and < 1e-4 in
float32). The torch backend runs on the device of the input tensor.

Candidate proposal from the map (local maxima, NMS, the MONAI transform ``FRSTCandidatesd``) is
:mod:`transforms.candidates`. Defaults were tuned on the phantom training split with ``scripts/tune_frst.py``
(see ``docs/frst.md``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from transforms.spacing import RATIO_DECIMALS, snap_spacing, voxel_ratio

__all__ = [
    "DEFAULT_RADII_MM",
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_MIN_DISTANCE_MM",
    "DEFAULT_MAX_CANDIDATES",
    "DEFAULT_PRESMOOTH_SIGMA_MM",
    "DEFAULT_SNAP_RADIUS_MM",
    "kappa_for_radius",
    "frst_3d",
]

# Defaults tuned on the phantom training split (scripts/tune_frst.py, docs/frst.md).
DEFAULT_RADII_MM: tuple[float, ...] = (0.75, 1.0, 1.5, 2.0)
DEFAULT_ALPHA: float = 2.0
DEFAULT_BETA: float = 0.05
DEFAULT_MIN_DISTANCE_MM: float = 3.0
DEFAULT_MAX_CANDIDATES: int = 300
DEFAULT_PRESMOOTH_SIGMA_MM: float = 0.0
DEFAULT_SNAP_RADIUS_MM: float = 1.0


def kappa_for_radius(n: float) -> float:
    """Orientation clipping constant of Kovesi's reference: 8 for n = 1, 9.9 otherwise (n in mm)."""
    return 8.0 if abs(float(n) - 1.0) < 1e-9 else 9.9


def _gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The same normalised kernel as ``scipy.ndimage.gaussian_filter1d`` (radius ``int(truncate*sigma+0.5)``,
    the argument rounded to ``RATIO_DECIMALS`` decimals so that spacing noise cannot change the radius)."""
    radius = int(np.floor(round(truncate * float(sigma) + 0.5, RATIO_DECIMALS)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / float(sigma) ** 2 * x**2)
    return phi / phi.sum()


def _check_volume(volume: Any, spacing: Sequence[float], radii_mm: Sequence[float]) -> None:
    if volume.ndim != 3:
        raise ValueError(f"frst_3d: expected a 3-D volume (X, Y, Z), got shape {tuple(volume.shape)}")
    if len(spacing) != 3 or any(float(s) <= 0 for s in spacing):
        raise ValueError(f"frst_3d: spacing must be three positive numbers, got {tuple(spacing)}")
    if len(radii_mm) == 0 or any(float(r) <= 0 for r in radii_mm):
        raise ValueError(f"frst_3d: radii_mm must be non-empty and positive, got {tuple(radii_mm)}")


# ----------------------------------------------------------------------------------------------- numpy
def _frst_numpy(
    vol: np.ndarray,
    spacing: tuple[float, float, float],
    radii_mm: Sequence[float],
    alpha: float,
    beta: float,
    mask: np.ndarray | None,
    presmooth_sigma_mm: float,
    dtype: np.dtype,
    workers: int = 1,
) -> np.ndarray:
    # The gradient, the voter selection and the vote offsets are always float64, so that both backends
    # round the same offsets; ``dtype`` applies to the vote images and their smoothing.
    vol = np.asarray(vol, dtype=np.float64)
    if presmooth_sigma_mm > 0:
        for ax in range(3):
            vol = ndimage.correlate1d(vol, _gaussian_kernel1d(presmooth_sigma_mm / spacing[ax]), axis=ax, mode="reflect")
    shape = vol.shape
    def sobel(ax: int) -> np.ndarray:
        g = ndimage.sobel(vol, axis=ax, mode="reflect")
        g *= 1.0 / (32.0 * spacing[ax])
        return g

    if workers > 1:  # scipy.ndimage releases the GIL
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(workers, 3)) as ex:
            grads = list(ex.map(sobel, range(3)))
    else:
        grads = [sobel(ax) for ax in range(3)]
    mag = np.sqrt(grads[0] * grads[0] + grads[1] * grads[1] + grads[2] * grads[2])
    ref = mag[mask] if mask is not None else mag
    gmax = float(ref.max()) if ref.size else 0.0
    if gmax <= 0:
        return np.zeros(shape, dtype=dtype)
    sel = mag > beta * gmax
    if mask is not None:
        sel &= mask
    voters = np.flatnonzero(sel)
    del sel
    m = mag.ravel()[voters]
    del mag
    # unit gradient of the voters, scaled to voxels per mm along each axis
    units = [grads[ax].ravel()[voters] / m for ax in range(3)]
    del grads
    # Votes are accumulated in a volume padded by the largest offset, so no bounds test is needed per vote;
    # the padding (votes that fell outside the volume) is cropped away afterwards.
    pad = [int(v) + 1 for v in np.ceil(voxel_ratio(max(radii_mm), spacing))]
    pshape = tuple(s + 2 * p for s, p in zip(shape, pad))
    strides = (pshape[1] * pshape[2], pshape[2], 1)
    coords = np.unravel_index(voters, shape)
    del voters
    flat_p = (coords[0] + pad[0]) * strides[0] + (coords[1] + pad[1]) * strides[1] + (coords[2] + pad[2])
    del coords
    n_pad = int(np.prod(pshape))
    crop = tuple(slice(p, p + s) for p, s in zip(pad, shape))

    m64 = m.astype(np.float64, copy=False)  # bincount accumulates in float64 (m is float64 already)
    off_dtype = np.float64
    local = threading.local()

    def one_radius(n: float) -> np.ndarray:
        n = float(n)
        kappa = kappa_for_radius(n)
        if not hasattr(local, "off"):  # per-thread work buffers, reused across radii (page faults are costly)
            local.off = np.empty(len(m), dtype=off_dtype)
            local.tmp = np.empty(len(m), dtype=off_dtype)
            local.flat = np.empty(len(m), dtype=np.int64)
        off, tmp, flat = local.off, local.tmp, local.flat
        off.fill(0)
        for ax in range(3):
            np.multiply(units[ax], n / spacing[ax], out=tmp)
            np.rint(tmp, out=tmp)
            if strides[ax] != 1:
                tmp *= strides[ax]
            off += tmp
        np.subtract(flat_p, off, out=flat, casting="unsafe")
        orient = np.bincount(flat, minlength=n_pad).reshape(pshape)[crop].astype(dtype)
        f = np.bincount(flat, weights=m64, minlength=n_pad).reshape(pshape)[crop].astype(dtype)
        np.minimum(orient, kappa, out=orient)
        orient *= 1.0 / kappa
        f *= 1.0 / kappa
        f *= orient**alpha if alpha != 2.0 else orient * orient
        del orient
        for ax in range(3):
            f = ndimage.correlate1d(f, _gaussian_kernel1d(0.25 * n / spacing[ax]).astype(dtype), axis=ax,
                                    mode="reflect")
        f *= n
        return f

    out = None
    if workers > 1 and len(radii_mm) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as ex:
            for f in ex.map(one_radius, radii_mm):
                out = f if out is None else np.add(out, f, out=out)
    else:
        for n in radii_mm:
            f = one_radius(n)
            out = f if out is None else np.add(out, f, out=out)
    out /= len(radii_mm)
    return out


# ----------------------------------------------------------------------------------------------- torch
def _symmetric_index(n: int, r: int, device: torch.device) -> torch.Tensor:
    """Indices implementing scipy's ``mode='reflect'`` (d c b a | a b c d | d c b a) padding by ``r``."""
    i = torch.arange(-r, n + r, device=device)
    period = 2 * n
    i = torch.remainder(i, period)
    return torch.where(i < n, i, period - 1 - i)


def _correlate1d_torch(x: torch.Tensor, weights: Sequence[float], axis: int) -> torch.Tensor:
    """``scipy.ndimage.correlate1d(x, weights, axis, mode='reflect')`` for odd-length weights."""
    r = len(weights) // 2
    n = x.shape[axis]
    if r == 0:
        xp = x
    elif r <= n:  # mirror slabs concatenated (much faster than index_select along inner axes on the CPU)
        xp = torch.cat([x.narrow(axis, 0, r).flip(axis), x, x.narrow(axis, n - r, r).flip(axis)], dim=axis)
    else:
        xp = x.index_select(axis, _symmetric_index(n, r, x.device))
    out = None
    for j, w in enumerate(weights):
        if w == 0:
            continue
        if out is None:
            out = xp.narrow(axis, j, n) * float(w)
        else:
            out.add_(xp.narrow(axis, j, n), alpha=float(w))
    return out if out is not None else torch.zeros_like(x)


def _sobel_torch(x: torch.Tensor, axis: int) -> torch.Tensor:
    out = _correlate1d_torch(x, [-1.0, 0.0, 1.0], axis)
    for ax in range(3):
        if ax != axis:
            out = _correlate1d_torch(out, [1.0, 2.0, 1.0], ax)
    return out


def _frst_torch(
    vol: torch.Tensor,
    spacing: tuple[float, float, float],
    radii_mm: Sequence[float],
    alpha: float,
    beta: float,
    mask: torch.Tensor | None,
    presmooth_sigma_mm: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    vol = vol.to(torch.float64)  # gradient, selection and offsets in float64 (see _frst_numpy)
    if presmooth_sigma_mm > 0:
        for ax in range(3):
            vol = _correlate1d_torch(vol, _gaussian_kernel1d(presmooth_sigma_mm / spacing[ax]).tolist(), ax)
    shape = tuple(vol.shape)
    grads = [_sobel_torch(vol, ax) / (32.0 * spacing[ax]) for ax in range(3)]
    mag = torch.sqrt(grads[0] ** 2 + grads[1] ** 2 + grads[2] ** 2)
    ref = mag[mask] if mask is not None else mag
    gmax = float(ref.max()) if ref.numel() else 0.0
    out = torch.zeros(shape, dtype=dtype, device=vol.device)
    if gmax <= 0:
        return out
    sel = mag > beta * gmax
    if mask is not None:
        sel &= mask
    idx = torch.nonzero(sel, as_tuple=True)
    m = mag[idx]
    units = [grads[ax][idx] / m for ax in range(3)]
    del grads, mag, sel
    pad = [int(v) + 1 for v in np.ceil(voxel_ratio(max(radii_mm), spacing))]  # padded accumulation, as numpy
    pshape = tuple(s + 2 * p for s, p in zip(shape, pad))
    strides = (pshape[1] * pshape[2], pshape[2], 1)
    flat_p = (idx[0] + pad[0]) * strides[0] + (idx[1] + pad[1]) * strides[1] + (idx[2] + pad[2])
    del idx
    n_pad = int(np.prod(pshape))
    crop = tuple(slice(p, p + s) for p, s in zip(pad, shape))
    ones = torch.ones_like(m)
    for n in radii_mm:
        n = float(n)
        kappa = kappa_for_radius(n)
        off = torch.zeros_like(m)
        for ax in range(3):
            off += torch.round(units[ax] * (n / spacing[ax])) * strides[ax]
        flat = flat_p - off.to(torch.int64)
        del off
        orient = torch.zeros(n_pad, dtype=torch.float64, device=vol.device).index_add_(0, flat, ones)
        magn = torch.zeros(n_pad, dtype=torch.float64, device=vol.device).index_add_(0, flat, m)
        del flat
        orient = orient.reshape(pshape)[crop].to(dtype)
        f = magn.reshape(pshape)[crop].to(dtype)
        del magn
        orient.clamp_(max=kappa).mul_(1.0 / kappa)
        f.mul_(1.0 / kappa).mul_(orient**alpha if alpha != 2.0 else orient * orient)
        del orient
        for ax in range(3):
            f = _correlate1d_torch(f, _gaussian_kernel1d(0.25 * n / spacing[ax]).tolist(), ax)
        out += f * n
    out /= len(radii_mm)
    return out


# ------------------------------------------------------------------------------------------- public API
def frst_3d(
    volume: np.ndarray | torch.Tensor,
    spacing: Sequence[float] = (0.98, 0.98, 1.0),
    radii_mm: Sequence[float] = DEFAULT_RADII_MM,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    backend: str | None = None,
    mask: np.ndarray | torch.Tensor | None = None,
    presmooth_sigma_mm: float = DEFAULT_PRESMOOTH_SIGMA_MM,
    dtype: Any = None,
    workers: int = 1,
) -> np.ndarray | torch.Tensor:
    """Dark-polarity 3-D Fast Radial Symmetry Transform of ``volume``.

    Args:
        volume: (X, Y, Z) intensities (any scale; the map scales linearly with the intensity scale).
            A leading channel of size 1 is accepted and kept in the output.
        spacing: voxel size in mm along X, Y, Z; radii and smoothing are converted to voxels per axis.
            Rounded to 1e-6 mm first (``transforms.spacing.snap_spacing``): floating-point noise in an
            affine's spacing does not change the map.
        radii_mm: radii of the blobs to detect, in mm (CMBs: diameter 2-10 mm).
        alpha: radial strictness (exponent of the clipped orientation term).
        beta: gradient threshold as a fraction of the maximum gradient magnitude (inside ``mask`` if given).
        backend: ``"numpy"`` or ``"torch"``; default: torch for a tensor input, numpy otherwise.
        mask: optional (X, Y, Z) boolean mask; only voxels inside it vote and the gradient maximum is
            taken inside it (votes may still land outside it).
        presmooth_sigma_mm: Gaussian smoothing of the intensities before the gradient (0: none).
        dtype: computation dtype (default float64; float32 halves memory at ~1e-6 relative error).
        workers: numpy backend: threads processing radii in parallel (SciPy and NumPy release the GIL);
            the torch backend uses torch's intra-op threads instead.

    Returns:
        The FRST map with the shape of ``volume``, ``>= 0`` and large at the centres of dark blobs;
        a numpy array (numpy backend) or a tensor on the input's device (torch backend), in ``dtype``.
    """
    is_tensor = isinstance(volume, torch.Tensor)
    backend = backend or ("torch" if is_tensor else "numpy")
    if backend not in ("numpy", "torch"):
        raise ValueError(f"frst_3d: backend must be 'numpy' or 'torch', got {backend!r}")
    spacing = tuple(float(s) for s in spacing)
    channel = volume.ndim == 4 and volume.shape[0] == 1
    vol = volume[0] if channel else volume
    _check_volume(vol, spacing, radii_mm)
    spacing = snap_spacing(spacing)  # 1.00000003 mm computes exactly as 1 mm
    if mask is not None:
        mask = mask[0] if (mask.ndim == 4 and mask.shape[0] == 1) else mask
        if tuple(mask.shape) != tuple(vol.shape):
            raise ValueError(f"frst_3d: mask shape {tuple(mask.shape)} differs from volume shape {tuple(vol.shape)}")
    if backend == "numpy":
        v = vol.detach().cpu().numpy() if is_tensor else np.asarray(vol)
        mk = None
        if mask is not None:
            mk = (mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)) > 0
        out = _frst_numpy(v, spacing, radii_mm, float(alpha), float(beta), mk, float(presmooth_sigma_mm),
                          np.dtype(dtype or np.float64), workers=int(workers))
        return out[None] if channel else out
    v = vol if is_tensor else torch.as_tensor(np.asarray(vol))
    v = v.as_tensor() if hasattr(v, "as_tensor") else v  # MetaTensor -> plain tensor
    mk = None
    if mask is not None:
        mk = (mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))).to(v.device) > 0
        mk = mk.as_tensor() if hasattr(mk, "as_tensor") else mk
    tdtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, np.dtype(dtype or np.float64).name)
    out = _frst_torch(v, spacing, radii_mm, float(alpha), float(beta), mk, float(presmooth_sigma_mm), tdtype)
    return out[None] if channel else out

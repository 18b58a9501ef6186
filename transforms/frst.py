"""3-D Fast Radial Symmetry Transform (FRST) for dark blobs (numpy and torch backends).

Loy and Zelinsky, "Fast radial symmetry for detecting points of interest", IEEE TPAMI 25(8), 2003, extended
to 3-D with the dark polarity only (cerebral microbleeds are hypointense on SWI), following the choices of
Kovesi's reference implementation (``fastradial.m``) for the clipping constant and the per-radius scaling:

1. gradient ``g`` by the 3-D Sobel operator (as ``scipy.ndimage.sobel`` per axis, mirror boundary), normalised
   to intensity/mm by dividing by 32 and by the voxel spacing of that axis;
2. only voxels with ``|g| > beta * max|g|`` vote (the maximum is taken inside ``mask`` when one is given);
3. for every radius ``n`` (in mm; ``n / spacing`` voxels along each axis) the *negatively affected* voxel
   ``p - round(n_vox * g / |g|)`` (the point ``n`` mm down the gradient, i.e. into the dark side) collects one
   orientation vote ``O_n += 1`` and the magnitude ``M_n += |g|``. Accumulation uses ``np.add.at`` with an
   array of values (NumPy's fast path, the order of additions of ``np.bincount``; numpy backend) or
   ``Tensor.index_add_`` (torch backend) on a volume padded by the largest offset. Votes falling outside the
   volume are dropped;
4. ``O_n`` is clipped at ``kappa_n`` (8 for n = 1, 9.9 otherwise) and
   ``F_n = (M_n / kappa_n) * (O~_n / kappa_n) ** alpha``;
5. ``F_n`` is smoothed with a Gaussian of sigma ``0.25 n`` (in voxels per axis, truncated at 4 sigma, mirror
   boundary as ``scipy.ndimage``), multiplied by ``n`` (mm) so that large radii keep their weight;
6. the map is the mean over radii. Because only negatively affected voxels vote, the map is ``>= 0`` and
   positive at dark blobs (Loy and Zelinsky's ``-S`` for a dark-only transform).

Both backends compute the same map (float64 by default; relative difference ~1e-12, and < 1e-4 in
float32). The torch backend runs on the device of the input tensor; ``backend="auto"`` picks torch on CUDA
when a GPU is available, else numpy. Speed (issue 14, ``docs/frst.md`` "Speed"): with a mask the
computation is restricted to the mask's bounding box widened by :func:`frst_margin` (exact); the numpy
backend works in slabs along X in ``workers`` threads, with eight shared Sobel passes, banded-matrix
Gaussian passes and everything in ``dtype`` (float32 in the candidate stage).

Candidate proposal from the map (local maxima, NMS, the MONAI transform ``FRSTCandidatesd``) is
:mod:`transforms.candidates`. Defaults were tuned on the phantom training split with ``scripts/tune_frst.py``
(see ``docs/frst.md``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from transforms.spacing import RATIO_DECIMALS, snap_spacing, voxel_ratio
from transforms.threads import blas_single_thread, usable_cpus

__all__ = [
    "DEFAULT_RADII_MM",
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_MIN_DISTANCE_MM",
    "DEFAULT_MAX_CANDIDATES",
    "DEFAULT_PRESMOOTH_SIGMA_MM",
    "DEFAULT_SNAP_RADIUS_MM",
    "kappa_for_radius",
    "frst_margin",
    "default_workers",
    "auto_backend",
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


def _gaussian_radius(sigma: float, truncate: float = 4.0) -> int:
    """Half-width in voxels of :func:`_gaussian_kernel1d` (``int(truncate * sigma + 0.5)``, noise-robust)."""
    return int(np.floor(round(truncate * float(sigma) + 0.5, RATIO_DECIMALS)))


def frst_margin(
    spacing: Sequence[float], radii_mm: Sequence[float], presmooth_sigma_mm: float = DEFAULT_PRESMOOTH_SIGMA_MM
) -> tuple[int, int, int]:
    """Voxels per axis beyond which a voter cannot influence the map: the largest vote offset plus the
    half-width of that radius' Gaussian, plus the pre-smoothing half-width and 2 (the Sobel operator's
    reach, and one voxel of safety). The map is 0 farther than this from every voter, and the gradient at a
    voxel depends on the intensities within ``presmoothing + 1`` voxels only."""
    spacing = snap_spacing(tuple(float(s) for s in spacing))
    out = []
    for ax in range(3):
        reach = max(int(np.ceil(voxel_ratio(n, spacing)[ax])) + _gaussian_radius(0.25 * float(n) / spacing[ax])
                    for n in radii_mm)
        pre = _gaussian_radius(presmooth_sigma_mm / spacing[ax]) if presmooth_sigma_mm > 0 else 0
        out.append(reach + pre + 2)
    return tuple(out)


def auto_backend() -> tuple[str, str | None]:
    """``("torch", "cuda")`` when a CUDA device is available, else ``("numpy", None)`` (the fast CPU path)."""
    return ("torch", "cuda") if torch.cuda.is_available() else ("numpy", None)


def _mask_box(mask: np.ndarray | torch.Tensor, margin: Sequence[int]) -> tuple[slice, ...] | None:
    """Bounding box of the non-zero voxels of ``mask`` widened by ``margin`` voxels per axis (clipped to the
    volume); ``None`` for an empty mask."""
    shape = tuple(mask.shape)
    if isinstance(mask, torch.Tensor):
        p01 = mask.any(dim=2)
        proj = [p01.any(dim=1).cpu().numpy(), p01.any(dim=0).cpu().numpy(), mask.any(dim=0).any(dim=0).cpu().numpy()]
    else:
        p01 = mask.any(axis=2)
        proj = [p01.any(axis=1), p01.any(axis=0), mask.any(axis=(0, 1))]
    box = []
    for ax in range(3):
        idx = np.flatnonzero(proj[ax])
        if not len(idx):
            return None
        box.append(slice(max(0, int(idx[0]) - margin[ax]), min(shape[ax], int(idx[-1]) + 1 + margin[ax])))
    return tuple(box)


def _gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The same normalised kernel as ``scipy.ndimage.gaussian_filter1d`` (radius ``int(truncate*sigma+0.5)``,
    the argument rounded to ``RATIO_DECIMALS`` decimals so that spacing noise cannot change the radius)."""
    radius = _gaussian_radius(sigma, truncate)
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
# The numpy backend works on slabs of a few planes along axis 0 (about 1 MiB per array, so that a slab's
# temporaries stay in the CPU cache), in ``workers`` threads: NumPy, SciPy and BLAS release the GIL. Passes
# along axes 1 and 2 of a slab need no other slab; a pass along axis 0 reads a halo of planes. The Gaussian
# passes along axes 0 and 1 are products with banded matrices (the mirror boundary folded in, one BLAS call
# per block), along axis 2 ``scipy.ndimage.correlate1d``; the per-radius passes along axis 0 and the sum
# over radii are one product per slab.

def default_workers() -> int:
    """Threads of the numpy backend when ``workers`` is not given: torch's intra-op thread count (it follows
    ``OMP_NUM_THREADS``), at most the CPUs this process may use (:func:`transforms.threads.usable_cpus`), and at
    most 4."""
    return max(1, min(usable_cpus(), torch.get_num_threads(), 4))


def _slabs(shape: Sequence[int], itemsize: int, nbytes: int = 1 << 20) -> list[tuple[int, int]]:
    """``(start, stop)`` planes along axis 0 of about ``nbytes`` per array (at least one plane each)."""
    rows = max(1, nbytes // max(int(np.prod(shape[1:])) * itemsize, 1))
    return [(a, min(a + rows, shape[0])) for a in range(0, shape[0], rows)]


def _run(fn: Any, items: Sequence[Any], workers: int) -> None:
    """``fn(item)`` for every item, in ``workers`` threads (in this thread for one worker or one item)."""
    if workers <= 1 or len(items) <= 1:
        for it in items:
            fn(it)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as ex:
        for _ in ex.map(fn, items):  # re-raises the first error
            pass


def _take(ndim: int, axis: int, start: int, stop: int) -> tuple[slice, ...]:
    sl = [slice(None)] * ndim
    sl[axis] = slice(start, stop)
    return tuple(sl)


def _reflect_index(start: int, stop: int, n: int) -> np.ndarray:
    """Indices ``start..stop-1`` folded into ``[0, n)`` as scipy's ``mode='reflect'`` (d c b a | a b c d | d c b a)."""
    i = np.remainder(np.arange(start, stop), 2 * n)
    return np.where(i < n, i, 2 * n - 1 - i)


def _rows(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Planes ``start..stop-1`` of ``x`` along axis 0, mirrored beyond its ends (a view when inside)."""
    if start >= 0 and stop <= x.shape[0]:
        return x[start:stop]
    return x[_reflect_index(start, stop, x.shape[0])]


def _smooth121(x: np.ndarray, axis: int, out: np.ndarray) -> np.ndarray:
    """``out = correlate1d(x, [1, 2, 1], axis, mode='reflect')`` (Sobel's smoothing pass)."""
    n, nd = x.shape[axis], x.ndim
    if n == 1:
        return np.multiply(x, 4, out=out)
    s = lambda a, b: _take(nd, axis, a, b)  # noqa: E731
    mid, first, last = out[s(1, n - 1)], out[s(0, 1)], out[s(n - 1, n)]
    np.add(x[s(0, n - 2)], x[s(2, n)], out=mid)
    mid += x[s(1, n - 1)]
    mid += x[s(1, n - 1)]
    np.multiply(x[s(0, 1)], 3, out=first)  # mirror: x[-1] = x[0]
    first += x[s(1, 2)]
    np.multiply(x[s(n - 1, n)], 3, out=last)
    last += x[s(n - 2, n - 1)]
    return out


def _diff101(x: np.ndarray, axis: int, out: np.ndarray) -> np.ndarray:
    """``out = correlate1d(x, [-1, 0, 1], axis, mode='reflect')`` (Sobel's derivative pass)."""
    n, nd = x.shape[axis], x.ndim
    if n == 1:
        out[...] = 0
        return out
    s = lambda a, b: _take(nd, axis, a, b)  # noqa: E731
    np.subtract(x[s(2, n)], x[s(0, n - 2)], out=out[s(1, n - 1)])
    np.subtract(x[s(1, 2)], x[s(0, 1)], out=out[s(0, 1)])
    np.subtract(x[s(n - 1, n)], x[s(n - 2, n - 1)], out=out[s(n - 1, n)])
    return out


def _sobel_slab(v: np.ndarray, a: int, b: int, scale: Sequence[float], g: Sequence[np.ndarray]) -> None:
    """Sobel gradient components (times ``scale[k]``) of planes ``a..b-1`` of ``v`` into ``g[k][a:b]``.

    The nine 1-D passes of three ``scipy.ndimage.sobel`` calls become eight: ``S_z v`` is shared by
    ``g_x = D_x S_y S_z v`` and ``g_y = S_x D_y S_z v`` (``S`` = [1, 2, 1], ``D`` = [-1, 0, 1])."""
    c = _rows(v, a - 1, b + 1)  # one plane of halo on each side for the passes along axis 0
    t1, t2, t3 = np.empty_like(c), np.empty_like(c), np.empty_like(c)
    _smooth121(c, 2, t1)  # S_z v
    _smooth121(t1, 1, t2)  # S_y S_z v
    _diff101(t2, 0, t3)  # D_x S_y S_z v (its first and last planes, the halo, are unused)
    np.multiply(t3[1:-1], scale[0], out=g[0][a:b])
    _diff101(t1, 1, t2)  # D_y S_z v
    _smooth121(t2, 0, t3)  # S_x D_y S_z v
    np.multiply(t3[1:-1], scale[1], out=g[1][a:b])
    _diff101(c, 2, t1)  # D_z v
    _smooth121(t1, 1, t2)  # S_y D_z v
    _smooth121(t2, 0, t3)  # S_x S_y D_z v
    np.multiply(t3[1:-1], scale[2], out=g[2][a:b])


@functools.lru_cache(maxsize=64)
def _axis_matrix(n: int, weights: tuple[float, ...]) -> np.ndarray:
    """(n, n) float64 matrix ``K`` with ``K @ x == correlate1d(x, weights, mode='reflect')`` for a length-n
    signal ``x`` (odd-length weights; banded, the mirrored boundary folded into its first and last rows)."""
    r = len(weights) // 2
    k = np.zeros((n, n), np.float64)
    w = np.asarray(weights, np.float64)
    for i in range(n):
        np.add.at(k[i], _reflect_index(i - r, i + r + 1, n), w)
    return k


def _band(n: int, r: int, a: int, b: int) -> tuple[int, int]:
    """Columns ``[lo, hi)`` of an :func:`_axis_matrix` (half-width ``r``) that rows ``a..b-1`` use."""
    return (max(0, a - r), min(n, b + r)) if r < n else (0, n)


def _smooth_yz(s: np.ndarray, kz: np.ndarray, ky: np.ndarray, out: np.ndarray, block: int = 32) -> None:
    """``out = correlate1d(correlate1d(s, kz, axis=2), ky, axis=1)`` (mirror boundary) for a slab ``s``;
    the pass along axis 1 as banded matrix products of ``block`` rows."""
    t = ndimage.correlate1d(s, kz, axis=2, mode="reflect")
    n, r = s.shape[1], len(ky) // 2
    k = _axis_matrix(n, tuple(float(w) for w in ky)).astype(s.dtype)
    for a in range(0, n, block):
        b = min(a + block, n)
        lo, hi = _band(n, r, a, b)
        np.matmul(k[a:b, lo:hi], t[:, lo:hi, :], out=out[:, a:b, :])


def _smooth_x_sum(ts: Sequence[np.ndarray], kxs: Sequence[np.ndarray], weights: Sequence[float], a: int, b: int,
                  out: np.ndarray) -> None:
    """``out[a:b] = sum_i weights[i] * correlate1d(ts[i], kxs[i], axis=0)[a:b]`` (mirror boundary), as one
    matrix product over the stacked bands of the ``ts``."""
    n = out.shape[0]
    mats, rows = [], []
    for t, kx, w in zip(ts, kxs, weights):
        lo, hi = _band(n, len(kx) // 2, a, b)
        mats.append(_axis_matrix(n, tuple(float(x) for x in kx))[a:b, lo:hi] * w)
        rows.append(t[lo:hi].reshape(hi - lo, -1))
    lhs = np.concatenate(mats, axis=1).astype(out.dtype)
    rhs = rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0)
    np.matmul(lhs, rhs, out=out[a:b].reshape(b - a, -1))


def _gaussian3(v: np.ndarray, ks: Sequence[np.ndarray], slabs: list[tuple[int, int]], workers: int) -> np.ndarray:
    """Separable correlation of ``v`` with ``ks[ax]`` along each axis (mirror boundary), in ``v``'s dtype."""
    t = np.empty_like(v)
    _run(lambda ab: _smooth_yz(v[ab[0]:ab[1]], ks[2], ks[1], t[ab[0]:ab[1]]), slabs, workers)
    out = np.empty_like(v)
    _run(lambda ab: _smooth_x_sum([t], [ks[0]], [1.0], ab[0], ab[1], out), slabs, workers)
    return out


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
    """The numpy backend over all of ``vol`` (cropping to the mask is :func:`frst_3d`'s). Every volume pass
    (pre-smoothing, gradient, magnitude, vote images, Gaussian) runs in ``dtype``; the voters' unit vectors
    and vote offsets are float64 (so rounding an offset depends on ``dtype`` only through the gradient)."""
    dtype = np.dtype(dtype)
    shape = vol.shape
    slabs = _slabs(shape, dtype.itemsize)
    # BLAS in one thread whatever ``workers`` is: parallelism comes from the slabs, and a multi-threaded BLAS
    # may split (and so round) a product differently, which would make the map depend on the thread count
    with blas_single_thread():
        v = np.asarray(vol, dtype=dtype)
        if presmooth_sigma_mm > 0:
            v = _gaussian3(v, [_gaussian_kernel1d(presmooth_sigma_mm / spacing[ax]).astype(dtype) for ax in range(3)],
                           slabs, workers)
        g = [np.empty(shape, dtype) for _ in range(3)]
        scale = [1.0 / (32.0 * spacing[ax]) for ax in range(3)]
        _run(lambda ab: _sobel_slab(v, ab[0], ab[1], scale, g), slabs, workers)
        v = None  # released (closures above captured the name)
        mag = np.empty(shape, dtype)

        def magnitude(ab: tuple[int, int]) -> None:
            x, y, z, mg = g[0][ab[0]:ab[1]], g[1][ab[0]:ab[1]], g[2][ab[0]:ab[1]], mag[ab[0]:ab[1]]
            np.multiply(x, x, out=mg)
            mg += y * y
            mg += z * z
            np.sqrt(mg, out=mg)

        _run(magnitude, slabs, workers)
        ref = mag[mask] if mask is not None else mag
        gmax = float(ref.max()) if ref.size else 0.0
        if gmax <= 0:
            return np.zeros(shape, dtype=dtype)
        sel = mag > beta * gmax
        if mask is not None:
            sel &= mask
        voters = np.flatnonzero(sel)
        del sel
        m = mag.ravel()[voters].astype(np.float64)
        mag = None
        units = [g[ax].ravel()[voters].astype(np.float64) / m for ax in range(3)]
        g = None
        # Votes are accumulated in a volume padded by the largest offset, so no bounds test is needed per
        # vote; votes that fell outside the volume land in the padding, which is never read.
        pad = [int(p) + 1 for p in np.ceil(voxel_ratio(max(radii_mm), spacing))]
        pshape = tuple(s + 2 * p for s, p in zip(shape, pad))
        strides = (pshape[1] * pshape[2], pshape[2], 1)
        coords = np.unravel_index(voters, shape)
        del voters
        flat_p = (coords[0] + pad[0]) * strides[0] + (coords[1] + pad[1]) * strides[1] + (coords[2] + pad[2])
        del coords
        m = m.astype(dtype)
        ones = np.ones(len(m), dtype)
        off = np.empty(len(m), np.float64)
        tmp = np.empty(len(m), np.float64)
        flat = np.empty(len(m), np.int64)
        orient = np.zeros(n_pad := int(np.prod(pshape)), dtype)  # reset after each radius where voted
        image = np.zeros(n_pad, dtype)  # M_n, then F_n in place
        smoothed, kxs = [], []
        for n in radii_mm:
            n = float(n)
            kappa = kappa_for_radius(n)
            off.fill(0)
            for ax in range(3):
                np.multiply(units[ax], n / spacing[ax], out=tmp)
                np.rint(tmp, out=tmp)
                if strides[ax] != 1:
                    tmp *= strides[ax]
                off += tmp
            np.subtract(flat_p, off, out=flat, casting="unsafe")
            np.add.at(orient, flat, ones)  # O_n (the same order of additions as np.bincount)
            np.add.at(image, flat, m)  # M_n
            # F_n = (M_n / kappa) * (min(O_n, kappa) / kappa) ** alpha, computed where votes landed (it is 0
            # elsewhere); a voxel voted for several times is written several times with the same value
            o = np.minimum(orient[flat], kappa)
            o *= 1.0 / kappa
            f = image[flat] * (1.0 / kappa)
            f *= o**alpha if alpha != 2.0 else o * o
            image[flat] = f
            orient[flat] = 0
            del o, f
            ks = [_gaussian_kernel1d(0.25 * n / spacing[ax]).astype(dtype) for ax in range(3)]
            t = np.empty(shape, dtype)
            fimg = image.reshape(pshape)[pad[0]:pad[0] + shape[0], pad[1]:pad[1] + shape[1], pad[2]:pad[2] + shape[2]]
            _run(lambda ab: _smooth_yz(fimg[ab[0]:ab[1]], ks[2], ks[1], t[ab[0]:ab[1]]), slabs, workers)
            image[flat] = 0
            smoothed.append(t)
            kxs.append(ks[0])
        del orient, image
        out = np.empty(shape, dtype)
        weights = [float(n) / len(radii_mm) for n in radii_mm]  # F_n smoothed times n, mean over radii
        _run(lambda ab: _smooth_x_sum(smoothed, kxs, weights, ab[0], ab[1], out), slabs, workers)
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
    workers: int | None = None,
    crop: bool = True,
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
        backend: ``"numpy"``, ``"torch"`` or ``"auto"`` (torch on CUDA when a GPU is available, else numpy:
            :func:`auto_backend`); default: torch for a tensor input (on its device), numpy otherwise.
        mask: optional (X, Y, Z) boolean mask; only voxels inside it vote and the gradient maximum is
            taken inside it (votes may still land outside it).
        presmooth_sigma_mm: Gaussian smoothing of the intensities before the gradient (0: none).
        dtype: computation dtype (default float64). float32 (what the candidate stage uses) halves memory
            and time at ~1e-7 relative error of the map; the numpy backend then also computes the gradient
            in float32, so a vote offset that lies within float error of .5 voxel may round differently.
        workers: numpy backend: threads (default :func:`default_workers`: torch's thread count, at most 4;
            the map does not depend on it); the torch backend uses torch's intra-op threads instead.
        crop: with a ``mask``, compute only over the mask's bounding box widened by :func:`frst_margin`
            (the largest vote offset + Gaussian half-width + pre-smoothing + 2 voxels) and return 0
            outside it. Exact: outside that box the full computation is 0 as well, and inside it every
            voter's gradient and every vote and smoothing see the same values (``crop=False``: the whole
            volume, the reference path).

    Returns:
        The FRST map with the shape of ``volume``, ``>= 0`` and large at the centres of dark blobs;
        a numpy array (numpy backend) or a tensor (torch backend; on CUDA for ``"auto"`` with a GPU, else on
        the input's device), in ``dtype``.
    """
    is_tensor = isinstance(volume, torch.Tensor)
    device = None
    if backend == "auto":
        backend, device = auto_backend()
    backend = backend or ("torch" if is_tensor else "numpy")
    if backend not in ("numpy", "torch"):
        raise ValueError(f"frst_3d: backend must be 'numpy', 'torch' or 'auto', got {backend!r}")
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
        ndtype = np.dtype(dtype or np.float64)
        nworkers = default_workers() if workers is None else max(1, int(workers))

        def run_numpy(v: np.ndarray, mk: np.ndarray | None) -> np.ndarray:
            return _frst_numpy(v, spacing, radii_mm, float(alpha), float(beta), mk, float(presmooth_sigma_mm),
                               ndtype, workers=nworkers)

        out = _cropped(run_numpy, v, mk, crop, spacing, radii_mm, presmooth_sigma_mm,
                       lambda s: np.zeros(s, ndtype))
        return out[None] if channel else out
    v = vol if is_tensor else torch.as_tensor(np.asarray(vol))
    v = v.as_tensor() if hasattr(v, "as_tensor") else v  # MetaTensor -> plain tensor
    if device is not None:
        v = v.to(device)
    mk = None
    if mask is not None:
        mk = (mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))).to(v.device) > 0
        mk = mk.as_tensor() if hasattr(mk, "as_tensor") else mk
    tdtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, np.dtype(dtype or np.float64).name)

    def run_torch(v: torch.Tensor, mk: torch.Tensor | None) -> torch.Tensor:
        return _frst_torch(v, spacing, radii_mm, float(alpha), float(beta), mk, float(presmooth_sigma_mm), tdtype)

    out = _cropped(run_torch, v, mk, crop, spacing, radii_mm, presmooth_sigma_mm,
                   lambda s: torch.zeros(s, dtype=tdtype, device=v.device))
    return out[None] if channel else out


def _cropped(run: Any, v: Any, mask: Any, crop: bool, spacing: Sequence[float], radii_mm: Sequence[float],
             presmooth_sigma_mm: float, zeros: Any) -> Any:
    """``run(v, mask)``, over the mask's widened bounding box only when ``crop`` (see :func:`frst_3d`)."""
    if not crop or mask is None:
        return run(v, mask)
    box = _mask_box(mask, frst_margin(spacing, radii_mm, presmooth_sigma_mm))
    shape = tuple(v.shape)
    if box is None:  # empty mask: no voter, the map is 0
        return zeros(shape)
    if all(b.start == 0 and b.stop == s for b, s in zip(box, shape)):
        return run(v, mask)
    out = zeros(shape)
    out[box] = run(v[box], mask[box])
    return out

"""Register nilearn's MNI152 T1 template to a scan with ITK and warp the template's brain mask onto the scan.

The brain-mask fallback of :func:`cmb_synthesis.data.brainmask.estimate_brainmask` (``method="mni"``). Steps
(all on coarse grids, so a 512 x 512 x 128 scan takes a few seconds):

1. The scan is block-averaged to about ``grid_mm`` (3 mm) and scaled to [0, 1] by its 99.5th percentile; the
   template (nilearn's MNI152 2009 T1, 1 mm, shipped in the wheel) is block-averaged alike.
2. Initial transform: the template's brain centroid is put on the centre of mass of the scan's foreground, with
   an isotropic scale from the ratio of the in-plane head extents (the axial extent is not used: clinical SWI
   is often a slab).
3. Affine registration (``itk.ImageRegistrationMethodv4``, Mattes mutual information as SWI and T1 differ in
   contrast, restricted to the template's brain dilated by 10 mm; regular-step gradient descent with
   physical-shift parameter scales, two resolution levels), run twice on different metric samples, the better
   one (metric over the whole coarse grid) kept.
4. A coarse B-spline deformable step (``bspline_mesh`` control-grid cells per axis over the scan, L-BFGS-B,
   bounded displacements), kept only when it improves the metric.
5. The template's brain mask (nilearn ``load_mni152_brain_mask``) is sampled through the transforms with
   trilinear interpolation on a grid of about ``output_mm`` spanning the scan's voxel centres, upsampled
   trilinearly to the scan grid and thresholded at 0.5.

Measured Dice and timing: ``docs/brainmask.md`` (``benchmarks/bench_brainmask.py``).

Frames: scan arrays are (X, Y, Z) in the voxel order of their 4 x 4 voxel -> world affine (RAS mm, as nibabel).
ITK works in LPS and its array views are (z, y, x): :func:`itk_image` flips the first two rows of the
direction/origin and transposes the array. The transforms found map scan (fixed) points to template (moving)
points, as ITK registration does.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["itk_image", "block_average", "mni_template", "TemplateRegistration", "register_template",
           "warp_template_mask"]

logger = logging.getLogger(__name__)

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _check_affine(affine: np.ndarray) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"affine must be a finite 4 x 4 matrix, got shape {a.shape}")
    if abs(np.linalg.det(a[:3, :3])) < 1e-9:
        raise ValueError("affine is singular (a zero voxel size or collinear axes)")
    return a


def itk_image(array: np.ndarray, affine: np.ndarray):
    """A float32 ``itk.Image[itk.F, 3]`` of an (X, Y, Z) array with its voxel -> RAS affine (stored as LPS).

    The voxel axes keep their order (ITK index (i, j, k) = ``array[i, j, k]``); spacing = column norms of the
    affine; direction and origin are converted RAS -> LPS.
    """
    import itk

    a = _check_affine(affine)
    sp = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    direction = _RAS_TO_LPS @ (a[:3, :3] / sp)
    origin = _RAS_TO_LPS @ a[:3, 3]
    img = itk.image_from_array(np.ascontiguousarray(np.asarray(array, dtype=np.float32).transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in sp])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    return img


def block_average(array: np.ndarray, affine: np.ndarray, target_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Average non-overlapping blocks of about ``target_mm`` (factor ``round(target_mm / spacing)`` >= 1 per axis).

    Trailing voxels that do not fill a block are dropped. Returns the (X', Y', Z') float32 array and its affine
    (voxel (i', j', k') is the centre of block i' * f .. i' * f + f - 1).
    """
    a = _check_affine(affine)
    sp = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    f = [max(1, int(round(target_mm / s))) for s in sp]
    f = [min(fi, n) for fi, n in zip(f, array.shape)]
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    out = F.avg_pool3d(t, kernel_size=f, stride=f)[0, 0].numpy()
    step = np.eye(4)
    step[:3, :3] = np.diag(f)
    step[:3, 3] = (np.asarray(f) - 1) / 2.0
    return np.ascontiguousarray(out), a @ step


@functools.lru_cache(maxsize=1)
def _mni_arrays() -> dict:
    """nilearn's MNI152 2009 1 mm T1 template and brain mask (from its wheel, no download), loaded once."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    brain = datasets.load_mni152_brain_mask(resolution=1)
    t1_arr = np.asarray(t1.dataobj, dtype=np.float32)
    br_arr = (np.asarray(brain.dataobj, dtype=np.float32) > 0.5).astype(np.float32)
    if t1_arr.ndim != 3 or t1_arr.shape != br_arr.shape:
        raise RuntimeError(f"nilearn MNI152 template {t1_arr.shape} and brain mask {br_arr.shape} differ")
    return {"t1": t1_arr, "t1_affine": np.asarray(t1.affine, np.float64), "brain": br_arr,
            "brain_affine": np.asarray(brain.affine, np.float64)}


@functools.lru_cache(maxsize=4)
def mni_template(grid_mm: float = 3.0, mask_dilate_mm: float = 10.0) -> dict:
    """The MNI152 T1 template prepared for registration on a ``grid_mm`` grid (cached per argument pair).

    Returns ``t1`` (block-averaged to ``grid_mm``, divided by its 99.5th percentile, clipped to [0, 1]) and
    ``t1_affine``; ``reg_mask`` (uint8, same grid: the brain mask dilated by ``mask_dilate_mm`` voxels of 1 mm,
    city-block distance, the region the metric samples) and ``reg_mask_affine``; ``brain`` (197 x 233 x 189
    float32 in {0, 1}, 1 mm) and ``brain_affine``; ``brain_centre`` (RAS mm, centroid of the brain mask) and
    ``head_extent`` (mm, sqrt of the head's LR x AP extent), used for the initial transform.
    """
    from scipy import ndimage

    arrs = _mni_arrays()
    t1_arr, t1_aff, br_arr = arrs["t1"], arrs["t1_affine"], arrs["brain"]
    hi = float(np.percentile(t1_arr[t1_arr > 0], 99.5))
    coarse, coarse_aff = block_average(np.clip(t1_arr / hi, 0, 1), t1_aff, grid_mm)
    centre = t1_aff[:3, :3] @ np.argwhere(br_arr > 0).mean(axis=0) + t1_aff[:3, 3]
    dilated = br_arr > 0
    if mask_dilate_mm >= 1:
        dilated = ndimage.binary_dilation(dilated, iterations=int(round(mask_dilate_mm)))
    reg_mask, reg_mask_aff = block_average(dilated.astype(np.float32), t1_aff, grid_mm)
    return {"t1": coarse, "t1_affine": coarse_aff, "reg_mask": (reg_mask > 0.01).astype(np.uint8),
            "reg_mask_affine": reg_mask_aff, "brain": br_arr, "brain_affine": arrs["brain_affine"],
            "brain_centre": centre, "head_extent": _inplane_extent(t1_arr > 0.1 * hi, t1_aff)}


def _inplane_extent(fg: np.ndarray, affine: np.ndarray) -> float:
    """sqrt(LR extent x AP extent) in mm of a foreground's largest axial cross-sections (robust percentiles)."""
    sp = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ext = []
    for ax in (0, 1):
        other = tuple(a for a in range(3) if a != ax)
        prof = fg.sum(axis=other)
        idx = np.nonzero(prof > 0.02 * prof.max())[0]
        ext.append((idx[-1] - idx[0] + 1) * sp[ax] if idx.size else 0.0)
    return float(np.sqrt(ext[0] * ext[1]))


@dataclass
class TemplateRegistration:
    """Scan (fixed, RAS mm) -> template (moving, RAS mm) mapping: ``y = affine @ (x + d(x))``.

    ``affine``: 4 x 4 RAS matrix; ``displacement``: (3, X', Y', Z') float32 RAS mm of the B-spline step on the
    grid ``displacement_affine`` (None: affine only); ``metric``: Mattes MI of the kept transforms over every
    other voxel of the coarse scan grid (lower is better);
    ``seconds``: time per stage.
    """

    affine: np.ndarray
    displacement: np.ndarray | None
    displacement_affine: np.ndarray | None
    metric: float
    seconds: dict = field(default_factory=dict)


def _itk_affine_to_ras(tf) -> np.ndarray:
    """A 4 x 4 RAS matrix of an ITK matrix-offset transform (which maps LPS points)."""
    import itk

    m = np.asarray(itk.array_from_matrix(tf.GetMatrix()), dtype=np.float64)
    off = np.array([tf.GetOffset()[i] for i in range(3)], dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = m, off
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


def _ras_to_itk_affine(ras: np.ndarray):
    import itk

    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ ras @ flip
    tf = itk.AffineTransform[itk.D, 3].New()
    params = tf.GetParameters()
    for r in range(3):
        for c in range(3):
            params[r * 3 + c] = float(lps[r, c])
    for r in range(3):
        params[9 + r] = float(lps[r, 3])
    tf.SetParameters(params)
    return tf


def _foreground(coarse: np.ndarray) -> np.ndarray:
    """Head foreground of a [0, 1]-scaled coarse image: above a fraction of the robust maximum."""
    return coarse > 0.15


def _initial_affine(scan: np.ndarray, scan_aff: np.ndarray, tpl: dict) -> np.ndarray:
    """RAS scan -> template map from centres and the in-plane head size (an isotropic similarity)."""
    fg = _foreground(scan)
    if not fg.any():
        raise ValueError("no foreground in the scan (nothing above 15 % of its 99.5th percentile)")
    w = scan * fg
    ijk = np.indices(scan.shape).reshape(3, -1).T
    centre_vox = (ijk * w.reshape(-1, 1)).sum(axis=0) / w.sum()
    centre = scan_aff[:3, :3] @ centre_vox + scan_aff[:3, 3]
    # orientation: world axes are RAS for both, so the rotation starts at the identity
    ext = _inplane_extent(fg, scan_aff)
    s = tpl["head_extent"] / ext if ext > 0 else 1.0
    s = float(np.clip(s, 0.5, 2.0))
    m = np.eye(4)
    m[:3, :3] = s * np.eye(3)
    m[:3, 3] = tpl["brain_centre"] - s * centre
    return m


def _mask_object(mask: np.ndarray, reference):
    """An ``itk.ImageMaskSpatialObject`` of a uint8 (X, Y, Z) mask on ``reference``'s grid."""
    import itk

    img = itk.image_from_array(np.ascontiguousarray(mask.astype(np.uint8).transpose(2, 1, 0)))
    img.CopyInformation(reference)
    so = itk.ImageMaskSpatialObject[3].New()
    so.SetImage(img)
    so.Update()
    return so


def _registration(fixed, moving, metric, optimizer, initial, shrink: Sequence[int], sigmas: Sequence[float],
                  sampling: float, seed: int, moving_initial=None):
    """A configured ``itk.ImageRegistrationMethodv4`` (random metric sampling, transform optimised in place)."""
    import itk

    ImageF3 = itk.Image[itk.F, 3]
    reg = itk.ImageRegistrationMethodv4[ImageF3, ImageF3].New()
    reg.SetFixedImage(fixed)
    reg.SetMovingImage(moving)
    reg.SetMetric(metric)
    reg.SetOptimizer(optimizer)
    if moving_initial is not None:
        reg.SetMovingInitialTransform(moving_initial)
    reg.SetInitialTransform(initial)
    reg.InPlaceOn()
    reg.SetNumberOfLevels(len(shrink))
    reg.SetShrinkFactorsPerLevel([int(v) for v in shrink])
    reg.SetSmoothingSigmasPerLevel([float(v) for v in sigmas])
    reg.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(False)
    reg.SetMetricSamplingStrategy(itk.ImageRegistrationMethodv4Enums.MetricSamplingStrategy_RANDOM)
    reg.SetMetricSamplingPercentage(float(sampling))
    reg.MetricSamplingReinitializeSeed(int(seed))
    return reg


def _affine_run(fixed, moving, moving_mask, init: np.ndarray, centre: Sequence[float], iterations: int,
                sampling: float, seed: int, bins: int):
    """One affine registration (regular-step gradient descent, physical-shift scales, levels 2x and 1x the
    coarse grid) from the RAS map ``init``, parametrised about ``centre`` (LPS mm); returns the ITK transform.

    Raises:
        ValueError: ITK failed (e.g. no sample maps into the template).
    """
    import itk

    ImageF3 = itk.Image[itk.F, 3]
    tf = _ras_to_itk_affine(init)
    want = _ras_to_itk_affine(init)
    tf.SetCenter([float(c) for c in centre])
    tf.SetMatrix(want.GetMatrix())
    tf.SetOffset(want.GetOffset())  # the same mapping as ``init``, parametrised about the new centre
    metric = itk.MattesMutualInformationImageToImageMetricv4[ImageF3, ImageF3].New()
    metric.SetNumberOfHistogramBins(int(bins))
    metric.SetMovingImageMask(moving_mask)
    opt = itk.RegularStepGradientDescentOptimizerv4[itk.D].New()
    opt.SetLearningRate(2.0)
    opt.SetMinimumStepLength(0.01)
    opt.SetRelaxationFactor(0.6)
    opt.SetNumberOfIterations(int(iterations))
    scales = itk.RegistrationParameterScalesFromPhysicalShift[type(metric)].New()
    scales.SetMetric(metric)
    opt.SetScalesEstimator(scales)
    opt.SetDoEstimateLearningRateOnce(True)
    reg = _registration(fixed, moving, metric, opt, tf, (2, 1), (1.0, 0.0), sampling, seed)
    try:
        reg.Update()
    except RuntimeError as e:
        raise ValueError(f"template registration failed (affine stage: {str(e).strip().splitlines()[-1]})") from e
    return tf


def _dense_value(fixed, moving, moving_mask, transform, bins: int) -> float:
    """Mattes mutual information (lower is better) of ``transform`` over every voxel of ``fixed``."""
    import itk

    ImageF3 = itk.Image[itk.F, 3]
    metric = itk.MattesMutualInformationImageToImageMetricv4[ImageF3, ImageF3].New()
    metric.SetNumberOfHistogramBins(int(bins))
    metric.SetFixedImage(fixed)
    metric.SetMovingImage(moving)
    metric.SetMovingImageMask(moving_mask)
    metric.SetMovingTransform(transform)
    try:
        metric.Initialize()
        v = float(metric.GetValue())
    except RuntimeError:
        return float("inf")
    return v if np.isfinite(v) else float("inf")


def register_template(
    image: np.ndarray,
    affine: np.ndarray,
    grid_mm: float = 3.0,
    affine_iterations: int = 150,
    samples: int = 30_000,
    bspline_mesh: int | None = 4,
    bspline_iterations: int = 15,
    bspline_samples: int = 15_000,
    bspline_bound_mm: float | None = 10.0,
    affine_runs: int = 2,
    mask_dilate_mm: float = 10.0,
    bins: int = 32,
    seed: int = 0,
) -> TemplateRegistration:
    """Register the MNI152 T1 template to ``image``: affine, then an optional coarse B-spline step.

    Both stages use Mattes mutual information restricted to the template's brain mask dilated by
    ``mask_dilate_mm`` (the metric then follows the brain and the skull next to it, not the neck and face); the
    B-spline stage also samples only the scan region the affine maps into that mask.

    Args:
        image: (X, Y, Z) intensities of the scan; affine: its voxel -> RAS mm matrix.
        grid_mm: block size the scan and template are averaged to before registering (mm).
        affine_iterations: regular-step gradient-descent iterations per level (levels: 2x ``grid_mm``, then
            ``grid_mm``).
        affine_runs: affine registrations on different metric samples (seeds ``seed``, ``seed + 1``, ...); the
            one with the best metric over every voxel is kept.
        samples: metric samples of the affine stage (random points of the coarse scan grid, seeded by ``seed``;
            the fraction ``samples / voxels``, at most 1, so the cost does not grow with the field of view).
        bspline_mesh: B-spline control-grid cells per axis over the scan (None or 0: affine only).
        bspline_iterations, bspline_samples: L-BFGS-B iterations and metric samples of the B-spline stage.
        bspline_bound_mm: bound of each control point's displacement (mm; None: unbounded).
        bins: Mattes mutual information histogram bins.

    Returns:
        :class:`TemplateRegistration`. A B-spline stage that fails inside ITK (e.g. a step that maps every
        sample outside the template) or does not improve the metric over every voxel is dropped with a
        warning, keeping the affine result.

    Raises:
        ValueError: a constant or non-finite image, no foreground, or an affine stage that failed or ended on an
            implausible transform (singular values outside 0.4-2.5, a reflection).
    """
    import itk

    t0 = time.perf_counter()
    tpl = mni_template(float(grid_mm), float(mask_dilate_mm))
    coarse, caff = block_average(image, affine, grid_mm)
    if not np.all(np.isfinite(coarse)):
        raise ValueError("the image holds NaN or infinite values")
    hi, lo = float(np.percentile(coarse, 99.5)), float(coarse.min())
    if hi <= lo:
        raise ValueError("constant image (no contrast to register)")
    coarse = np.clip((coarse - lo) / (hi - lo), 0, 1).astype(np.float32)
    init = _initial_affine(coarse, caff, tpl)
    fixed = itk_image(coarse, caff)
    # every other voxel of the coarse grid: where candidate transforms are compared (``_dense_value``)
    step2 = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed_eval = itk_image(np.ascontiguousarray(coarse[::2, ::2, ::2]), caff @ step2) if min(coarse.shape) >= 8 \
        else fixed
    moving = itk_image(tpl["t1"], tpl["t1_affine"])
    moving_mask = _mask_object(tpl["reg_mask"], itk_image(tpl["reg_mask"], tpl["reg_mask_affine"]))
    ImageF3 = itk.Image[itk.F, 3]
    seconds = {"prepare": time.perf_counter() - t0}

    # --- affine stage: two runs on different metric samples (the gradient descent on a sampled Mattes metric
    # can stop early on an unlucky sample set); the one with the better metric over every voxel is kept
    t1 = time.perf_counter()
    centre = [float(c) for c in _RAS_TO_LPS @ (caff[:3, :3] @ ((np.asarray(coarse.shape) - 1) / 2.0) + caff[:3, 3])]
    n_vox = float(coarse.size)
    runs = []
    for k in range(max(1, int(affine_runs))):
        aff_k = _affine_run(fixed, moving, moving_mask, init, centre, affine_iterations, min(1.0, samples / n_vox),
                            seed + k, bins)
        runs.append((_dense_value(fixed_eval, moving, moving_mask, aff_k, bins), k, aff_k))
    value, _, aff_tf = min(runs, key=lambda r: (r[0], r[1]))
    ras = _itk_affine_to_ras(aff_tf)
    seconds["affine"] = time.perf_counter() - t1
    sv = np.linalg.svd(ras[:3, :3], compute_uv=False)
    if not np.all(np.isfinite(ras)) or sv.min() < 0.4 or sv.max() > 2.5 or np.linalg.det(ras[:3, :3]) <= 0:
        raise ValueError(f"template registration diverged (affine singular values {np.round(sv, 2).tolist()})")

    disp, disp_aff = None, None
    if bspline_mesh:
        t2 = time.perf_counter()
        BSpline = itk.BSplineTransform[itk.D, 3, 3]
        bs = BSpline.New()
        init_bs = itk.BSplineTransformInitializer[BSpline, ImageF3].New()
        init_bs.SetTransform(bs)
        init_bs.SetImage(fixed)
        init_bs.SetTransformDomainMeshSize([int(bspline_mesh)] * 3)
        init_bs.InitializeTransform()
        bs.SetIdentity()
        metric2 = itk.MattesMutualInformationImageToImageMetricv4[ImageF3, ImageF3].New()
        metric2.SetNumberOfHistogramBins(int(bins))
        metric2.SetMovingImageMask(moving_mask)
        # sample only the scan region that the affine maps into the template's dilated brain
        metric2.SetFixedImageMask(_mask_object(
            _mask_through(ras, coarse.shape, caff, tpl["reg_mask"], tpl["reg_mask_affine"]), fixed))
        opt2 = itk.LBFGSBOptimizerv4.New()
        n_par = bs.GetNumberOfParameters()
        # each control point's displacement bounded to +-bspline_bound_mm (2: lower and upper bounds): a step
        # cannot fold the brain into the skull when the metric is flat or noisy
        bounded = 2 if bspline_bound_mm else 0
        opt2.SetBoundSelection(itk.Array[itk.SL](n_par, bounded))
        opt2.SetLowerBound(itk.Array[itk.D](n_par, -float(bspline_bound_mm or 0.0)))
        opt2.SetUpperBound(itk.Array[itk.D](n_par, float(bspline_bound_mm or 0.0)))
        opt2.SetNumberOfIterations(int(bspline_iterations))
        opt2.SetMaximumNumberOfFunctionEvaluations(int(bspline_iterations) * 2)
        opt2.SetMaximumNumberOfCorrections(7)
        opt2.SetCostFunctionConvergenceFactor(1e7)
        opt2.SetGradientConvergenceTolerance(1e-6)
        reg2 = _registration(fixed, moving, metric2, opt2, bs, (1,), (0.0,), min(1.0, bspline_samples / n_vox), seed,
                             moving_initial=aff_tf)
        try:
            reg2.Update()
        except RuntimeError as e:
            logger.warning("template registration: B-spline stage failed (%s); keeping the affine result",
                           str(e).strip().splitlines()[-1])
        else:
            both = itk.CompositeTransform[itk.D, 3].New()
            both.AddTransform(aff_tf)
            both.AddTransform(bs)  # applied first (the last added transform is applied first)
            value_bs = _dense_value(fixed_eval, moving, moving_mask, both, bins)
            if not value_bs < value:
                logger.warning("template registration: the B-spline stage did not improve the metric (%.4f -> "
                               "%.4f); keeping the affine result", value, value_bs)
                bspline_mesh = None
            else:
                value = value_bs
        if bspline_mesh:
            # the B-spline displacement on the coarse scan grid, LPS -> RAS
            to_field = itk.TransformToDisplacementFieldFilter[itk.Image[itk.Vector[itk.F, 3], 3], itk.D].New()
            to_field.SetTransform(bs)
            to_field.SetReferenceImage(fixed)
            to_field.SetUseReferenceImage(True)
            to_field.Update()
            d = itk.array_from_image(to_field.GetOutput())  # (z, y, x, 3) LPS mm
            d = np.moveaxis(d.transpose(2, 1, 0, 3), -1, 0).astype(np.float32)
            d[:2] *= -1.0
            if np.all(np.isfinite(d)):
                disp, disp_aff = np.ascontiguousarray(d), caff
            else:
                logger.warning("template registration: non-finite B-spline displacement; keeping the affine result")
        seconds["bspline"] = time.perf_counter() - t2
    return TemplateRegistration(ras, disp, disp_aff, value, seconds)


def _mask_through(ras: np.ndarray, shape: Sequence[int], affine: np.ndarray, mask: np.ndarray,
                  mask_affine: np.ndarray) -> np.ndarray:
    """``mask`` (template grid) pulled onto a scan grid through the RAS map ``ras`` (nearest): uint8 (X, Y, Z)."""
    ijk = torch.from_numpy(np.indices(tuple(shape), dtype=np.float32).reshape(3, -1))
    m = torch.from_numpy(np.linalg.inv(mask_affine) @ ras @ affine).float()
    idx = m[:3, :3] @ ijk + m[:3, 3:]
    g = _normalised(idx.T, mask.shape)[None, None, None]
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    out = F.grid_sample(t, g, mode="nearest", padding_mode="zeros", align_corners=True)[0, 0, 0, 0]
    return out.numpy().reshape(tuple(shape)).astype(np.uint8)


def _output_grid(shape: Sequence[int], affine: np.ndarray, output_mm: float) -> tuple[tuple[int, ...], np.ndarray]:
    """A grid of about ``output_mm`` whose first and last voxel centres are those of the scan grid (per axis)."""
    sp = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    m = [int(n) if n < 2 else max(2, min(int(n), int(np.ceil((n - 1) * s / output_mm)) + 1)) for n, s in zip(shape, sp)]
    step = np.eye(4)
    for a, (n, mi) in enumerate(zip(shape, m)):
        step[a, a] = (n - 1) / (mi - 1) if mi > 1 else 1.0
    return tuple(m), affine @ step


def _normalised(idx: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel indices (..., 3) in (X, Y, Z) order -> grid_sample coordinates (..., 3) in (Z, Y, X) order."""
    n = torch.tensor([max(int(s) - 1, 1) for s in shape], dtype=idx.dtype)
    return (2.0 * idx / n - 1.0).flip(-1)


def warp_template_mask(
    reg: TemplateRegistration, shape: Sequence[int], affine: np.ndarray, output_mm: float = 1.5,
    threshold: float = 0.5, chunk: int = 2_000_000,
) -> np.ndarray:
    """The template brain mask on the scan grid (``shape``, ``affine``) through ``reg``: uint8 (X, Y, Z) {0, 1}.

    Sampled trilinearly on a grid of about ``output_mm`` spanning the scan's voxel centres, upsampled
    trilinearly (``align_corners``) to ``shape`` and thresholded at ``threshold``.
    """
    tpl = _mni_arrays()
    a = _check_affine(affine)
    oshape, oaff = _output_grid(shape, a, output_mm)
    brain = torch.from_numpy(tpl["brain"])[None, None]
    tpl_inv = torch.from_numpy(np.linalg.inv(tpl["brain_affine"]) @ reg.affine).float()
    disp = None
    if reg.displacement is not None:
        disp = torch.from_numpy(reg.displacement)[None]
        disp_inv = torch.from_numpy(np.linalg.inv(reg.displacement_affine)).float()
    out = np.empty(int(np.prod(oshape)), dtype=np.float32)
    grid = np.indices(oshape, dtype=np.float32).reshape(3, -1)
    oaff_t = torch.from_numpy(oaff).float()
    for s in range(0, grid.shape[1], chunk):
        ijk = torch.from_numpy(grid[:, s:s + chunk])
        x = oaff_t[:3, :3] @ ijk + oaff_t[:3, 3:]                     # (3, N) RAS mm
        if disp is not None:
            di = disp_inv[:3, :3] @ x + disp_inv[:3, 3:]
            g = _normalised(di.T, reg.displacement.shape[1:])[None, None, None]
            x = x + F.grid_sample(disp, g, mode="bilinear", padding_mode="border", align_corners=True)[0, :, 0, 0]
        ti = tpl_inv[:3, :3] @ x + tpl_inv[:3, 3:]                     # template voxel indices
        g = _normalised(ti.T, tpl["brain"].shape)[None, None, None]
        out[s:s + chunk] = F.grid_sample(brain, g, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0, 0, 0].numpy()
    prob = torch.from_numpy(out.reshape(oshape))[None, None]
    full_shape = tuple(int(n) for n in shape)
    if tuple(oshape) != full_shape:
        prob = F.interpolate(prob, size=full_shape, mode="trilinear", align_corners=True)
    return (prob[0, 0] >= threshold).to(torch.uint8).numpy()

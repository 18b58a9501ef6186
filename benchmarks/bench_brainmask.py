"""Estimated brain masks (MNI152 template registration) on deformed, reoriented, resampled phantom scans.

For each phantom scan (default: the test split of ``bundles/cmb_synthesis/data/phantom/datalist.json``):

1. **Deform** (:func:`deform_scan`): a random smooth warp (displacement standard deviation ``--warp_mm`` on a
   5^3 control grid, trilinearly upsampled), a scaling of 0.85-1.15 per axis and a rotation of up to 5 degrees
   per axis; **reorient** (voxel axes LPS or LAS, alternating) and **resample** to a clinical spacing
   (alternating 0.5 x 0.5 x 2 mm and 0.9 x 0.9 x 1.5 mm) over a field of view holding the whole deformed head.
   The image is sampled trilinearly, the true brain mask and the CMB labels with nearest neighbour.
2. **Estimate** the brain mask (:func:`cmb_synthesis.data.brainmask.estimate_brainmask`, ``method="mni"``) and
   report its Dice against the deformed true mask and the seconds it took (ITK's module loading is excluded:
   it is paid once per process and reported separately). ``dice`` counts the voxels inside the source scan's
   field of view (the deformed grid also covers zero-filled space beyond the phantom's slab, where the truth
   is empty because nothing was imaged); ``dice_whole_grid`` counts every voxel.
3. **Candidate-stage sensitivity**: FRST candidates (:func:`transforms.frst.frst_3d` on the deformed scan,
   percentile-scaled inside each mask; :func:`transforms.candidates.find_candidates` with the defaults) inside
   the true mask and inside the estimated mask; a CMB (a connected label of the deformed label map) counts as
   found when a candidate lies within 2 mm (world) of its centroid.
4. **Speed** on a 512 x 512 x 128 scan (one phantom resampled to 0.43 x 0.43 x 1.3 mm).

Run by hand (a few minutes of CPU)::

    OMP_NUM_THREADS=2 python benchmarks/bench_brainmask.py \
        --datalist bundles/cmb_synthesis/data/phantom/datalist.json --split test \
        --output docs/results/brainmask_benchmark.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmb_synthesis.data.brainmask import estimate_brainmask  # noqa: E402
from cmb_synthesis.data.io import write_json  # noqa: E402

ORIENTATIONS = {"LPS": (-1.0, -1.0, 1.0), "LAS": (-1.0, 1.0, 1.0), "RAS": (1.0, 1.0, 1.0)}
SPACINGS = ((0.5, 0.5, 2.0), (0.9, 0.9, 1.5))


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _to_grid(idx: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(N, 3) voxel indices (X, Y, Z) -> grid_sample coordinates (Z, Y, X order, align_corners)."""
    n = torch.tensor([max(int(s) - 1, 1) for s in shape], dtype=idx.dtype)
    return (2.0 * idx / n - 1.0).flip(-1)


def deform_scan(
    image: np.ndarray,
    affine: np.ndarray,
    masks: dict[str, np.ndarray],
    rng: np.random.Generator,
    spacing: Sequence[float] = (0.5, 0.5, 2.0),
    orientation: str = "LPS",
    scale_range: tuple[float, float] = (0.85, 1.15),
    rotation_deg: float = 5.0,
    warp_mm: float = 3.0,
    shape: Sequence[int] | None = None,
    chunk: int = 2_000_000,
) -> dict[str, Any]:
    """A randomly deformed, reoriented and resampled copy of a scan and its label maps.

    Args:
        image: (X, Y, Z) float intensities; affine: its voxel -> RAS matrix.
        masks: name -> (X, Y, Z) integer maps on the same grid (resampled with nearest neighbour).
        spacing: output voxel size (mm); orientation: output voxel axes ("LPS", "LAS" or "RAS").
        scale_range: per-axis scaling of the anatomy; rotation_deg: bound of each rotation angle.
        warp_mm: standard deviation (mm) of the smooth random displacement (5^3 control points).
        shape: output grid size (default: the deformed head's bounding box plus 10 mm).

    Returns:
        dict: ``image`` (float32), each mask name (same dtype as given), ``fov`` (uint8: 1 where the output
        voxel samples the input's field of view), ``affine`` (output voxel -> RAS),
        ``scale`` (3,), ``angles`` (3,) degrees.
    """
    aff = np.asarray(affine, np.float64)
    scale = rng.uniform(*scale_range, size=3)
    angles = rng.uniform(-rotation_deg, rotation_deg, size=3)
    fwd = _rotation(angles) @ np.diag(scale)                           # original world -> deformed world
    centre = aff[:3, :3] @ ((np.asarray(image.shape) - 1) / 2.0) + aff[:3, 3]
    # output grid: bounding box of the deformed input grid corners (+10 mm), in the chosen orientation
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in image.shape], indexing="ij")).reshape(3, -1)
    wc = fwd @ ((aff[:3, :3] @ corners + aff[:3, 3:]) - centre[:, None]) + centre[:, None]
    lo, hi = wc.min(axis=1) - 10.0, wc.max(axis=1) + 10.0
    flips = np.asarray(ORIENTATIONS[orientation])
    sp = np.asarray(spacing, np.float64)
    if shape is None:
        shape = tuple(int(np.ceil((h - l) / s)) + 1 for l, h, s in zip(lo, hi, sp))
    shape = tuple(int(s) for s in shape)
    out_aff = np.eye(4)
    out_aff[:3, :3] = np.diag(flips * sp)
    mid = (lo + hi) / 2.0
    out_aff[:3, 3] = mid - out_aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    # smooth displacement (mm, in deformed world), defined on a 5^3 grid spanning the output grid
    coarse = torch.from_numpy(rng.normal(0.0, warp_mm, size=(1, 3, 5, 5, 5)).astype(np.float32))
    inv_fwd = np.linalg.inv(fwd)
    pull = np.linalg.inv(aff) @ np.vstack([np.hstack([inv_fwd, (centre - inv_fwd @ centre)[:, None]]), [0, 0, 0, 1]])
    pull = torch.from_numpy(pull @ out_aff).float()                       # output voxel -> input voxel (before warp)
    inv_aff3 = torch.from_numpy(np.linalg.inv(aff)[:3, :3] @ inv_fwd).float()  # deformed-world mm -> input voxels
    src_img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    src_masks = {k: torch.from_numpy(np.ascontiguousarray(v).astype(np.float32))[None, None] for k, v in masks.items()}
    n = int(np.prod(shape))
    out_img = np.empty(n, np.float32)
    out_fov = np.empty(n, np.uint8)
    out_masks = {k: np.empty(n, np.float32) for k in masks}
    grid_idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    for s in range(0, n, chunk):
        ijk = torch.from_numpy(grid_idx[:, s:s + chunk])
        g_ctrl = _to_grid(ijk.T, shape)[None, None, None]
        u = F.grid_sample(coarse, g_ctrl, mode="bilinear", padding_mode="border", align_corners=True)[0, :, 0, 0]
        src = pull[:3, :3] @ ijk + pull[:3, 3:] + inv_aff3 @ u
        g = _to_grid(src.T, image.shape)[None, None, None]
        half = torch.tensor([(k - 1) / 2.0 for k in image.shape], dtype=src.dtype)[:, None]
        out_fov[s:s + chunk] = ((src - half).abs() <= half + 0.5).all(dim=0).numpy()
        out_img[s:s + chunk] = F.grid_sample(src_img, g, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0, 0, 0].numpy()
        for k, t in src_masks.items():
            out_masks[k][s:s + chunk] = F.grid_sample(t, g, mode="nearest", padding_mode="zeros", align_corners=True)[0, 0, 0, 0].numpy()
    result: dict[str, Any] = {"image": out_img.reshape(shape), "fov": out_fov.reshape(shape), "affine": out_aff,
                              "scale": scale, "angles": angles}
    for k, v in masks.items():
        result[k] = np.rint(out_masks[k]).reshape(shape).astype(np.asarray(v).dtype)
    return result


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    s = int(a.sum()) + int(b.sum())
    return 2.0 * float((a & b).sum()) / s if s else 1.0


def candidate_sensitivity(image: np.ndarray, affine: np.ndarray, brainmask: np.ndarray, label: np.ndarray,
                          within_mm: float = 2.0) -> dict[str, Any]:
    """FRST candidates inside ``brainmask`` (defaults of :class:`transforms.candidates.FRSTCandidatesd`) and the
    fraction of CMBs (labels of ``label``) with a candidate within ``within_mm`` of their centroid (world mm)."""
    from scipy import ndimage

    from transforms import candidates, frst
    from transforms.intensity import percentile_scale

    sp = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    bm = brainmask > 0
    img = np.asarray(percentile_scale(np.asarray(image, np.float32), mask=bm, lower=0.0, upper=99.5)[0])
    fmap = frst.frst_3d(img, spacing=tuple(sp), mask=bm, dtype=np.float32)
    coords, _ = candidates.find_candidates(fmap, bm, spacing=tuple(sp), image=img)
    ids = [i for i in np.unique(label) if i > 0]
    cents = np.array(ndimage.center_of_mass(np.ones_like(label), label, ids)) if ids else np.zeros((0, 3))
    cw = (affine[:3, :3] @ cents.T + affine[:3, 3:]).T if len(ids) else cents
    kw = (affine[:3, :3] @ coords.T.astype(np.float64) + affine[:3, 3:]).T if len(coords) else np.zeros((0, 3))
    found = 0
    for c in cw:
        if len(kw) and np.min(np.linalg.norm(kw - c, axis=1)) <= within_mm:
            found += 1
    return {"lesions": len(ids), "found": found, "candidates": int(len(coords))}


def _load(path: str, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI in its closest-RAS voxel order: (array, affine)."""
    from cmb_synthesis.data.scans import to_canonical

    can = to_canonical(path, dtype=dtype)
    return can.array, np.asarray(can.affine, np.float64)


def run(datalist: str, split: str, n_scans: int, seed: int, warp_mm: float, output: str | None,
        speed: bool = True, sensitivity: bool = True) -> dict[str, Any]:
    """Deform every scan of the split, estimate its brain mask, score it; returns (and writes) the results."""
    from monai.data import load_decathlon_datalist

    from cmb_synthesis.progress import progress

    items = load_decathlon_datalist(datalist, True, split)[:n_scans]
    if not items:
        raise ValueError(f"{datalist}: no items in split {split!r}")
    t = time.perf_counter()
    import itk  # noqa: F401  (module loading paid once per process, reported apart)

    for name in ("ImageRegistrationMethodv4", "MattesMutualInformationImageToImageMetricv4", "BSplineTransform",
                 "LBFGSBOptimizerv4", "RegularStepGradientDescentOptimizerv4", "TransformToDisplacementFieldFilter"):
        getattr(itk, name)
    from cmb_synthesis.data.registration import mni_template

    mni_template(3.0)
    setup_s = time.perf_counter() - t
    rng = np.random.default_rng(seed)
    rows = []
    for i, item in enumerate(progress(items, "brain masks")):
        img, aff = _load(item["image"])
        bm, _ = _load(item["brainmask"], None)
        lab, _ = _load(item["label"], None) if item.get("label") else (np.zeros(img.shape, np.uint16), None)
        spacing = SPACINGS[i % len(SPACINGS)]
        orient = ("LPS", "LAS")[i % 2]
        d = deform_scan(img, aff, {"brainmask": (bm > 0).astype(np.uint8), "label": lab.astype(np.int32)}, rng,
                        spacing=spacing, orientation=orient, warp_mm=warp_mm)
        # the estimator takes closest-RAS arrays: flip the reoriented axes back (as to_canonical does)
        ornt = nib.orientations.io_orientation(d["affine"])
        arr_ras = nib.orientations.apply_orientation(d["image"], ornt)
        aff_ras = d["affine"] @ nib.orientations.inv_ornt_aff(ornt, d["image"].shape)
        true_ras = nib.orientations.apply_orientation(d["brainmask"], ornt)
        fov_ras = nib.orientations.apply_orientation(d["fov"], ornt) > 0
        lab_ras = nib.orientations.apply_orientation(d["label"], ornt)
        t0 = time.perf_counter()
        est = estimate_brainmask(arr_ras, affine=aff_ras)
        secs = time.perf_counter() - t0
        row = {"id": item.get("id", Path(item["image"]).name), "orientation": orient, "spacing_mm": list(spacing),
               "shape": list(d["image"].shape), "scale": np.round(d["scale"], 3).tolist(),
               "rotation_deg": np.round(d["angles"], 1).tolist(), "dice": round(dice(est * fov_ras, true_ras), 4),
               "dice_whole_grid": round(dice(est, true_ras), 4),
               "seconds": round(secs, 2)}
        if sensitivity:
            for key, mask in (("true_mask", true_ras), ("estimated_mask", est)):
                row[key] = candidate_sensitivity(arr_ras, aff_ras, mask, lab_ras)
        print(json.dumps(row), flush=True)
        rows.append(row)
    dices = [r["dice"] for r in rows]
    secs = [r["seconds"] for r in rows]
    summary: dict[str, Any] = {
        "n_scans": len(rows), "dice_mean": round(float(np.mean(dices)), 4), "dice_min": round(float(np.min(dices)), 4),
        "scans_below_0.95": int(sum(x < 0.95 for x in dices)), "seconds_mean": round(float(np.mean(secs)), 2),
        "seconds_max": round(float(np.max(secs)), 2), "itk_and_template_setup_seconds": round(setup_s, 2),
    }
    if sensitivity:
        for key in ("true_mask", "estimated_mask"):
            n = sum(r[key]["lesions"] for r in rows)
            f = sum(r[key]["found"] for r in rows)
            summary[f"candidate_sensitivity_{key}"] = {"found": f, "lesions": n, "sensitivity": round(f / n, 4) if n else None,
                                                       "candidates_per_scan": round(float(np.mean([r[key]["candidates"] for r in rows])), 1)}
    if speed:
        img, aff = _load(items[0]["image"])
        d = deform_scan(img, aff, {}, np.random.default_rng(seed + 1), spacing=(0.43, 0.43, 1.3),
                        orientation="RAS", shape=(512, 512, 128), warp_mm=warp_mm)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            estimate_brainmask(d["image"], affine=d["affine"])
            times.append(time.perf_counter() - t0)
        summary["seconds_512x512x128"] = [round(x, 2) for x in times]
    result = {
        "command": "OMP_NUM_THREADS=%s python %s" % (os.environ.get("OMP_NUM_THREADS", ""), " ".join(sys.argv)),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or platform.platform()})",
        "torch_threads": torch.get_num_threads(),
        "settings": {"datalist": datalist, "split": split, "seed": seed, "warp_mm": warp_mm,
                     "scale_range": [0.85, 1.15], "rotation_deg": 5.0, "spacings_mm": [list(s) for s in SPACINGS],
                     "orientations": ["LPS", "LAS"], "candidate_hit_mm": 2.0},
        "summary": summary,
        "scans": rows,
    }
    if output:
        write_json(result, output)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datalist", default=str(ROOT / "bundles/cmb_synthesis/data/phantom/datalist.json"))
    p.add_argument("--split", default="test")
    p.add_argument("--n_scans", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warp_mm", type=float, default=3.0)
    p.add_argument("--output", default=None)
    p.add_argument("--no_speed", action="store_true")
    p.add_argument("--no_sensitivity", action="store_true")
    a = p.parse_args(argv)
    r = run(a.datalist, a.split, a.n_scans, a.seed, a.warp_mm, a.output, not a.no_speed, not a.no_sensitivity)
    print(json.dumps(r["summary"], indent=1))


if __name__ == "__main__":
    main()

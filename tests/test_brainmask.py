"""Brain mask estimation for scans delivered without one (cmb_synthesis.data.brainmask / .registration)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cmb_synthesis.data.brainmask import estimate_brainmask

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    """benchmarks/bench_brainmask.py as a module (its ``deform_scan`` builds the test's deformed scan)."""
    spec = importlib.util.spec_from_file_location("bench_brainmask", ROOT / "benchmarks" / "bench_brainmask.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _first_scan(datalist: str) -> dict:
    d = json.loads(Path(datalist).read_text())
    item = next(i for i in d["training"] if i.get("group") == "pathological")
    base = Path(datalist).parent
    return {k: str(base / v) for k, v in item.items() if k in ("image", "brainmask", "label")}


def test_itk_image_keeps_voxel_order_and_world_positions():
    pytest.importorskip("itk")
    from cmb_synthesis.data.registration import itk_image

    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    rot = nib.eulerangles.euler2mat(0.1, -0.05, 0.2)  # an oblique, LPS-stored grid
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.5, -0.6, 2.0])
    affine[:3, 3] = [30.0, -12.0, 7.0]
    img = itk_image(arr, affine)
    for ijk in [(0, 0, 0), (3, 1, 5), (2, 4, 0)]:
        lps = np.asarray(img.TransformIndexToPhysicalPoint([int(v) for v in ijk]))
        ras = affine[:3, :3] @ np.asarray(ijk) + affine[:3, 3]
        np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-4)
        assert img.GetPixel([int(v) for v in ijk]) == arr[ijk]


def test_mni_mask_of_a_deformed_reoriented_resampled_phantom_scan(tiny_cohort):
    """A phantom scan under a random smooth warp and 0.85-1.15 scaling, stored LPS at 0.9 x 0.9 x 1.5 mm:
    the template-registered mask matches the equally deformed true mask (Dice >= 0.9 inside the field of view)."""
    pytest.importorskip("itk")
    bench = _bench()
    paths = _first_scan(tiny_cohort)
    img, aff = bench._load(paths["image"])
    bm, _ = bench._load(paths["brainmask"], None)
    d = bench.deform_scan(img, aff, {"brainmask": (bm > 0).astype(np.uint8)}, np.random.default_rng(3),
                          spacing=(0.9, 0.9, 1.5), orientation="LPS")
    assert np.diag(d["affine"])[:3].tolist() == [-0.9, -0.9, 1.5]
    ornt = nib.orientations.io_orientation(d["affine"])
    arr = nib.orientations.apply_orientation(d["image"], ornt)  # closest RAS, as to_canonical delivers
    aff_ras = d["affine"] @ nib.orientations.inv_ornt_aff(ornt, d["image"].shape)
    truth = nib.orientations.apply_orientation(d["brainmask"], ornt) > 0
    fov = nib.orientations.apply_orientation(d["fov"], ornt) > 0
    est = estimate_brainmask(arr, affine=aff_ras)
    assert est.dtype == np.uint8 and est.shape == arr.shape and set(np.unique(est)) <= {0, 1}
    dice = bench.dice(est * fov, truth)
    assert dice >= 0.9, f"Dice {dice:.3f}"
    # the older head mask is still there, and fits the brain worse
    head = estimate_brainmask(arr, affine=aff_ras, method="otsu")
    assert bench.dice(head * fov, truth) < dice


def test_otsu_head_mask_on_a_sphere():
    g = np.meshgrid(*[np.arange(30)] * 3, indexing="ij")
    vol = np.where(np.sqrt(sum((x - 15.0) ** 2 for x in g)) < 10, 100.0, 2.0)
    m = estimate_brainmask(vol, (1.0, 1.0, 1.0), method="otsu")
    assert m.dtype == np.uint8 and m[15, 15, 15] == 1 and m[0, 0, 0] == 0


@pytest.mark.parametrize(
    "image, kwargs, message",
    [
        (np.zeros((10, 10)), {}, "expected a 3-D"),
        (np.full((12, 12, 12), 7.0), {}, "constant image"),
        (np.where(np.eye(12)[:, :, None] > 0, np.nan, 1.0) * np.ones((12, 12, 12)), {}, "NaN"),
        (np.random.default_rng(0).random((12, 12, 12)), {"method": "bet"}, "method must be one of"),
        (np.random.default_rng(0).random((12, 12, 12)), {"affine": np.zeros((4, 4))}, "affine must be"),
        (np.random.default_rng(0).random((12, 12, 12)), {"spacing": (1.0, 0.0, 1.0)}, "spacing must be"),
    ],
)
def test_bad_inputs_are_refused_with_a_reason(image, kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_brainmask(image, **kwargs)


def test_a_scan_without_a_head_fails_clearly():
    """Registration of the template to an image holding no head ends in a ValueError, not a silent mask."""
    pytest.importorskip("itk")
    vol = np.zeros((40, 40, 30), np.float32)
    vol[:3, :3, :3] = 100.0  # a bright corner speck: nothing like a head
    with pytest.raises(ValueError, match="estimate_brainmask"):
        estimate_brainmask(vol, (1.0, 1.0, 1.0))

"""3-D FRST: dark spheres above tubes and noise, numpy == torch, spacing, candidates, the dict transform, and
the fast path (float32, threads, cropped to the mask) against the float64 full-volume reference path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from transforms.candidates import (
    FRSTCandidatesd,
    _ellipsoid_footprint,
    _local_maxima,
    find_candidates,
    snap_to_darkest,
)
from transforms.frst import auto_backend, default_workers, frst_3d, frst_margin, kappa_for_radius
from transforms.spacing import half_widths, snap_spacing, voxel_ratio, within_radius

RADII = (1.0, 1.5, 2.0, 3.0)


def _phantom(shape, spacing, spheres=(), tubes=(), noise=0.03, seed=0):
    """Bright (1.0) noisy volume with dark (0.3) spheres ((centre_mm, r_mm)) and tubes along axis 0 ((y, z), r)."""
    rng = np.random.default_rng(seed)
    v = 1.0 + noise * rng.standard_normal(shape)
    g = np.meshgrid(*[np.arange(s) * p for s, p in zip(shape, spacing)], indexing="ij")
    for c, r in spheres:
        v[np.sqrt(sum((g[a] - c[a]) ** 2 for a in range(3))) <= r] = 0.3
    for (y, z), r in tubes:
        v[np.sqrt((g[1] - y) ** 2 + (g[2] - z) ** 2) <= r] = 0.3
    return v


@pytest.fixture(scope="module")
def spheres_and_tubes():
    shape, spacing = (64, 96, 48), (1.0, 1.0, 1.0)
    spheres = [((12.0 + 14 * i, 15.0, 12.0), r) for i, r in enumerate(RADII)]
    tubes = [((45.0 + 14 * i, 24.0), r) for i, r in enumerate(RADII)]
    v = _phantom(shape, spacing, spheres, tubes)
    return v, spacing, spheres, tubes, frst_3d(v, spacing, radii_mm=RADII)


def test_spheres_rank_above_tubes_and_noise(spheres_and_tubes):
    v, spacing, spheres, tubes, fmap = spheres_and_tubes
    assert fmap.shape == v.shape and fmap.dtype == np.float64 and (fmap >= 0).all()
    noise = fmap[:, :, 36:].max()  # no object reaches z >= 36 mm
    for (c, r), ((y, z), rt) in zip(spheres, tubes):
        assert r == rt
        i, j, k = (int(round(x)) for x in c)
        sphere = fmap[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2].max()
        tube = fmap[:, int(y) - 4:int(y) + 5, int(z) - 4:int(z) + 5].max()
        assert sphere > 1.5 * tube, (r, sphere, tube)
        assert sphere > 10 * noise, (r, sphere, noise)


def test_candidates_find_every_sphere_first(spheres_and_tubes):
    v, spacing, spheres, tubes, fmap = spheres_and_tubes
    coords, scores = find_candidates(fmap, None, spacing, min_distance_mm=3.0, max_candidates=50)
    assert coords.dtype == np.int64 and coords.shape[1] == 3 and len(coords) == len(scores) <= 50
    assert np.all(np.diff(scores) <= 0)
    top = coords[: len(spheres)]
    for c, _ in spheres:
        assert np.abs(top - np.array(c)).max(axis=1).min() <= 1, (c, top)


def test_numpy_and_torch_agree(spheres_and_tubes):
    v, spacing, _, _, fmap = spheres_and_tubes
    mask = np.zeros(v.shape, bool)
    mask[4:-4, 4:-4, 2:-2] = True
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        t = frst_3d(torch.as_tensor(v), spacing, radii_mm=RADII, dtype=dtype)
        assert isinstance(t, torch.Tensor) and t.dtype == dtype
        rel = np.abs(t.double().numpy() - fmap).max() / np.abs(fmap).max()
        assert rel < tol, (dtype, rel)
    aniso = (0.7, 0.9, 1.3)
    a = frst_3d(v, aniso, radii_mm=(1.0, 2.5), beta=0.1, mask=mask, presmooth_sigma_mm=0.5)
    b = frst_3d(torch.as_tensor(v, dtype=torch.float32), aniso, radii_mm=(1.0, 2.5), beta=0.1,
                mask=torch.as_tensor(mask), presmooth_sigma_mm=0.5, backend="torch").numpy()
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-4


def test_anisotropic_spacing_is_honoured():
    centre, r = (20.0, 20.0, 20.0), 2.0
    # a sphere in mm on an anisotropic grid is found at its centre, and stronger than with the spacing ignored
    for spacing in ((0.6, 0.6, 1.5), (0.98, 0.98, 2.0)):
        shape = tuple(int(40 / s) for s in spacing)
        v = _phantom(shape, spacing, [(centre, r)], seed=1)
        right = frst_3d(v, spacing, radii_mm=(1.5, 2.0, 2.5))
        wrong = frst_3d(v, (1.0, 1.0, 1.0), radii_mm=(1.5, 2.0, 2.5))
        peak_mm = np.array(np.unravel_index(right.argmax(), shape)) * spacing
        assert np.all(np.abs(peak_mm - centre) <= np.array(spacing)), (spacing, peak_mm)
        assert right.max() > 2 * wrong.max()
    # the spacing follows its axis: permuting the axes and the spacing permutes the map
    spacing = (0.6, 0.9, 1.5)
    shape = tuple(int(30 / s) for s in spacing)
    v = _phantom(shape, spacing, [((15.0, 15.0, 15.0), 2.5)], seed=2)
    m = frst_3d(v, spacing, radii_mm=(2.0, 3.0))
    mp = frst_3d(np.transpose(v, (2, 0, 1)), (1.5, 0.6, 0.9), radii_mm=(2.0, 3.0))
    np.testing.assert_allclose(np.transpose(m, (2, 0, 1)), mp, rtol=1e-10, atol=1e-12)


def test_kappa_and_bright_blob_ignored():
    assert kappa_for_radius(1.0) == 8.0 and kappa_for_radius(2.0) == 9.9
    v = _phantom((32, 32, 32), (1, 1, 1), noise=0.0)
    g = np.meshgrid(*[np.arange(32)] * 3, indexing="ij")
    v[np.sqrt(sum((x - 16.0) ** 2 for x in g)) <= 2.5] = 2.0  # bright blob: dark polarity gives nothing there
    m = frst_3d(v, (1, 1, 1), radii_mm=(2.0, 2.5))
    assert m[16, 16, 16] < 1e-3 * m.max()
    assert not np.any(frst_3d(np.ones((8, 8, 8)), (1, 1, 1)))  # flat volume: no gradient, zero map


def test_mask_and_cap_and_snap():
    spacing = (1.0, 1.0, 1.0)
    spheres = [((10.0, 10.0, 10.0), 2.0), ((30.0, 10.0, 10.0), 2.0), ((10.0, 30.0, 10.0), 1.5)]
    v = _phantom((40, 40, 20), spacing, spheres, seed=3)
    fmap = frst_3d(v, spacing, radii_mm=(1.5, 2.0))
    mask = np.zeros(v.shape, np.uint8)
    mask[:20] = 1  # excludes the second sphere
    coords, scores = find_candidates(fmap, mask, spacing, min_distance_mm=4.0, max_candidates=2)
    assert len(coords) == 2 and np.all(coords[:, 0] < 20)
    assert {tuple(c) for c in coords} == {(10, 10, 10), (10, 30, 10)}
    all_c, _ = find_candidates(fmap, mask, spacing, min_distance_mm=4.0, max_candidates=None)
    d = np.sqrt(((all_c[:, None] - all_c[None]) ** 2).sum(-1))
    assert d[np.triu_indices(len(all_c), 1)].min() > 1.0  # non-maximum suppression: no adjacent peaks
    # snapping moves a candidate one voxel off a lesion onto the darkest voxel nearby
    off = np.array([[12, 10, 10]])
    snapped = snap_to_darkest(off, v, spacing, 2.0)
    assert np.sqrt(((snapped[0] - [10, 10, 10]) ** 2).sum()) <= 2.0
    assert v[tuple(snapped[0])] <= 0.31


def test_dict_transform_uses_affine_spacing_and_torch_backend():
    spacing = (0.98, 0.98, 1.0)
    spheres = [((15.0, 15.0, 12.0), 2.0)]
    v = _phantom((32, 32, 24), spacing, spheres, seed=4).astype(np.float32)
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    img = MetaTensor(torch.as_tensor(v)[None], affine=affine)
    mask = MetaTensor(torch.ones((1, *v.shape), dtype=torch.uint8), affine=affine)
    outs = []
    for backend in ("numpy", "torch"):
        t = FRSTCandidatesd(keys="image", mask_key="brainmask", radii_mm=(1.5, 2.0), max_candidates=10,
                            backend=backend, map_key="frst")
        d = t({"image": img, "brainmask": mask})
        assert d["candidates"].shape[1] == 3 and d["candidates_score"].shape == (len(d["candidates"]),)
        assert d["frst"].shape == (1, *v.shape)
        # the strongest candidate lies in the sphere (snapped to its darkest voxel within 1 mm by default)
        assert np.linalg.norm(d["candidates"][0] * np.array(spacing) - spheres[0][0]) <= spheres[0][1]
        outs.append(d)
    np.testing.assert_array_equal(outs[0]["candidates"][:3], outs[1]["candidates"][:3])
    np.testing.assert_allclose(outs[0]["candidates_score"][:3], outs[1]["candidates_score"][:3], rtol=1e-4)


def test_spacing_noise_does_not_change_the_candidates():
    """1.00000003 mm (oblique clinical affines) gives exactly the map and candidates of 1 mm."""
    clean, noisy = (1.0, 1.0, 1.0), (1.00000003, 1.0, 0.99999997)
    sizes = (0.8, 1.0, 1.2, 1.5, 2.0, 2.5, 1.0, 1.5)
    spheres = [((10.0 + 6 * i, 12.0 + 6 * (i % 5), 8.0 + 4 * (i % 6)), r) for i, r in enumerate(sizes)]
    v = _phantom((64, 64, 40), clean, spheres, noise=0.05, seed=7)
    mask = np.zeros(v.shape, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    maps = [frst_3d(v, sp, mask=mask) for sp in (clean, noisy)]  # the default (tuned) radii
    np.testing.assert_array_equal(maps[0], maps[1])
    t = frst_3d(torch.as_tensor(v), noisy, mask=torch.as_tensor(mask)).numpy()
    np.testing.assert_allclose(t, maps[0], rtol=1e-10, atol=1e-12)
    for kwargs in ({}, {"max_candidates": None, "min_distance_mm": 2.0, "snap_radius_mm": 1.5}):
        a = find_candidates(maps[0], mask, clean, image=v, **kwargs)
        b = find_candidates(maps[0], mask, noisy, image=v, **kwargs)
        assert len(a[0]) > 50
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    for r in (0.75, 1.0, 1.5, 2.0, 3.0, 4.0):
        np.testing.assert_array_equal(_ellipsoid_footprint(r, clean), _ellipsoid_footprint(r, noisy))
    assert _ellipsoid_footprint(3.0, noisy).shape == (7, 7, 7) and _ellipsoid_footprint(3.0, noisy)[0, 3, 3]


def test_spacing_helpers_keep_exact_ratios():
    assert snap_spacing((1.00000003, 0.99999997, 0.98)) == (1.0, 1.0, 0.98)
    assert 0.3 / 0.1 < 3 and half_widths(0.3, (0.1, 0.1, 0.2)) == (3, 3, 1)  # floor(2.9999999999999996) is 2
    assert half_widths(0.5, (1.0, 1.0, 1.0), minimum=1) == (1, 1, 1)
    np.testing.assert_array_equal(voxel_ratio(1.5, (1.00000003, 0.5)), [1.5, 3.0])
    offs = np.array([[3, 0, 0], [2, 2, 1], [2, 2, 2], [0, 0, 0]])
    assert within_radius(offs, (1.00000003, 1.0, 0.99999997), 3.0).tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="spacing"):
        snap_spacing((1.0, 1e-8, 1.0))


def test_bad_inputs():
    with pytest.raises(ValueError, match="3-D"):
        frst_3d(np.zeros((8, 8)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        frst_3d(np.zeros((8, 8, 8)), (1, 0, 1))
    with pytest.raises(ValueError, match="mask shape"):
        frst_3d(np.zeros((8, 8, 8)), (1, 1, 1), mask=np.ones((8, 8, 7), bool))
    with pytest.raises(ValueError, match="backend"):
        frst_3d(np.zeros((8, 8, 8)), (1, 1, 1), backend="cupy")
    with pytest.raises(ValueError, match="brain mask shape"):
        find_candidates(np.zeros((8, 8, 8)), np.ones((8, 8, 9)), (1, 1, 1))
    img = MetaTensor(torch.zeros((8, 8, 8)), meta={"filename_or_obj": "/data/sub-9_swi.nii.gz"})
    with pytest.raises(ValueError, match="sub-9_swi.nii.gz.*channel-first"):
        FRSTCandidatesd(keys="image", mask_key=None)({"image": img})


def _brain_like(shape, spacing, seed=11):
    """Noisy head-like volume: a bright ellipsoidal brain (its mask returned) that does not fill the volume,
    dark spheres of 0.8-2.5 mm inside it, dark tubes through it; (volume, mask, sphere centres in voxels)."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[(np.arange(s) - (s - 1) / 2) * p for s, p in zip(shape, spacing)], indexing="ij")
    semi = [0.36 * s * p for s, p in zip(shape, spacing)]
    mask = sum((g[a] / semi[a]) ** 2 for a in range(3)) <= 1.0
    v = np.where(mask, 1.0, 0.1)
    centres = []
    for _ in range(14):
        c = [rng.uniform(-0.6, 0.6) * semi[a] for a in range(3)]
        r = rng.uniform(0.8, 2.5)
        v[sum((g[a] - c[a]) ** 2 for a in range(3)) <= r**2] = 0.35
        centres.append([int(round(c[a] / spacing[a] + (shape[a] - 1) / 2)) for a in range(3)])
    for _ in range(4):
        y, z = rng.uniform(-0.5, 0.5) * semi[1], rng.uniform(-0.5, 0.5) * semi[2]
        v[(g[1] - y) ** 2 + (g[2] - z) ** 2 <= rng.uniform(0.6, 1.5) ** 2] *= 0.5
    v = v + 0.04 * rng.standard_normal(shape)
    return v.astype(np.float32), mask, np.array(centres)


def test_fast_path_matches_float64_full_volume_reference():
    """float32 + threads + crop to the mask (the candidate stage's path) against float64 over the whole volume:
    the same map (correlation >= 0.999 inside the mask, float noise only), exactly 0 outside the widened mask
    box, the same candidates; cropping alone is exact and the thread count changes nothing beyond float32 rounding."""
    spacing = (0.98, 0.98, 1.0)
    v, mask, centres = _brain_like((72, 80, 56), spacing)
    ref = frst_3d(v, spacing, mask=mask, dtype=np.float64, workers=1, crop=False)
    fast = frst_3d(v, spacing, mask=mask, dtype=np.float32)
    assert fast.dtype == np.float32 and fast.shape == v.shape
    assert np.corrcoef(fast[mask], ref[mask])[0, 1] >= 0.999
    assert np.abs(fast - ref).max() <= 1e-3 * ref.max()
    # the widened box is smaller than the volume here, so cropping is exercised; outside it both are 0
    margin = frst_margin(spacing, (0.75, 1.0, 1.5, 2.0))
    idx = np.argwhere(mask)
    lo, hi = np.maximum(idx.min(0) - margin, 0), np.minimum(idx.max(0) + 1 + np.array(margin), v.shape)
    assert np.any(lo > 0) and np.any(hi < v.shape)
    outside = np.ones(v.shape, bool)
    outside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = False
    assert not ref[outside].any() and not fast[outside].any()
    cropped64 = frst_3d(v, spacing, mask=mask, dtype=np.float64, workers=1)
    np.testing.assert_allclose(cropped64, ref, rtol=1e-10, atol=1e-12 * ref.max())
    # the thread count changes nothing beyond float32 rounding (BLAS kernels differ between CPUs)
    np.testing.assert_allclose(frst_3d(v, spacing, mask=mask, dtype=np.float32, workers=1),
                               frst_3d(v, spacing, mask=mask, dtype=np.float32, workers=3),
                               rtol=1e-5, atol=1e-6 * float(ref.max()))
    # candidates: the same list (voxels and order) as from the reference map, every sphere among them
    c_ref, s_ref = find_candidates(ref, mask, spacing, image=v)
    c_fast, s_fast = find_candidates(fast, mask, spacing, image=v)
    np.testing.assert_array_equal(c_fast, c_ref)
    np.testing.assert_allclose(s_fast, s_ref, rtol=1e-4)
    found = [np.abs(c_ref[:40] - c).max(axis=1).min() <= 2 for c in centres]
    assert np.mean(found) >= 0.8, found  # a meaningful map: most spheres rank high
    # the torch backend (float64) agrees with the cropped numpy path as well
    t = frst_3d(torch.as_tensor(v), spacing, mask=torch.as_tensor(mask), dtype=torch.float64).numpy()
    np.testing.assert_allclose(t, ref, rtol=1e-10, atol=1e-12 * ref.max())


@pytest.mark.parametrize("many", [None, 0])
def test_local_maxima_equal_the_ellipsoid_maximum_filter(many, monkeypatch):
    """The fast non-maximum suppression equals ``scipy.ndimage.maximum_filter`` with the ellipsoid footprint
    (ties, anisotropic spacings, volumes thinner than the footprint, candidates at the volume's edges), also
    through its box-filter step for maps with very many local maxima (``many=0`` forces it)."""
    from scipy import ndimage

    import transforms.candidates as cand_module

    if many is not None:
        monkeypatch.setattr(cand_module, "_MANY_MAXIMA", many)
    rng = np.random.default_rng(5)
    for _ in range(40):
        shape = tuple(int(s) for s in rng.integers(1, 22, 3))
        spacing = tuple(float(s) for s in rng.choice([0.5, 0.7, 0.98, 1.0, 1.5, 2.0], 3))
        x = np.round(rng.random(shape) * rng.choice([3, 1000])).astype(rng.choice([np.float32, np.float64]))
        fp = _ellipsoid_footprint(float(rng.choice([0.5, 1.0, 2.0, 3.0, 4.0])), spacing)
        cand = rng.random(shape) > 0.3
        full = ndimage.maximum_filter(x, footprint=fp, mode="constant", cval=-np.inf)
        np.testing.assert_array_equal(_local_maxima(x, fp, cand), np.argwhere(cand & (x >= full)))
    assert _local_maxima(np.zeros((4, 4, 4)), _ellipsoid_footprint(1.0, (1, 1, 1)), np.zeros((4, 4, 4), bool)).shape == (0, 3)


def test_defaults_pick_the_fast_path(monkeypatch):
    """FRSTCandidatesd defaults: auto backend (numpy without CUDA; torch on CUDA when available), float32,
    default_workers threads, cropping; its candidates equal the exact path's on a small volume."""
    spacing = (0.98, 0.98, 1.0)
    v, mask, _ = _brain_like((48, 52, 40), spacing, seed=3)
    data = {"image": v[None], "brainmask": mask[None].astype(np.uint8)}
    fast = FRSTCandidatesd(spacing=spacing, map_key="frst")(data)
    exact = FRSTCandidatesd(spacing=spacing, backend="numpy", dtype=np.float64, workers=1, crop=False,
                            map_key="frst")(data)
    assert fast["frst"].dtype == np.float32
    np.testing.assert_array_equal(fast["candidates"], exact["candidates"])
    assert np.corrcoef(fast["frst"][0][mask], exact["frst"][0][mask])[0, 1] >= 0.999
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_backend() == ("numpy", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_backend() == ("torch", "cuda")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert default_workers() == 1
    finally:
        torch.set_num_threads(n)
    with pytest.raises(ValueError, match="backend"):
        FRSTCandidatesd(backend="cupy")


def test_candidate_stage_on_phantom_scans(tiny_cohort):
    """Preprocessed phantom test scans: the default candidate stage hits the CMBs with at most the cap, and
    its candidates are those of the float64 full-volume reference path (the pre-speed-up computation)."""
    from monai.data import load_decathlon_datalist

    from cmb_synthesis.evaluation.hits import match_candidates
    from transforms.frst import DEFAULT_MAX_CANDIDATES
    from transforms.pipelines import preprocessing

    pre = preprocessing(keys=("image",), mask_keys=("brainmask",), label_keys=("label",))
    cand = FRSTCandidatesd(keys="image", mask_key="brainmask")
    exact = FRSTCandidatesd(keys="image", mask_key="brainmask", backend="numpy", dtype=np.float64, workers=1,
                            crop=False)
    hit = total = 0
    for item in load_decathlon_datalist(tiny_cohort, True, "test"):
        d = cand(pre({k: item[k] for k in ("image", "brainmask", "label")}))
        coords = d["candidates"]
        e = exact({k: d[k] for k in ("image", "brainmask")})
        np.testing.assert_array_equal(coords, e["candidates"])
        np.testing.assert_allclose(d["candidates_score"], e["candidates_score"], rtol=1e-4)
        assert 0 < len(coords) <= DEFAULT_MAX_CANDIDATES
        assert np.all(d["brainmask"][0].numpy()[tuple(coords.T)] > 0)  # inside the brain
        r = match_candidates(item["id"], coords, d["candidates_score"], d["label"][0].numpy())
        hit += int((~np.isnan(r.lesion_scores)).sum())
        total += len(r.lesion_scores)
    assert total > 0 and hit / total >= 0.9, (hit, total)

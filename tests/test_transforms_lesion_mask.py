"""transforms.lesion_mask: LesionBank build/save/load, RandLesionMaskd placement rules, statistics, determinism."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.utils import set_determinism
from scipy import ndimage, stats

from cmb_synthesis.synthesis.data import lesion_bank
from transforms.lesion_mask import LesionAllowedRegiond, LesionBank, RandLesionMaskd, allowed_region

SHAPE = (56, 52, 36)
AFF = torch.diag(torch.tensor([0.98, 0.98, 1.0, 1.0], dtype=torch.float64))


def _brain(shape=SHAPE):
    """Ellipsoid brain: GM shell (2), WM (3), deep GM (4), bright CSF ventricles (1); SWI-like image."""
    g = np.indices(shape).astype(float)
    c = (np.array(shape) - 1) / 2
    r = np.sqrt(sum(((g[a] - c[a]) / (0.45 * shape[a])) ** 2 for a in range(3)))
    tissue = np.zeros(shape, np.uint8)
    tissue[r < 1.0] = 2
    tissue[r < 0.8] = 3
    vent = np.sqrt(((g[0] - c[0]) / 4) ** 2 + ((g[1] - c[1]) / 10) ** 2 + ((g[2] - c[2]) / 6) ** 2) < 1
    tissue[vent] = 1
    deep = np.sqrt(((g[0] - c[0] - 9) / 4) ** 2 + ((g[1] - c[1]) / 5) ** 2 + ((g[2] - c[2]) / 4) ** 2) < 1
    tissue[deep] = 4
    brain = (tissue > 0).astype(np.uint8)
    image = np.choose(tissue, [0.0, 1.0, 0.55, 0.65, 0.45]).astype(np.float32)
    return image, brain, tissue


def _training_maps(n_scans=12, seed=0):
    """Pathological label maps with known lesions (spheres/ellipsoids of 1-33 voxels) in WM/GM."""
    rng = np.random.default_rng(seed)
    image, brain, tissue = _brain()
    ok = ndimage.binary_erosion(np.isin(tissue, (2, 3, 4)), iterations=3)
    cand = np.argwhere(ok)
    labels, counts = [], []
    for _ in range(n_scans):
        lab = np.zeros(SHAPE, np.uint16)
        n = int(rng.integers(1, 7))
        placed = 0
        while placed < n:
            c = cand[rng.integers(len(cand))]
            rx, ry, rz = rng.uniform(0.5, 2.2, 3)
            g = np.indices((7, 7, 7)) - 3
            blob = (g[0] / rx) ** 2 + (g[1] / ry) ** 2 + (g[2] / rz) ** 2 <= 1
            sl = tuple(slice(ci - 3, ci + 4) for ci in c)
            if lab[sl][ndimage.binary_dilation(blob, iterations=2)].any():
                continue
            placed += 1
            lab[sl][blob] = placed
        labels.append(lab)
        counts.append(n)
    return labels, [brain] * n_scans, [tissue] * n_scans, counts


@pytest.fixture(scope="module")
def bank():
    labels, brains, tissues, _ = _training_maps()
    return LesionBank.from_arrays(labels, brains, tissues)


def _healthy(with_tissue=True):
    image, brain, tissue = _brain()
    d = {
        "image": MetaTensor(torch.from_numpy(image)[None], affine=AFF, meta={"filename_or_obj": "healthy_swi.nii.gz"}),
        "brainmask": MetaTensor(torch.from_numpy(brain)[None], affine=AFF),
    }
    if with_tissue:
        d["tissue"] = MetaTensor(torch.from_numpy(tissue)[None], affine=AFF)
    return d, tissue


def test_bank_contents_and_roundtrip(bank, tmp_path):
    labels, _, _, counts = _training_maps()
    sizes = sorted(int((lab == i).sum()) for lab in labels for i in range(1, int(lab.max()) + 1))
    assert sorted(bank.sizes.tolist()) == sizes
    assert sorted(bank.counts.tolist()) == sorted(counts)
    assert bank.prior.shape == (8, 8, 8) and bank.prior.sum() == pytest.approx(1.0) and (bank.prior > 0).all()
    # lesions were in GM/WM/deep GM, never CSF or background
    assert bank.tissue_fraction[[0, 1]].sum() == 0 and bank.tissue_fraction.sum() == pytest.approx(1.0)
    old_umask = os.umask(0o022)
    try:
        path = bank.save(tmp_path / "bank.npz")
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o644  # the user's umask, not a private temporary's 0600
    assert [f.name for f in tmp_path.iterdir()] == ["bank.npz"]  # no temporary left
    back = LesionBank.load(path)
    assert len(back) == len(bank) and all(np.array_equal(a, b) for a, b in zip(back.shapes, bank.shapes))
    np.testing.assert_allclose(back.prior, bank.prior)
    np.testing.assert_array_equal(back.counts, bank.counts)
    with np.load(path, allow_pickle=False) as z:  # no object arrays
        assert all(z[k].dtype != object for k in z.files)


def test_bank_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        LesionBank.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, foo=np.zeros(3))
    with pytest.raises(ValueError, match="bad.npz"):
        LesionBank.load(bad)
    with pytest.raises(ValueError, match="no lesions"):
        LesionBank.from_arrays([np.zeros((5, 5, 5), int)], [np.ones((5, 5, 5), int)])


@pytest.mark.parametrize("with_tissue", [True, False])
def test_lesions_only_in_allowed_tissue_and_never_touch(bank, with_tissue):
    d, tissue = _healthy(with_tissue)
    t = RandLesionMaskd(bank=bank, n_lesions=12)
    t.set_random_state(1)
    allowed = allowed_region(d["brainmask"][0].numpy(), tissue, None, erosion=1)
    for _ in range(5):
        out = t(d)
        lab = out["label"][0].numpy()
        assert out["label"].shape == (1, *SHAPE) and out["label"].dtype == torch.int32
        assert out["label_n_lesions"] == int(lab.max()) >= 10
        assert (tissue[lab > 0] >= 2).all()  # never background or CSF (CSF also excluded by intensity)
        if with_tissue:
            assert allowed[lab > 0].all()
        for i in range(1, int(lab.max()) + 1):
            grown = ndimage.binary_dilation(lab == i, structure=np.ones((3, 3, 3)))
            assert set(np.unique(lab[grown])) <= {0, i}  # 1-voxel gap to every other lesion
        np.testing.assert_allclose(out["label"].affine.numpy(), AFF.numpy())


def test_dark_structures_and_their_surroundings_get_no_lesion(bank):
    """dark_percentile: a dark vessel through the white matter (an SWI vein) and 2 voxels around it are not
    allowed; without the option they are (the phantom keeps its CMBs 2 mm away from veins)."""
    d, tissue = _healthy()
    image = d["image"][0].numpy().copy()
    vessel = np.zeros(SHAPE, bool)
    c = np.array(SHAPE) // 2
    vessel[c[0] - 9:c[0] - 7, :, c[2] - 1:c[2] + 1] = True  # a 2 x Y x 2 dark tube crossing the brain
    vessel &= d["brainmask"][0].numpy() > 0
    image[vessel] = 0.2
    image[tissue == 4] = 0.65  # the deep grey matter as bright as the white matter: the vessel is the dark structure
    rng = np.random.default_rng(0)
    brain = d["brainmask"][0].numpy()
    # background as bright as the white matter: on this small toy brain a dark background blurring into the border
    # would fill the percentile (the rule also avoids that rim; tested on the phantom, bundle README)
    noisy = np.where(brain > 0, image, 0.65) + rng.normal(0, 0.02, SHAPE).astype(np.float32)
    near = ndimage.binary_dilation(vessel, iterations=2)
    plain = allowed_region(brain, tissue, noisy)
    dark = allowed_region(brain, tissue, noisy, dark_percentile=1.0)
    assert plain[near & (tissue == 3)].any() and not dark[near].any()
    # away from the vessel the noise removes little (a few grey-matter voxels, the next darkest tissue): the image
    # is smoothed before thresholding
    kept = ~ndimage.binary_dilation(vessel, iterations=4)
    assert (plain & ~dark & kept).sum() / (plain & kept).sum() < 0.05
    d["image"] = MetaTensor(torch.from_numpy(noisy)[None], affine=AFF, meta={"filename_or_obj": "healthy_swi.nii.gz"})
    t = RandLesionMaskd(bank=bank, n_lesions=12, dark_percentile=1.0)
    t.set_random_state(2)
    for _ in range(3):
        assert not (t(d)["label"][0].numpy() > 0)[near].any()


def test_precomputed_region_gives_the_same_masks_and_is_cached(bank):
    """LesionAllowedRegiond (deterministic) precomputes what RandLesionMaskd would compute at every call: with
    ``allowed_key`` the sampler draws the same masks from it, a MONAI CacheDataset keeps it with the volume (the
    training pipeline), and a region of the wrong shape or an empty one is refused with the file's name."""
    from monai.data import CacheDataset
    from monai.transforms import Compose

    d, tissue = _healthy()
    options = {"dark_percentile": 5.0, "erosion": 1}
    region = LesionAllowedRegiond(output_key="allowed", **options)
    pre = region(d)
    expected = allowed_region(d["brainmask"][0].numpy(), tissue, d["image"][0].numpy(), dark_percentile=5.0)
    assert pre["allowed"].shape == d["image"].shape and pre["allowed"].dtype == torch.uint8
    np.testing.assert_array_equal(pre["allowed"][0].numpy() > 0, expected)
    own = RandLesionMaskd(bank=bank, **options).set_random_state(3)
    cached = RandLesionMaskd(bank=bank, allowed_key="allowed", **options).set_random_state(3)
    for _ in range(3):
        assert torch.equal(own(d)["label"].as_tensor(), cached(pre)["label"].as_tensor())
    ds = CacheDataset([d], Compose([cached.region, cached]), progress=False)
    assert "allowed" in ds._cache[0] and "label" not in ds._cache[0]  # cached up to the random sampler
    assert (ds[0]["label"] > 0).any()
    with pytest.raises(ValueError, match="healthy_swi.nii.gz: allowed region shape"):
        cached({**pre, "allowed": pre["allowed"][:, :-1]})
    with pytest.raises(ValueError, match="healthy_swi.nii.gz: no allowed tissue"):
        cached({**pre, "allowed": torch.zeros_like(pre["allowed"])})


def test_reproducible_by_seed(bank):
    d, _ = _healthy()
    t = RandLesionMaskd(bank=bank)
    a = t.set_random_state(5)(d)["label"]
    b = t.set_random_state(5)(d)["label"]
    c = t.set_random_state(6)(d)["label"]
    assert torch.equal(a.as_tensor(), b.as_tensor()) and not torch.equal(a.as_tensor(), c.as_tensor())
    set_determinism(seed=11)
    e = RandLesionMaskd(bank=bank)(d)["label"]
    set_determinism(seed=11)
    f = RandLesionMaskd(bank=bank)(d)["label"]
    set_determinism(None)
    assert torch.equal(e.as_tensor(), f.as_tensor())


def test_count_and_size_distributions_match_training(bank):
    """200 draws: lesion counts follow the training count distribution; sizes follow the bank's sizes."""
    d, _ = _healthy()
    t = RandLesionMaskd(bank=bank, scale_range=(1.0, 1.0))
    t.set_random_state(0)
    counts, sizes = [], []
    for _ in range(200):
        lab = t(d)["label"][0].numpy()
        counts.append(int(lab.max()))
        sizes += np.bincount(lab.ravel())[1:].tolist()
    # counts: chi-square goodness of fit against the empirical training distribution
    values, freq = np.unique(bank.counts, return_counts=True)
    observed = np.array([np.sum(np.array(counts) == v) for v in values])
    assert observed.sum() == len(counts)  # no count outside the training support
    expected = freq / freq.sum() * len(counts)
    assert stats.chisquare(observed, expected).pvalue > 0.001
    # sizes: flips / 90-degree rotations keep the voxel count; two-sample KS against the bank
    assert stats.ks_2samp(sizes, bank.sizes).pvalue > 0.001
    # with the default scale jitter the sizes stay close (median within 20 %)
    t2 = RandLesionMaskd(bank=bank).set_random_state(0)
    jittered = np.concatenate([np.bincount(t2(d)["label"][0].numpy().ravel())[1:] for _ in range(60)])
    assert abs(np.median(jittered) / np.median(bank.sizes) - 1) < 0.2


def test_location_prior_is_followed():
    """A bank whose lesions all sit in the left half places new lesions mostly in the left half."""
    labels, brains, tissues, _ = _training_maps(n_scans=8, seed=3)
    half = SHAPE[0] // 2
    left = [np.where(np.indices(SHAPE)[0] < half, lab, 0) for lab in labels]
    keep = [i for i, lab in enumerate(left) if lab.any()]
    b = LesionBank.from_arrays([left[i] for i in keep], [brains[i] for i in keep], [tissues[i] for i in keep], sigma=0.5)
    d, _ = _healthy()
    t = RandLesionMaskd(bank=b, n_lesions=10).set_random_state(0)
    xs = np.concatenate([np.argwhere(t(d)["label"][0].numpy() > 0)[:, 0] for _ in range(10)])
    assert np.mean(xs < half) > 0.8


def test_bad_inputs(bank):
    d, _ = _healthy()
    with pytest.raises(ValueError, match="healthy_swi.nii.gz.*brain mask is empty"):
        RandLesionMaskd(bank=bank)({**d, "brainmask": torch.zeros_like(d["brainmask"])})
    with pytest.raises(ValueError, match="needs a brain mask"):
        RandLesionMaskd(bank=bank)({"image": d["image"]})
    with pytest.raises(ValueError, match="needs a LesionBank"):
        RandLesionMaskd(bank=None)


def _phantom_ready() -> bool:
    try:
        from cmb_synthesis.phantom import generate_cohort  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _phantom_ready(), reason="phantom package not landed")
def test_bank_and_sampler_on_phantom_cohort(tiny_cohort, tmp_path):
    """Bank from the phantom's training split; masks sampled on a healthy phantom (with and without its
    tissue map) stay in GM/WM/deep GM and follow the training count and size distributions."""
    from monai.data import load_decathlon_datalist

    from transforms.pipelines import preprocessing

    b = lesion_bank(tiny_cohort, split="training")
    items = load_decathlon_datalist(tiny_cohort, True, "training")
    patho = [i for i in items if i["group"] == "pathological"]
    assert b.counts.size == len(patho) and len(b) == int(b.counts.sum()) > 0
    assert b.tissue_fraction[[0, 1]].sum() < 0.2  # phantom CMBs are not in CSF / background
    b = LesionBank.load(b.save(tmp_path / "bank.npz"))
    healthy = next(i for i in items if i["group"] == "healthy")
    pre = preprocessing(label_keys=(), extra_keys=("tissue",))
    d = pre({"image": healthy["image"], "brainmask": healthy["brainmask"], "tissue": healthy["tissue"]})
    tis = d["tissue"][0].numpy()
    t = RandLesionMaskd(bank=b, scale_range=(1.0, 1.0)).set_random_state(0)
    counts, sizes = [], []
    for _ in range(15):
        lab = t(d)["label"][0].numpy()
        assert np.isin(tis[lab > 0], (2, 3, 4)).all()
        counts.append(int(lab.max()))
        sizes += np.bincount(lab.ravel())[1:].tolist()
    values, freq = np.unique(b.counts, return_counts=True)
    observed = np.array([np.sum(np.array(counts) == v) for v in values])
    assert observed.sum() == len(counts)
    assert stats.chisquare(observed, freq / freq.sum() * len(counts)).pvalue > 0.001
    assert stats.ks_2samp(sizes, b.sizes).pvalue > 0.001
    # external data has no tissue map: CSF excluded by intensity (bright on SWI) + eroded brain mask
    no_tissue = {k: v for k, v in d.items() if k != "tissue"}
    t2 = RandLesionMaskd(bank=b, n_lesions=10).set_random_state(1)
    for _ in range(3):
        lab = t2(no_tissue)["label"][0].numpy()
        assert lab.max() >= 8 and np.isin(tis[lab > 0], (2, 3, 4)).all()


def test_bank_splits_a_binary_mask_into_its_lesions():
    """A 0/255 mask holding three CMBs gives three lesion shapes and a count of 3, not one merged lesion."""
    lab = np.zeros((30, 30, 20), np.uint8)
    for c in ((8, 8, 8), (20, 10, 10), (12, 22, 12)):
        lab[c[0] - 1:c[0] + 2, c[1] - 1:c[1] + 2, c[2] - 1:c[2] + 2] = 255
    bm = np.zeros_like(lab)
    bm[2:28, 2:28, 2:18] = 1
    bank = LesionBank.from_arrays([lab], [bm], sources=["binary.nii.gz"])
    assert len(bank) == 3 and bank.counts.tolist() == [3] and bank.sizes.tolist() == [27, 27, 27]
    assert bank.split_sources == ["binary.nii.gz"]
    inst = lab.astype(np.int64) // 255
    inst[18:23, :, :] *= 2
    inst[10:15, 20:25, :] *= 3
    kept = LesionBank.from_arrays([inst], [bm])
    assert len(kept) == 3 and kept.split_sources == []

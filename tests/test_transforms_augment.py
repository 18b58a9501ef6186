"""transforms.augment.classical_augmentation: image and masks stay aligned, lesions kept, reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.utils import set_determinism

from transforms.augment import classical_augmentation


def _blobs(shape=(48, 44, 24), seed=0):
    """Bright-ish brain box with dark spherical blobs (r = 2 voxels) and their instance labels."""
    rng = np.random.default_rng(seed)
    img = np.full(shape, 0.2, np.float32)
    img[4:-4, 4:-4, 3:-3] = 0.7
    lab = np.zeros(shape, np.int32)
    zz = np.indices(shape)
    centres = [(12, 12, 8), (30, 20, 12), (24, 32, 16), (36, 34, 6), (8, 30, 18)]
    for i, c in enumerate(centres, 1):
        ball = sum((zz[a] - c[a]) ** 2 for a in range(3)) <= 4
        img[ball] = 0.05
        lab[ball] = i
    img += rng.normal(0, 0.01, shape).astype(np.float32)
    bm = (img > 0.45).astype(np.uint8)  # the brain box (background is 0.2)
    bm[lab > 0] = 1
    aff = torch.diag(torch.tensor([0.98, 0.98, 1.0, 1.0], dtype=torch.float64))
    return {
        "image": MetaTensor(torch.from_numpy(img)[None], affine=aff),
        "label": MetaTensor(torch.from_numpy(lab)[None], affine=aff),
        "brainmask": MetaTensor(torch.from_numpy(bm)[None], affine=aff),
    }


@pytest.mark.parametrize("seed", range(4))
def test_cda_keeps_lesions_under_the_dark_blobs(seed):
    d = _blobs()
    aug = classical_augmentation(
        ("image",), ("label", "brainmask"), prob=1.0, rotate_deg=15, shear=0.1, scale=0.15,
        intensity_scale=0.1, intensity_shift=0.05,
    )  # fmt: skip
    aug.set_random_state(seed)
    out = aug(d)
    img, lab = out["image"][0].numpy(), out["label"][0].numpy()
    assert lab.dtype == np.int32 and out["brainmask"].dtype == torch.int32
    assert set(np.unique(lab)) == set(range(6))  # every lesion survived, no new label values
    assert not np.array_equal(img, d["image"][0].numpy())  # something happened
    bg = np.median(img[(lab == 0) & (out["brainmask"][0].numpy() > 0)])
    dark = (img < 0.5 * bg) & (out["brainmask"][0].numpy() > 0)  # dark voxels inside the (warped) brain
    grid = np.indices(lab.shape).reshape(3, -1).T.reshape(*lab.shape, 3)
    for i in range(1, 6):
        m = lab == i
        assert np.sum(m) >= 0.5 * np.sum(d["label"][0].numpy() == i)
        # the label moved with the image: its voxels are dark (bilinear edges aside) ...
        assert np.median(img[m]) < 0.5 * bg and np.mean(dark[m]) > 0.6, (i, img[m], bg)
        # ... and the dark blob around it has the same centre (within one voxel)
        lo, hi = np.maximum(np.argwhere(m).min(0) - 3, 0), np.argwhere(m).max(0) + 4
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        c_lab, c_dark = grid[sl][m[sl]].mean(0), grid[sl][dark[sl]].mean(0)
        assert np.linalg.norm(c_lab - c_dark) < 1.0, (i, c_lab, c_dark)


def test_cda_flip_is_left_right_only():
    d = _blobs()
    aug = classical_augmentation(prob=1.0, rotate_deg=0, shear=0, scale=0, intensity_scale=0, intensity_shift=0)
    aug.set_random_state(0)
    out = aug(d)
    np.testing.assert_array_equal(out["label"][0].numpy(), d["label"][0].numpy()[::-1])


def test_cda_reproducible_with_set_determinism():
    outs = []
    for _ in range(2):
        set_determinism(seed=3)
        aug = classical_augmentation(label_keys=("label",), prob=0.8)
        outs.append(aug(_blobs()))
    set_determinism(None)
    torch.testing.assert_close(outs[0]["image"].as_tensor(), outs[1]["image"].as_tensor())
    assert torch.equal(outs[0]["label"].as_tensor(), outs[1]["label"].as_tensor())


def test_cda_missing_label_key_is_skipped():
    d = _blobs()
    del d["brainmask"]
    out = classical_augmentation(label_keys=("label", "brainmask"), prob=1.0)(d)
    assert "brainmask" not in out and out["image"].shape == d["image"].shape


def test_cda_never_loses_single_voxel_or_border_lesions():
    """1-voxel lesions (one at the border) under strong down-scaling: plain RandAffined drops some, cDA none."""
    from monai.transforms import RandAffined

    from transforms.augment import RandAffineKeepLesionsd

    shape = (32, 30, 20)
    lab = np.zeros(shape, np.int32)
    for i, c in enumerate([(0, 15, 10), (10, 10, 5), (20, 21, 14), (25, 5, 9), (16, 16, 16)], 1):
        lab[c] = i
    d = {"image": torch.rand(1, *shape), "label": torch.from_numpy(lab)[None]}
    kw = dict(prob=1.0, rotate_range=(0, 0, 0.3), scale_range=(0.3, 0.3, 0.3), mode=("bilinear", "nearest"))
    plain, safe = RandAffined(("image", "label"), **kw), RandAffineKeepLesionsd(("image", "label"), max_retries=20, **kw)
    plain.set_random_state(0)
    safe.set_random_state(0)
    lost_plain = sum(len(set(range(1, 6)) - set(np.unique(plain(d)["label"]).tolist())) for _ in range(3))
    assert lost_plain > 0  # the situation is real
    for _ in range(3):
        assert set(range(1, 6)) <= set(np.unique(safe(d)["label"]).tolist())
    # via the factory (label is the default lesion key)
    aug = classical_augmentation(prob=1.0, scale=0.3, rotate_deg=(0, 0, 20), max_retries=20)
    aug.set_random_state(1)
    for _ in range(2):
        assert set(range(1, 6)) <= set(np.unique(aug(d)["label"]).tolist())

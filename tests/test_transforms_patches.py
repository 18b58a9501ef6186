"""transforms.patches: z grid coverage/overlap, exact stitching, candidate-centred patches; MONAI inferer parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer

from transforms.patches import (
    CandidatePatchesd,
    ZPatchesd,
    ZPatchSampler,
    extract_candidate_patches,
    padded_depth,
    stitch_z_patches,
    z_patch_starts,
)


@pytest.mark.parametrize("depth", [1, 20, 32, 33, 48, 100, 112, 113])
def test_grid_covers_every_slice_with_16_slice_overlap(depth):
    starts = z_patch_starts(depth, 32, 0.5)
    assert starts[0] == 0
    covered = np.zeros(padded_depth(depth), int)
    for s in starts:
        covered[s : s + 32] += 1
    assert (covered[:depth] >= 1).all()
    assert padded_depth(depth) >= max(depth, 32)
    for a, b in zip(starts, starts[1:]):
        assert (a + 32) - b == 16  # neighbours share exactly 16 slices
    assert starts[-1] < depth  # no patch made of padding only


def test_paper_grid_for_112_slices():
    assert z_patch_starts(112) == [0, 16, 32, 48, 64, 80]


@pytest.mark.parametrize("mode", ["mean", "linear"])
def test_stitch_reproduces_volume(mode):
    vol = torch.rand(1, 20, 18, 45)
    sampler = ZPatchSampler((24, 18, 16), overlap=0.5)  # X padded 20 -> 24, Z padded 45 -> 48
    patches, starts = sampler(vol)
    assert patches.shape == (len(starts), 1, 24, 18, 16)
    assert starts == [0, 8, 16, 24, 32]
    back = sampler.stitch(patches, starts, vol.shape, mode=mode)
    torch.testing.assert_close(back, vol)


def test_stitch_blends_disagreeing_overlaps():
    p = torch.stack([torch.zeros(1, 2, 2, 4), torch.ones(1, 2, 2, 4)])  # starts 0 and 2, overlap 2 slices
    out = stitch_z_patches(p, [0, 2], 6, mode="mean")
    assert out[0, 0, 0].tolist() == [0, 0, 0.5, 0.5, 1, 1]


def test_zpatchesd_and_sliding_window_inferer_agree():
    vol = torch.rand(1, 16, 12, 40)
    d = ZPatchesd("image", patch_size=(16, 12, 16))({"image": vol})
    assert d["image"].shape[0] == len(d["image_patch_starts"]) and d["image_shape"] == (1, 16, 12, 40)
    # MONAI's inferer, configured as documented, does the same patch-wise pass for inference
    net = lambda x: 2 * x  # noqa: E731
    inf = SlidingWindowInferer(roi_size=(16, 12, 16), overlap=(0, 0, 0.5), mode="gaussian")
    out = inf(vol[None], net)[0]
    stitched = stitch_z_patches(net(d["image"]), d["image_patch_starts"], 40)
    torch.testing.assert_close(out, stitched)


def test_inplane_larger_than_patch_refused():
    with pytest.raises(ValueError, match="exceeds"):
        ZPatchSampler((10, 10, 8))(torch.zeros(1, 12, 10, 8))


def test_candidate_patches_centred_and_padded():
    img = torch.arange(10 * 11 * 12, dtype=torch.float32).reshape(1, 10, 11, 12) + 1
    coords = np.array([[5, 5, 6], [0, 0, 0], [9, 10, 11]])
    d = CandidatePatchesd(("image",), patch_size=(4, 4, 4), output_key="patches")({"image": img, "candidates": coords})
    p = d["patches"]
    assert p.shape == (3, 1, 4, 4, 4)
    for n, c in enumerate(coords):
        assert p[n, 0, 2, 2, 2] == img[0, c[0], c[1], c[2]]  # centre voxel at index p // 2
    torch.testing.assert_close(p[0, 0], img[0, 3:7, 3:7, 4:8])
    assert (p[1, 0, :2] == 0).all() and (p[1, 0, 2:, 2:, 2:] == img[0, :2, :2, :2]).all()  # zero padded corner
    rep = extract_candidate_patches(img, coords[1:2], (4, 4, 4), padding_mode="replicate")
    assert (rep[0, 0, 0, 0, 0] == img[0, 0, 0, 0]).item()
    assert extract_candidate_patches(img, np.zeros((0, 3), int), (4, 4, 4)).shape == (0, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="outside"):
        extract_candidate_patches(img, np.array([[10, 0, 0]]), (4, 4, 4))


def test_bundle_config_targets():
    """Bundle configs build the transforms by ``_target_: transforms.<Name>`` (lazy package exports)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {
            "imports": ["$import transforms"],
            "patches": {"_target_": "transforms.CandidatePatchesd", "keys": ["image"], "patch_size": [8, 8, 4]},
            "cda": {"_target_": "transforms.classical_augmentation", "prob": 0.2},
        }
    )
    assert isinstance(parser.get_parsed_content("patches"), CandidatePatchesd)
    assert len(parser.get_parsed_content("cda").transforms) == 5

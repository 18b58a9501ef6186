"""transforms.patches: candidate-centred patches; bundle configs reach the transforms by ``_target_``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transforms.patches import CandidatePatchesd, extract_candidate_patches


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

"""scripts/head_profile_fit.py: the least-squares fit of G_HP's head features to real CMB profiles."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cmb_synthesis.synthesis.networks import CMBGenerator

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("head_profile_fit", REPO / "scripts" / "head_profile_fit.py")
head_profile_fit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(head_profile_fit)


def _crops(G: CMBGenerator, radii: list[float], weights: np.ndarray) -> tuple[torch.Tensor, ...]:
    """21^3 crops of uniform tissue with one ball lesion each, painted exactly as the head would with ``weights``
    on its features alone: image = 1 - sum_k w_k f_k / gain."""
    zz, yy, xx = np.mgrid[:21, :21, :21]
    masks = torch.stack([torch.from_numpy(((zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2 <= r * r)[None]).float() for r in radii])
    with torch.no_grad():
        feats = G.head_features(torch.ones_like(masks), masks)[0::2]
        image = 1.0 - sum(float(w) * f / G.head_gain for w, f in zip(weights, feats))
    return image, masks, torch.ones_like(masks)


def test_fit_recovers_the_weights_that_painted_the_lesions():
    """Lesions painted by known head weights (sizes 1 to 123 voxels) are fitted back: the same weights, no
    profile error on either split, one entry per size bin with lesions; without the sharp feature they do not fit."""
    G = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3, norm=None, mask_blur=(1.0, 2.0), head_smooth=0.7,
                     smooth_peak=True, head_sharp=True)
    w = np.array([0.3, 0.4, 0.5, -0.2])  # smoothed, sharp, blur 1, blur 2
    train = _crops(G, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0], w)
    val = _crops(G, [1.2, 2.2], w)
    r = head_profile_fit.fit(G, train, val)
    assert r["n_features"] == 4
    assert np.allclose(r["weights"], w, atol=0.02)  # linearised: the sigma-2 blur reaches the tissue ring
    assert r["training"]["profile_error"] < 2e-3 and r["validation"]["profile_error"] < 2e-3
    # balls of radius 0.5 and 1 (1, 7 voxels), 1.5 and 2 (19, 33), 2.5 and 3 (81, 123): bins < 9, 19-39, 40+
    assert [(b["bin"], b["n"]) for b in r["per_size_bin_training"]] == [(0, 2), (2, 2), (3, 2)]
    G_plain = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3, norm=None, mask_blur=(1.0, 2.0), head_smooth=0.7,
                           smooth_peak=True)
    assert head_profile_fit.fit(G_plain, train, val)["validation"]["profile_error"] > 0.02  # no sharp feature: 0.035

"""Shapes and value ranges of the synthesis networks at the paper's patch size (narrow widths for speed)."""

from __future__ import annotations

import pytest
import torch

from cmb_synthesis.synthesis.networks import CMBCritic, CMBGenerator


@pytest.mark.parametrize("output", ["residual", "sigmoid"])
def test_generators_accept_160x146x32(output):
    torch.manual_seed(0)
    x = torch.rand(1, 1, 160, 146, 32)
    y = torch.zeros_like(x)
    y[..., 80:83, 70:73, 15:17] = 1
    for name in ("G_HP", "G_PH"):
        g = CMBGenerator(channels=2, n_res_blocks=1, stem_kernel=3, output=output)
        with torch.no_grad():
            out = g(x, y)
            stacked = g(torch.cat([x, y], 1))
        assert out.shape == x.shape, name
        assert 0.0 <= out.min() and out.max() <= 1.0
        assert torch.equal(out, stacked)


def test_critics_accept_160x146x32():
    x = torch.rand(2, 1, 160, 146, 32)
    for name in ("D_P", "D_H"):
        d = CMBCritic(channels=2, num_layers_d=3)
        with torch.no_grad():
            s = d(x)
        assert s.shape[:2] == (2, 1) and s.ndim == 5 and min(s.shape[2:]) >= 1, name


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="too small"):
        CMBCritic(channels=2, num_layers_d=3)(torch.rand(1, 1, 64, 64, 16))
    with pytest.raises(ValueError, match="stacked channels"):
        CMBGenerator(channels=2, n_res_blocks=0)(torch.rand(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="output must be"):
        CMBGenerator(output="linear")

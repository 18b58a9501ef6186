"""Shapes and value ranges of the synthesis networks at the paper's patch size (narrow widths for speed), and
the paper presets of both bundles (train.yaml + paper.yaml) building the paper's networks and cohort."""

from __future__ import annotations

from pathlib import Path

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


# --- the paper presets as configured: each bundle's train.yaml + paper.yaml, parsed and instantiated ---------

REPO = Path(__file__).resolve().parents[1]


def _paper_parser(bundle: str, bundle_root: Path, paper: bool = True):
    """train.yaml (+ paper.yaml) of ``bundle``, read like ``monai.bundle run`` merges them, on the CPU."""
    from monai.bundle import ConfigParser

    configs = REPO / "bundles" / bundle / "configs"
    p = ConfigParser()
    p.read_config([str(configs / "train.yaml")] + ([str(configs / "paper.yaml")] if paper else []))
    p["bundle_root"] = str(bundle_root)
    p["device"] = "$torch.device('cpu')"
    return p


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k**3 + cout  # weights + bias


def _n_params(net: torch.nn.Module) -> int:
    return sum(q.numel() for q in net.parameters())


def test_synthesis_paper_preset_builds_the_papers_networks(tmp_path):
    """G_HP, G_PH: Xia et al. widths (stem 7^3, 32/64/128 channels, 6 residual blocks, instance norm with
    affine parameters, image + mask input); D_P, D_H: image-only critics 64/128/256/512. No cohort is made."""
    p = _paper_parser("cmb_synthesis", tmp_path)
    c1, c2, c3 = 32, 64, 128
    norms = 2 * (c1 + c2 + c3 + 6 * 2 * c3 + c2 + c1)  # instance norm: weight + bias per channel
    convs = (_conv(2, c1, 7) + _conv(c1, c2, 3) + _conv(c2, c3, 3) + 6 * 2 * _conv(c3, c3, 3)
             + _conv(c3, c2, 3) + _conv(2 * c2, c2, 3) + _conv(c2, c1, 3) + _conv(2 * c1, c1, 3) + _conv(c1 + 2, 1, 1))
    critic = _conv(1, 64, 4) + _conv(64, 128, 4) + _conv(128, 256, 4) + _conv(256, 512, 4) + _conv(512, 1, 4)
    torch.manual_seed(0)
    x = torch.rand(1, 1, 32, 32, 16)
    y = torch.zeros_like(x)
    y[..., 15:18, 15:18, 7:9] = 1
    for name in ("G_HP", "G_PH"):
        g = p.get_parsed_content(name)
        assert isinstance(g, CMBGenerator) and _n_params(g) == convs + norms, name
        assert sum(isinstance(m, torch.nn.InstanceNorm3d) for m in g.modules()) == 5 + 6 * 2, name  # + 2 per block
        with torch.no_grad():
            out = g(torch.cat([x, y], 1))  # the stacked form the sliding-window inferer uses
        assert out.shape == x.shape and 0.0 <= out.min() and out.max() <= 1.0, name
    for name in ("D_P", "D_H"):
        d = p.get_parsed_content(name)
        assert isinstance(d, CMBCritic) and _n_params(d) == critic, name
        with torch.no_grad():
            s = d(torch.rand(1, 1, 32, 32, 32))
        assert s.ndim == 5 and s.shape[:2] == (1, 1) and torch.isfinite(s).all(), name
    assert p.get_parsed_content("critic_mask") is False and p.get_parsed_content("patch_size") == [160, 146, 32]
    assert not any(tmp_path.iterdir()), "building the networks must not generate a cohort"


def test_detection_paper_preset_builds_a_3d_densenet121(tmp_path):
    """The classifier of the detection paper preset: a 3-D DenseNet121 (1 channel in, 1 logit out) on 32^3
    candidate patches, larger than the CPU preset's Classifier. No cohort is made."""
    from monai.networks.nets import DenseNet121

    net = _paper_parser("cmb_detection", tmp_path).get_parsed_content("network")
    cpu = _paper_parser("cmb_detection", tmp_path, paper=False).get_parsed_content("network")
    assert isinstance(net, DenseNet121)
    assert _n_params(net) == _n_params(DenseNet121(spatial_dims=3, in_channels=1, out_channels=1)) > 10 * _n_params(cpu)
    net.eval()
    with torch.no_grad():
        logit = net(torch.rand(2, 1, 32, 32, 32))
    assert logit.shape == (2, 1) and torch.isfinite(logit).all()
    assert not any(tmp_path.iterdir()), "building the network must not generate a cohort"


@pytest.mark.parametrize("bundle", ["cmb_synthesis", "cmb_detection"])
def test_paper_preset_selects_the_paper_cohort(bundle, tmp_path, monkeypatch):
    """paper.yaml: the paper's split (phantom preset 'paper') in its own folder; train.yaml alone: the default."""
    import cmb_synthesis.phantom

    calls = []
    monkeypatch.setattr(cmb_synthesis.phantom, "ensure_cohort",
                        lambda d, preset="default", **kw: calls.append((str(d), preset)) or f"{d}/datalist.json")
    for paper in (True, False):
        _paper_parser(bundle, tmp_path, paper=paper).get_parsed_content("datalist")
    assert calls == [(f"{tmp_path}/data/phantom_paper", "paper"), (f"{tmp_path}/data/phantom", "default")]


def test_blurred_masks_feed_the_head_and_keep_an_untrained_generator_the_identity():
    g = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3, norm=None, mask_blur=(1.0, 2.0))
    assert g.head.in_channels == 4 + 2 * 3  # features + (mask, mask * image) for the mask and 2 blurs
    x = torch.rand(1, 1, 24, 24, 12)
    m = torch.zeros_like(x)
    m[..., 11:13, 11:13, 5:7] = 1
    torch.testing.assert_close(g(x, m), x)  # zero head at initialisation
    b = g._blurred(m, g._blur0)
    assert b.sum().item() == pytest.approx(m.sum().item(), rel=1e-4)  # mass kept, spread beyond the mask
    assert 0 < b[0, 0, 14, 12, 6] < b[0, 0, 12, 12, 6] < 1
    with pytest.raises(ValueError, match="positive"):
        CMBGenerator(channels=4, n_res_blocks=1, mask_blur=(0.0,))

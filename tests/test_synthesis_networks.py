"""Shapes and value ranges of the synthesis networks at the paper's patch size (narrow widths for speed), and
the paper presets of both bundles (train.yaml + paper.yaml) building the paper's networks and cohort."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def test_head_smooth_paints_a_graded_lesion_and_nothing_beyond_its_reach():
    """head_smooth: the head's mask (and code) features blurred, so a painted lesion fades towards its edge
    instead of a plateau with a step; nothing farther than round(3 sigma) voxels from the label changes."""
    x = torch.full((1, 1, 24, 24, 12), 0.6)
    m = torch.zeros_like(x)
    m[..., 10:15, 10:15, 4:9] = 1  # a 5-voxel cube
    out = {}
    for sigma in (0.0, 0.7):
        g = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3, norm=None, mask_blur=(), head_smooth=sigma)
        assert g.head.in_channels == 4 + 2
        torch.testing.assert_close(g(x, m), x)  # untrained: the identity
        with torch.no_grad():
            g.head.weight.zero_()
            g.head.weight[0, 4] = -0.05  # paint with the mask feature only
        out[sigma] = (x - g(x, m))[0, 0, :, 12, 6]  # darkening along a line through the centre
    sharp, smooth = out[0.0], out[0.7]
    assert float(sharp[10:15].std()) < 1e-6 and float(sharp[9]) == 0.0  # a plateau with a step
    assert float(smooth[12]) > float(smooth[10]) > float(smooth[9]) > 0  # darkest at the centre, graded edge
    assert float(smooth[:7].abs().max()) == 0.0 and float(smooth[18:].abs().max()) == 0.0  # reach 2 voxels
    coded = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3, norm=None, mask_blur=(), mask_code=True,
                         head_smooth=0.7)
    with torch.no_grad():
        coded.head.weight.zero_()
        coded.head.weight[0, 6:] = -0.05  # the code and rim features only
    diff = (coded(x, m * 1.5) - coded(x, m * 0.5)).abs()[0, 0]
    far = torch.nn.functional.max_pool3d(m, 7, 1, 3)[0, 0] == 0  # > 3 voxels from the label
    assert float(diff[10:15, 10:15, 4:9].min()) > 0 and float(diff[far].max()) == 0.0
    with pytest.raises(ValueError, match="head_smooth"):
        CMBGenerator(channels=4, n_res_blocks=1, head_smooth=-1.0)
    with pytest.raises(ValueError, match="smooth_peak needs head_smooth"):
        CMBGenerator(channels=4, n_res_blocks=1, smooth_peak=True)


def test_smooth_peak_paints_the_same_centre_on_a_small_and_a_large_lesion():
    """smooth_peak: the smoothed mask scaled to 1 at each lesion's centre, so one head weight paints a 1-voxel
    and a 4-voxel-wide lesion equally dark at the centre (without it the small one stays lighter)."""
    x = torch.full((1, 1, 24, 24, 12), 0.6)
    centre = {}
    for peak in (False, True):
        g = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3, norm=None, mask_blur=(), head_gain=1.0,
                         head_smooth=0.7, smooth_peak=peak)
        with torch.no_grad():
            g.head.weight.zero_()
            g.head.weight[0, 4] = -0.5  # paint with the (smoothed) mask feature only
            for width in (1, 4):
                m = torch.zeros_like(x)
                m[..., 11:11 + width, 11:11 + width, 5:5 + width] = 1
                out = g(x, m)[0, 0]
                c = width // 2
                centre[peak, width] = float(out[11 + c, 11 + c, 5 + c])
                assert float((out - 0.6)[m[0, 0] == 0].abs().max()) < 0.5  # graded: the edge is lighter than 0.1
    assert centre[False, 1] > centre[False, 4] + 0.3  # the blurred label peaks lower on a small lesion
    assert centre[True, 1] == pytest.approx(centre[True, 4], abs=1e-4) == pytest.approx(0.1, abs=1e-4)


def test_size_scale_lets_the_head_paint_by_lesion_size():
    """size_scale: the head also sees its mask features times the lesion's effective voxel count / scale. The
    size map is about the voxel count (a 7-voxel and a 33-voxel ball), and a weight on a size product paints a
    large lesion darker than a small one where the plain features paint both alike; an untrained generator is
    still the identity, and no mask paints nothing."""
    import numpy as np

    g = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3, norm=None, mask_blur=(1.0,), head_gain=1.0,
                     head_smooth=0.7, smooth_peak=True, size_scale=10.0)
    assert g.head.in_channels == 4 + 2 * 2 * 2  # (mask, blur) x (alone, x image) x (plain, size product)
    x = torch.full((1, 1, 24, 24, 16), 0.6)
    zz, yy, xx = np.mgrid[:24, :24, :16]
    centre = {}
    for r in (1.0, 2.0):
        m = torch.from_numpy((((zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 8) ** 2) <= r * r)[None, None]).float()
        size = g._lesion_size(m) * 10.0
        assert float(size[0, 0, 12, 12, 8]) == pytest.approx(float(m.sum()), rel=0.3)  # 7 and 33 voxels
        with torch.no_grad():
            assert torch.equal(g(x, m), x)  # zero-initialised head: the identity
            g.head.weight.zero_()
            g.head.weight[0, 4 + 4] = -0.1  # the smoothed mask times the size only
            centre[r] = float(g(x, m)[0, 0, 12, 12, 8])
            g.head.weight.zero_()
    assert centre[2.0] < centre[1.0] - 0.15  # 0.35 against 0.54
    with torch.no_grad():
        g.head.weight[0, 8] = -0.1
        assert torch.equal(g(x, torch.zeros_like(x)), x)
    with pytest.raises(ValueError, match="size_scale"):
        CMBGenerator(channels=4, n_res_blocks=1, size_scale=-1.0)


def test_head_sharp_adds_the_binary_mask_beside_its_smoothed_form():
    """head_sharp: the head gets the binary mask (and mask * image) as it is beside the smoothed, peak-normalised
    mask, so a weight on it paints a step exactly on the label (dark 1 voxel inside a large lesion's edge, nothing
    1 voxel outside), which the smoothed feature alone cannot; untrained it is the identity; it needs
    head_smooth."""
    import numpy as np

    g = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3, norm=None, mask_blur=(1.0,), head_gain=1.0,
                     head_smooth=0.7, smooth_peak=True, head_sharp=True)
    assert g.head.in_channels == 4 + 2 * 3  # (smoothed, sharp, blur) x (alone, x image)
    x = torch.full((1, 1, 24, 24, 16), 0.6)
    zz, yy, xx = np.mgrid[:24, :24, :16]
    m = torch.from_numpy((((zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 8) ** 2) <= 4.0)[None, None]).float()  # r = 2
    with torch.no_grad():
        assert torch.equal(g(x, m), x)
        g.head.weight[0, 4 + 2] = -0.4  # the binary mask alone
        out = g(x, m)[0, 0]
    assert float(out[12, 12, 8]) == pytest.approx(0.2, abs=1e-5)
    assert float(out[14, 12, 8]) == pytest.approx(0.2, abs=1e-5)  # on the label's edge: the full step
    assert float(out[15, 12, 8]) == pytest.approx(0.6, abs=1e-6)  # 1 voxel outside: untouched
    with torch.no_grad():
        assert torch.equal(g(x, torch.zeros_like(x)), x)
    with pytest.raises(ValueError, match="head_sharp"):
        CMBGenerator(channels=4, n_res_blocks=1, head_sharp=True)


def test_cube_max_equals_the_full_max_pool():
    """The generator's peak normalisation takes the cube maximum in three 1-D passes: the same values as one
    (2r+1)^3 max pool, borders included, so trained weights behave exactly as before."""
    import torch.nn.functional as F

    from cmb_synthesis.synthesis.networks import cube_max

    g = torch.Generator().manual_seed(0)
    for shape, r in (((2, 1, 12, 9, 7), 3), ((1, 2, 5, 6, 4), 1), ((1, 1, 3, 3, 3), 3)):
        x = torch.rand(shape, generator=g)
        x = x * (x > 0.8)
        assert torch.equal(cube_max(x, r), F.max_pool3d(x, kernel_size=2 * r + 1, stride=1, padding=r))


def test_centred_critic_is_blind_to_a_global_brightness_offset_only():
    """``centre_input``: a constant added to every voxel of the image leaves the scores unchanged (the mask channel
    is not centred), while a local change (a dark blob) still changes them; the default critic sees the offset."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32, 16) * 0.5 + 0.25
    mask = torch.zeros_like(x)
    mask[:, :, 14:18, 14:18, 6:10] = 1.0
    centred = CMBCritic(in_channels=2, channels=4, num_layers_d=2, centre_input=True)
    plain = CMBCritic(in_channels=2, channels=4, num_layers_d=2)
    plain.load_state_dict(centred.state_dict())  # same weights: the option adds no parameters
    pair, shifted = torch.cat([x, mask], 1), torch.cat([x + 0.1, mask], 1)
    torch.testing.assert_close(centred(shifted), centred(pair), atol=1e-6, rtol=0)  # scores ~1e-3 at random init
    assert (plain(shifted) - plain(pair)).abs().max() > 1e-4
    blob = x.clone()
    blob[:, :, 14:18, 14:18, 6:10] = 0.05
    assert (centred(torch.cat([blob, mask], 1)) - centred(pair)).abs().max() > 1e-4
    # the mask channel is scored as it is: moving the mask changes the scores
    assert (centred(torch.cat([x, mask.roll(8, dims=2)], 1)) - centred(pair)).abs().max() > 1e-5


def test_whole_scan_changes_separates_brain_and_background():
    """scripts/whole_scan_changes.py: a change confined to the background shows outside the brain only; a change
    within 2 voxels of the mask is not counted as a change of the brain away from the mask."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("whole_scan_changes", Path(__file__).resolve().parents[1] / "scripts" / "whole_scan_changes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    image = np.full((30, 30, 20), 0.6, np.float32)
    brain = np.zeros(image.shape, bool)
    brain[5:25, 5:25, 4:16] = True
    mask = np.zeros(image.shape, bool)
    mask[14:16, 14:16, 9:11] = True
    out = image.copy()
    out[~brain] += 0.25  # background only (the brain's 2-voxel shell is excluded from "outside")
    from scipy import ndimage as ndi

    out[ndi.binary_dilation(mask)] -= 0.3  # a lesion and its 1-voxel (6-connected) rim
    c = mod.changes(image, out, mask, brain)
    assert c["brain_away_from_mask_mean_abs"] == 0.0
    assert c["outside_brain_mean"] == c["outside_brain_mean_abs"] == 0.25
    out[brain & (out == image)] += 0.01
    assert mod.changes(image, out, mask, brain)["brain_away_from_mask_mean_abs"] == 0.01


def test_first_scans_picks_the_splits_first_healthy_and_pathological_scan(tmp_path):
    """cmb_synthesis.synthesis.inference.first_scans: the jobs the montage and whole_scan_changes.py use; a split
    without one of the groups is refused naming the datalist."""
    import json

    import nibabel as nib

    from cmb_synthesis.synthesis.inference import first_scans

    for name in ("h1", "h2", "p1"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8), np.eye(4)), str(tmp_path / "p1_label.nii.gz"))
    items = [{"id": "h1", "group": "healthy", "image": "h1.nii.gz"}, {"id": "h2", "group": "healthy", "image": "h2.nii.gz"},
             {"id": "p1", "group": "pathological", "image": "p1.nii.gz", "label": "p1_label.nii.gz"}]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "validation": items}))
    healthy, patho = first_scans(datalist, "validation")
    assert (healthy.id, patho.id) == ("h1", "p1")
    with pytest.raises(ValueError, match="datalist.json.*no healthy scan"):
        first_scans(datalist, "training")

"""Contrast codes (cmb_synthesis/synthesis/codes.py): ranks, code maps, measured ranks of real lesions, the
generator's code channel, the per-lesion profile target, the trainer/evaluator and inference paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmb_synthesis.synthesis.codes import (
    CODE_OFFSET,
    ContrastCode,
    code_map,
    quantile_profiles,
    random_codes,
    rank_at,
)
from cmb_synthesis.synthesis.engine import CycleGANTrainer, SynthesisEvaluator
from cmb_synthesis.synthesis.losses import (
    CriticObjective,
    GeneratorObjective,
    LesionProfileLoss,
    paper_terms,
    radial_profiles,
)
from cmb_synthesis.synthesis.networks import CMBCritic, CMBGenerator

S = (24, 24, 16)
TISSUE = 0.8


def _lesion(level: float, radius: float = 1.6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, X, Y, Z) image of tissue with one spherical lesion at ``level`` x tissue, and its mask."""
    g = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in S), indexing="ij"))
    c = torch.tensor([(s - 1) / 2 for s in S]).round()
    inside = ((g - c.view(3, 1, 1, 1)) ** 2).sum(0).sqrt() <= radius
    noise = 0.01 * torch.randn(S, generator=torch.Generator().manual_seed(seed))
    image = torch.where(inside, torch.tensor(TISSUE * level), TISSUE + noise)
    return image[None, None], inside[None, None].to(torch.int32)


def _reference(levels=(0.2, 0.35, 0.5, 0.65, 0.8)) -> tuple[ContrastCode, torch.Tensor]:
    """A one-bin reference made of measured lesions at ``levels`` (their profiles, as training measures them)."""
    profiles = torch.cat([radial_profiles(*_lesion(v, seed=i), return_sizes=True)[0] for i, v in enumerate(levels)])
    return ContrastCode({"edges": np.zeros(0), "quantiles": quantile_profiles(profiles.numpy(), 9)[None]}), profiles


def test_quantile_profiles_order_lightest_first_and_interpolate():
    p = np.array([[0.5, 0.9], [0.1, 0.5], [0.3, 0.7]])
    q = quantile_profiles(p, 5)
    np.testing.assert_allclose(q[0], [0.5, 0.9])  # rank 0: the lightest centre
    np.testing.assert_allclose(q[-1], [0.1, 0.5])  # rank 1: the darkest
    np.testing.assert_allclose(q[2], [0.3, 0.7])  # the median lesion
    np.testing.assert_allclose(q[1], [0.4, 0.8])  # halfway between the lightest and the median
    assert quantile_profiles(p[:1], 3).shape == (3, 2)
    with pytest.raises(ValueError, match="non-empty"):
        quantile_profiles(np.zeros((0, 5)))


def test_random_codes_one_rank_per_lesion_inside_the_mask_only():
    m = torch.zeros(2, 1, 12, 12, 6, dtype=torch.int32)
    m[0, 0, 2:4, 2:4, 2:4], m[0, 0, 8:10, 8:10, 2:4], m[1, 0, 5:7, 5:7, 2:4] = 1, 2, 1
    c = random_codes(m, torch.Generator().manual_seed(0))
    assert c.dtype == torch.float32 and c.shape == m.shape
    assert bool((c[m == 0] == 0).all()) and bool(((c[m > 0] >= 0.5) & (c[m > 0] <= 1.5)).all())
    assert c[0, 0, 2:4, 2:4, 2:4].unique().numel() == 1 and c[0, 0, 2, 2, 2] != c[0, 0, 8, 8, 2]  # per lesion
    torch.testing.assert_close(c, random_codes(m, torch.Generator().manual_seed(0)))  # seeded
    fixed = random_codes(m, ranks=[0.0, 1.0])
    assert fixed[0, 0, 2, 2, 2] == CODE_OFFSET and fixed[0, 0, 8, 8, 2] == CODE_OFFSET + 1
    assert fixed[1, 0, 5, 5, 2] == CODE_OFFSET  # lesion id 1 of the second sample
    binary = random_codes((m > 0).float(), torch.Generator().manual_seed(1))
    assert binary[0][m[0] > 0].unique().numel() == 1  # a binary mask: one lesion per sample
    torch.testing.assert_close(random_codes(m.float(), torch.Generator().manual_seed(0)), c)  # float labels = labels
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        random_codes(m, ranks=[0.2, 1.5])
    with pytest.raises(ValueError, match="one per lesion"):
        random_codes(m, ranks=[0.2, 0.3, 0.4])
    torch.testing.assert_close(code_map(m, torch.tensor([0.25, 1.0])).amax(dim=(1, 2, 3, 4)), torch.tensor([0.75, 1.5]))


def test_measured_rank_orders_real_lesions_and_inverts_the_target():
    code, profiles = _reference()
    # rank <-> target: the target profile at rank q is measured back as rank q
    q = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0])
    sizes = torch.full((5,), 33)
    torch.testing.assert_close(code.rank(code.target(q, sizes)[:, 0], sizes), q, atol=1e-4, rtol=0)
    # rank 0 is the lightest reference lesion, rank 1 the darkest, and out-of-range lesions are clipped
    torch.testing.assert_close(code.target(torch.tensor([0.0, 1.0]), sizes[:2]), profiles[[4, 0]], atol=1e-5, rtol=0)
    measured = [float(code.measure(*_lesion(v, seed=9)).max()) - CODE_OFFSET for v in (0.05, 0.3, 0.5, 0.7, 0.95)]
    assert measured[0] == 1.0 and measured[-1] == 0.0 and measured == sorted(measured, reverse=True)
    assert abs(measured[2] - 0.5) < 0.1
    # a sample without a lesion, or one that cannot be measured, asks for the median
    empty = code.measure(torch.full((1, 1, *S), TISSUE), torch.zeros(1, 1, *S))
    assert float(empty.abs().max()) == 0.0
    with pytest.raises(ValueError, match="quantiles"):
        ContrastCode({"edges": np.zeros(0), "profiles": np.zeros((1, 5))})
    with pytest.raises(ValueError, match="quantiles must be"):
        ContrastCode({"edges": np.zeros(1), "quantiles": np.zeros((1, 9, 5))})


def test_rank_at_reads_the_lesion_nearest_the_centre():
    m = torch.zeros(10, 10, 6)
    m[1:3, 1:3, 1:3], m[5:7, 5:7, 2:4] = 0.6, 1.4
    assert abs(float(rank_at(m, torch.tensor([5, 5, 3]))) - 0.9) < 1e-6
    assert abs(float(rank_at(m, torch.tensor([1, 1, 1]))) - 0.1) < 1e-6
    assert float(rank_at((m > 0).float(), torch.tensor([5, 5, 3]))) == 0.5  # binary: the median
    assert float(rank_at(torch.zeros(4, 4, 4), torch.tensor([1, 1, 1]))) == 0.5


def test_generator_paints_darker_for_a_higher_code_and_refuses_label_values():
    torch.manual_seed(0)
    G = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3, norm=None, mask_code=True, mask_blur=())
    # head inputs: 4 network channels, gain * mask, gain * mask * image, gain * (code - 1) on the lesion and on
    # the 1-voxel shell around it
    assert G.head.in_channels == 4 + 2 + 2
    with torch.no_grad():  # paint with the mask feature, and darker with the code feature
        G.head.weight.zero_()
        G.head.weight[0, 4] = -0.03
        G.head.weight[0, 6] = -0.04
    x, m = _lesion(1.0)
    out = {v: G(x, m.float() * v)[m > 0].mean() for v in (0.5, 1.0, 1.5)}
    assert out[1.5] < out[1.0] < out[0.5] < TISSUE
    # the rank changes the lesion and its 1-voxel rim, nothing farther out
    with torch.no_grad():
        G.head.weight[0, 7] = -0.04
    diff = (G(x, m.float() * 1.5) - G(x, m.float() * 0.5)).abs()[0, 0]
    rim = torch.nn.functional.max_pool3d(m.float(), 3, 1, 1)[0, 0] > 0
    assert float(diff[rim & (m[0, 0] == 0)].min()) > 0 and float(diff[~rim].max()) == 0.0
    with torch.no_grad():  # untrained code weights: every rank paints what a binary mask paints
        G.head.weight[0, 6:] = 0.0
    torch.testing.assert_close(G(x, m.float() * 1.5), G(x, m))
    torch.testing.assert_close(G(x, m), G(x, m.float()))  # integer labels = binary = the median code 1.0
    torch.testing.assert_close(G(x, m * 3), G(x, m))  # instance labels are binarised
    with pytest.raises(ValueError, match="mask_code"):
        G(x, m.float() * 2)  # float instance labels are not codes
    with pytest.raises(ValueError, match="mask_code"):
        G(x, m.float() * 0.3)
    plain = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3, norm=None, mask_blur=())
    torch.testing.assert_close(plain(x, m.float() * 1.5), plain(x, m))  # without codes every mask is binarised
    odd = torch.rand(1, 1, 10, 11, 7)  # padded inside: the code map is padded with the image
    assert G(odd, (odd > 0.9).float() * 1.5).shape == odd.shape


def test_profile_loss_per_lesion_target_at_the_code_rank():
    code, profiles = _reference()
    loss = LesionProfileLoss(weight=1.0, code=code)
    # painted lesions exactly at the darkest / lightest reference profile, asked for with ranks 1 / 0: zero loss
    x_dark, m = _lesion(0.2, seed=0)
    x_light, _ = _lesion(0.8, seed=4)
    fake = torch.cat([x_dark, x_light])
    codes = torch.cat([m.float() * (CODE_OFFSET + 1.0), m.float() * CODE_OFFSET])
    healthy = torch.full_like(fake, TISSUE)
    cycle = dict(fake_p=fake, y_hp=codes, fake_h=healthy, y_p=codes, x_h=healthy, x_p=fake)
    assert float(loss(cycle)) < 1e-5
    # the same lesions asked for with swapped ranks: the per-lesion L1 to the swapped targets
    swapped = dict(cycle, y_hp=codes.flip(0))
    expected = (profiles[0] - profiles[4]).abs().sum()
    torch.testing.assert_close(loss(swapped), expected, atol=1e-4, rtol=1e-4)
    # it pulls a too-light lesion that was asked to be dark towards dark (negative gradient on its centre)
    fake_l = x_light.clone().requires_grad_(True)
    one = dict(cycle, fake_p=fake_l, y_hp=m.float() * (CODE_OFFSET + 1.0), fake_h=healthy[:1], y_p=m, x_h=healthy[:1], x_p=x_light)
    loss(one).backward()
    assert float(fake_l.grad[m > 0].sum()) > 0  # descending the loss lowers the lesion's intensity
    with pytest.raises(ValueError, match="max_radius"):
        LesionProfileLoss(max_radius=3, ring=(5.0, 7.0), code=code)


def _item(seed: int) -> dict:
    x, m = _lesion(1.0, seed=seed)
    xp, _ = _lesion(0.2 + 0.15 * (seed % 4), seed=seed + 10)
    ones = torch.ones_like(x[0])
    return dict(x_h=x[0], y_hp=m[0], brainmask_h=ones, x_p=xp[0], y_p=m[0], brainmask_p=ones, x_p2=xp[0], y_p2=m[0])


def test_trainer_and_evaluator_give_g_hp_code_maps():
    """With a ContrastCode the trainer paints random ranks and gives G_HP the measured ranks of real lesions; the
    evaluator's ranks are the same at every round."""
    code, _ = _reference()
    torch.manual_seed(0)
    g_hp = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3, norm=None, mask_code=True)
    g_ph = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3, norm=None)
    d_p, d_h = CMBCritic(channels=4, num_layers_d=2), CMBCritic(channels=4, num_layers_d=2)
    seen: list[torch.Tensor] = []
    g_hp.register_forward_pre_hook(lambda mod, args: seen.append(args[1].detach().clone()) if len(args) > 1 else None)
    loader = torch.utils.data.DataLoader([_item(i) for i in range(4)], batch_size=2)
    go = torch.optim.Adam(list(g_hp.parameters()) + list(g_ph.parameters()), 1e-3, betas=(0.5, 0.99))
    do = torch.optim.Adam(list(d_p.parameters()) + list(d_h.parameters()), 1e-3, betas=(0.5, 0.99))
    terms = paper_terms() + [LesionProfileLoss(weight=1.0, code=code)]
    tr = CycleGANTrainer("cpu", 1, loader, g_hp, g_ph, d_p, d_h, go, do, CriticObjective(d_p), CriticObjective(d_h),
                         GeneratorObjective(g_hp, g_ph, d_p, d_h, terms), epoch_length=1, n_critic=1, lesion_code=code)
    tr.run()
    assert np.isfinite(tr.state.output["PM_lesion"])
    assert seen and all(s.is_floating_point() for s in seen)
    values = torch.cat([s[s > 0] for s in seen])
    assert bool(((values >= 0.5) & (values <= 1.5)).all()) and values.unique().numel() > 2  # ranks, not a binary mask
    # real lesions of the batch: level 0.2 (dark, rank near 1) and 0.35
    real = code.measure(torch.stack([_item(0)["x_p"], _item(1)["x_p"]]), torch.stack([_item(0)["y_p"], _item(1)["y_p"]]))
    assert any(torch.equal(s, real) for s in seen)
    assert float(real[0].max()) > float(real[1].max())

    ev_loader = torch.utils.data.DataLoader([_item(i) for i in range(4)], batch_size=2)
    ev = SynthesisEvaluator("cpu", ev_loader, g_hp, g_ph, realism=False, lesion_code=code, code_seed=3)
    seen.clear()
    ev.run()
    first = [s.clone() for s in seen]
    seen.clear()
    ev.run()
    assert len(first) == 2 and all(torch.equal(a, b) for a, b in zip(first, seen))
    assert not torch.equal(first[0], first[1])


def test_synthesize_volume_paints_seeded_ranks_per_lesion():
    from cmb_synthesis.synthesis.inference import synthesize_volume

    torch.manual_seed(0)
    G = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3, norm=None, mask_code=True, mask_blur=())
    with torch.no_grad():
        G.head.weight.zero_()
        G.head.weight[0, 4] = -0.03
        G.head.weight[0, 6] = -0.04
    x, m = _lesion(1.0)
    labels = m[0].clone()
    labels[0, :, :, 8:] *= 2  # two lesions (the sphere's halves)
    a = synthesize_volume(G, x[0], labels, patch=S, code_seed=1)
    torch.testing.assert_close(a, synthesize_volume(G, x[0], labels, patch=S, code_seed=1))
    assert not torch.equal(a, synthesize_volume(G, x[0], labels, patch=S, code_seed=2))
    dark = synthesize_volume(G, x[0], labels, patch=S, code=labels.float().clamp(max=1) * 1.5)
    light = synthesize_volume(G, x[0], labels, patch=S, code=labels.float().clamp(max=1) * 0.5)
    assert dark[labels > 0].mean() < a[labels > 0].mean() < light[labels > 0].mean()
    with pytest.raises(ValueError, match="differ in shape"):
        synthesize_volume(G, x[0], labels, patch=S, code=labels[:, :4].float())


def test_run_inference_refuses_a_bad_contrast_rank(tmp_path):
    from cmb_synthesis.synthesis.inference import run_inference

    G = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3, norm=None, mask_code=True)
    for bad in (1.5, -0.1, "dark"):
        with pytest.raises(ValueError, match="contrast_rank must be a number in \\[0, 1\\]"):
            run_inference(tmp_path, tmp_path / "out", G_HP=G, contrast_rank=bad)
    assert not (tmp_path / "out").exists()


def test_stacked_windows_are_clamped_not_refused():
    """The 2-channel form (sliding windows, TorchScript export, MONAI's verify_net_in_out with random inputs) is
    not checked: the mask channel is clamped to [0, 1.5]."""
    G = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3, norm=None, mask_code=True)
    x = torch.rand(1, 2, 16, 16, 8)
    assert G(x).shape == (1, 1, 16, 16, 8)
    torch.testing.assert_close(G(torch.cat([x[:, :1], x[:, 1:] * 3], 1)), G(torch.cat([x[:, :1], (x[:, 1:] * 3).clamp(0, 1.5)], 1)))

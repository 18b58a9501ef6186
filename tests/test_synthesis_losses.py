"""Known-tensor checks of the paper losses (cmb_synthesis.synthesis.losses)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from cmb_synthesis.synthesis.losses import (
    L_AM,
    L_CC,
    L_GAN,
    L_ID,
    AbnormalityMaskLoss,
    AdversarialLoss,
    CriticObjective,
    CycleConsistencyLoss,
    GeneratorObjective,
    IdentityLoss,
    LesionAdversarialLoss,
    LesionCriticObjective,
    LesionCycleLoss,
    LesionIdentityLoss,
    LesionProfileLoss,
    critic_input,
    gradient_penalty,
    lesion_crops,
    paper_terms,
    radial_profiles,
)
from cmb_synthesis.synthesis.networks import CMBCritic, CMBGenerator


class LinearCritic(nn.Module):
    """D(x) = <w, x> per sample: its input gradient is w everywhere."""

    def __init__(self, shape, scale: float):
        super().__init__()
        w = torch.randn(shape)
        self.w = nn.Parameter(scale * w / w.norm())

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)


def test_gradient_penalty_zero_for_unit_norm_gradient():
    torch.manual_seed(0)
    shape = (1, 8, 8, 4)
    real, fake = torch.rand(3, *shape), torch.rand(3, *shape)
    gp = gradient_penalty(LinearCritic(shape, 1.0), real, fake)
    assert gp.item() < 1e-10
    gp2 = gradient_penalty(LinearCritic(shape, 3.0), real, fake)
    assert abs(gp2.item() - 4.0) < 1e-4  # (3 - 1)^2
    gp3 = gradient_penalty(LinearCritic(shape, 0.25), real, fake)
    assert gp3.item() > 0.5


def test_gradient_penalty_trains_critic_and_is_fp32_under_autocast():
    torch.manual_seed(0)
    critic = CMBCritic(channels=4, num_layers_d=2)
    real, fake = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gp = gradient_penalty(critic, real, fake)
    assert gp.dtype == torch.float32 and gp.item() > 0
    gp.backward()
    weights = [p for p in critic.parameters() if p.ndim > 1]  # biases do not change the input gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)


def test_L_AM_ignores_changes_inside_mask_and_penalises_outside():
    x = torch.rand(2, 1, 8, 8, 8)
    mask = torch.zeros_like(x)
    mask[:, :, 2:4, 2:4, 2:4] = 3  # instance label
    brain = torch.ones_like(x)
    inside = x.clone()
    inside[mask > 0] = 0.0
    assert L_AM(inside, x, mask, brain).item() == 0.0
    outside = x.clone()
    outside[:, :, 6, 6, 6] += 0.5
    expected = 2 * 0.5 / (2 * (512 - 8))
    assert abs(L_AM(outside, x, mask, brain).item() - expected) < 1e-6
    # outside the brain does not count either
    brain[:, :, 6, 6, 6] = 0
    assert L_AM(outside, x, mask, brain).item() == 0.0


def test_L_CC_L_ID_L_GAN_values():
    a, b = torch.zeros(1, 1, 2, 2, 2), torch.full((1, 1, 2, 2, 2), 0.25)
    assert L_CC(a, b).item() == 0.25 and L_ID(b, b).item() == 0.0
    fake, real = torch.tensor([1.0, 3.0]), torch.tensor([5.0, 7.0])
    assert L_GAN(fake, real).item() == 2.0 - 6.0
    assert L_GAN(fake).item() == -2.0


def test_objectives_single_forward():
    torch.manual_seed(0)
    g1, g2 = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3), CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3)
    d1, d2 = CMBCritic(channels=4, num_layers_d=2), CMBCritic(channels=4, num_layers_d=2)
    x = torch.rand(2, 1, 16, 16, 16)
    y = torch.zeros_like(x)
    y[:, :, 7:9, 7:9, 7:9] = 1
    crit = CriticObjective(d1)(x, x * 0.5)
    assert set(crit) == {"loss", "W", "GP"} and crit["loss"].requires_grad
    out = GeneratorObjective(g1, g2, d1, d2, paper_terms(am_in_hph=True))(x, y, x, y, torch.ones_like(x), torch.ones_like(x))
    # zero-initialised residual heads: both generators start as the identity, so every L1 term is 0
    assert out["CC"].item() == 0.0 and out["ID"].item() == 0.0 and out["AM"].item() == 0.0
    assert out["G"].requires_grad


def test_mask_conditioned_critics_see_image_and_mask():
    """critic_mask: D_P judges [x~_p, y_p] against [x_p2, y_p2]; the linear critic D = <w_mask, mask * (-image)>
    style feature "dark where the mask says" is then expressible, and the generator's GAN term sees the mask too."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16, 16)
    y = torch.zeros_like(x)
    y[:, :, 7:9, 7:9, 7:9] = 3  # instance label: the critic gets it binarised
    pair = critic_input(x, y)
    assert pair.shape == (2, 2, 16, 16, 16) and torch.equal(pair[:, 1], (y[:, 0] > 0).float())
    assert critic_input(x) is x
    seen = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = CMBCritic(in_channels=2, channels=4, num_layers_d=2)

        def forward(self, t):
            seen.append(t.shape[1])
            return self.c(t)

    d1, d2 = Recording(), Recording()
    out = CriticObjective(d1, critic_mask=True)(x, x * 0.5, y, y)
    assert out["loss"].requires_grad and set(seen) == {2}
    with pytest.raises(ValueError, match="both real_mask and fake_mask"):
        CriticObjective(d1, critic_mask=True)(x, x, y, None)
    g1, g2 = CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3), CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3)
    seen.clear()
    g = GeneratorObjective(g1, g2, d1, d2, paper_terms(critic_mask=True))(x, y, x, y)
    assert g["G"].requires_grad and seen == [2, 2]
    # an image-only critic (the paper's) ignores the masks the trainer always passes
    seen.clear()
    plain = CMBCritic(channels=4, num_layers_d=2)
    CriticObjective(lambda t: seen.append(t.shape[1]) or plain(t))(x, x * 0.5, y, y)
    assert set(seen) == {1}


def _perturbed_generators():
    torch.manual_seed(0)
    gens = [CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3) for _ in range(2)]
    with torch.no_grad():  # zero heads make an untrained generator the identity: move them off it
        for g in gens:
            g.head.weight.normal_(0.0, 0.1)
    return gens


def test_generator_objective_total_is_the_weighted_sum_of_named_terms():
    g1, g2 = _perturbed_generators()
    d1, d2 = CMBCritic(channels=4, num_layers_d=2), CMBCritic(channels=4, num_layers_d=2)
    x_h, x_p = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16)
    y = torch.zeros_like(x_h)
    y[:, :, 6:9, 6:9, 6:9] = 1
    bm = torch.ones_like(x_h)
    out = GeneratorObjective(g1, g2, d1, d2, paper_terms(am_in_hph=True))(x_h, y, x_p, y, bm, bm)
    # the paper symbols, computed here from the networks directly
    with torch.no_grad():
        fake_p, fake_h = g1(x_h, y), g2(x_p, y)
        cc = L_CC(g2(fake_p, y), x_h) + L_CC(g1(fake_h, y), x_p)
        ident = L_ID(g2(x_h, torch.zeros_like(y)), x_h) + L_ID(g1(x_p, y), x_p)
        am = L_AM(fake_h, x_p, y, bm) + L_AM(fake_p, x_h, y, bm)
        gan = L_GAN(d1(fake_p)) + L_GAN(d2(fake_h))
    for name, ref in (("CC", cc), ("ID", ident), ("AM", am), ("GAN", gan)):
        torch.testing.assert_close(out[name], ref, msg=name)
    assert min(cc.item(), ident.item(), am.item()) > 0  # every term is exercised
    torch.testing.assert_close(out["G"].detach(), 10 * cc + 5 * ident + 10 * am + gan)  # the paper's defaults
    torch.testing.assert_close(out["fake_p"], fake_p)
    # other weights and a subset of terms: only those are computed and reported
    two = GeneratorObjective(g1, g2, d1, d2, [CycleConsistencyLoss(weight=3.0), AdversarialLoss(weight=0.5)])
    out2 = two(x_h, y, x_p, y, bm, bm)
    assert {k for k, v in out2.items() if v.ndim == 0} == {"G", "CC", "GAN"}
    torch.testing.assert_close(out2["G"].detach(), 3 * cc + 0.5 * gan)


def test_generator_objective_rejects_bad_terms():
    g1, g2 = _perturbed_generators()
    d1, d2 = CMBCritic(channels=4, num_layers_d=2), CMBCritic(channels=4, num_layers_d=2)
    with pytest.raises(ValueError, match="at least one"):
        GeneratorObjective(g1, g2, d1, d2, [])
    with pytest.raises(ValueError, match="unique"):
        GeneratorObjective(g1, g2, d1, d2, [IdentityLoss(), IdentityLoss(weight=1.0)])
    with pytest.raises(ValueError, match="unique"):
        GeneratorObjective(g1, g2, d1, d2, [AbnormalityMaskLoss(name="G")])
    with pytest.raises(ValueError, match="name and a weight"):
        GeneratorObjective(g1, g2, d1, d2, [nn.L1Loss()])


def _lesion_case():
    """Two perturbed generators, two critics, 16^3 images with a 2^3 lesion, a full brain mask, and the lesion
    region of a one-voxel dilation (what the lesion-focused terms average over)."""
    g1, g2 = _perturbed_generators()
    d1, d2 = CMBCritic(channels=4, num_layers_d=2), CMBCritic(channels=4, num_layers_d=2)
    x_h, x_p = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    y = torch.zeros_like(x_h)
    y[:, :, 7:9, 7:9, 7:9] = 1
    region = torch.zeros_like(y, dtype=torch.bool)
    region[:, :, 6:10, 6:10, 6:10] = True
    return g1, g2, d1, d2, x_h, x_p, y, torch.ones_like(x_h), region


def test_lesion_cycle_loss_is_local_and_teaches_only_the_generator_that_closes_each_cycle():
    g1, g2, d1, d2, x_h, x_p, y, bm, region = _lesion_case()
    term = LesionCycleLoss(weight=1.0, dilation=1)
    out = GeneratorObjective(g1, g2, d1, d2, [term])(x_h, y, x_p, y, bm, bm)
    with torch.no_grad():
        paint = (g1(g2(x_p, y), y) - x_p).abs()[region].mean()
        remove = (g2(g1(x_h, y), y) - x_h).abs()[region].mean()
    torch.testing.assert_close(out["CC_lesion"], paint + remove)
    # the PHP part trains G_HP only: G_PH's output enters it detached (no hiding of the lesion for the cycle)
    g1.zero_grad(), g2.zero_grad()
    cyc = {"x_p": x_p, "y_p": y, "x_h": x_h, "y_hp": torch.zeros_like(y), "fake_h": g2(x_p, y),
           "fake_p": x_h.clone(), "G_HP": g1, "G_PH": g2, "brainmask_p": bm, "brainmask_h": bm}
    term(cyc).backward()
    assert g1.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in g2.parameters())


def test_lesion_identity_loss_is_local_and_rules_out_offset_generators():
    g1, g2, d1, d2, x_h, x_p, y, bm, region = _lesion_case()
    term = LesionIdentityLoss(weight=1.0, dilation=1)
    out = GeneratorObjective(g1, g2, d1, d2, [term])(x_h, y, x_p, y, bm, bm)
    with torch.no_grad():
        expected = (g1(x_p, y) - x_p).abs()[region].mean() + (g2(x_h, y) - x_h).abs()[region].mean()
    torch.testing.assert_close(out["ID_lesion"], expected)
    # both generators learn from it
    g1.zero_grad(), g2.zero_grad()
    out = GeneratorObjective(g1, g2, d1, d2, [term])(x_h, y, x_p, y, bm, bm)
    out["G"].backward()
    assert g1.head.weight.grad.abs().sum() > 0 and g2.head.weight.grad.abs().sum() > 0

    class Offset(nn.Module):
        """A generator that shifts the voxels under the mask by a fixed amount (outside: identity)."""

        def __init__(self, a: float):
            super().__init__()
            self.a = a

        def forward(self, x, m):
            return x + self.a * (m > 0).to(x.dtype)

    # a pair of opposite offsets closes both lesion cycles exactly but fails the lesion identity by |a| per cycle
    paint, remove = Offset(-0.3), Offset(0.3)
    x = torch.full((1, 1, 16, 16, 16), 0.8)
    cycle = {"x_p": x - 0.3 * y, "y_p": y, "x_h": x, "y_hp": y, "brainmask_p": bm, "brainmask_h": bm,
             "G_HP": paint, "G_PH": remove}
    cycle["fake_h"], cycle["fake_p"] = remove(cycle["x_p"], y), paint(x, y)
    cycle["id_p"] = paint(cycle["x_p"], y)
    assert LesionCycleLoss(dilation=1)(cycle).item() < 1e-6
    ident = LesionIdentityLoss(dilation=1)(cycle).item()
    assert abs(ident - 2 * 0.3 * 8 / 64) < 1e-5  # 8 lesion voxels of 64 in the region, both generators
    # the identity voxels away from the mask do not count
    far = cycle["id_p"].clone()
    far[:, :, 0:3] += 0.5
    assert abs(LesionIdentityLoss(dilation=1)({**cycle, "id_p": far}).item() - ident) < 1e-6


def _blob(shape, centre, r: float = 1.5) -> torch.Tensor:
    """(X, Y, Z) binary ball of radius ``r`` voxels at ``centre``."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij"))
    return (((grid - torch.tensor(centre).view(3, 1, 1, 1)) ** 2).sum(0) <= r * r).float()


def test_lesion_crops_are_centred_on_the_lesion_and_keep_the_gradient():
    shape, size = (32, 32, 16), (16, 16, 8)
    mask = torch.zeros(4, 1, *shape)
    mask[0, 0] = _blob(shape, (16, 15, 8))  # lesion-centred patch
    mask[1, 0] = _blob(shape, (12, 20, 6))  # off-centre lesion
    mask[1, 0] += _blob(shape, (28, 3, 13))  # a second, farther lesion: not the one chosen
    mask[3, 0] = _blob(shape, (1, 30, 1))  # at the border: the crop is shifted inwards
    image = torch.rand(4, 1, *shape, requires_grad=True)
    crops, mcrops, index = lesion_crops(image, mask, size)
    assert crops.shape == (3, 1, *size) and mcrops.shape == (3, 1, *size)
    assert index.tolist() == [0, 1, 3]  # sample 2 has no lesion: left out
    # the lesion's centre of mass lands on the crop's centre voxel (size // 2) where the crop fits
    for k, centre in ((0, (16, 15, 8)), (1, (12, 20, 6))):
        grid = mcrops[k, 0].nonzero().float().mean(0)
        torch.testing.assert_close(grid, torch.tensor([8.0, 8.0, 4.0]), msg=str(centre))
        assert mcrops[k].sum() == _blob(shape, centre).sum()  # the whole lesion, and only it
        lo = [c - s // 2 for c, s in zip(centre, size)]
        torch.testing.assert_close(crops[k, 0], image[index[k], 0, lo[0] : lo[0] + 16, lo[1] : lo[1] + 16, lo[2] : lo[2] + 8])
    assert mcrops[2].sum() == mask[3].sum()  # border lesion entirely inside the shifted crop
    crops.sum().backward()
    assert image.grad[0].sum() == 16 * 16 * 8 and image.grad[2].sum() == 0
    none = lesion_crops(image, torch.zeros_like(mask), size)
    assert none[0].shape == (0, 1, *size) and len(none[2]) == 0
    with pytest.raises(ValueError, match="exceeds the patch"):
        lesion_crops(image, mask, (16, 16, 32))
    with pytest.raises(ValueError, match="3 positive ints"):
        lesion_crops(image, mask, (16, 16))


def test_lesion_critic_objective_sees_only_the_lesion_crops():
    """WGAN-GP on the crops: changing the patch away from the lesions leaves the loss unchanged, changing the
    lesion changes it; no lesion on a side -> zero loss (still in the critic's graph) and named terms W, GP."""
    shape, size = (32, 32, 16), (16, 16, 8)
    y = _blob(shape, (16, 16, 8)).expand(2, 1, *shape).clone()
    real, fake = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    torch.manual_seed(0)
    obj = LesionCriticObjective(CMBCritic(2, channels=4, num_layers_d=1), crop_size=size, critic_mask=True)

    def run(r, f, mr=y, mf=y):
        torch.manual_seed(1)  # same penalty interpolation
        return obj(r, f, mr, mf)

    base = run(real, fake)
    assert set(base) == {"loss", "W", "GP"} and base["loss"].requires_grad
    far = fake.clone()
    far[..., :4, :4, :] = 0.0  # outside the 16x16x8 crop at the centre
    torch.testing.assert_close(run(real, far)["loss"], base["loss"])
    near = fake.clone()
    near[y > 0] = 0.0  # a dark lesion
    assert not torch.allclose(run(real, near)["loss"], base["loss"])
    empty = run(real, fake, mf=torch.zeros_like(y))
    assert empty["loss"].item() == 0.0 and empty["W"].item() == 0.0
    empty["loss"].backward()  # in the graph of the critic's parameters (DDP needs every parameter used)
    assert all(p.grad is not None for p in obj.critic.parameters())
    with pytest.raises(ValueError, match="real_mask and fake_mask"):
        obj(real, fake)


def test_lesion_adversarial_term_is_named_and_trains_only_the_generators_that_made_the_crops():
    g1, g2 = _perturbed_generators()
    d1, d2 = CMBCritic(channels=4, num_layers_d=2), CMBCritic(channels=4, num_layers_d=2)
    dl1, dl2 = CMBCritic(2, channels=4, num_layers_d=1), CMBCritic(2, channels=4, num_layers_d=1)
    shape, size = (16, 16, 16), (8, 8, 8)
    x_h, x_p = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    y = _blob(shape, (8, 8, 8)).expand(2, 1, *shape).clone()
    term = LesionAdversarialLoss(dl1, dl2, crop_size=size, weight=2.0)
    out = GeneratorObjective(g1, g2, d1, d2, [CycleConsistencyLoss(), term])(x_h, y, x_p, y)
    assert {k for k, v in out.items() if v.ndim == 0} == {"G", "CC", "GAN_lesion"}
    with torch.no_grad():
        fp, mp, _ = lesion_crops(g1(x_h, y), y, size)
        fh, mh, _ = lesion_crops(g2(x_p, y), y, size)
        ref = L_GAN(dl1(critic_input(fp, mp))) + L_GAN(dl2(critic_input(fh, mh)))
    torch.testing.assert_close(out["GAN_lesion"], ref)
    torch.testing.assert_close(out["G"].detach(), 10 * out["CC"] + 2 * ref)
    # the P side alone: gradient into G_HP (the painter) only
    g1.zero_grad(), g2.zero_grad()
    p_only = LesionAdversarialLoss(dl1, None, crop_size=size)
    p_only({"fake_p": g1(x_h, y), "y_hp": y}).backward()
    assert g1.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in g2.parameters())


def test_radial_profiles_equal_the_evaluators_realism_profiles():
    from cmb_synthesis.synthesis.realism import lesion_measurements

    g = torch.Generator().manual_seed(0)
    x = 0.6 + 0.2 * torch.rand(2, 1, 32, 32, 16, generator=g)
    y = torch.zeros_like(x)
    y[0, :, 15:18, 14:17, 7:9] = 1  # the centred lesion
    y[0, :, 2:4, 2:4, 2:4] = 1  # another one, near the border: only the centred one is profiled
    x[y > 0] *= 0.3
    bm = torch.ones_like(x)
    bm[0, :, 24:] = 0
    prof, index = radial_profiles(x, y, bm)
    assert index.tolist() == [0] and prof.shape == (1, 5)  # sample 1 has no lesion
    y_one = y.clone()
    y_one[0, :, 2:4] = 0
    ref, _ = lesion_measurements(x[0], y_one[0], bm[0])
    assert ref.shape == (1, 5)
    torch.testing.assert_close(prof[0].double(), torch.from_numpy(ref[0]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="radial_profiles"):
        radial_profiles(x[:, :, :4], y)


def test_lesion_profile_loss_pulls_painted_lesions_to_the_real_profile():
    g1, g2, d1, d2, x_h, x_p, y, bm, region = _lesion_case()
    x_h, x_p = torch.full_like(x_h, 0.8), torch.full_like(x_p, 0.8)
    x_p[y > 0] = 0.16  # a real CMB at 0.2 of the tissue
    term = LesionProfileLoss(weight=1.0, max_radius=1, ring=(4.0, 6.0))
    # painted at 0.4 of the tissue, pseudo-healthy site left at 0.5, both flat over the lesion
    fake_p, fake_h = x_h.clone(), x_p.clone()
    fake_p[y > 0], fake_h[y > 0] = 0.32, 0.4
    cycle = {"x_h": x_h, "y_hp": y, "x_p": x_p, "y_p": y, "brainmask_h": bm, "brainmask_p": bm,
             "fake_p": fake_p.requires_grad_(True), "fake_h": fake_h.requires_grad_(True)}
    with torch.no_grad():
        prof = lambda im: radial_profiles(im, y, bm, 1, (4.0, 6.0))[0]  # noqa: E731
        expected = (prof(fake_p) - prof(x_p)).abs().sum() + (prof(fake_h) - prof(x_h)).abs().sum()
    loss = term(cycle)
    torch.testing.assert_close(loss, expected)
    assert loss.item() > 0.2
    loss.backward()
    # the gradient darkens the painted lesion and lightens the pseudo-healthy site (the lesion voxels within
    # max_radius of the centre), and touches nothing far away
    gp, gh = cycle["fake_p"].grad[y > 0], cycle["fake_h"].grad[y > 0]
    assert (gp >= 0).all() and (gp > 0).sum() == 7 and (gh <= 0).all() and (gh < 0).sum() == 7
    assert cycle["fake_p"].grad[..., :2, :, :].abs().max() == 0
    # painted at the real lesion's profile: 0; a batch without any lesion: 0 (no NaN)
    assert term({**cycle, "fake_p": x_p.clone(), "fake_h": x_h.clone()}).item() < 1e-6
    empty = torch.zeros_like(y)
    assert term({**cycle, "y_hp": empty, "y_p": empty}).item() == 0.0
    with pytest.raises(ValueError, match="max_radius"):
        LesionProfileLoss(max_radius=5, ring=(5.0, 7.0))
    # inside the full objective it trains both generators
    out = GeneratorObjective(g1, g2, d1, d2, [term])(x_h, y, x_p, y, bm, bm)
    out["G"].backward()
    assert g1.head.weight.grad.abs().sum() > 0 and g2.head.weight.grad.abs().sum() > 0


def test_radial_profile_sizes_equal_the_evaluators_component_sizes():
    from cmb_synthesis.synthesis.realism import lesion_measurements

    x = torch.full((2, 1, 32, 32, 16), 0.8)
    y = torch.zeros_like(x)
    y[0, :, 15:18, 14:17, 7:9] = 1  # 18 voxels, centred
    y[1, :, 16, 16, 8] = 1  # 1 voxel ...
    y[1, :, 17, 17, 9] = 1  # ... 26-connected to a second one: one lesion of 2
    x[y > 0] = 0.2
    prof, index, sizes = radial_profiles(x, y, None, return_sizes=True)
    assert index.tolist() == [0, 1] and sizes.tolist() == [18, 2]
    for b in range(2):
        _, _, s = lesion_measurements(x[b], y[b], return_sizes=True)
        assert s.tolist() == [sizes[b].item()]
    assert len(radial_profiles(x, torch.zeros_like(y), return_sizes=True)[2]) == 0


def test_lesion_profile_loss_with_a_size_reference_pulls_each_size_to_its_own_profile():
    x = torch.full((2, 1, 32, 32, 16), 0.8)
    y = torch.zeros_like(x)
    y[0, :, 16, 16, 8] = 1  # a 1-voxel lesion (bin 0)
    y[1, :, 15:18, 15:18, 7:10] = 1  # a 27-voxel lesion (bin 1)
    bm = torch.ones_like(x)
    # real small CMBs are light at their centre, large ones dark (partial volume vs blooming)
    reference = {"edges": [10.0], "profiles": [[0.5, 0.9], [0.2, 0.4]]}
    term = LesionProfileLoss(weight=1.0, max_radius=1, ring=(4.0, 6.0), reference=reference)
    assert "2 size bins" in repr(term)
    fake_p = x.clone()
    fake_p[y > 0] = 0.8 * 0.35  # both painted at the average contrast
    cycle = {"x_h": x, "y_hp": y, "x_p": x, "y_p": torch.zeros_like(y), "brainmask_h": bm, "brainmask_p": bm,
             "fake_p": fake_p.requires_grad_(True), "fake_h": x.clone()}
    with torch.no_grad():
        prof = radial_profiles(fake_p, y, bm, 1, (4.0, 6.0))[0]
        ref = torch.tensor(reference["profiles"])
        expected = 0.5 * (prof[0] - ref[0]).abs().sum() + 0.5 * (prof[1] - ref[1]).abs().sum()
    loss = term(cycle)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    g = cycle["fake_p"].grad
    # descent lightens the small lesion's centre and darkens the large one's
    assert g[0, 0, 16, 16, 8] < 0 and g[1, 0, 16, 16, 8] > 0
    # painted at each size's own profile: 0, whatever the batch's real lesions are (there are none here)
    exact = LesionProfileLoss(weight=1.0, max_radius=1, ring=(4.0, 6.0), reference={"edges": [10.0], "profiles": prof})
    assert exact({**cycle, "fake_p": fake_p.detach()}).item() < 1e-6
    # the same lesions one bin apart: the reference of the other bin is not used
    swapped = LesionProfileLoss(weight=1.0, max_radius=1, ring=(4.0, 6.0), reference={"edges": [10.0], "profiles": prof.flip(0)})
    assert swapped({**cycle, "fake_p": fake_p.detach()}).item() > 0.1
    with pytest.raises(ValueError, match="reference"):
        LesionProfileLoss(max_radius=1, ring=(4.0, 6.0), reference={"edges": [10.0], "profiles": [[0.5, 0.9]]})
    with pytest.raises(ValueError, match="edges must increase"):
        LesionProfileLoss(max_radius=1, ring=(4.0, 6.0), reference={"edges": [10.0, 5.0], "profiles": [[1, 1]] * 3})

"""CycleGANTrainer on small random patches: updates, loss names, a new loss term through the bundle config,
NaN guard, checkpoint resume."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch.utils.data import default_collate

from cmb_synthesis.synthesis.engine import CycleGANTrainer, SynthesisEvaluator
from cmb_synthesis.synthesis.losses import (
    CriticObjective,
    GeneratorLoss,
    GeneratorObjective,
    LesionAdversarialLoss,
    LesionCriticObjective,
    paper_terms,
)
from cmb_synthesis.training.handlers import ExportNetworks, NonFiniteLossGuard
from cmb_synthesis.training.resume import latest_checkpoint
from cmb_synthesis.synthesis.networks import CMBCritic, CMBGenerator
from cmb_synthesis.synthesis.metrics import METRIC_NAMES, SynthesisMetric

S = (16, 16, 16)
CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "cmb_synthesis" / "configs"


def _item(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(1, *S)
    y[0, 7:9, 7:9, 7:9] = 1
    x = 0.5 + 0.1 * torch.rand(1, *S, generator=g)
    xp = x.clone()
    xp[y > 0] = 0.05
    return dict(x_h=x, y_hp=y, brainmask_h=torch.ones(1, *S), x_p=xp, y_p=y, brainmask_p=torch.ones(1, *S), x_p2=xp.flip(1),
                y_p2=y.flip(1))


def _nets(seed: int = 0):
    torch.manual_seed(seed)
    g = [CMBGenerator(channels=4, n_res_blocks=1, stem_kernel=3) for _ in range(2)]
    d = [CMBCritic(channels=4, num_layers_d=2) for _ in range(2)]
    return g + d


def _trainer(nets, max_epochs=1, epoch_length=2, handlers=None, n_critic=2):
    g1, g2, d1, d2 = nets
    loader = torch.utils.data.DataLoader([_item(i) for i in range(4)], batch_size=2)
    go = torch.optim.Adam(list(g1.parameters()) + list(g2.parameters()), 1e-3, betas=(0.5, 0.99))
    do = torch.optim.Adam(list(d1.parameters()) + list(d2.parameters()), 1e-3, betas=(0.5, 0.99))
    objectives = CriticObjective(d1), CriticObjective(d2), GeneratorObjective(g1, g2, d1, d2, paper_terms())
    return CycleGANTrainer(
        "cpu", max_epochs, loader, g1, g2, d1, d2, go, do, *objectives, epoch_length=epoch_length, n_critic=n_critic,
        train_handlers=handlers,
    )


def test_one_iteration_updates_all_four_networks():
    nets = _nets()
    before = [copy.deepcopy(n.state_dict()) for n in nets]
    tr = _trainer(nets, epoch_length=1)
    tr.run()
    assert tr.state.iteration == 1
    out = tr.state.output
    assert set(out) == {"G", "CC", "ID", "AM", "GAN", "D_P", "D_H", "W_P", "W_H", "GP_P", "GP_H", "GP"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["GP"] == 0.5 * (out["GP_P"] + out["GP_H"])
    for name, net, old in zip(("G_HP", "G_PH", "D_P", "D_H"), nets, before):
        changed = any(not torch.equal(v, old[k]) for k, v in net.state_dict().items())
        assert changed, f"{name} was not updated"
    assert set(tr.state.synthesis_images) >= {"x_h", "y_hp", "fake_p", "rec_h"}


class MeanDarkening(GeneratorLoss):
    """A made-up extra term: the mean intensity of x~_p = G_HP(x_h, y_hp) (minimising it darkens everything)."""

    def __init__(self, weight: float = 1.0, name: str = "DARK") -> None:
        super().__init__(weight, name)

    def forward(self, cycle):
        return cycle["fake_p"].mean()


def _config_iteration(batch: dict, extra_terms: list, where: dict) -> tuple[CycleGANTrainer, dict]:
    """One iteration of the trainer that configs/train.yaml builds (tiny networks, lr 0 so that the critics
    stay as initialised), with ``extra_terms`` appended to its ``generator_terms``; returns it and the
    generators' gradients. ``where``: ``bundle_root`` and ``datalist`` (the defaults would generate the phantom
    cohort into the repository's bundle)."""
    p = ConfigParser()
    p.read_config(str(CONFIGS / "train.yaml"))
    p.update(where)
    overrides = dict(device="$torch.device('cpu')", g_channels=4, g_res_blocks=1, d_channels=4, d_layers=2, n_critic=1,
                     lr=0.0, max_epochs=1, epoch_length=1,
                     # the profile term's gradient dwarfs a small extra term's: the gradient differences
                     # compared below would be float32 round-off
                     lambda_profile_lesion=0.0)  # fmt: skip
    for k, v in overrides.items():
        p[k] = v
    p["generator_terms"] = list(p["generator_terms"]) + extra_terms
    p["train#trainer#train_data_loader"] = "$[None]"  # replaced by the fixed batch
    p.parse()
    torch.manual_seed(0)  # same initial networks and penalty draws in every call
    trainer = p.get_parsed_content("train#trainer")
    trainer.data_loader = [batch]
    trainer.run()
    grads = {f"{n}.{k}": q.grad.clone() for n in ("G_HP", "G_PH") for k, q in p.get_parsed_content(n).named_parameters()}
    return trainer, grads


def test_new_loss_term_is_one_config_entry(tiny_cohort, tmp_path):
    """Adding a loss = a GeneratorLoss class + one entry in train.yaml's generator_terms: the value is reported
    under its name and the generators' gradient changes by weight * the term's gradient, in G_HP only."""
    batch = default_collate([_item(0), _item(1)])
    where = {"bundle_root": str(tmp_path), "datalist": tiny_cohort}
    base, g0 = _config_iteration(batch, [], where)
    assert {"CC", "ID", "AM", "GAN"} <= set(base.state.output) and "DARK" not in base.state.output
    entry = lambda w: {"_target_": f"{__name__}.MeanDarkening", "weight": w}  # noqa: E731
    tr1, g1 = _config_iteration(batch, [entry(1.0)], where)
    tr2, g2 = _config_iteration(batch, [entry(2.0)], where)
    assert isinstance(tr1.generator_objective.terms[-1], MeanDarkening)
    # untrained residual generators are the identity: x~_p = x_h
    assert tr1.state.output["DARK"] == pytest.approx(batch["x_h"].mean().item(), rel=1e-5)
    for k in ("CC", "ID", "AM", "GAN", "W_P", "D_H"):  # the other terms are unchanged
        assert tr1.state.output[k] == pytest.approx(base.state.output[k], rel=1e-5, abs=1e-7)
    assert tr1.state.output["G"] == pytest.approx(base.state.output["G"] + tr1.state.output["DARK"], rel=1e-5)
    d1 = {k: g1[k] - g0[k] for k in g0}
    d2 = {k: g2[k] - g0[k] for k in g0}
    assert max(d1[k].abs().max().item() for k in d1 if k.startswith("G_HP.")) > 1e-4
    for k in g0:
        if k.startswith("G_PH."):  # x~_p does not depend on G_PH
            torch.testing.assert_close(d1[k], torch.zeros_like(d1[k]), rtol=0, atol=1e-6)
        torch.testing.assert_close(d2[k], 2 * d1[k], rtol=1e-3, atol=1e-6)


def test_two_iterations_with_lesion_focused_critics():
    """D_P_lesion / D_H_lesion are trained in the critic steps by the critics' optimiser, their terms reported
    (D_*_lesion, W_*_lesion, GP_*_lesion, GAN_lesion), and frozen in the generator step."""
    g1, g2, d1, d2 = _nets()
    dl1, dl2 = CMBCritic(1, channels=4, num_layers_d=1), CMBCritic(1, channels=4, num_layers_d=1)
    size = (8, 8, 8)
    before = [copy.deepcopy(d.state_dict()) for d in (dl1, dl2)]
    loader = torch.utils.data.DataLoader([_item(i) for i in range(4)], batch_size=2)
    go = torch.optim.Adam(list(g1.parameters()) + list(g2.parameters()), 1e-3, betas=(0.5, 0.99))
    params_d = [p for d in (d1, d2, dl1, dl2) for p in d.parameters()]
    do = torch.optim.Adam(params_d, 1e-3, betas=(0.5, 0.99))
    terms = [*paper_terms(), LesionAdversarialLoss(dl1, dl2, crop_size=size, critic_mask=False)]
    grads_in_g_step = []
    gen = GeneratorObjective(g1, g2, d1, d2, terms)
    gen.register_forward_hook(lambda *a: grads_in_g_step.append(any(p.requires_grad for p in (*dl1.parameters(), *dl2.parameters()))))
    tr = CycleGANTrainer(
        "cpu", 1, loader, g1, g2, d1, d2, go, do, CriticObjective(d1), CriticObjective(d2), gen,
        critic_objective_P_lesion=LesionCriticObjective(dl1, crop_size=size, critic_mask=False),
        critic_objective_H_lesion=LesionCriticObjective(dl2, crop_size=size, critic_mask=False),
        epoch_length=2, n_critic=2,
    )  # fmt: skip
    tr.run()
    assert tr.state.iteration == 2
    out = tr.state.output
    lesion_keys = {"GAN_lesion", "D_P_lesion", "D_H_lesion", "W_P_lesion", "W_H_lesion", "GP_P_lesion", "GP_H_lesion"}
    assert lesion_keys <= set(out) and all(isinstance(out[k], float) for k in lesion_keys)
    assert out["GP"] == 0.5 * (out["GP_P"] + out["GP_H"])  # the whole-patch critics' mean, as before
    for name, net, old in zip(("D_P_lesion", "D_H_lesion"), (dl1, dl2), before):
        assert any(not torch.equal(v, old[k]) for k, v in net.state_dict().items()), f"{name} was not updated"
    assert grads_in_g_step == [False, False]  # frozen while the generators step
    assert all(p.requires_grad for p in dl1.parameters())  # and trainable again after it


def _lesion_config(**overrides):
    p = ConfigParser()
    p.read_config(str(CONFIGS / "train.yaml"))
    # profile_size_bins 0 and no contrast codes: no reference to measure, so no cohort is needed
    # (test_profile_size_reference_from_config)
    # (a datalist and bundle root that do not exist: the defaults would generate the phantom cohort into the
    # repository's bundle; a config value that needed them would fail here instead)
    base = dict(device="$torch.device('cpu')", g_channels=4, g_res_blocks=1, d_channels=4, d_layers=2, profile_size_bins=0,
                contrast_code=False, bundle_root="/nonexistent/bundle", datalist="/nonexistent/bundle/datalist.json")
    for k, v in {**base, **overrides}.items():
        p[k] = v
    p["train#trainer#train_data_loader"] = "$[None]"  # no cohort needed
    p.parse()
    return p


def test_lesion_critic_is_one_config_value():
    """train.yaml: lambda_gan_lesion > 0 (the CPU preset: 5) adds the GAN_lesion term and the two lesion critics'
    objectives (their parameters are in the critics' optimiser); 0 (paper.yaml) leaves only the whole-patch
    critics."""
    on = _lesion_config(lambda_gan_lesion=0.5)
    tr = on.get_parsed_content("train#trainer")
    (term,) = [t for t in tr.generator_objective.terms if isinstance(t, LesionAdversarialLoss)]
    assert isinstance(term, LesionAdversarialLoss) and term.weight == 0.5 and term.crop_size == (16, 16, 8)
    assert set(tr.lesion_objectives) == {"P_lesion", "H_lesion"}
    assert tr.lesion_objectives["P_lesion"].critic is on.get_parsed_content("D_P_lesion")
    opt_ids = {id(q) for g in on.get_parsed_content("d_optimizer").param_groups for q in g["params"]}
    assert {id(q) for q in on.get_parsed_content("D_H_lesion").parameters()} <= opt_ids
    assert float(_lesion_config().get_parsed_content("lambda_gan_lesion")) == 5.0  # on in the CPU preset
    off = _lesion_config(lambda_gan_lesion=0.0)
    tr_off = off.get_parsed_content("train#trainer")
    assert not tr_off.lesion_objectives
    assert not any(isinstance(t, LesionAdversarialLoss) for t in tr_off.generator_objective.terms)
    paper = ConfigParser()
    paper.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "paper.yaml")])
    assert float(paper.get_parsed_content("lambda_gan_lesion")) == 0.0
    assert paper.get_parsed_content("contrast_code_flag") is False  # the paper's binary masks


def test_smooth_painting_and_mask_placement_are_config_values():
    """g_head_smooth / g_head_smooth_peak reach G_HP only (G_PH stays sharp: L_AM holds it to the label), the
    flag read from its command-line string; mask_dark_percentile reaches the mask sampler's options of training,
    validation and inference; paper.yaml switches all three off."""
    on = _lesion_config(g_head_smooth=0.7, g_head_smooth_peak="true", mask_dark_percentile=5)
    G_HP, G_PH = on.get_parsed_content("G_HP"), on.get_parsed_content("G_PH")
    assert (G_HP.head_smooth, G_HP.smooth_peak, G_PH.head_smooth, G_PH.smooth_peak) == (0.7, True, 0.0, False)
    assert on.get_parsed_content("lesion_mask_options") == {"dark_percentile": 5.0}
    assert on.get("train#dataset#mask_options") == "@lesion_mask_options"
    assert "mask_options=@lesion_mask_options" in on.get("validate#items")
    # the realism split sets both the painted shapes and the real lesions they are compared with
    assert on.get("realism_split") == "validation"
    assert "split=@realism_split" in on.get("val_lesion_bank") and "@realism_split" in on.get("validate#realism_reference")
    inference = ConfigParser()
    inference.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "inference.yaml")])
    assert inference.get("run_inference#mask_options") == "@lesion_mask_options"
    off = _lesion_config(g_head_smooth=0.7, g_head_smooth_peak="false", mask_dark_percentile="null")
    assert off.get_parsed_content("G_HP").smooth_peak is False
    assert off.get_parsed_content("lesion_mask_options") == {"dark_percentile": None}
    paper = ConfigParser()
    paper.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "paper.yaml")])
    assert float(paper.get_parsed_content("g_head_smooth")) == 0.0
    assert paper.get_parsed_content("lesion_mask_options") == {"dark_percentile": None}


@pytest.mark.parametrize(
    "key, cls, default, attrs",
    [
        ("lambda_id_lesion", "LesionIdentityLoss", 0.0, {"dilation": 2}),
        ("lambda_profile_lesion", "LesionProfileLoss", 10.0, {"max_radius": 4, "ring": (5.0, 7.0)}),
    ],
)
def test_lesion_generator_term_is_one_config_value(key, cls, default, attrs):
    """train.yaml: one weight adds its lesion term (its CPU-preset default; off in paper.yaml), 0 removes it."""
    from cmb_synthesis.synthesis import losses

    cls = getattr(losses, cls)
    on = _lesion_config(**{key: 2.0})
    found = [t for t in on.get_parsed_content("train#trainer").generator_objective.terms if isinstance(t, cls)]
    assert len(found) == 1 and found[0].weight == 2.0
    assert all(getattr(found[0], a) == v for a, v in attrs.items())
    assert float(_lesion_config().get_parsed_content(key)) == default
    off = _lesion_config(**{key: 0.0})
    assert not any(isinstance(t, cls) for t in off.get_parsed_content("train#trainer").generator_objective.terms)
    paper = ConfigParser()
    paper.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "paper.yaml")])
    assert float(paper.get_parsed_content(key)) == 0.0


def test_profile_size_reference_from_config(tiny_cohort):
    """train.yaml: profile_size_bins > 0 gives LesionProfileLoss the training split's real profiles per size bin
    (measured on the datalist's training lesions), 0 the batch target; paper.yaml has no profile term at all."""
    from cmb_synthesis.synthesis.losses import LesionProfileLoss
    from cmb_synthesis.synthesis.realism import size_binned_profiles

    on = _lesion_config(profile_size_bins=2, datalist=tiny_cohort, contrast_code=True)
    (term,) = [t for t in on.get_parsed_content("train#trainer").generator_objective.terms if isinstance(t, LesionProfileLoss)]
    ref = size_binned_profiles(tiny_cohort, "training", 2)
    assert term.reference.shape == (2, 5) and ref["counts"].sum() == len(ref["sizes"]) > 0
    np.testing.assert_allclose(term.reference.numpy(), ref["profiles"], rtol=1e-6)
    np.testing.assert_allclose(term.edges.numpy(), ref["edges"])
    # the bins split the training lesions at their median size; the small ones are lighter at the centre
    assert ref["counts"].min() >= len(ref["sizes"]) // 2 - 1 and ref["profiles"][0, 0] > ref["profiles"][-1, 0]
    # contrast codes (the CPU preset): the same reference's rank profiles; G_HP (not G_PH) reads the codes, the
    # trainer and the evaluator make them, the profile term targets each lesion's rank
    tr = on.get_parsed_content("train#trainer")
    code = tr.lesion_code
    assert code is not None and term.code is code and on.get_parsed_content("validate#evaluator").lesion_code is code
    np.testing.assert_allclose(code.quantiles.numpy(), ref["quantiles"], rtol=1e-6)
    assert on.get_parsed_content("G_HP").mask_code and not on.get_parsed_content("G_PH").mask_code
    assert ref["quantiles"].shape == (2, 11, 5) and (np.diff(ref["quantiles"][:, :, 0], axis=1) <= 1e-12).all()
    assert str(_lesion_config().get_parsed_content("contrast_code")).lower() == "false"  # the helper's override
    (batch,) = [t for t in _lesion_config(datalist=tiny_cohort).get_parsed_content("train#trainer").generator_objective.terms
                if isinstance(t, LesionProfileLoss)]
    assert batch.reference is None and batch.code is None
    with pytest.raises(ValueError, match="n_bins"):
        size_binned_profiles(tiny_cohort, "training", 0)


def test_nan_guard_stops_with_clear_message(tmp_path):
    nets = _nets()
    with torch.no_grad():
        nets[0].head.bias.fill_(float("nan"))  # G_HP outputs NaN
    tr = _trainer(nets, handlers=[NonFiniteLossGuard(ckpt_dir=str(tmp_path))])
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at iteration 1"):
        tr.run()


def test_resume_continues_from_saved_iteration(tmp_path):
    nets = _nets()
    save = lambda tr, n: {"G_HP": n[0], "G_PH": n[1], "D_P": n[2], "D_H": n[3], "g_opt": tr.g_optimizer, "d_opt": tr.d_optimizer, "trainer": tr}  # noqa: E731

    tr = _trainer(nets, max_epochs=2, epoch_length=2)
    CheckpointSaver(str(tmp_path), save(tr, nets), save_interval=3, epoch_level=False, n_saved=2).attach(tr)
    # stop after 3 of 4 iterations, as if killed
    from ignite.engine import Events

    tr.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: e.terminate())
    tr.run()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.endswith("iteration=3.pt")
    saved_g = copy.deepcopy(nets[0].state_dict())

    nets2 = _nets(seed=1)
    seen = []
    tr2 = _trainer(nets2, max_epochs=2, epoch_length=2)
    CheckpointLoader(ckpt, save(tr2, nets2), map_location="cpu").attach(tr2)
    tr2.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append(e.state.iteration))
    tr2.add_event_handler(
        Events.ITERATION_STARTED(once=4),
        lambda e: seen.append(("g", torch.equal(nets2[0].head.weight, saved_g["head.weight"]))),
    )
    tr2.run()
    assert [s for s in seen if isinstance(s, int)] == [4] and tr2.state.iteration == 4  # only iteration 4 ran
    assert ("g", True) in seen  # weights restored before the first resumed iteration


def test_evaluator_metrics_and_export(tmp_path):
    nets = _nets()
    loader = torch.utils.data.DataLoader([_item(i) for i in range(2)], batch_size=2)
    ev = SynthesisEvaluator(
        "cpu", loader, nets[0], nets[1],
        key_val_metric={"identity_mae": SynthesisMetric("identity_mae")},
        additional_metrics={n: SynthesisMetric(n) for n in METRIC_NAMES if n != "identity_mae"},
    )  # fmt: skip
    ev.run()
    m = ev.state.metrics
    # untrained residual generators are the identity: no change anywhere, real lesions are dark
    assert m["identity_mae"] == 0.0 and m["removal_identity_mae"] == 0.0
    assert m["contrast_real"] < 0.2 and abs(m["contrast_healthy_input"] - 1.0) < 0.2
    assert abs(m["lesion_fidelity"]) < 0.2 and abs(m["removal_contrast"] - m["contrast_real"]) < 1e-9
    ExportNetworks(str(tmp_path), {"G_HP": nets[0]})()
    sd = torch.load(tmp_path / "G_HP.pt", weights_only=True)
    assert set(sd) == set(nets[0].state_dict())


def test_metrics_json_writer_keeps_numpy_and_tensor_scalars(tmp_path):
    import json

    import numpy as np
    from ignite.engine import Engine, Events

    from cmb_synthesis.training.handlers import MetricsJSONWriter

    def set_metrics(e):  # what a MONAI evaluator leaves: numpy and tensor scalars beside non-scalars
        e.state.metrics = {"auc": np.float32(0.75), "cpm": 0.5, "n": torch.tensor(3.0), "flag": True,
                           "curve": np.arange(3.0), "name": "x"}  # fmt: skip

    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, set_metrics)
    writer = MetricsJSONWriter(str(tmp_path / "metrics.json"), extra={"run": "x"})
    writer.attach(engine)
    engine.run([0], max_epochs=2)
    out = json.loads((tmp_path / "metrics.json").read_text())
    assert out["metrics"] == {"auc": 0.75, "cpm": 0.5, "n": 3.0} and out["run"] == "x"
    assert len(out["history"]) == 2

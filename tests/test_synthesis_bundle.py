"""The cmb_synthesis bundle end to end in a tiny configuration: train, resume, export, evaluate a checkpoint and
infer (evaluate.yaml and inference.yaml are overlays merged over train.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "cmb_synthesis" / "configs"
TINY = dict(
    device="cpu",
    patch_size=[32, 32, 16],
    batch_size=2,
    epoch_length=2,
    val_interval=1,
    val_patches_per_volume=1,
    val_shape_repeats=1,
    image_interval=1,
    g_channels=2,
    g_res_blocks=1,
    d_channels=2,
    n_critic=1,
)


def _train(bundle_root: Path, datalist: str, **overrides) -> None:
    from monai.bundle import run

    run(
        "training",
        config_file=str(CONFIGS / "train.yaml"),
        bundle_root=str(bundle_root),
        datalist=datalist,
        dataset_dir=str(Path(datalist).parent),
        **{**TINY, **overrides},
    )


@pytest.fixture(scope="module")
def trained(tiny_cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("synthesis_bundle")
    _train(root, tiny_cohort, max_epochs=1)
    return root


@pytest.mark.e2e
def test_training_writes_checkpoints_metrics_and_weights(trained):
    models = trained / "models"
    names = {p.name for p in models.iterdir()}
    assert {"G_HP.pt", "G_PH.pt", "D_P.pt", "D_H.pt", "D_P_lesion.pt", "D_H_lesion.pt", "lesion_bank.npz", "metrics.json"} <= names
    assert "checkpoint_iteration=2.pt" in names
    ckpt = torch.load(models / "checkpoint_iteration=2.pt", weights_only=True)
    assert {"G_HP", "G_PH", "D_P", "D_H", "D_P_lesion", "D_H_lesion", "g_optimizer", "d_optimizer", "trainer"} <= set(ckpt)
    metrics = json.loads((models / "metrics.json").read_text())
    for key in ("identity_mae", "lesion_fidelity", "removal_contrast", "removal_identity_mae", "contrast_real"):
        assert key in metrics["metrics"]
    assert metrics["epoch"] == 1 and len(metrics["history"]) == 1
    assert np.isfinite(metrics["metrics"]["identity_mae"]) and metrics["metrics"]["contrast_real"] < 1.0
    assert any((trained / "runs").iterdir())  # TensorBoard events


@pytest.mark.e2e
def test_resume_override_continues_from_saved_iteration(trained, tiny_cohort):
    # The bundle's logging.conf (fileConfig) replaces pytest's log capture, so the proof of resumption is in
    # the artefacts: the trainer state continues at iteration 4 and only epoch 2 is validated.
    _train(trained, tiny_cohort, max_epochs=2, resume="true")
    models = trained / "models"
    ckpt = torch.load(models / "checkpoint_iteration=4.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 4 and ckpt["trainer"]["max_epochs"] == 2
    hist = json.loads((models / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [2]  # the resumed run validated epoch 2 only: epoch 1 was not redone


@pytest.mark.e2e
def test_lesion_critics_train_checkpoint_and_resume(tiny_cohort, tmp_path):
    """--lambda_gan_lesion > 0: the lesion-focused critics are trained, reported, checkpointed, exported and
    restored on resume (their weights and the critics' optimiser state continue)."""
    _train(tmp_path, tiny_cohort, max_epochs=1, lambda_gan_lesion=1.0)
    models = tmp_path / "models"
    first = torch.load(models / "checkpoint_iteration=2.pt", weights_only=True)
    init = torch.load(models / "D_P_lesion.pt", weights_only=True)
    assert {"D_P_lesion", "D_H_lesion"} <= set(first)
    _train(tmp_path, tiny_cohort, max_epochs=2, lambda_gan_lesion=1.0, resume="true")
    second = torch.load(models / "checkpoint_iteration=4.pt", weights_only=True)
    assert second["trainer"]["iteration"] == 4
    for k, v in first["D_P_lesion"].items():
        torch.testing.assert_close(init[k], v)  # exported = checkpointed weights at iteration 2
    # trained further from the restored weights (Adam's step count continues: 2 + 2 iterations x n_critic 1)
    assert any(not torch.equal(v, second["D_P_lesion"][k]) for k, v in first["D_P_lesion"].items())
    steps = [st["step"] for st in second["d_optimizer"]["state"].values()]
    assert steps and max(float(s) for s in steps) == 4.0


@pytest.mark.e2e
def test_evaluating_overlay_scores_the_newest_checkpoint(trained, tiny_cohort, tmp_path):
    from monai.bundle import ConfigParser, run

    from cmb_synthesis.training.resume import latest_checkpoint

    files = [str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")]
    p = ConfigParser()
    p.read_config(files)
    p["bundle_root"] = str(trained)
    assert p.get_parsed_content("ckpt_path") == latest_checkpoint(trained / "models")  # the default checkpoint
    train_metrics = (trained / "models" / "metrics.json").read_text()
    args = dict(bundle_root=str(trained), datalist=tiny_cohort, dataset_dir=str(Path(tiny_cohort).parent), **TINY)
    run("evaluating", config_file=files, **args)
    metrics = json.loads((trained / "eval" / "metrics.json").read_text())["metrics"]
    assert np.isfinite(metrics["identity_mae"]) and "lesion_fidelity" in metrics
    assert (trained / "models" / "metrics.json").read_text() == train_metrics  # training's record untouched
    # the checkpoint's generators are what is scored (their moving averages, key G_HP_ema): a G_HP that brightens
    # every voxel changes identity_mae
    ckpt = torch.load(latest_checkpoint(trained / "models"), weights_only=True)
    ckpt["G_HP_ema"]["head.bias"] = ckpt["G_HP_ema"]["head.bias"] + 0.2
    torch.save(ckpt, tmp_path / "bright.pt")
    run("evaluating", config_file=files, ckpt_path=str(tmp_path / "bright.pt"), metrics_path=str(tmp_path / "m.json"), **args)
    bright = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert bright["identity_mae"] > metrics["identity_mae"] + 0.05


@pytest.mark.e2e
def test_inference_output_has_input_shape_and_affine(trained, tiny_cohort, tmp_path, monkeypatch):
    from monai.bundle import run

    import cmb_synthesis.phantom

    def no_cohort(*args, **kwargs):
        raise AssertionError("inference must not generate the training cohort")

    # train.yaml's lazy data items (datalist, lesion bank) stay unevaluated at inference
    monkeypatch.setattr(cmb_synthesis.phantom, "ensure_cohort", no_cohort)
    out = tmp_path / "out"
    run(
        "inference",
        config_file=[str(CONFIGS / "train.yaml"), str(CONFIGS / "inference.yaml")],
        bundle_root=str(trained),
        dataset_dir=str(Path(tiny_cohort).parent),
        output_dir=str(out),
        device="cpu",
        g_channels=2,
        g_res_blocks=1,
        n_lesions=3,
        inference_patch=[160, 146, 32],
    )
    items = json.loads(Path(tiny_cohort).read_text())
    healthy = [i for k in ("training", "validation", "test") for i in items.get(k, []) if i["group"] == "healthy"]
    assert healthy
    for item in healthy:
        src = nib.load(str(Path(tiny_cohort).parent / item["image"]))
        syn = nib.load(str(out / f"{item['id']}_synthetic.nii.gz"))
        lab = nib.load(str(out / f"{item['id']}_synthetic_cmb.nii.gz"))
        assert syn.shape == src.shape == lab.shape
        assert np.allclose(syn.affine, src.affine) and np.allclose(lab.affine, src.affine)
        assert lab.get_data_dtype() == np.uint16 and np.asarray(lab.dataobj).max() >= 1
        assert np.isfinite(syn.get_fdata()).all()
    summary = json.loads((out / "inference_summary.json").read_text())
    assert len(summary["written"]) == len(healthy) and not summary["failed"]

"""The augmentation study end to end in a tiny configuration: every artefact produced and well formed."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cmb_synthesis.study import runner
from cmb_synthesis.study.runner import ARMS, arm_name, run_configs, run_study, subset_datalist

REPO = Path(__file__).resolve().parents[1]
STUDY_YAML = REPO / "bundles" / "cmb_detection" / "configs" / "study.yaml"
SYN_TINY = dict(device="cpu", patch_size=[32, 32, 16], batch_size=2, epoch_length=2, max_epochs=1, val_interval=1,
                val_patches_per_volume=1, image_interval=1, g_channels=2, g_res_blocks=1, d_channels=2, n_critic=1)
DET_TINY = dict(device="cpu", channels=[4, 8], strides=[2, 2], num_res_units=1, patch_size=[24, 24, 16],
                batch_size=8, epoch_length=2, max_epochs=1, val_interval=1)


def test_run_configs_merge_the_overlay_over_the_training_configs():
    paper = ["configs/train.yaml", "configs/paper.yaml"]
    assert run_configs(paper, "configs/inference.yaml") == [*paper, "configs/inference.yaml"]
    assert run_configs(paper, "configs/inference.yaml", [*paper, "configs/mine.yaml"]) == [*paper, "configs/mine.yaml"]
    with pytest.raises(ValueError, match="paper.yaml"):  # a paper-preset model run with the CPU preset's network
        run_configs(paper, "configs/inference.yaml", ["configs/train.yaml", "configs/inference.yaml"])


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_study_yaml_lists_run_study_and_stacks_each_bundles_configs(preset):
    """study.yaml: `run_study` is a component listing every argument; --preset paper merges each bundle's
    paper.yaml after train.yaml for training AND for the runs of the trained models."""
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(str(STUDY_YAML))
    assert p["run_study"]["_target_"] == "cmb_synthesis.study.runner.run_study"
    assert set(p["run_study"]) - {"_target_"} == set(inspect.signature(run_study).parameters)
    p["preset"] = preset
    p.parse()
    train = ["configs/train.yaml"] + (["configs/paper.yaml"] if preset == "paper" else [])
    assert p.get_parsed_content("run_study#synthesis_train_configs") == train
    assert p.get_parsed_content("run_study#synthesis_inference_configs") == [*train, "configs/inference.yaml"]
    assert p.get_parsed_content("run_study#detection_train_configs") == train
    assert p.get_parsed_content("run_study#detection_eval_configs") == [*train, "configs/evaluate.yaml"]
    assert p.get_parsed_content("run_study#detection_overrides") == ({"max_epochs": 8} if preset == "cpu" else {})
    # the preset's own phantom cohort (paper: the paper's split sizes), generated lazily (not here)
    assert p.get_parsed_content("dataset_dir").endswith("phantom_paper" if preset == "paper" else "phantom")
    assert ("preset='paper'" in p["datalist"]) and ("ensure_cohort" in p["datalist"])
    arms = p.get_parsed_content("run_study#arms")
    assert [tuple(a) for a in arms] == list(ARMS)


def test_paper_preset_runs_of_trained_models_get_the_training_configs_and_overrides(tiny_cohort, tmp_path,
                                                                                    monkeypatch):
    """The bundle runs a paper-preset study launches (recorded, not run): synthesis inference and detector
    evaluation merge their overlay after train.yaml + paper.yaml and get the training overrides."""
    calls = []

    class Stop(Exception):
        pass

    def launch(config_files, run_id, overrides, log_file):
        calls.append((list(config_files), run_id, dict(overrides)))
        if run_id == "inference":  # the synthetic scans the synthesise stage checks for
            healthy = json.loads(Path(overrides["dataset_dir"]).read_text())["training"]
            out = Path(overrides["output_dir"])
            out.mkdir(parents=True, exist_ok=True)
            for it in healthy:
                for suffix in ("_synthetic.nii.gz", "_synthetic_cmb.nii.gz"):
                    (out / f"{it['id']}{suffix}").write_bytes(b"")
        if run_id == "evaluating":
            raise Stop

    monkeypatch.setattr(runner, "_launcher", lambda in_process: launch)
    syn_b, det_b = REPO / "bundles" / "cmb_synthesis", REPO / "bundles" / "cmb_detection"
    models = tmp_path / "syn_models"
    models.mkdir()
    paper = ["configs/train.yaml", "configs/paper.yaml"]
    with pytest.raises(Stop):
        run_study(tmp_path / "study", tiny_cohort, syn_b, det_b, synthesis_train_configs=paper,
                  detection_train_configs=paper, synthesis_overrides={"g_channels": 4, "device": "cpu"},
                  detection_overrides={"channels": [4, 8], "device": "cpu"}, synthesis_ckpt_dir=models,
                  n_real_pathological=1, arms=[("real", False)], n_bootstrap=10)
    assert [c[1] for c in calls] == ["inference", "training", "evaluating"]  # 1 synthetic scan: one round
    (inf_files, _, inf_over), (tr_files, _, tr_over), (ev_files, _, ev_over) = calls
    assert inf_files == [str(syn_b / c) for c in (*paper, "configs/inference.yaml")]
    assert inf_over["g_channels"] == 4 and inf_over["ckpt_dir"] == str(models)
    assert tr_files == [str(det_b / c) for c in paper]
    assert ev_files == [str(det_b / c) for c in (*paper, "configs/evaluate.yaml")]
    assert ev_over["channels"] == tr_over["channels"] == [4, 8] and ev_over["model_path"].endswith("model.pt")


def test_subset_datalist_keeps_k_pathological(tiny_cohort, tmp_path):
    counts = subset_datalist(tiny_cohort, tmp_path / "d.json", 2, seed=3)
    data = json.loads((tmp_path / "d.json").read_text())
    assert counts["n_real_pathological"] == 2 and counts["n_healthy"] == 2
    assert sum(it["group"] == "pathological" for it in data["training"]) == 2
    assert all(Path(it["image"]).is_absolute() and Path(it["image"]).is_file() for it in data["training"])
    again = subset_datalist(tiny_cohort, tmp_path / "e.json", 2, seed=3)
    assert json.loads((tmp_path / "e.json").read_text())["training"] == data["training"] and again == counts
    with pytest.raises(ValueError, match="n_real_pathological"):
        subset_datalist(tiny_cohort, tmp_path / "f.json", 99, seed=0)


@pytest.mark.e2e
def test_tiny_study_produces_every_artefact_and_resumes(tiny_cohort, tmp_path):
    out = tmp_path / "study"
    kw = dict(output_dir=out, datalist=tiny_cohort, synthesis_bundle=REPO / "bundles" / "cmb_synthesis",
              detection_bundle=REPO / "bundles" / "cmb_detection", synthesis_overrides=SYN_TINY,
              detection_overrides=DET_TINY, n_real_pathological=2, n_bootstrap=50, in_process=True)
    results = run_study(**kw)
    for name in ("results.json", "results.md", "froc.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = results["repeats"][0]
    assert rep["counts"]["n_real_pathological"] == 2 and rep["n_synthetic"] == 2
    assert set(rep["arms"]) == {arm_name(td, c) for td, c in ARMS}
    for s in rep["arms"].values():
        assert 0.0 <= s["sensitivity_at_10"] <= 1.0
        lo, hi = s["sensitivity_at_10_ci95"]
        assert lo <= hi
        assert s["n_scans"] == 2 and s["n_lesions"] > 0
    diffs = rep["differences"]
    assert set(diffs) == {"real+synthetic minus real", "real+synthetic+cDA minus real+cDA"}
    for d in diffs.values():
        assert d["difference"] == pytest.approx(d["sensitivity_a"] - d["sensitivity_b"])
    table = (out / "results.md").read_text()
    assert table.count("\n| real") >= 2 and "77.8" in table and "82.4" in table
    # synthetic scans exist with their instance masks
    syn = json.loads((out / "stages" / rep["stages"]["synthesise"] / "datalist.json").read_text())["training"]
    assert len(syn) == 2 and all(Path(it["image"]).is_file() and Path(it["label"]).is_file() for it in syn)
    # rerun: every stage comes from the cache, same numbers
    stamp = {p: p.stat().st_mtime for p in (out / "stages").glob("*/stage.json")}
    again = run_study(**kw)
    assert {p: p.stat().st_mtime for p in (out / "stages").glob("*/stage.json")} == stamp
    assert again["repeats"][0]["arms"] == rep["arms"]


PAPER = ["configs/train.yaml", "configs/paper.yaml"]
# the paper preset's structure (paper.yaml merged: 160x146x32 patches, stem 7^3, instance norm, image-only
# critics with 3 layers, 4 loader workers) at tiny widths and budgets, on the CPU
SYN_PAPER_TINY = dict(device="cpu", batch_size=2, epoch_length=2, max_epochs=1, val_interval=1,
                      val_patches_per_volume=1, image_interval=1, g_channels=2, g_res_blocks=1, d_channels=2, n_critic=1)
DET_PAPER_TINY = dict(device="cpu", batch_size=8, epoch_length=2, max_epochs=1, val_interval=1)


@pytest.mark.e2e
def test_paper_preset_study_trains_synthesises_and_evaluates(tiny_cohort, tmp_path):
    """The study's paper path end to end: synthesis training and synthesis inference with train.yaml +
    paper.yaml (the trained networks have the paper's structure), then a paper-preset detector (3-D DenseNet121
    on 32^3 patches) trained on the synthetic scans and evaluated on the test split."""
    out = tmp_path / "study"
    results = run_study(out, tiny_cohort, REPO / "bundles" / "cmb_synthesis", REPO / "bundles" / "cmb_detection",
                        synthesis_train_configs=PAPER, detection_train_configs=PAPER,
                        synthesis_overrides=SYN_PAPER_TINY, detection_overrides=DET_PAPER_TINY,
                        n_real_pathological=2, arms=[("synthetic", False)], n_bootstrap=20, in_process=True)
    (models,) = (out / "stages").glob("synthesis-train-*/models")
    g = torch.load(models / "G_HP.pt", weights_only=True)
    d = torch.load(models / "D_P.pt", weights_only=True)
    assert g["stem.0.weight"].shape == (2, 2, 7, 7, 7) and "stem.1.weight" in g  # 7^3 stem, instance norm
    assert d["net.initial_conv.conv.weight"].shape[1] == 1 and "net.2.conv.weight" in d  # image only, 3 layers
    meta = json.loads((models / "metrics.json").read_text())
    assert meta["preset"] == "paper" and meta["patch_size"] == [160, 146, 32]
    rep = results["repeats"][0]
    assert rep["n_synthetic"] == 2
    synth = out / "stages" / rep["stages"]["synthesise"]
    assert "configs/paper.yaml" in (synth / "log_round0.txt").read_text()  # inference built the paper networks
    for it in json.loads((synth / "datalist.json").read_text())["training"]:
        assert nib.load(it["image"]).shape == nib.load(it["source"]).shape
        assert (np.asarray(nib.load(it["label"]).dataobj) > 0).any()
    s = rep["arms"]["synthetic"]
    assert s["n_scans"] == 2 and s["n_lesions"] > 0 and 0.0 <= s["sensitivity_at_10"] <= 1.0
    (det,) = (out / "stages").glob("detector-synthetic-*/models/model.pt")
    assert any(k.startswith("features.denseblock4") for k in torch.load(det, weights_only=True))

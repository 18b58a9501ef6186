"""The learning-curve study: protocol (nested K subsets, strict synthesis), pooled statistics, study.yaml
(presets, --quick) and the quick study end to end at tiny scale (every artefact, the strict protocol, resume)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cmb_synthesis.evaluation.froc import paired_bootstrap_difference
from cmb_synthesis.evaluation.hits import ScanResult
from cmb_synthesis.evaluation.pooled import pooled_bootstrap, pooled_paired_bootstrap_difference
from cmb_synthesis.study import runner
from cmb_synthesis.study.protocol import nested_subsets, resolve_k_values
from cmb_synthesis.study.runner import ARMS, arm_name, run_configs, run_study, subset_datalist
from transforms.lesion_bank import LesionBank

REPO = Path(__file__).resolve().parents[1]
STUDY_YAML = REPO / "bundles" / "cmb_detection" / "configs" / "study.yaml"
SYN_TINY = dict(device="cpu", patch_size=[32, 32, 16], batch_size=2, epoch_length=2, max_epochs=1, val_interval=1,
                val_patches_per_volume=1, val_shape_repeats=1, image_interval=1, g_channels=2, g_res_blocks=1, d_channels=2, n_critic=1)
DET_TINY = dict(device="cpu", channels=[4, 8], strides=[2, 2], num_res_units=1, patch_size=[24, 24, 16],
                batch_size=8, epoch_length=2, max_epochs=1, val_interval=1)


def test_run_configs_merge_the_overlay_over_the_training_configs():
    paper = ["configs/train.yaml", "configs/paper.yaml"]
    assert run_configs(paper, "configs/inference.yaml") == [*paper, "configs/inference.yaml"]
    assert run_configs(paper, "configs/inference.yaml", [*paper, "configs/mine.yaml"]) == [*paper, "configs/mine.yaml"]
    with pytest.raises(ValueError, match="paper.yaml"):  # a paper-preset model run with the CPU preset's network
        run_configs(paper, "configs/inference.yaml", ["configs/train.yaml", "configs/inference.yaml"])


@pytest.mark.parametrize("preset", ["cpu", "paper", "benchmark"])
def test_study_yaml_lists_run_study_and_stacks_each_bundles_configs(preset):
    """study.yaml: `run_study` is a component listing every argument; --preset paper merges each bundle's
    paper.yaml after train.yaml for training AND for the runs of the trained models; --preset benchmark selects
    the benchmark phantom cohort with the CPU configs; the full learning curve by default."""
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
    assert p.get_parsed_content("run_study#detection_overrides") == ({} if preset == "paper" else {"max_epochs": 8})
    # CPU presets: the synthesis stages validate once, at the end, on 4 patches per volume (the study uses the final
    # G_HP)
    synthesis_epochs = ConfigParser.load_config_file(str(REPO / "bundles/cmb_synthesis/configs/train.yaml"))["max_epochs"]
    assert p.get_parsed_content("run_study#synthesis_overrides") == (
        {} if preset == "paper" else {"val_patches_per_volume": 4, "val_interval": synthesis_epochs})
    # the preset's own phantom cohort, generated lazily (not here)
    folder = {"cpu": "phantom", "paper": "phantom_paper", "benchmark": "phantom_benchmark"}[preset]
    assert p.get_parsed_content("dataset_dir").endswith("/" + folder)
    assert p.get_parsed_content("cohort_preset") == {"cpu": "default"}.get(preset, preset)
    assert "ensure_cohort" in p["datalist"] and "@cohort_preset" in p["datalist"]
    arms = p.get_parsed_content("run_study#arms")
    assert [tuple(a) for a in arms] == list(ARMS)
    assert p.get_parsed_content("run_study#k_values") == [2, 4, 8, None]
    assert p.get_parsed_content("run_study#repeats") == 3 and p.get_parsed_content("run_study#quick") is False
    assert p.get_parsed_content("run_study#preset") == preset


@pytest.mark.parametrize("flag", [True, "true", "True"])
def test_study_yaml_quick_selects_the_smaller_study(flag):
    """--quick true (a bool, or the string the command line gives): K = 2 and all, 2 seeds, real and
    real+synthetic without and with cDA, smaller synthesis and detector budgets; --quick false is the full one."""
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(str(STUDY_YAML))
    p["quick"] = flag
    p["preset"] = "benchmark"
    p.parse()
    assert p.get_parsed_content("run_study#quick") is True
    assert p.get_parsed_content("run_study#k_values") == [2, None]
    assert p.get_parsed_content("run_study#repeats") == 2
    assert [tuple(a) for a in p.get_parsed_content("run_study#arms")] == [
        ("real", False), ("real+synthetic", False), ("real", True), ("real+synthetic", True)]
    assert p.get_parsed_content("run_study#synthesis_overrides") == {"max_epochs": 5, "val_interval": 5}
    assert p.get_parsed_content("run_study#detection_overrides") == {"max_epochs": 4}
    p2 = ConfigParser()
    p2.read_config(str(STUDY_YAML))
    p2["quick"] = "false"
    p2.parse()
    assert p2.get_parsed_content("run_study#quick") is False and p2.get_parsed_content("run_study#repeats") == 3


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
        if run_id == "training":  # the weights the detector stage declares as its output
            (Path(overrides["ckpt_dir"])).mkdir(parents=True, exist_ok=True)
            (Path(overrides["ckpt_dir"]) / "model.pt").write_bytes(b"")
        if run_id == "evaluating":
            raise Stop

    monkeypatch.setattr(runner, "_launcher", lambda in_process, threads=None: launch)
    syn_b, det_b = REPO / "bundles" / "cmb_synthesis", REPO / "bundles" / "cmb_detection"
    models = tmp_path / "syn_models"
    models.mkdir()
    paper = ["configs/train.yaml", "configs/paper.yaml"]
    with pytest.raises(Stop):
        run_study(tmp_path / "study", tiny_cohort, syn_b, det_b, synthesis_train_configs=paper,
                  detection_train_configs=paper, synthesis_overrides={"g_channels": 4, "device": "cpu"},
                  detection_overrides={"channels": [4, 8], "device": "cpu"}, synthesis_ckpt_dir=models,
                  n_real_pathological=1, repeats=1, arms=[("real+synthetic", False)], n_bootstrap=10)
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
    assert sorted(it["id"] for it in data["training"] if it["group"] == "pathological") == counts["pathological_ids"]
    assert all(Path(it["image"]).is_absolute() and Path(it["image"]).is_file() for it in data["training"])
    again = subset_datalist(tiny_cohort, tmp_path / "e.json", 2, seed=3)
    assert json.loads((tmp_path / "e.json").read_text())["training"] == data["training"] and again == counts
    with pytest.raises(ValueError, match="n_real_pathological"):
        subset_datalist(tiny_cohort, tmp_path / "f.json", 99, seed=0)
    kept = subset_datalist(tiny_cohort, tmp_path / "g.json", keep_ids=counts["pathological_ids"][:1])
    assert kept["pathological_ids"] == counts["pathological_ids"][:1]
    with pytest.raises(ValueError, match="no pathological training scans with ids"):
        subset_datalist(tiny_cohort, tmp_path / "h.json", keep_ids=["not-a-scan"])


def test_nested_subsets_are_nested_and_deterministic_in_the_seed():
    ids = [f"sub-{i:03d}" for i in range(12)]
    ks = resolve_k_values([8, None, 2, 4, 12, "all"], len(ids))
    assert ks == [2, 4, 8, None]  # ordered, 12 = all dropped as a duplicate of None
    for seed in range(5):
        sub = nested_subsets(ids, ks, seed)
        assert [len(sub[k]) for k in ("2", "4", "8", "all")] == [2, 4, 8, 12]
        assert set(sub["2"]) < set(sub["4"]) < set(sub["8"]) < set(sub["all"]) == set(ids)
        assert sub == nested_subsets(ids, ks, seed)
    assert nested_subsets(ids, [4], 0) != nested_subsets(ids, [4], 1)
    for bad in ([0], [13], [2.5], ["two"], []):
        with pytest.raises(ValueError, match="k_values"):
            resolve_k_values(bad, len(ids), "cohort.json")


def _results(scores_per_scan, fp=0.2, n_fp=10, rng=None):
    """ScanResults: scan i has lesions scored ``scores_per_scan[i]`` (NaN: missed) and ``n_fp`` FPs of ``fp``."""
    return [ScanResult(f"s{i}", np.asarray(les, float), np.full(n_fp, fp) if rng is None else rng.random(n_fp) * fp)
            for i, les in enumerate(scores_per_scan)]


def test_pooled_bootstrap_and_paired_difference_over_scans_and_seeds():
    rng = np.random.default_rng(0)
    n_scans = 12
    lesions = [rng.integers(1, 5) for _ in range(n_scans)]
    # arm b finds about half the lesions, arm a about 90 %; 3 seeds each; FPs below every hit
    b = [_results([np.where(rng.random(n) < 0.5, 0.9, np.nan) for n in lesions], rng=rng) for _ in range(3)]
    a = [_results([np.where(rng.random(n) < 0.9, 0.9, np.nan) for n in lesions], rng=rng) for _ in range(3)]
    d = pooled_paired_bootstrap_difference(a, b, fp_rate=10, n_bootstrap=200, seed=4)
    per_seed = [paired_bootstrap_difference(a[s], b[s], fp_rate=10, n_bootstrap=200, seed=4) for s in range(3)]
    assert d["difference"] == pytest.approx(np.mean([p["difference"] for p in per_seed]))
    assert [p["difference"] for p in d["per_seed"]] == pytest.approx([p["difference"] for p in per_seed])
    assert [p["ci95"] for p in d["per_seed"]] == [p["ci95"] for p in per_seed]
    lo, hi = d["ci95"]
    assert 0 < lo <= d["difference"] <= hi and d["n_seeds"] == 3 and d["n_scans"] == n_scans
    assert d["sensitivity_a"] - d["sensitivity_b"] == pytest.approx(d["difference"])
    assert d["cpm_difference"] == pytest.approx(d["cpm_a"] - d["cpm_b"]) and d["cpm_ci95"][0] <= d["cpm_ci95"][1]
    # pooling narrows the interval relative to one seed's paired CI (averaging the seeds' noise)
    assert hi - lo <= max(p["ci95"][1] - p["ci95"][0] for p in per_seed) + 1e-9
    # an arm against itself: exactly 0 in every resample
    same = pooled_paired_bootstrap_difference(a, a, n_bootstrap=50)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]
    # one arm over seeds: mean of the seeds with a CI around it
    one = pooled_bootstrap(a, fp_rate=10, n_bootstrap=200, seed=4)
    assert one["sensitivity"] == pytest.approx(d["sensitivity_a"]) and len(one["per_seed_sensitivity"]) == 3
    assert one["sensitivity_ci95"][0] <= one["sensitivity"] <= one["sensitivity_ci95"][1]
    # other scans, lesion counts or seed counts are refused
    with pytest.raises(ValueError, match="seeds"):
        pooled_paired_bootstrap_difference(a, b[:2])
    with pytest.raises(ValueError, match="other test scans"):
        pooled_paired_bootstrap_difference(a, [b[0][:-1], b[1], b[2]])
    with pytest.raises(ValueError, match="lesions"):
        pooled_paired_bootstrap_difference(a, [_results([[0.5] * (n + 1) for n in lesions])] * 3)


@pytest.mark.e2e
def test_quick_learning_curve_study_writes_every_artefact_keeps_the_strict_protocol_and_resumes(tiny_cohort,
                                                                                             tmp_path):
    """study.yaml with --quick true at tiny scale (tiny networks and budgets, 2 arms for time): K = 2 and all,
    2 seeds; results.json (protocol, per K/arm/seed metrics, pooled curve and paired differences), results.md,
    table1.md, learning_curve.png, froc.png; each K's synthesis model saw exactly that K's pathological scans
    (its datalist and its lesion bank's sources); a rerun comes entirely from the stage cache."""
    from monai.bundle import ConfigParser

    out = tmp_path / "study"

    def parser():
        p = ConfigParser()
        p.read_config(str(STUDY_YAML))
        p.update({"quick": "true", "datalist": tiny_cohort, "output_dir": str(out), "in_process": True,
                  "n_bootstrap": 50, "quick_synthesis_overrides": SYN_TINY, "quick_detection_overrides": DET_TINY,
                  "quick_arms": [["real", False], ["real+synthetic", False]]})
        p.parse()
        return p

    results = parser().get_parsed_content("run_study")
    for name in ("results.json", "results.md", "table1.md", "learning_curve.png", "froc.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in ("learning_curve.png", "froc.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))

    proto = results["protocol"]
    all_ids = proto["pathological_ids_available"]
    assert len(all_ids) == 3 and proto["k_values"] == ["2", "all"] and proto["seeds"] == [0, 1]
    assert proto["quick"] is True and proto["strict"] is True and proto["synthesis_ckpt_dir"] is None
    assert proto["arms"] == ["real", "real+synthetic"] and proto["budgets"]["synthesis_overrides"] == SYN_TINY
    assert proto["versions"]["torch"] and proto["versions"]["monai"]
    assert len(results["runs"]) == 4
    for seed in ("0", "1"):
        two, every = proto["subsets"]["2"][seed], proto["subsets"]["all"][seed]
        assert len(two) == 2 and set(two) < set(every) == set(all_ids)   # nested
        assert proto["synthesis_training_ids"]["2"][seed] == two          # strict: synthesis saw these only
        assert proto["synthesis_training_ids"]["all"][seed] == every

    cohort = {it["id"]: it for it in json.loads(Path(tiny_cohort).read_text())["training"]}
    for run in results["runs"]:
        k, ids = run["k"], run["pathological_ids"]
        assert len(ids) == (2 if k == "2" else 3) and run["counts"]["n_real_pathological"] == len(ids)
        assert run["n_synthetic"] == len(ids) and run["counts"]["n_healthy"] == 2
        # the strict protocol, read from what the synthesis stage trained on
        (syn_stage,) = [d for d in (out / "stages").glob("synthesis-train-*")
                        if json.loads((d / "stage.json").read_text())["result"]["models"] == run["synthesis"]["models"]]
        trained = json.loads((syn_stage / "datalist.json").read_text())["training"]
        assert sorted(it["id"] for it in trained if it["group"] == "pathological") == sorted(ids)
        assert sorted(it["id"] for it in trained if it["group"] != "pathological") == run["healthy_ids"]
        bank = LesionBank.load(syn_stage / "models" / "lesion_bank.npz")
        assert sorted(Path(f).name for f in bank.sources) == sorted(Path(cohort[i]["label"]).name for i in ids)
        syn = json.loads((out / "stages" / run["stages"]["synthesise"] / "datalist.json").read_text())["training"]
        assert len(syn) == len(ids) and all(Path(it["image"]).is_file() and Path(it["label"]).is_file() for it in syn)
        assert set(run["arms"]) == {"real", "real+synthetic"}
        for s in run["arms"].values():
            assert set(s["sensitivity_at_fp"]) == {"1", "2", "4", "8", "10"}
            for r, v in s["sensitivity_at_fp"].items():
                lo, hi = s["sensitivity_at_fp_ci95"][r]
                assert 0.0 <= lo <= hi <= 1.0 and 0.0 <= v <= 1.0
            assert s["fp_at_90"] is None or s["fp_at_90"] >= 0
            assert 0.0 <= s["cpm"] <= 1.0 and s["n_scans"] == 2 and s["n_lesions"] > 0

    for k in ("2", "all"):
        for name in ("real", "real+synthetic"):
            lc = results["learning_curve"][k][name]
            per = [r["arms"][name]["sensitivity_at_10"] for r in results["runs"] if r["k"] == k]
            assert lc["per_seed_sensitivity"] == pytest.approx(per) and lc["sensitivity"] == pytest.approx(np.mean(per))
            assert lc["sensitivity_ci95"][0] <= lc["sensitivity_ci95"][1]
        (d,) = results["differences"][k].values()
        assert list(results["differences"][k]) == ["real+synthetic minus real"]
        assert d["n_seeds"] == 2 and len(d["per_seed"]) == 2
        assert d["difference"] == pytest.approx(np.mean([p["difference"] for p in d["per_seed"]]))
        assert -1.0 <= d["ci95"][0] <= d["ci95"][1] <= 1.0

    table1 = (out / "table1.md").read_text()
    assert "K = all" in table1 and "| real | no |" in table1 and "| real+synthetic | no |" in table1
    assert "77.8" in table1 and "78.9" in table1
    md = (out / "results.md").read_text()
    assert "## K = 2" in md and "## K = all" in md and "strict protocol" in md and "real+synthetic minus real" in md

    # rerun: every stage comes from the cache, same numbers
    stamp = {p: p.stat().st_mtime for p in (out / "stages").glob("*/stage.json")}
    again = parser().get_parsed_content("run_study")
    assert {p: p.stat().st_mtime for p in (out / "stages").glob("*/stage.json")} == stamp
    assert again["runs"] == results["runs"] and again["differences"] == results["differences"]


PAPER = ["configs/train.yaml", "configs/paper.yaml"]
# the paper preset's structure (paper.yaml merged: 160x146x32 patches, stem 7^3, instance norm, image-only
# critics with 3 layers, 4 loader workers) at tiny widths and budgets, on the CPU
SYN_PAPER_TINY = dict(device="cpu", batch_size=2, epoch_length=2, max_epochs=1, val_interval=1,
                      val_patches_per_volume=1, val_shape_repeats=1, image_interval=1, g_channels=2, g_res_blocks=1, d_channels=2, n_critic=1)
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
                        n_real_pathological=2, repeats=1, arms=[("synthetic", False)], n_bootstrap=20,
                        in_process=True)
    (models,) = (out / "stages").glob("synthesis-train-*/models")
    g = torch.load(models / "G_HP.pt", weights_only=True)
    d = torch.load(models / "D_P.pt", weights_only=True)
    assert g["stem.0.weight"].shape == (2, 2, 7, 7, 7) and "stem.1.weight" in g  # 7^3 stem, instance norm
    assert d["net.initial_conv.conv.weight"].shape[1] == 1 and "net.2.conv.weight" in d  # image only, 3 layers
    meta = json.loads((models / "metrics.json").read_text())
    assert meta["preset"] == "paper" and meta["patch_size"] == [160, 146, 32]
    rep = results["runs"][0]
    assert rep["n_synthetic"] == 2 and rep["k"] == "2"
    synth = out / "stages" / rep["stages"]["synthesise"]
    assert "configs/paper.yaml" in (synth / "log_round0.txt").read_text()  # inference built the paper networks
    for it in json.loads((synth / "datalist.json").read_text())["training"]:
        assert nib.load(it["image"]).shape == nib.load(it["source"]).shape
        assert (np.asarray(nib.load(it["label"]).dataobj) > 0).any()
    s = rep["arms"]["synthetic"]
    assert s["n_scans"] == 2 and s["n_lesions"] > 0 and 0.0 <= s["sensitivity_at_10"] <= 1.0
    (det,) = (out / "stages").glob("detector-synthetic-*/models/model.pt")
    assert any(k.startswith("features.denseblock4") for k in torch.load(det, weights_only=True))

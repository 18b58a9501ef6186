"""The augmentation study end to end in a tiny configuration: every artefact produced and well formed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmb_synthesis.study.runner import ARMS, arm_name, run_study, subset_datalist

REPO = Path(__file__).resolve().parents[1]
SYN_TINY = dict(device="cpu", patch_size=[32, 32, 16], batch_size=2, epoch_length=2, max_epochs=1, val_interval=1,
                val_patches_per_volume=1, image_interval=1, g_channels=2, g_res_blocks=1, d_channels=2, n_critic=1)
DET_TINY = dict(device="cpu", channels=[4, 8], strides=[2, 2], num_res_units=1, patch_size=[24, 24, 16],
                batch_size=8, epoch_length=2, max_epochs=1, val_interval=1)


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

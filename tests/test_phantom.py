"""The embedded SWI phantom cohort: anatomy, veins, CMBs, files, determinism and bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cmb_synthesis.phantom import PRESETS, generate_cohort, simulate_subject
from cmb_synthesis.phantom.lesions import sample_count, sample_lesion_specs

SPACING = (0.98, 0.98, 1.0)


def _items(datalist: str) -> list[dict]:
    data = json.loads(Path(datalist).read_text())
    return [dict(it, split=s) for s in ("training", "validation", "test") for it in data[s]]


def _load(datalist: str, name: str) -> np.ndarray:
    return np.asarray(nib.load(str(Path(datalist).parent / name)).dataobj)


def test_datalist_loads_with_monai_and_files_are_right(tiny_cohort):
    from monai.data import load_decathlon_datalist

    train = load_decathlon_datalist(tiny_cohort, True, "training")
    assert len(train) == 5 and {it["group"] for it in train} == {"healthy", "pathological"}
    for key in ("image", "label", "brainmask", "tissue", "veins", "lesions"):
        assert Path(train[0][key]).is_file()
    assert len(load_decathlon_datalist(tiny_cohort, True, "test")) == 2
    for it in _items(tiny_cohort):
        img = nib.load(str(Path(tiny_cohort).parent / it["image"]))
        assert img.shape == (160, 146, 112)
        assert np.allclose(img.header.get_zooms(), SPACING, atol=1e-5)
        assert np.allclose(np.abs(np.diag(img.affine)[:3]), SPACING)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert img.get_data_dtype() == np.float32
        lab = nib.load(str(Path(tiny_cohort).parent / it["label"]))
        assert lab.get_data_dtype() == np.uint16 and np.allclose(lab.affine, img.affine)
        if it["group"] == "healthy":
            assert not np.asarray(lab.dataobj).any()


def test_every_cmb_in_brain_tissue_and_away_from_veins(tiny_cohort):
    n_checked = 0
    for it in _items(tiny_cohort):
        if it["group"] != "pathological":
            continue
        lab = _load(tiny_cohort, it["label"])
        tissue = _load(tiny_cohort, it["tissue"])
        brain = _load(tiny_cohort, it["brainmask"]) > 0
        veins = _load(tiny_cohort, it["veins"]) > 0
        assert lab.max() >= 1
        inside = lab > 0
        assert brain[inside].all(), "a CMB voxel lies outside the brain mask"
        assert np.isin(tissue[inside], [2, 3]).all(), "a CMB voxel lies in CSF, deep nuclei or background"
        near_vein = ndimage.binary_dilation(veins, iterations=1)
        assert not (inside & near_vein).any(), "a CMB touches a vein"
        # instances do not touch each other
        for lesion in range(1, lab.max() + 1):
            grown = ndimage.binary_dilation(lab == lesion)
            assert set(np.unique(lab[grown])) <= {0, lesion}
        n_checked += 1
    assert n_checked >= 4


def test_lesion_table_matches_label_map(tiny_cohort):
    for it in _items(tiny_cohort):
        lab = _load(tiny_cohort, it["label"])
        rows = list(csv.DictReader(open(Path(tiny_cohort).parent / it["lesions"])))
        assert len(rows) == lab.max() == it["n_lesions"]
        affine = nib.load(str(Path(tiny_cohort).parent / it["image"])).affine
        for r in rows:
            i, j, k = int(r["i"]), int(r["j"]), int(r["k"])
            assert lab[i, j, k] == int(r["label"])
            world = affine[:3, :3] @ [i, j, k] + affine[:3, 3]
            assert np.allclose(world, [float(r["x"]), float(r["y"]), float(r["z"])], atol=1e-2)
            vol = (lab == int(r["label"])).sum() * np.prod(SPACING)
            assert float(r["volume_mm3"]) == pytest.approx(vol, rel=1e-3)
            assert 1.5 <= float(r["diameter_mm"]) <= 10.5
            assert 1.0 <= float(r["elongation"]) <= 2.5


def test_size_and_count_distributions_within_spec():
    rng = np.random.default_rng(0)
    counts = np.array([sample_count(rng) for _ in range(4000)])
    assert counts.min() >= 1 and counts.max() <= 30
    assert 4 <= np.median(counts) <= 6
    assert np.mean(counts) > np.median(counts)          # right-skewed
    specs = sample_lesion_specs(rng, 4000)
    d = np.array([s.diameter_mm for s in specs])
    assert d.min() >= 2.0 and d.max() <= 10.0
    assert (d < 5).mean() > 0.7                          # most under 5 mm
    e = np.array([s.elongation for s in specs])
    assert 0.2 < (e > 1).mean() < 0.4                   # some elongated (TBI)


def test_veins_present_tubular_and_contrast_ordered(tiny_cohort):
    it = next(i for i in _items(tiny_cohort) if i["group"] == "pathological")
    veins = _load(tiny_cohort, it["veins"]) > 0
    swi = _load(tiny_cohort, it["image"]).astype(np.float64)
    tissue = _load(tiny_cohort, it["tissue"])
    lab = _load(tiny_cohort, it["label"])
    comps, n = ndimage.label(veins, structure=np.ones((3, 3, 3)))
    assert n >= 20
    # tubular: thin everywhere (distance to the vein wall <= ~1.5 mm) yet long (extent of each piece >> width)
    thickness = ndimage.distance_transform_edt(veins, sampling=SPACING)[veins]
    assert np.percentile(thickness, 99) <= 2.0
    extents = [max((s.stop - s.start) * sp for s, sp in zip(sl, SPACING)) for sl in ndimage.find_objects(comps)]
    assert np.median(extents) >= 8.0
    wm = swi[tissue == 3].mean()
    assert swi[tissue == 1].mean() > wm                 # CSF bright on SWI
    assert swi[veins & (tissue == 3)].mean() < 0.85 * wm
    assert swi[tissue == 4].mean() < wm                 # iron-rich deep nuclei
    assert swi[lab > 0].mean() < 0.6 * wm               # CMB cores dark


def test_same_seed_same_bytes_different_seed_different_subject(tmp_path):
    small = dict(shape=(96, 96, 64), n_cortical_veins=40, n_medullary_veins=40)
    kw = dict(preset="default", n_train_pathological=1, n_train_healthy=0, n_val_pathological=0, n_val_healthy=0,
              n_test_pathological=0, options=small)
    a = generate_cohort(tmp_path / "a", seed=11, **kw).parent
    b = generate_cohort(tmp_path / "b", seed=11, **kw).parent
    c = generate_cohort(tmp_path / "c", seed=12, **kw).parent
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    sa = np.asarray(nib.load(str(a / "sub-000_P_swi.nii.gz")).dataobj)
    sc = np.asarray(nib.load(str(c / "sub-000_P_swi.nii.gz")).dataobj)
    assert np.abs(sa - sc).mean() > 0.05 * sa.mean()


def test_subjects_have_distinct_anatomy():
    s1 = simulate_subject(1, False, shape=(96, 96, 64), n_cortical_veins=0, n_medullary_veins=0)
    s2 = simulate_subject(2, False, shape=(96, 96, 64), n_cortical_veins=0, n_medullary_veins=0)
    dice = 2 * (s1.brainmask & s2.brainmask).sum() / (s1.brainmask.sum() + s2.brainmask.sum())
    assert 0.8 < dice < 0.99


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cmb_synthesis.phantom", *args], capture_output=True, text=True)


def test_cli_bad_input_exit_code_2_and_nothing_written(tmp_path):
    r = _cli("--output", str(tmp_path / "missing" / "cohort"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert not (tmp_path / "missing").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    r = _cli("--output", str(full))
    assert r.returncode == 2 and "not empty" in r.stderr and str(full) in r.stderr
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]
    r = _cli("--output", str(tmp_path / "neg"), "--n-train-pathological", "-3")
    assert r.returncode == 2 and "n_train_pathological" in r.stderr
    zero = [f"--{k}" for k in ("n-train-pathological", "n-train-healthy", "n-val-pathological", "n-val-healthy",
                                "n-test-pathological", "n-test-healthy")]
    r = _cli("--output", str(tmp_path / "zero"), *[x for k in zero for x in (k, "0")])
    assert r.returncode == 2 and "empty" in r.stderr
    assert not (tmp_path / "neg").exists() and not (tmp_path / "zero").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_paper_preset_mirrors_the_paper_split():
    p = PRESETS["paper"]
    assert (p["n_train_pathological"], p["n_train_healthy"]) == (46, 14)
    assert (p["n_val_pathological"], p["n_val_healthy"]) == (11, 4)
    assert (p["n_test_pathological"], p["n_test_healthy"]) == (10, 0)

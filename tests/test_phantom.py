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
    return subprocess.run([sys.executable, "-m", "cmb_synthesis.phantom", *args], capture_output=True, text=True,
                          encoding="utf-8", errors="replace")


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


# --- the benchmark preset --------------------------------------------------------------------------------------

SMALL = dict(shape=(96, 96, 64), n_cortical_veins=40, n_medullary_veins=40)
BENCH_SPLIT = dict(n_train_pathological=1, n_train_healthy=1, n_val_pathological=1, n_val_healthy=0,
                   n_test_pathological=2, n_test_healthy=0)
# every mimic type in every subject (the preset draws most of them with a probability < 1)
ALL_MIMICS = dict(mineralisation_rate=4.0, pineal_prob=1.0, choroid_prob=1.0, flow_void_prob=1.0)


def test_benchmark_preset_counts_and_planned_test_lesions():
    from cmb_synthesis.phantom import planned_lesions
    from cmb_synthesis.phantom.benchmark import plan_lesion_counts

    b, d = PRESETS["benchmark"], PRESETS["default"]
    assert b["n_test_pathological"] >= 40 and b["n_val_pathological"] >= 10 and b["n_val_healthy"] >= 1
    assert (b["n_train_pathological"], b["n_train_healthy"]) == (d["n_train_pathological"], d["n_train_healthy"])
    for seed in range(10):
        plan = planned_lesions("benchmark", seed)
        assert [len(plan[s]) for s in ("training", "validation", "test")] == [12, 10, 40]
        assert sum(plan["test"]) >= 320 and sum(plan["validation"]) >= 80      # 8 per pathological scan
        assert all(1 <= c <= 30 for s in plan.values() for c in s)
    assert planned_lesions("benchmark", 3) == planned_lesions("benchmark", 3)
    assert planned_lesions("benchmark", 3) != planned_lesions("benchmark", 4)
    assert planned_lesions("default", 0) is None and planned_lesions("paper", 0) is None
    # the top-up: a floor above the log-normal mean is met exactly, and a lower floor changes nothing
    assert sum(plan_lesion_counts(0, "test", 40, min_mean_lesions=12.0)) == 480
    free = plan_lesion_counts(0, "test", 40, min_mean_lesions=0.0)
    assert 1 < len(set(free)) and plan_lesion_counts(0, "test", 40, min_mean_lesions=1.0) == free
    with pytest.raises(ValueError, match="maximum"):
        plan_lesion_counts(0, "test", 4, min_mean_lesions=31.0)


def test_benchmark_lesion_sizes_and_contrast_spread():
    from cmb_synthesis.phantom.lesions import sample_benchmark_specs

    specs = sample_benchmark_specs(np.random.default_rng(0), 4000)
    bloom = np.array([s.bloom for s in specs])
    d = np.array([s.diameter_mm for s in specs]) * bloom        # apparent (labelled) diameter
    depth = np.array([s.depth for s in specs])
    assert ((d >= 2) & (d <= 3)).mean() > 0.4 and np.median(d) < 3.0 and d.min() >= 2.0 - 1e-9 and d.max() <= 9.5
    assert 0.15 < (depth < 0.45).mean() < 0.35 and depth.min() >= 0.25       # some faint
    assert bloom.min() >= 1.1 and bloom.max() <= 1.7


def test_blooming_profile_reaches_beyond_the_label_with_partial_volume():
    from cmb_synthesis.phantom.lesions import LABEL_RHO, LesionSpec, _blooming_profile, _rho

    spacing, reach, frac, rot = np.array(SPACING), 6, np.array([0.2, -0.1, 0.3]), np.eye(3)
    spec = LesionSpec(diameter_mm=2.5, elongation=1.0, depth=0.5, bloom=1.6)
    prof = _blooming_profile(spec, rot, spacing, reach, frac)
    rho = _rho(spec, rot, spacing, reach, frac)
    assert prof.max() == pytest.approx(1.0) and prof.min() == 0.0
    assert (prof[rho <= 1.0] > 0.95).all()                           # the deposit is fully dark
    edge_of_label = np.abs(rho - LABEL_RHO * spec.bloom) < 0.05       # the label boundary: about half-maximum
    assert 0.3 < prof[edge_of_label].mean() < 0.7
    assert (prof[(rho > 1.5) & (rho < 1.7)] > 0.2).all()             # blooming: dark beyond the label
    edge = prof[(prof > 0) & (prof < 1)]
    assert len(edge) > 20 and len(np.unique(np.round(edge, 3))) > 10  # graded partial volume, not binary
    plain = _blooming_profile(LesionSpec(2.5, 1.0, 0.5, 1.0), rot, spacing, reach, frac)
    assert (prof > 0.05).sum() > 2 * (plain > 0.05).sum()


@pytest.fixture(scope="module")
def bench_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cohort"
    return str(generate_cohort(out, preset="benchmark", seed=5, options={**SMALL, **ALL_MIMICS}, **BENCH_SPLIT))


def test_benchmark_cohort_sites_planned_lesions_and_unlabelled_mimics(bench_cohort):
    from monai.data import load_decathlon_datalist

    from cmb_synthesis.phantom import MIMIC_CODES, MIMIC_TYPES, SITES, planned_lesions
    from cmb_synthesis.phantom.benchmark import BENCHMARK_OPTIONS

    items = _items(bench_cohort)
    plan = planned_lesions("benchmark", 5, **BENCH_SPLIT)
    for split in ("training", "validation", "test"):
        got = [it["n_lesions"] for it in items if it["split"] == split and it["group"] == "pathological"]
        assert got == plan[split]
    assert {it["site"] for it in items} == set(SITES)
    assert {it["site"] for it in items if it["split"] == "training"} == {"A"}   # one per group: both start at A
    assert [it["site"] for it in items if it["split"] == "test"] == ["A", "B"]
    assert Path(load_decathlon_datalist(bench_cohort, True, "test")[0]["mimic_map"]).is_file()
    totals = dict.fromkeys(MIMIC_TYPES, 0)
    for it in items:
        lab = _load(bench_cohort, it["label"])
        code = _load(bench_cohort, it["mimic_map"])
        swi = _load(bench_cohort, it["image"]).astype(np.float64)
        rows = list(csv.DictReader(open(Path(bench_cohort).parent / it["mimics"])))
        assert {t: sum(r["type"] == t for r in rows) for t in MIMIC_TYPES} == it["mimic_counts"]
        for t in MIMIC_TYPES:
            totals[t] += it["mimic_counts"][t]
        for r in csv.DictReader(open(Path(bench_cohort).parent / it["lesions"])):
            assert lab[int(r["i"]), int(r["j"]), int(r["k"])] == int(r["label"])
            assert float(r["diameter_mm"]) > float(r["deposit_diameter_mm"])      # labelled as seen: bloomed
            lo = min(BENCHMARK_OPTIONS["faint_depth"][0], BENCHMARK_OPTIONS["lesion_depth"][0])
            hi = max(BENCHMARK_OPTIONS["faint_depth"][1], BENCHMARK_OPTIONS["lesion_depth"][1])
            assert 1.1 <= float(r["bloom"]) <= 1.7 and lo <= float(r["contrast"]) <= hi
        # mimics are never labelled, nor touching a label
        assert not (ndimage.binary_dilation(code > 0) & (lab > 0)).any()
        for t in ("basal_ganglia_mineralisation", "pineal_calcification", "choroid_plexus_calcification", "flow_void"):
            m = code == MIMIC_CODES[t]
            assert m.any(), (it["id"], t)
            ring = ndimage.binary_dilation(m, iterations=3) & ~ndimage.binary_dilation(m) & (code == 0)
            # dark against its surroundings: on average (its mask includes a partial-volume rim, blurred
            # through-plane at site B: a 3 mm calcification there averages ~0.83 of its ring) and at its core
            assert swi[m].mean() < 0.9 * swi[ring].mean(), (it["id"], t)
            assert swi[m].min() < 0.75 * swi[ring].mean(), (it["id"], t)
        for r in rows:
            if r["type"] in ("basal_ganglia_mineralisation", "pineal_calcification", "flow_void"):
                assert code[int(r["i"]), int(r["j"]), int(r["k"])] > 0
    assert all(v > 0 for v in totals.values()), totals


def test_two_sites_differ_in_noise_and_slice_thickness():
    from cmb_synthesis.phantom import SITES
    from cmb_synthesis.phantom.subject import slice_profile

    assert np.allclose(slice_profile(2.0, 1.0), [0.25, 0.5, 0.25]) and np.allclose(slice_profile(1.0, 1.0), [1.0])
    assert SITES["A"]["slice_thickness_mm"] != SITES["B"]["slice_thickness_mm"]
    kw = dict(shape=(96, 96, 64), n_cortical_veins=20, n_medullary_veins=20)
    ratio = {}
    for site, opts in SITES.items():
        s = simulate_subject(3, False, site=site, **kw, **opts)
        assert s.site == site
        # noise: Rayleigh background far from the head, mean = sigma * sqrt(pi / 2), sigma = 400 / SNR
        far = ndimage.distance_transform_edt(s.brainmask == 0, sampling=(0.98, 0.98, 1.0)) > 11
        snr = 400.0 / (s.swi[far].mean() / np.sqrt(np.pi / 2))
        assert opts["snr"][0] * 0.9 <= snr <= opts["snr"][1] * 1.1, (site, snr)
        # slice thickness, noise-free: through-plane vs in-plane gradient energy inside the brain
        q = simulate_subject(3, False, site=site, **kw, **{**opts, "snr": (1e6, 1e6)})
        b = q.brainmask > 0
        gz = np.diff(q.swi, axis=2)[b[:, :, 1:]]
        gx = np.diff(q.swi, axis=0)[b[1:]]
        ratio[site] = float((gz ** 2).mean() / (gx ** 2).mean())
    assert SITES["A"]["snr"][0] > SITES["B"]["snr"][1]          # disjoint noise ranges
    assert ratio["B"] < 0.75 * ratio["A"], ratio                 # 2 mm slices: smoother through-plane


def test_default_preset_unchanged():
    """The default phantom (no realism option) keeps its exact integer outputs and intensities."""
    import hashlib

    s = simulate_subject(5, True, **SMALL)
    h = hashlib.sha256()
    for a in (s.cmb, s.veins, s.tissue, s.brainmask):
        h.update(np.ascontiguousarray(a).tobytes())
    assert h.hexdigest() == "f8d7200acf202d4309dd5860f6d50068a0b814070ddbc599d8f66e9813ef79c5"
    assert s.lesions[0] == {"label": 1, "i": 35, "j": 51, "k": 34, "diameter_mm": 5.092, "volume_mm3": 69.149,
                            "elongation": 1.573, "x": -12.25, "y": 3.43, "z": 2.5}
    swi = s.swi.astype(np.float64)
    assert swi.mean() == pytest.approx(177.39659137314436, rel=1e-6)
    assert swi.std() == pytest.approx(159.73694754075234, rel=1e-6)
    w = np.arange(swi.size, dtype=np.float64).reshape(swi.shape) % 97
    assert (swi * w).sum() == pytest.approx(5024030430.950249, rel=1e-6)
    assert s.mimics is None and s.site is None


def test_cli_accepts_the_benchmark_preset(tmp_path):
    r = _cli("--output", str(tmp_path / "missing" / "cohort"), "--preset", "benchmark")
    assert r.returncode == 2 and "does not exist" in r.stderr          # checked past the preset choice
    r = _cli("--output", str(tmp_path / "x"), "--preset", "hard")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = _cli("--output", str(tmp_path / "y"), "--preset", "benchmark", "--option", "fiant_fraction=0.3")
    assert r.returncode == 2 and "fiant_fraction" in r.stderr and "faint_fraction" in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_benchmark_lesion_model_knobs_keep_the_default_draws():
    from cmb_synthesis.phantom.lesions import sample_benchmark_specs

    base = sample_benchmark_specs(np.random.default_rng(1), 500)
    same = sample_benchmark_specs(np.random.default_rng(1), 500, 0.25, 2.0, (0.45, 0.8), (0.25, 0.45))
    assert base == same                                   # the knobs at their defaults draw exactly as before
    big = sample_benchmark_specs(np.random.default_rng(1), 2000, deposit_median_mm=2.6, depth=(0.6, 0.85))
    small = sample_benchmark_specs(np.random.default_rng(1), 2000)
    app = lambda specs: np.median([s.diameter_mm * s.bloom for s in specs])   # noqa: E731
    assert app(big) > app(small) + 0.5
    deep = np.array([s.depth for s in big])
    assert ((deep >= 0.6) | (deep <= 0.45)).all()
    for bad in (dict(deposit_median_mm=0.0), dict(depth=(0.8, 0.5)), dict(faint_depth=(0.2, 1.0))):
        with pytest.raises(ValueError):
            sample_benchmark_specs(np.random.default_rng(0), 3, **bad)


def test_site_overrides_apply_to_one_site_and_are_recorded(tmp_path):
    split = dict(n_train_pathological=0, n_train_healthy=2, n_val_pathological=0, n_val_healthy=0,
                 n_test_pathological=0, n_test_healthy=0)
    small = dict(shape=(64, 64, 48), n_cortical_veins=5, n_medullary_veins=5)
    dl = generate_cohort(tmp_path / "c", preset="benchmark", seed=2, options=small,
                         site_overrides={"B": {"snr": [60.0, 60.0]}}, **split)
    meta = json.loads((Path(dl).parent / "cohort.json").read_text())
    from cmb_synthesis.phantom import SITES

    assert meta["sites"]["B"]["snr"] == [60.0, 60.0] and meta["sites"]["A"]["snr"] == list(SITES["A"]["snr"])
    assert SITES["B"]["snr"] != [60.0, 60.0]              # the preset itself is untouched
    items = {it["site"]: it for it in _items(str(dl))}
    noise = {}
    for site, it in items.items():
        swi, mask = _load(str(dl), it["image"]), _load(str(dl), it["brainmask"])
        far = ndimage.distance_transform_edt(mask == 0) > 8
        noise[site] = float(swi[far].mean())
    assert noise["B"] < noise["A"]                         # SNR 60 at site B: less noise than site A (24-34)
    with pytest.raises(ValueError, match="unknown site 'C'"):
        generate_cohort(tmp_path / "d", preset="benchmark", site_overrides={"C": {"snr": [1, 2]}}, **split)
    with pytest.raises(ValueError, match="no sites"):
        generate_cohort(tmp_path / "e", preset="default", site_overrides={"A": {"snr": [1, 2]}}, **split)
    with pytest.raises(ValueError, match="snrr"):
        generate_cohort(tmp_path / "f", preset="benchmark", site_overrides={"B": {"snrr": [1, 2]}}, **split)
    r = _cli("--output", str(tmp_path / "g"), "--preset", "benchmark", "--site-option", "snr=[1, 2]")
    assert r.returncode == 2 and "SITE:KEY=VALUE" in r.stderr
    assert not any((tmp_path / n).exists() for n in "defg")


def test_min_mean_lesions_override_plans_more_cmbs(tmp_path):
    from cmb_synthesis.phantom import planned_lesions

    base = planned_lesions("benchmark", 0)
    more = planned_lesions("benchmark", 0, min_mean_lesions=9.0)
    assert all(sum(more[s]) >= 9 * len(more[s]) for s in more) and sum(more["test"]) > sum(base["test"])
    assert planned_lesions("benchmark", 0, min_mean_lesions=None) == base
    with pytest.raises(ValueError, match="plans no lesion counts"):
        generate_cohort(tmp_path / "x", preset="default", min_mean_lesions=9.0)
    r = _cli("--output", str(tmp_path / "y"), "--preset", "benchmark", "--min-mean-lesions", "40")
    assert r.returncode == 2 and "maximum" in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

"""FROC evaluation: hand-computed cases, bootstrap, paired difference, candidates CSV, bad input, CLI."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from cmb_synthesis.evaluation import __main__ as froc_cli
from cmb_synthesis.evaluation import report as froc
from cmb_synthesis.evaluation.froc import evaluate, froc_curve, paired_bootstrap_difference
from cmb_synthesis.evaluation.hits import ScanResult, match_candidates


def _labels():
    lab = np.zeros((10, 10, 10), np.uint16)
    lab[1:3, 1:3, 1:3] = 1
    lab[5:7, 5:7, 5:7] = 2
    lab[8, 8, 8] = 3
    return lab


def test_match_candidates_duplicates_misses_fps():
    # lesion 1 hit twice (0.9 and 0.5: counts once, 0.5 is not an FP), lesion 2 once, lesion 3 missed, 2 FPs
    coords = [[1, 1, 1], [2, 2, 2], [5, 5, 5], [0, 0, 0], [9, 9, 9]]
    r = match_candidates("a", coords, [0.9, 0.5, 0.3, 0.8, 0.1], _labels())
    np.testing.assert_array_equal(r.lesion_scores, [0.9, 0.3, np.nan])
    np.testing.assert_array_equal(np.sort(r.fp_scores), [0.1, 0.8])
    empty = match_candidates("h", np.zeros((0, 3), int), [], np.zeros((4, 4, 4), np.uint8))
    assert empty.lesion_scores.size == 0 and empty.fp_scores.size == 0


def _hand_results():
    a = match_candidates("a", [[1, 1, 1], [2, 2, 2], [5, 5, 5], [0, 0, 0], [9, 9, 9]], [0.9, 0.5, 0.3, 0.8, 0.1],
                         _labels())
    b = ScanResult("b", [], [0.95, 0.2])  # a scan without lesions, two FPs
    return [a, b]


def test_froc_curve_hand_computed():
    fp, sens, thr = froc_curve(_hand_results())
    # thresholds: inf, .95(FP b), .9(hit L1), .8(FP a), .3(hit L2), .2(FP b), .1(FP a); 2 scans, 3 lesions
    np.testing.assert_array_equal(thr, [np.inf, 0.95, 0.9, 0.8, 0.3, 0.2, 0.1])
    np.testing.assert_allclose(fp, [0, 0.5, 0.5, 1.0, 1.0, 1.5, 2.0])
    np.testing.assert_allclose(sens, [0, 0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3])


def test_evaluate_hand_computed_and_reproducible():
    m = evaluate(_hand_results(), n_bootstrap=300, seed=3)
    assert m["n_scans"] == 2 and m["n_lesions"] == 3 and m["n_lesions_hit"] == 2 and m["n_false_positives"] == 4
    # step interpolation: best sensitivity at mean FP/scan <= rate; the ceiling (2/3) beyond the last point
    assert m["sensitivity_at_fp"] == pytest.approx({"1": 2 / 3, "2": 2 / 3, "4": 2 / 3, "8": 2 / 3, "10": 2 / 3,
                                                    "20": 2 / 3})
    # CPM: rates 1/8, 1/4 -> 0; 1/2 -> 1/3; 1, 2, 4, 8 -> 2/3
    assert m["cpm"] == pytest.approx((1 / 3 + 4 * 2 / 3) / 7)
    assert m["fp_per_scan_at_sensitivity_90"]["value"] is None  # never reaches 90 %
    assert m["fp_per_scan_at_sensitivity_90"]["ci95"] == [None, None]
    lo, hi = m["cpm_ci95"]
    assert lo <= m["cpm"] <= hi
    again = evaluate(_hand_results(), n_bootstrap=300, seed=3)
    assert json.dumps(again, sort_keys=True) == json.dumps(m, sort_keys=True)
    json.dumps(m, allow_nan=False)  # strictly valid JSON (no inf/NaN)


def test_sensitivity_90_and_bootstrap_seed():
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[1, 1, 1], lab[4, 4, 4] = 1, 2
    results = []
    for s in range(6):  # each scan: two lesions hit at 0.9 / 0.4, FPs at 0.95 and 0.5
        results.append(match_candidates(f"s{s}", [[1, 1, 1], [4, 4, 4], [0, 0, 0], [3, 3, 3]],
                                         [0.9, 0.4 + 0.01 * s, 0.95, 0.5], lab))
    m = evaluate(results, n_bootstrap=200, seed=0)
    # 90 % sensitivity needs 11 of 12 lesions: threshold 0.41 -> all FPs above 0.41 counted: 2 per scan
    assert m["fp_per_scan_at_sensitivity_90"]["value"] == pytest.approx(2.0)
    assert m["sensitivity_at_fp"]["1"] == pytest.approx(0.5)
    assert m["sensitivity_at_fp"]["2"] == pytest.approx(1.0)
    assert m["sensitivity_at_fp_ci95"]["2"] == pytest.approx([1.0, 1.0])
    other = evaluate(results, n_bootstrap=200, seed=1)
    assert other["curve"] == m["curve"]
    band_a, band_b = np.array(m["curve_ci95"]["low"]), np.array(other["curve_ci95"]["low"])
    assert band_a.shape == band_b.shape


def test_bootstrap_ci_varies_with_seed_and_covers_point():
    rng = np.random.default_rng(0)
    results = []
    for s in range(12):
        n_les = int(rng.integers(0, 5))
        les = np.where(rng.random(n_les) < 0.7, rng.random(n_les), np.nan)
        results.append(ScanResult(f"s{s}", les, rng.random(int(rng.integers(0, 30))) * 0.8))
    m0 = evaluate(results, n_bootstrap=500, seed=0)
    m1 = evaluate(results, n_bootstrap=500, seed=1)
    assert m0["sensitivity_at_fp_ci95"] != m1["sensitivity_at_fp_ci95"] or m0["cpm_ci95"] != m1["cpm_ci95"]
    for r in ("1", "10"):
        lo, hi = m0["sensitivity_at_fp_ci95"][r]
        assert lo <= m0["sensitivity_at_fp"][r] <= hi and 0 <= lo <= hi <= 1
    low, high = np.array(m0["curve_ci95"]["low"]), np.array(m0["curve_ci95"]["high"])
    assert np.all(low <= high + 1e-12)


def test_paired_bootstrap_difference():
    res = _hand_results()
    same = paired_bootstrap_difference(res, list(reversed(res)), fp_rate=1, n_bootstrap=200, seed=0)
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0]
    worse = [ScanResult("a", [0.9, np.nan, np.nan], res[0].fp_scores), res[1]]
    d = paired_bootstrap_difference(res, worse, fp_rate=1, n_bootstrap=200, seed=0)
    assert d["difference"] == pytest.approx(1 / 3) and d["ci95"][0] >= 0
    with pytest.raises(ValueError, match="same, unique scan ids"):
        paired_bootstrap_difference(res, res[:1])


def test_no_lesions_is_an_error():
    with pytest.raises(ValueError, match="no lesions"):
        evaluate([ScanResult("h", [], [0.5])])
    with pytest.raises(ValueError, match="outside"):
        match_candidates("x", [[10, 0, 0]], [0.5], _labels())


def _write_scan(folder, sid, labels, affine):
    img = np.ones(labels.shape, np.float32)
    nib.save(nib.Nifti1Image(img, affine), str(folder / f"{sid}_swi.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(folder / f"{sid}_cmb.nii.gz"))
    return {"image": f"{sid}_swi.nii.gz", "label": f"{sid}_cmb.nii.gz", "id": sid, "group": "pathological"}


@pytest.fixture()
def small_cohort(tmp_path):
    affine = np.array([[0.98, 0, 0, -70.0], [0, 0.98, 0, -90.0], [0, 0, 1.0, -50.0], [0, 0, 0, 1]])
    items = [_write_scan(tmp_path, "s1", _labels(), affine)]
    lab2 = np.zeros((10, 10, 10), np.uint16)
    lab2[4, 4, 4] = 1
    items.append(_write_scan(tmp_path, "s2", lab2, affine))
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": [], "validation": [], "test": items}))
    return tmp_path, dl, affine


def test_candidates_csv_world_coordinates_and_evaluate_csv(small_cohort):
    folder, dl, affine = small_cohort
    rows = froc.candidate_rows("s1_swi.nii.gz", [[1, 1, 1], [0, 0, 0]], [0.9, 0.2], affine)
    rows += froc.candidate_rows("s2_swi.nii.gz", [[4, 4, 4], [9, 0, 3]], [0.7, 0.6], affine)
    assert (rows[0]["x"], rows[0]["y"], rows[0]["z"]) == pytest.approx((-70 + 0.98, -90 + 0.98, -49.0))
    assert (rows[3]["x"], rows[3]["y"], rows[3]["z"]) == pytest.approx((-70 + 9 * 0.98, -90.0, -47.0))
    csv_path = froc.write_candidates_csv(rows, folder / "candidates.csv")
    back = froc.read_candidates_csv(csv_path)
    assert [r["i"] for r in back] == [1, 0, 4, 9] and back[1]["probability"] == 0.2
    out = folder / "report"
    m = froc.evaluate_csv(csv_path, dl, split="test", out_dir=out, n_bootstrap=50, seed=0)
    # 4 lesions (3 in s1, 1 in s2), hits: L1 of s1 (0.9), s2's lesion (0.7); FPs 0.6 and 0.2 over 2 scans
    assert m["n_lesions"] == 4 and m["n_scans"] == 2
    assert m["sensitivity_at_fp"]["1"] == pytest.approx(0.5)
    assert {p.name for p in out.iterdir()} == {"metrics.json", "froc.csv", "froc.png"}
    assert json.loads((out / "metrics.json").read_text())["n_lesions"] == 4
    assert (out / "froc.csv").read_text().splitlines()[0] == "threshold,fp_per_scan,sensitivity"
    # the command line does the same
    out2 = folder / "cli"
    assert froc_cli.main(["--candidates", str(csv_path), "--datalist", str(dl), "--output_dir", str(out2),
                      "--n_bootstrap", "20"]) == 0
    assert json.loads((out2 / "metrics.json").read_text())["sensitivity_at_fp"]["1"] == pytest.approx(0.5)


def test_bad_candidates_csv_and_datalist(small_cohort, capsys):
    folder, dl, affine = small_cohort
    bad = folder / "missing_cols.csv"
    bad.write_text("image,i,j,k,probability\ns1_swi.nii.gz,1,1,1,0.5\n")
    with pytest.raises(ValueError, match=r"missing_cols.csv.*lacks columns \['x', 'y', 'z'\]"):
        froc.read_candidates_csv(bad)
    outside = folder / "outside.csv"
    rows = froc.candidate_rows("s1_swi.nii.gz", [[1, 1, 1], [12, 0, 0]], [0.5, 0.4], affine)
    froc.write_candidates_csv(rows, outside)
    with pytest.raises(ValueError, match=r"outside.csv: row 2: voxel \[12, 0, 0\] lies outside"):
        froc.evaluate_csv(outside, dl, n_bootstrap=0)
    wrong_world = folder / "world.csv"
    rows = froc.candidate_rows("s1_swi.nii.gz", [[1, 1, 1]], [0.5], np.eye(4))
    froc.write_candidates_csv(rows, wrong_world)
    with pytest.raises(ValueError, match=r"world.csv: row 1: world coordinates"):
        froc.evaluate_csv(wrong_world, dl, n_bootstrap=0)
    unknown = folder / "unknown.csv"
    froc.write_candidates_csv(froc.candidate_rows("zz_swi.nii.gz", [[1, 1, 1]], [0.5], affine), unknown)
    with pytest.raises(ValueError, match="'zz_swi.nii.gz' is not one of the evaluated images"):
        froc.evaluate_csv(unknown, dl, n_bootstrap=0)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        froc.read_candidates_csv(folder / "nope.csv")
    (folder / "s2_cmb.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"datalist.json: test\[1\] names label file .*s2_cmb.nii.gz"):
        froc.evaluate_csv(outside, dl, n_bootstrap=0)
    assert froc_cli.main(["--candidates", str(outside), "--datalist", str(dl), "--output_dir", str(folder / "o")]) == 2
    assert "s2_cmb.nii.gz" in capsys.readouterr().err
    assert not (folder / "o").exists()


def test_plot_froc_panels(tmp_path):
    m = evaluate(_hand_results(), n_bootstrap=20, seed=0)
    png = froc.plot_froc_panels([{"Real": m, "Synthetic": m}, {"Real+cDA": m}], tmp_path / "fig3.png",
                                title=["(a) without cDA", "(b) with cDA"])
    assert png.is_file() and png.stat().st_size > 1000
    assert not math.isnan(m["cpm"])

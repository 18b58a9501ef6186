"""Detection pieces on small hand-made volumes: classifier shapes, hit-rule targets, sampler balance,
training-data selection, CPM metric, loading non-RAS scans, candidates.csv geometry, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cmb_synthesis.data import brainmask, datalist, naming, scans
from cmb_synthesis.detection import candidates, inference, training
from cmb_synthesis.detection.classifier import build_classifier, count_parameters


# ------------------------------------------------------------------------------------------ classifier
@pytest.mark.parametrize(
    "name,patch", [("classifier", (32, 32, 16)), ("classifier", (24, 24, 16)), ("resnet10", (32, 32, 16))]
)
def test_classifier_maps_patches_to_one_logit(name, patch):
    net = build_classifier(name, patch_size=patch, channels=(4, 8), strides=(2, 2), num_res_units=1)
    net.eval()
    with torch.no_grad():
        y = net(torch.rand(3, 1, *patch))
    assert y.shape == (3, 1) and torch.isfinite(y).all()
    assert count_parameters(net) > 0


def test_classifier_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown network"):
        build_classifier("vgg")
    with pytest.raises(ValueError, match="same length"):
        build_classifier(channels=(4, 8), strides=(2,))
    with pytest.raises(ValueError, match="patch_size"):
        build_classifier(patch_size=(32, 32))


# ------------------------------------------------------------------------------------- hit-rule targets
def test_label_candidates_follows_the_hit_rule():
    lab = np.zeros((10, 10, 10), np.uint16)
    lab[2:4, 2:4, 2:4] = 5  # lesion 5
    lab[7, 7, 7] = 9  # one-voxel lesion 9
    coords = np.array([[2, 2, 2], [3, 3, 3], [4, 4, 4], [7, 7, 7], [0, 0, 0], [7, 7, 6]])
    targets, ids = candidates.label_candidates(coords, torch.as_tensor(lab[None].astype(np.int32)))
    np.testing.assert_array_equal(targets, [1, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(ids, [5, 5, 0, 9, 0, 0])  # two hits on lesion 5: both positive samples
    assert targets.dtype == np.float32
    t0, i0 = candidates.label_candidates(np.zeros((0, 3), int), lab)
    assert t0.shape == (0,) and i0.shape == (0,)
    with pytest.raises(ValueError, match="outside"):
        candidates.label_candidates(np.array([[10, 0, 0]]), lab)


# ---------------------------------------------------------------------------------------------- sampler
def test_balanced_sampler_draws_the_asked_positive_fraction_reproducibly():
    labels = np.r_[np.ones(10), np.zeros(990)]
    draws = list(training.balanced_sampler(labels, pos_fraction=0.5, num_samples=4000, seed=3))
    assert len(draws) == 4000
    frac = float(np.mean(labels[draws]))
    assert abs(frac - 0.5) < 0.04  # 4000 Bernoulli(0.5) draws: sd 0.008
    assert len(set(d for d in draws if labels[d] == 1)) == 10  # every positive is used
    assert draws == list(training.balanced_sampler(labels, 0.5, 4000, seed=3))
    assert draws != list(training.balanced_sampler(labels, 0.5, 4000, seed=4))
    frac25 = float(np.mean(labels[list(training.balanced_sampler(labels, 0.25, 4000, seed=0))]))
    assert abs(frac25 - 0.25) < 0.04
    uniform = list(training.balanced_sampler(np.zeros(50), 0.5, 100, seed=0))  # healthy-only set: uniform
    assert len(uniform) == 100 and max(uniform) < 50
    with pytest.raises(ValueError, match="no samples"):
        training.balanced_sampler([], 0.5)
    with pytest.raises(ValueError, match="pos_fraction"):
        training.balanced_sampler(labels, 1.0)


def test_patch_transforms_cast_and_cda_switch():
    x = {"image": torch.rand(1, 16, 16, 8).half(), "label": torch.tensor([1.0])}
    out = training.patch_transforms(False)(dict(x))
    assert out["image"].dtype == torch.float32 and torch.equal(out["image"], x["image"].float())
    aug = training.patch_transforms("true", prob=1.0, flip=True, padding_mode="border")
    aug.set_random_state(0)
    out = aug(dict(x))
    assert out["image"].shape == (1, 16, 16, 8) and not torch.allclose(out["image"], x["image"].float())
    assert out["label"].item() == 1.0
    with pytest.raises(ValueError, match="boolean"):
        training.patch_transforms("maybe")


# ------------------------------------------------------------------------------ training-data selection
def _fake_datalist(folder: Path, n_path: int, n_healthy: int, key: str = "training", prefix: str = "real") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n_path + n_healthy):
        group = "pathological" if i < n_path else "healthy"
        it = {"id": f"{prefix}{i}", "group": group}
        for k in ("image", "label", "brainmask"):
            name = f"{prefix}{i}_{k}.nii.gz"
            (folder / name).write_bytes(b"")
            it[k] = name
        items.append(it)
    path = folder / "datalist.json"
    path.write_text(json.dumps({key: items, "validation": [], "test": []}))
    return path


def test_training_items_real_synthetic_and_one_to_one_mix(tmp_path):
    real = _fake_datalist(tmp_path / "real", n_path=4, n_healthy=2)
    syn_dir = tmp_path / "synthetic"
    _fake_datalist(syn_dir, n_path=7, n_healthy=0, prefix="synthetic")
    r = training.training_items(real, "real")
    assert [it["id"] for it in r] == [f"real{i}" for i in range(6)]
    assert all(Path(it["image"]).is_absolute() for it in r)
    s = training.training_items(real, "synthetic", syn_dir)
    assert [it["id"] for it in s] == [f"synthetic{i}" for i in range(7)] and all(it["synthetic"] for it in s)
    m = training.training_items(real, "real+synthetic", syn_dir, ratio=1.0, seed=0)
    n_syn = sum(1 for it in m if it.get("synthetic"))
    assert len(m) == 6 + 4 and n_syn == 4  # as many synthetic scans as real pathological ones
    assert training.training_items(real, "real+synthetic", syn_dir, seed=0) == m  # seeded
    assert sum(1 for it in training.training_items(real, "real+synthetic", syn_dir, ratio=3.0) if it.get("synthetic")) == 7
    with pytest.raises(ValueError, match="training_data"):
        training.training_items(real, "fake")
    with pytest.raises(FileNotFoundError, match="synthetic datalist"):
        training.training_items(real, "synthetic", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="synthetic_dir"):
        training.training_items(real, "real+synthetic", None)


def test_datalist_naming_a_missing_file_is_a_clear_error(tmp_path):
    path = _fake_datalist(tmp_path, 2, 0)
    (tmp_path / "real1_label.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="real1_label.nii.gz"):
        datalist.load_split(path, "training")
    with pytest.raises(FileNotFoundError, match="datalist does not exist"):
        datalist.load_split(tmp_path / "none.json", "training")
    with pytest.raises(ValueError, match="no 'nosplit'"):
        datalist.load_split(path, "nosplit")


# ------------------------------------------------------------------------------------------ CPM metric
def test_candidate_cpm_matches_froc_evaluate_on_hand_made_scans():
    from cmb_synthesis.evaluation.froc import evaluate
    from cmb_synthesis.evaluation.hits import ScanResult

    scans = [{"id": "a", "n_lesions": 2}, {"id": "b", "n_lesions": 1}, {"id": "c", "n_lesions": 0}]
    metric = training.CandidateCPM(scans)
    metric.reset()
    # scan a: lesion 1 hit twice (0.9, 0.4), lesion 2 missed; FP 0.8. scan b: lesion 3 hit 0.3; FP 0.95, 0.1
    # scan c (healthy): FP 0.5
    probs = [0.9, 0.4, 0.8, 0.3, 0.95, 0.1, 0.5]
    scan = [0, 0, 0, 1, 1, 1, 2]
    lesion = [1, 1, 0, 3, 0, 0, 0]
    metric.update((torch.tensor(probs[:4]), torch.tensor(scan[:4]), torch.tensor(lesion[:4])))
    metric.update((torch.tensor(probs[4:]), torch.tensor(scan[4:]), torch.tensor(lesion[4:])))
    expected = evaluate([ScanResult("a", [0.9, np.nan], [0.8]), ScanResult("b", [0.3], [0.95, 0.1]),
                         ScanResult("c", [], [0.5])], n_bootstrap=0)["cpm"]
    assert metric.compute() == pytest.approx(expected)
    # hand computation: thresholds 0.95 (FP/scan 1/3, sens 0), 0.9 (1/3, 1/3), 0.8 (2/3, 1/3), 0.5 (1, 1/3),
    # 0.3 (1, 2/3), 0.1 (4/3, 2/3): sensitivities at 1/8, 1/4, 1/2, 1, 2, 4, 8 FP/scan = 0, 0, 1/3, 2/3, 2/3 x3
    assert metric.compute() == pytest.approx((0 + 0 + 1 / 3 + 4 * 2 / 3) / 7)
    empty = training.CandidateCPM([{"id": "h", "n_lesions": 0}])
    empty.reset()
    empty.update((torch.tensor([0.2]), torch.tensor([0]), torch.tensor([0])))
    assert empty.compute() == 0.0


# --------------------------------------------------------------------------------- loading and geometry
def _blob_scan(folder: Path, affine: np.ndarray, name: str = "s1") -> dict[str, Path]:
    """A small SWI-like volume with three dark spheres (instance labels 1..3) and a dark tube, in the
    array order given by ``affine`` (the arrays are built in RAS and reoriented to the affine's axes)."""
    rng = np.random.default_rng(0)
    shape = (48, 44, 36)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    img = (100 + rng.normal(0, 3, shape)).astype(np.float32)
    lab = np.zeros(shape, np.uint16)
    for i, (cx, cy, cz, r) in enumerate([(16, 16, 18, 2), (32, 26, 12, 1.5), (24, 32, 24, 2.5)], 1):
        s = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= r * r
        img[s], lab[s] = 30, i
    img[((x - 36) ** 2 + (y - 12) ** 2) <= 4] = 40
    bm = np.zeros(shape, np.uint8)
    bm[4:-4, 4:-4, 3:-3] = 1
    ras_affine = np.diag([0.98, 0.98, 1.0, 1.0])
    ras_affine[:3, 3] = (-20, -20, -15)
    folder.mkdir(parents=True, exist_ok=True)
    from nibabel.orientations import io_orientation, ornt_transform

    ornt = ornt_transform(io_orientation(ras_affine), io_orientation(affine))
    paths = {}
    for key, arr in (("image", img), ("brainmask", bm), ("label", lab)):
        out = nib.Nifti1Image(arr, ras_affine).as_reoriented(ornt)
        suffix = {"image": "swi", "brainmask": "brainmask", "label": "cmb"}[key]
        paths[key] = folder / f"{name}_{suffix}.nii.gz"
        nib.save(out, str(paths[key]))
    return paths


def test_load_scan_candidates_and_rows_in_the_input_space(tmp_path):
    las = np.diag([-0.98, 0.98, 1.0, 1.0])  # x flipped: stored LAS, processed in RAS
    paths = _blob_scan(tmp_path, las)
    scan = scans.load_scan(paths["image"], paths["brainmask"], paths["label"])
    assert scan["id"] == "s1" and scan["image"].shape == (1, 48, 44, 36)
    assert float(scan["image"].min()) >= 0.0 and float(scan["image"].max()) == pytest.approx(1.0)
    assert np.allclose(scan["affine"][:3, :3], np.diag([0.98, 0.98, 1.0]), atol=1e-5)
    coords, scores = candidates.scan_candidates(scan, cache_dir=tmp_path / "cache")
    targets, ids = candidates.label_candidates(coords, scan["label"])
    assert set(ids[ids > 0]) == {1, 2, 3}  # every dark sphere is a candidate
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1
    c2, s2 = candidates.scan_candidates(scan, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(c2, coords)
    assert len(candidates.scan_candidates(scan, {"max_candidates": 5}, tmp_path / "cache")[0]) == 5  # settings in the key
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    # candidates.csv rows: voxels in the stored (LAS) grid, world = input affine @ voxel, same lesion label
    rows = inference._rows(scan, coords, np.linspace(1, 0, len(coords)))
    stored = nib.load(str(paths["label"]))
    lab_stored = np.asarray(stored.dataobj)
    for r, lesion in zip(rows, ids):
        ijk = np.array([r["i"], r["j"], r["k"]])
        np.testing.assert_allclose([r["x"], r["y"], r["z"]], nib.affines.apply_affine(stored.affine, ijk), atol=1e-3)
        assert lab_stored[tuple(ijk)] == lesion
        assert r["image"] == "s1_swi.nii.gz"


def test_mask_on_another_grid_and_missing_image_are_named(tmp_path):
    paths = _blob_scan(tmp_path, np.diag([0.98, 0.98, 1.0, 1.0]))
    bad = tmp_path / "other_brainmask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4)), str(bad))
    with pytest.raises(ValueError, match="other_brainmask"):
        scans.load_scan(paths["image"], bad)
    with pytest.raises(FileNotFoundError, match="missing_swi"):
        scans.load_scan(tmp_path / "missing_swi.nii.gz")


def test_estimated_brainmask_covers_the_head_and_keeps_dark_lesions():
    shape = (40, 40, 30)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    head = (x - 20) ** 2 + (y - 20) ** 2 + ((z - 15) * 1.2) ** 2 <= 14**2
    img = np.where(head, 100.0, 5.0) + np.random.default_rng(0).normal(0, 2, shape)
    lesion = (x - 20) ** 2 + (y - 20) ** 2 + (z - 15) ** 2 <= 4
    img[lesion] = 10.0  # as dark as background, inside the head
    m = brainmask.estimate_brainmask(img, (1.0, 1.0, 1.0), method="otsu")  # the head-mask fallback
    assert m.dtype == np.uint8 and m[lesion].all()
    from scipy import ndimage

    core = ndimage.binary_erosion(head, iterations=3)
    assert m[core].all() and m[~head].mean() < 0.01
    with pytest.raises(ValueError, match="constant"):
        brainmask.estimate_brainmask(np.ones(shape), method="otsu")


def test_draw_balls_puts_values_on_small_balls_in_any_grid():
    from cmb_synthesis.detection import outputs

    pm = outputs.draw_balls((20, 20, 20), np.eye(4), np.array([[5, 5, 5], [6, 5, 5], [19, 19, 19]]),
                            np.array([0.2, 0.7, 0.4]), radius_mm=1.0)
    assert pm.dtype == np.float32 and pm[5, 5, 5] == pytest.approx(0.7)  # overlap: the max
    assert pm[4, 5, 5] == pytest.approx(0.2) and pm[19, 19, 19] == pytest.approx(0.4)
    assert pm[10, 10, 10] == 0 and (pm > 0).sum() == 7 + 7 - 2 + 4  # two 7-voxel balls sharing 2 voxels, a clipped corner ball
    # labels: the first (most probable) keeps shared voxels
    lab = outputs.draw_balls((20, 20, 20), np.eye(4), np.array([[6, 5, 5], [5, 5, 5]]), np.array([1, 2]), 1.0,
                             np.uint16, "first")
    assert lab.dtype == np.uint16 and lab[5, 5, 5] == 1 and lab[6, 5, 5] == 1 and lab[4, 5, 5] == 2
    # an oblique, anisotropic grid (0.5 x 0.5 x 2 mm rotated 10 degrees): every voxel of the ball is within the
    # radius in world mm, and the ball holds the voxels a brute-force distance test finds
    t = np.deg2rad(10)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.5, 0.5, 2.0])
    centre = nib.affines.apply_affine(aff, [10.3, 9.6, 5.2])
    ball = outputs.draw_balls((20, 20, 10), aff, centre[None], [1.0], 1.5) > 0
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (20, 20, 10)], indexing="ij"), -1)
    dist = np.linalg.norm(nib.affines.apply_affine(aff, grid) - centre, axis=-1)
    np.testing.assert_array_equal(ball, dist <= 1.5)
    # world -> input voxels is the inverse affine, rounded and clipped
    np.testing.assert_array_equal(outputs.world_to_voxels(centre[None], aff, (20, 20, 10)), [[10, 10, 5]])


def test_operating_point_threshold_and_overrides(tmp_path):
    """The saved threshold is the last FROC point at <= the FP rate; --fp_per_scan looks up the saved curve;
    --threshold wins; no file and no --threshold is an error; a file of another model.pt is refused."""
    from cmb_synthesis.data.io import write_json
    from cmb_synthesis.detection import operating_point as opm
    from cmb_synthesis.evaluation.hits import ScanResult

    results = [ScanResult("a", [0.9, np.nan], [0.8, 0.5, 0.1]), ScanResult("b", [0.7], [0.6, 0.3])]
    op = opm.operating_point(results, 1.0, {"spacing": [0.98, 0.98, 1.0]})
    # points: 0.9 (fp 0, 1/3), 0.8 (0.5, 1/3), 0.7 (0.5, 2/3), 0.6 (1.0, 2/3), 0.5 (1.5, ...)
    assert op["threshold"] == pytest.approx(0.6) and op["sensitivity"] == pytest.approx(2 / 3)
    assert op["fp_per_scan"] == pytest.approx(1.0) and op["n_scans"] == 2 and op["n_lesions"] == 3
    assert op["froc"]["threshold"][0] is None and op["spacing"] == [0.98, 0.98, 1.0]
    nothing = opm.operating_point([ScanResult("c", [np.nan], [0.9])], 0.5)
    assert nothing["threshold"] > 0.9 and nothing["fp_per_scan"] == 0.0
    assert opm.detections_at(results, 0.6) == {"threshold": 0.6, "sensitivity": pytest.approx(2 / 3),
                                               "fp_per_scan": 1.0, "n_lesions_detected": 2, "n_false_positives": 2}
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    path = tmp_path / "operating_point.json"
    write_json({**op, "model_sha256": opm.file_sha256(model)}, path)
    saved = opm.resolve_threshold(operating_point_path=path, model_path=model)
    assert saved["threshold"] == pytest.approx(0.6) and saved["source"] == "saved operating point"
    assert saved["spacing"] == [0.98, 0.98, 1.0]
    looked_up = opm.resolve_threshold(fp_per_scan=0.5, operating_point_path=path, model_path=model)
    assert looked_up["threshold"] == pytest.approx(0.7) and looked_up["source"] == "--fp_per_scan"
    given = opm.resolve_threshold(threshold=0.25, operating_point_path=path)
    assert given["threshold"] == 0.25 and given["source"] == "--threshold"
    with pytest.raises(ValueError, match="either --threshold or --fp_per_scan"):
        opm.resolve_threshold(0.5, 2.0, path)
    with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
        opm.resolve_threshold(threshold=1.5)
    with pytest.raises(ValueError, match="no operating point saved.*--threshold"):
        opm.resolve_threshold(operating_point_path=tmp_path / "missing.json")
    model.write_bytes(b"other weights")
    with pytest.raises(ValueError, match="another model"):
        opm.resolve_threshold(operating_point_path=path, model_path=model)


def test_load_scan_resamples_to_the_training_spacing(tmp_path):
    """A scan at 0.5 x 0.5 x 2 mm stored LPS: load_scan(spacing=) gives the RAS grid at that spacing, mask and
    labels resampled by nearest neighbour, a lesion at the same world place; at the native spacing: no resampling."""
    from nibabel.processing import resample_from_to

    paths = _blob_scan(tmp_path / "native", np.diag([0.98, 0.98, 1.0, 1.0]))
    native = scans.load_scan(paths["image"], paths["brainmask"], paths["label"], spacing=(0.98, 0.98, 1.0))
    assert not native["resampled"] and native["image"].shape == (1, 48, 44, 36)
    lps = np.diag([-0.5, -0.5, 2.0, 1.0])
    ref = nib.load(str(paths["image"]))
    centre = ref.affine[:3, :3] @ (np.array(ref.shape) / 2) + ref.affine[:3, 3]
    lps[:3, 3] = centre - lps[:3, :3] @ np.array([48, 44, 9])
    folder = tmp_path / "lps"
    folder.mkdir()
    out = {}
    for key, order in (("image", 1), ("brainmask", 0), ("label", 0)):
        img = resample_from_to(nib.load(str(paths[key])), ((96, 88, 18), lps), order=order)
        out[key] = folder / paths[key].name
        nib.save(img, str(out[key]))
    scan = scans.load_scan(out["image"], out["brainmask"], out["label"], spacing=(0.98, 0.98, 1.0))
    assert scan["resampled"] and scan["spacing"] == pytest.approx((0.98, 0.98, 1.0))
    assert scan["brainmask"].dtype == torch.uint8 and scan["label"].dtype == torch.int32
    assert set(np.unique(np.asarray(scan["label"]))) <= {0, 1, 2, 3}
    assert scan["canonical"].source_shape == (96, 88, 18)
    # each lesion's centroid lands at the same world position (within a voxel) in both grids
    for lesion in (1, 2, 3):
        def centroid(s):
            idx = np.argwhere(np.asarray(s["label"][0]) == lesion).mean(axis=0)
            return s["affine"][:3, :3] @ idx + s["affine"][:3, 3]
        assert np.linalg.norm(centroid(scan) - centroid(native)) < 1.5
    with pytest.raises(ValueError, match="spacing must be 3 positive"):
        scans.load_scan(paths["image"], paths["brainmask"], spacing=(1.0, 0.0, 1.0))


def test_find_inputs_skips_masks_labels_and_outputs(tmp_path):
    for n in ("a_swi.nii.gz", "a_brainmask.nii.gz", "a_cmb.nii.gz", "a_cmb_prob.nii.gz", "b.nii", "notes.txt",
              "c_veins.nii.gz", "c_tissue.nii.gz"):
        (tmp_path / n).write_bytes(b"")
    (tmp_path / "dicom_series").mkdir()
    assert [p.name for p in naming.find_inputs(tmp_path)] == ["a_swi.nii.gz", "b.nii", "dicom_series"]
    assert naming.find_brainmask(tmp_path / "a_swi.nii.gz").name == "a_brainmask.nii.gz"
    assert naming.find_brainmask(tmp_path / "b.nii") is None
    assert naming.scan_id_of(tmp_path / "a_swi.nii.gz") == "a" and naming.scan_id_of("x/dicom_series") == "dicom_series"
    with pytest.raises(FileNotFoundError):
        naming.find_inputs(tmp_path / "none")


def test_load_split_of_a_relative_datalist_path_gives_each_file_once(tmp_path, monkeypatch):
    """A datalist given by a relative path: item paths are joined to its folder once (absolute results)."""
    folder = tmp_path / "cohort"
    folder.mkdir()
    for name in ("a_swi.nii.gz", "a_brainmask.nii.gz"):
        (folder / name).write_bytes(b"x")
    (folder / "datalist.json").write_text(json.dumps({"test": [{"image": "a_swi.nii.gz", "brainmask": "a_brainmask.nii.gz"}]}))
    monkeypatch.chdir(tmp_path)
    (item,) = datalist.load_split("cohort/datalist.json", "test")
    assert item["image"] == str(folder / "a_swi.nii.gz") and item["brainmask"] == str(folder / "a_brainmask.nii.gz")

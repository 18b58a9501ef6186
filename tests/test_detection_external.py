"""End to end, as a hospital runs it: a phantom test scan stored at clinical resolution (0.5 x 0.5 x 2 mm), LPS,
with a 10-degree oblique affine and no brain mask goes through the bundle's `inference` and its
``<id>_detections.csv`` finds the CMBs in world coordinates about as well as the same scans in their native form
(issue 14: sensitivity no more than 10 points lower); the outputs are in the input's space."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "cmb_detection" / "configs"
# a small classifier trained enough to find a good share of the test CMBs at its saved operating point
NET = dict(device="cpu", channels=[4, 8], strides=[2, 2], num_res_units=1, patch_size=[24, 24, 16])
TRAIN = dict(batch_size=32, epoch_length=30, max_epochs=4, val_interval=1)
HIT_MM = 2.0  # a true CMB is found when a detection lies within 2 mm (world) of its centre
CLINICAL_ZOOMS = (0.5, 0.5, 2.0)
PNG = b"\x89PNG\r\n\x1a\n"


def _run(key: str, configs: list[str], bundle_root: Path, **overrides) -> None:
    from monai.bundle import run

    run(key, config_file=[str(CONFIGS / c) for c in configs], bundle_root=str(bundle_root), **{**NET, **overrides})


def oblique_lps_grid(img: nib.Nifti1Image, zooms=CLINICAL_ZOOMS, degrees: float = 10.0) -> tuple[tuple[int, ...], np.ndarray]:
    """A grid covering ``img``'s field of view: voxel size ``zooms``, axes L, P, S rotated by ``degrees`` about
    the oblique axis (1, 2, 3)/|(1, 2, 3)| (Rodrigues' formula)."""
    axis = np.array([1.0, 2.0, 3.0]) / np.linalg.norm([1.0, 2.0, 3.0])
    t = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k
    lin = rot @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(zooms)
    corners = np.array([[i, j, kk] for i in (0, img.shape[0] - 1) for j in (0, img.shape[1] - 1)
                        for kk in (0, img.shape[2] - 1)], float)
    v = nib.affines.apply_affine(img.affine, corners) @ np.linalg.inv(lin).T
    lo, hi = v.min(axis=0), v.max(axis=0)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = lin, lin @ lo
    return tuple(int(np.ceil(h - low)) + 1 for low, h in zip(lo, hi)), affine


@pytest.fixture(scope="module")
def detector(tiny_cohort, tmp_path_factory) -> Path:
    """A bundle folder with a classifier trained on the tiny cohort (models/model.pt + operating_point.json)."""
    root = tmp_path_factory.mktemp("external_detector")
    _run("training", ["train.yaml"], root, datalist=tiny_cohort, **TRAIN)
    assert (root / "models" / "operating_point.json").is_file()
    return root


@pytest.fixture(scope="module")
def external(tiny_cohort, tmp_path_factory) -> dict:
    """The test scans twice: native (as stored, with their brain masks) and clinical (0.5 x 0.5 x 2 mm, LPS,
    10-degree oblique, trilinear, no brain mask); the true CMB centres in world mm from the native labels."""
    from monai.data import load_decathlon_datalist

    base = tmp_path_factory.mktemp("external_scans")
    native, clinical = base / "native", base / "clinical"
    native.mkdir()
    clinical.mkdir()
    truth = {}
    for it in load_decathlon_datalist(tiny_cohort, True, "test"):
        sid = it["id"]
        shutil.copy(it["image"], native / f"{sid}_swi.nii.gz")
        shutil.copy(it["brainmask"], native / f"{sid}_brainmask.nii.gz")
        img = nib.load(it["image"])
        shape, affine = oblique_lps_grid(img)
        nib.save(resample_from_to(img, (shape, affine), order=1), str(clinical / f"{sid}_swi.nii.gz"))
        lab = np.asarray(nib.load(it["label"]).dataobj)
        truth[sid] = np.array([nib.affines.apply_affine(img.affine, np.argwhere(lab == v).mean(axis=0))
                               for v in np.unique(lab) if v > 0])
    assert sum(len(c) for c in truth.values()) >= 5
    return {"native": native, "clinical": clinical, "truth": truth}


def _detections(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _sensitivity(out: Path, truth: dict) -> tuple[float, int]:
    """Fraction of true CMBs with a detection within HIT_MM (world), and the number of detections."""
    found = total = n_det = 0
    for sid, centres in truth.items():
        rows = _detections(out / f"{sid}_detections.csv")
        n_det += len(rows)
        xyz = np.array([[float(r["x"]), float(r["y"]), float(r["z"])] for r in rows]).reshape(-1, 3)
        for c in centres:
            total += 1
            found += bool(len(xyz)) and float(np.linalg.norm(xyz - c, axis=1).min()) <= HIT_MM
    return found / total, n_det


def _check_outputs(folder: Path, out: Path, truth: dict) -> None:
    """Per scan: CSV (i, j, k) -> input affine -> (x, y, z); the label NIfTI in the input's grid with label k at
    row k's voxel; a PNG; summary.csv's n_detections = the CSV's rows."""
    with open(out / "summary.csv", newline="") as f:
        summary = {r["id"]: r for r in csv.DictReader(f)}
    for sid in truth:
        ref = nib.load(str(folder / f"{sid}_swi.nii.gz"))
        rows = _detections(out / f"{sid}_detections.csv")
        assert summary[sid]["status"] == "written" and int(summary[sid]["n_detections"]) == len(rows)
        probs = [float(r["probability"]) for r in rows]
        assert probs == sorted(probs, reverse=True) and [int(r["label"]) for r in rows] == list(range(1, len(rows) + 1))
        half_voxel = 0.5 * float(np.linalg.norm(nib.affines.voxel_sizes(ref.affine))) + 1e-3
        labels = nib.load(str(out / f"{sid}_detections.nii.gz"))
        assert labels.shape == ref.shape and np.allclose(labels.affine, ref.affine, atol=1e-5)
        lab = np.asarray(labels.dataobj)
        assert lab.dtype == np.uint16 and int(lab.max()) == len(rows)
        for r in rows:
            ijk = [int(r["i"]), int(r["j"]), int(r["k"])]
            xyz = np.array([float(r["x"]), float(r["y"]), float(r["z"])])
            assert np.linalg.norm(nib.affines.apply_affine(ref.affine, ijk) - xyz) <= half_voxel  # nearest voxel
            assert lab[tuple(ijk)] == int(r["label"])
        assert (out / f"{sid}_qc.png").read_bytes()[:8] == PNG
        prob = nib.load(str(out / f"{sid}_cmb_prob.nii.gz"))
        assert prob.shape == ref.shape and np.allclose(prob.affine, ref.affine, atol=1e-5)


@pytest.mark.e2e
def test_clinical_oblique_scan_without_mask_is_detected_as_well_as_native(detector, external, tmp_path):
    truth = external["truth"]
    outs = {}
    for form in ("native", "clinical"):
        outs[form] = tmp_path / form
        _run("inference", ["train.yaml", "inference.yaml"], detector, dataset_dir=str(external[form]),
             output_dir=str(outs[form]))
        _check_outputs(external[form], outs[form], truth)
    native, n_native = _sensitivity(outs["native"], truth)
    clinical, n_clinical = _sensitivity(outs["clinical"], truth)
    print(f"sensitivity within {HIT_MM} mm: native {native:.3f} ({n_native} detections), "
          f"clinical 0.5x0.5x2 mm LPS oblique without mask {clinical:.3f} ({n_clinical} detections)")
    assert native >= 0.3, f"the test detector finds too few CMBs in the native scans ({native:.2f}): train it more"
    assert clinical >= native - 0.10
    summary = json.loads((outs["clinical"] / "inference_summary.json").read_text())
    assert summary["threshold_source"] == "saved operating point" and summary["spacing"] == [0.98, 0.98, 1.0]
    assert all(w["mask"] == "estimated" and w["resampled"] for w in summary["written"])
    native_summary = json.loads((outs["native"] / "inference_summary.json").read_text())
    assert all(w["mask"] == "file" and not w["resampled"] for w in native_summary["written"])
    assert summary["threshold"] == native_summary["threshold"]
    with open(outs["clinical"] / "detections.csv", newline="") as f:  # the folder's table: all scans
        assert len(list(csv.DictReader(f))) == n_clinical


@pytest.mark.e2e
def test_threshold_overrides_and_a_folder_made_at_another_threshold(detector, external, tmp_path):
    """--fp_per_scan looks the threshold up on the saved validation FROC, --threshold is used as given; a rerun
    into a folder made at another threshold is refused unless --overwrite true."""
    op = json.loads((detector / "models" / "operating_point.json").read_text())
    folder = tmp_path / "one"
    folder.mkdir()
    sid = sorted(external["truth"])[0]
    shutil.copy(external["native"] / f"{sid}_swi.nii.gz", folder)
    shutil.copy(external["native"] / f"{sid}_brainmask.nii.gz", folder)
    out = tmp_path / "out"
    _run("inference", ["train.yaml", "inference.yaml"], detector, dataset_dir=str(folder), output_dir=str(out),
         fp_per_scan=8)
    s = json.loads((out / "inference_summary.json").read_text())
    fps = np.array(op["froc"]["fp_per_scan"])
    expected = op["froc"]["threshold"][int((fps <= 8 + 1e-12).sum()) - 1]
    assert s["threshold_source"] == "--fp_per_scan" and s["threshold"] == pytest.approx(expected)
    n8 = len(_detections(out / f"{sid}_detections.csv"))
    with pytest.raises(Exception) as info:
        _run("inference", ["train.yaml", "inference.yaml"], detector, dataset_dir=str(folder), output_dir=str(out),
             threshold=0.0)
    err = info.value
    while err.__cause__ is not None:
        err = err.__cause__
    assert "--overwrite true" in str(err)
    _run("inference", ["train.yaml", "inference.yaml"], detector, dataset_dir=str(folder), output_dir=str(out),
         threshold=0.0, overwrite=True)
    s = json.loads((out / "inference_summary.json").read_text())
    assert s["threshold_source"] == "--threshold" and s["threshold"] == 0.0
    rows = _detections(out / f"{sid}_detections.csv")
    assert len(rows) == len(_detections(out / f"{sid}_candidates.csv")) >= n8  # threshold 0: every candidate

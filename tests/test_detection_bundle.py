"""The cmb_detection bundle end to end in a tiny configuration: train (real+synthetic, cDA), evaluate, infer
on external scans (one of them bad), metadata; evaluate.yaml and inference.yaml as overlays over train.yaml."""

from __future__ import annotations

import csv
import inspect
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "cmb_detection" / "configs"
NET = dict(device="cpu", channels=[4, 8], strides=[2, 2], num_res_units=1, patch_size=[24, 24, 16])
TINY_TRAIN = dict(batch_size=8, epoch_length=3, max_epochs=2, val_interval=1)
EVALUATE = ["train.yaml", "evaluate.yaml"]
INFERENCE = ["train.yaml", "inference.yaml"]
# what train.yaml alone defines: the network, the candidate and patch settings, the device and the folders
TRAIN_ONLY = {"network_def", "network_name", "channels", "strides", "num_res_units", "dropout", "patch_size", "frst",
              "device", "bundle_root", "ckpt_dir", "cache_dir", "datalist", "seed", "spacing", "operating_fp_per_scan"}


def _run(key: str, configs: str | list[str], bundle_root: Path, **overrides) -> None:
    """``monai.bundle run key`` with ``configs`` (names in configs/, merged in order) and the tiny network."""
    from monai.bundle import run

    files = [str(CONFIGS / c) for c in ([configs] if isinstance(configs, str) else configs)]
    run(key, config_file=files, bundle_root=str(bundle_root), **{**NET, **overrides})


def _cause(err: BaseException) -> BaseException:
    """The innermost cause of an exception (MONAI's config evaluation wraps errors in RuntimeErrors)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _forbid_training_data(monkeypatch) -> None:
    """Make generating the phantom cohort or building a training/validation candidate set fail."""
    import cmb_synthesis.detection.training
    import cmb_synthesis.phantom

    def forbidden(*args, **kwargs):
        raise AssertionError("a run of the trained model evaluated a training-only config item")

    monkeypatch.setattr(cmb_synthesis.phantom, "ensure_cohort", forbidden)
    monkeypatch.setattr(cmb_synthesis.detection.training, "build_candidate_set", forbidden)


@pytest.mark.parametrize("overlay,key,function", [("evaluate.yaml", "evaluate", "run_evaluation"),
                                                  ("inference.yaml", "infer", "run_inference")])
def test_overlays_list_every_argument_and_take_the_network_from_train_yaml(overlay, key, function):
    """evaluate.yaml / inference.yaml define no network or candidate settings of their own; their run is a
    component listing every argument of its function, each overridable by id; train.yaml's settings (and
    paper.yaml's, merged between them) reach it."""
    from monai.bundle import ConfigParser

    from cmb_synthesis.detection import inference
    from transforms import frst

    assert not TRAIN_ONLY & set(ConfigParser.load_config_file(str(CONFIGS / overlay)))
    p = ConfigParser()
    p.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / overlay)])
    component = p[key]
    assert component["_target_"] == f"cmb_synthesis.detection.inference.{function}"
    assert set(component) - {"_target_"} == set(inspect.signature(getattr(inference, function)).parameters)
    assert component["network"] == "@network" and p["network"]["network"] == "@network_def"
    assert p["network"]["_target_"] == "cmb_synthesis.detection.inference.load_classifier"
    # train.yaml lists the FRST settings at the transform's defaults
    assert p["frst"] == {"radii_mm": list(frst.DEFAULT_RADII_MM), "alpha": frst.DEFAULT_ALPHA, "beta": frst.DEFAULT_BETA,
                         "presmooth_sigma_mm": frst.DEFAULT_PRESMOOTH_SIGMA_MM,
                         "min_distance_mm": frst.DEFAULT_MIN_DISTANCE_MM, "max_candidates": frst.DEFAULT_MAX_CANDIDATES,
                         "snap_radius_mm": frst.DEFAULT_SNAP_RADIUS_MM}
    p.update({f"{key}#batch_size": 7, "frst#max_candidates": 5, "device": "cpu"})
    p.parse()
    assert p.get_parsed_content(f"{key}#batch_size") == 7
    assert p.get_parsed_content(f"{key}#frst")["max_candidates"] == 5
    assert p.get_parsed_content(f"{key}#patch_size") == [32, 32, 16]
    # the command-line check first, then determinism; creates no bundle folder
    assert p["initialize"] == ["$cmb_synthesis.bundle_utils.command_line()", "$monai.utils.set_determinism(seed=@seed)"]

    paper = ConfigParser()
    paper.read_config([str(CONFIGS / n) for n in ("train.yaml", "paper.yaml", overlay)])
    paper.parse()
    assert paper.get_parsed_content(f"{key}#patch_size") == [32, 32, 32] and paper["network_name"] == "densenet121"


def test_inference_overlay_needs_no_cohort_and_writes_nothing_into_the_bundle(tmp_path, monkeypatch):
    """Inference from a fresh bundle folder with released weights elsewhere: no phantom cohort, no candidate
    set and no candidate cache are built (each would fail here), the outputs are written, the bundle stays empty."""
    from cmb_synthesis.detection.classifier import build_classifier

    _forbid_training_data(monkeypatch)
    torch.manual_seed(0)
    net = build_classifier("classifier", NET["patch_size"], channels=NET["channels"], strides=NET["strides"],
                           num_res_units=NET["num_res_units"])
    torch.save(net.state_dict(), tmp_path / "model.pt")
    rng = np.random.default_rng(0)
    vol = (0.6 + 0.05 * rng.standard_normal((48, 48, 24))).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), -1)
    for centre in ((16, 16, 12), (32, 30, 10), (24, 36, 14)):  # dark 2-voxel balls (microbleed-like)
        vol[((grid - np.array(centre)) ** 2).sum(-1) <= 4] = 0.1
    mask = np.zeros(vol.shape, np.uint8)
    mask[4:-4, 4:-4, 2:-2] = 1
    ext = tmp_path / "external"
    ext.mkdir()
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(ext / "s1_swi.nii.gz"))
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(ext / "s1_brainmask.nii.gz"))
    root, out = tmp_path / "bundle", tmp_path / "out"
    # no operating point saved with these weights: refused before any scan is read, unless --threshold is given
    with pytest.raises(Exception) as info:  # MONAI's config evaluation wraps it in a RuntimeError
        _run("inference", INFERENCE, root, model_path=str(tmp_path / "model.pt"), dataset_dir=str(ext),
             output_dir=str(out))
    assert "no operating point saved with the model" in str(_cause(info.value)) and "--threshold" in str(_cause(info.value))
    assert not out.exists()
    _run("inference", INFERENCE, root, model_path=str(tmp_path / "model.pt"), dataset_dir=str(ext), output_dir=str(out),
         threshold=0.5)
    assert nib.load(str(out / "s1_cmb_prob.nii.gz")).shape == vol.shape
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["threshold"] == 0.5 and summary["threshold_source"] == "--threshold"
    assert summary["spacing"] == [0.98, 0.98, 1.0] and summary["written"][0]["resampled"]  # 1 mm input resampled
    with open(out / "candidates.csv", newline="") as f:
        assert [r["image"] for r in csv.DictReader(f)][:1] == ["s1_swi.nii.gz"]
    assert not root.exists() or not any(root.iterdir())


@pytest.fixture(scope="module")
def synthetic_dir(tiny_cohort, tmp_path_factory):
    """A stand-in for the synthesis output: copies of two real pathological training scans, renamed as
    ``<id>_synthetic.nii.gz`` / ``<id>_synthetic_cmb.nii.gz`` with a decathlon ``training`` list."""
    from monai.data import load_decathlon_datalist

    out = tmp_path_factory.mktemp("copied_scans_as_synthetic")
    items = [it for it in load_decathlon_datalist(tiny_cohort, True, "training") if it["group"] == "pathological"][:2]
    listed = []
    for it in items:
        sid = f"{it['id']}_copy"
        shutil.copy(it["image"], out / f"{sid}_synthetic.nii.gz")
        shutil.copy(it["label"], out / f"{sid}_synthetic_cmb.nii.gz")
        shutil.copy(it["brainmask"], out / f"{sid}_brainmask.nii.gz")
        listed.append({"id": sid, "image": f"{sid}_synthetic.nii.gz", "label": f"{sid}_synthetic_cmb.nii.gz",
                       "brainmask": f"{sid}_brainmask.nii.gz", "group": "pathological"})
    (out / "datalist.json").write_text(json.dumps({"training": listed}))
    return out


@pytest.fixture(scope="module")
def trained(tiny_cohort, synthetic_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("detection_bundle")
    _run("training", "train.yaml", root, datalist=tiny_cohort, training_data="real+synthetic",
         synthetic_dir=str(synthetic_dir), cda="true", **TINY_TRAIN)
    return root


@pytest.mark.e2e
def test_training_mixes_real_and_synthetic_and_writes_checkpoints(trained):
    models = trained / "models"
    names = {p.name for p in models.iterdir()}
    assert {"model.pt", "checkpoint_epoch=2.pt", "train_metrics.json"} <= names
    state = torch.load(models / "model.pt", weights_only=True)  # best model: a plain state dict
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    ckpt = torch.load(models / "checkpoint_epoch=2.pt", weights_only=True)
    assert {"network", "optimizer", "trainer", "best"} <= set(ckpt) and ckpt["trainer"]["iteration"] == 6
    m = json.loads((models / "train_metrics.json").read_text())
    # the checkpoint of the last epoch holds that epoch's validation: the best score so far, for a resume
    assert ckpt["best"]["best_metric"] == pytest.approx(max(h["metrics"]["val_cpm"] for h in m["history"]))
    assert 0.0 <= m["metrics"]["val_cpm"] <= 1.0
    # val_auc is logged every round (MONAI may return it as numpy.float32)
    assert all(0.0 <= h["metrics"]["val_auc"] <= 1.0 for h in m["history"])
    assert len(m["history"]) == 2 and m["training_data"] == "real+synthetic" and m["cda"] == "true"
    # tiny cohort: 3 pathological + 2 healthy real scans, plus 2 synthetic (all of them: fewer than 3)
    ids = m["training_scans"]
    assert len(ids) == 7 and sum(i.endswith("_copy") for i in ids) == 2
    tc = m["training_candidates"]
    assert tc["n_scans"] == 7 and 0 < tc["n_positive"] < tc["n_candidates"]
    assert any((trained / "runs").iterdir())  # TensorBoard events
    assert list((trained / "data" / "candidate_cache").glob("*.npz"))
    # the operating point of the best round, beside model.pt and tied to it
    from cmb_synthesis.detection.operating_point import file_sha256

    op = json.loads((models / "operating_point.json").read_text())
    assert op["model_sha256"] == file_sha256(models / "model.pt") and op["fp_per_scan_target"] == 2.0
    assert op["val_metric"] == pytest.approx(ckpt["best"]["best_metric"]) and op["epoch"] == ckpt["best"]["best_metric_epoch"]
    assert op["spacing"] == [0.98, 0.98, 1.0] and op["patch_size"] == NET["patch_size"] and op["frst"]["max_candidates"] == 300
    assert op["n_scans"] == 2 and op["n_lesions"] > 0 and op["fp_per_scan"] <= 2.0 and 0.0 <= op["threshold"]
    assert len(op["froc"]["threshold"]) == len(op["froc"]["fp_per_scan"]) == len(op["froc"]["sensitivity"]) > 1



@pytest.mark.e2e
def test_resume_continues_and_keeps_the_best_model(trained, tiny_cohort, synthetic_dir, tmp_path):
    """--resume true on a copy of the trained bundle: training continues at epoch 3 (not from scratch), and
    model.pt changes only if epoch 3 validates better than the best restored from the checkpoint."""
    root = tmp_path / "bundle"
    shutil.copytree(trained / "models", root / "models")
    before = (root / "models" / "model.pt").read_bytes()
    best = torch.load(root / "models" / "checkpoint_epoch=2.pt", weights_only=True)["best"]["best_metric"]
    _run("training", "train.yaml", root, datalist=tiny_cohort, training_data="real+synthetic",
         synthetic_dir=str(synthetic_dir), cda="true", resume="true", **{**TINY_TRAIN, "max_epochs": 3})
    ckpt = torch.load(root / "models" / "checkpoint_epoch=3.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 9 and ckpt["trainer"]["max_epochs"] == 3
    hist = json.loads((root / "models" / "train_metrics.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [3]  # epochs 1 and 2 were not redone
    score = hist[0]["metrics"]["val_cpm"]
    assert ckpt["best"]["best_metric"] == pytest.approx(max(best, score))
    assert ((root / "models" / "model.pt").read_bytes() == before) == (score <= best)
    from cmb_synthesis.detection.operating_point import file_sha256

    op = json.loads((root / "models" / "operating_point.json").read_text())
    assert op["model_sha256"] == file_sha256(root / "models" / "model.pt")
    assert op["epoch"] == (3 if score > best else ckpt["best"]["best_metric_epoch"])

@pytest.mark.e2e
def test_evaluating_writes_a_well_formed_froc_report(trained, tiny_cohort, monkeypatch):
    out = trained / "eval_out"
    _forbid_training_data(monkeypatch)  # evaluation builds no training candidate set
    _run("evaluating", EVALUATE, trained, datalist=tiny_cohort, output_dir=str(out), training_data="real+synthetic",
         **{"evaluate#n_bootstrap": 50})
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_bootstrap"] == 50 and m["training_data"] == "real+synthetic" and m["network"] == "classifier"
    assert m["model_path"] == str(trained / "models" / "model.pt")
    assert set(m["sensitivity_at_fp"]) == {"1", "2", "4", "8", "10", "20"}
    for k, (lo, hi) in m["sensitivity_at_fp_ci95"].items():
        assert 0.0 <= lo <= hi <= 1.0
    assert m["n_scans"] == 2 and m["n_lesions"] > 0 and 0.0 <= m["cpm"] <= 1.0
    assert "value" in m["fp_per_scan_at_sensitivity_90"] and "ci95" in m["fp_per_scan_at_sensitivity_90"]
    assert 0.0 < m["candidate_stage"]["candidate_sensitivity"] <= 1.0
    op = json.loads((trained / "models" / "operating_point.json").read_text())
    assert m["operating_point"]["threshold"] == op["threshold"] and m["spacing"] == [0.98, 0.98, 1.0]
    assert set(m["operating_point"]["test"]) == {"threshold", "sensitivity", "fp_per_scan", "n_lesions_detected",
                                                 "n_false_positives"}
    with open(out / "froc.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {"threshold", "fp_per_scan", "sensitivity"} <= set(rows[0])
    fps = [float(r["fp_per_scan"]) for r in rows]
    assert fps == sorted(fps)
    assert (out / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # candidates.csv is evaluable on its own against the datalist and gives the same numbers
    from cmb_synthesis.evaluation.report import evaluate_csv

    again = evaluate_csv(out / "candidates.csv", tiny_cohort, "test", n_bootstrap=50)
    assert again["sensitivity_at_fp"] == m["sensitivity_at_fp"] and again["cpm"] == pytest.approx(m["cpm"])


@pytest.mark.e2e
def test_inference_writes_outputs_in_the_input_space_and_reports_a_bad_scan(trained, tiny_cohort, tmp_path):
    from monai.data import load_decathlon_datalist

    from cmb_synthesis.detection.inference import BatchInferenceError

    item = load_decathlon_datalist(tiny_cohort, True, "test")[0]
    ext = tmp_path / "external"
    ext.mkdir()
    # a scan stored LPI (x and z flipped) with its mask beside it, and one without a mask (estimated)
    img = nib.load(item["image"])
    flip = nib.orientations.axcodes2ornt(("L", "A", "I"))
    nib.save(img.as_reoriented(flip), str(ext / "ext1_swi.nii.gz"))
    nib.save(nib.load(item["brainmask"]).as_reoriented(flip), str(ext / "ext1_brainmask.nii.gz"))
    shutil.copy(item["image"], ext / "ext2.nii.gz")
    (ext / "broken_swi.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    with pytest.raises(Exception) as info:  # MONAI's config evaluation wraps it in a RuntimeError
        _run("inference", INFERENCE, trained, dataset_dir=str(ext), output_dir=str(out))
    err = info.value
    while not isinstance(err, BatchInferenceError) and err.__cause__ is not None:
        err = err.__cause__
    assert isinstance(err, BatchInferenceError) and "1 of 3 scans failed" in str(err) and "broken_swi" in str(err)
    summary = json.loads((out / "inference_summary.json").read_text())
    assert [Path(f["image"]).name for f in summary["failed"]] == ["broken_swi.nii.gz"]
    assert summary["n_inputs"] == 3 and not summary["skipped"]
    assert [f["id"] for f in summary["failed"]] == ["broken"] and "not a readable NIfTI" in summary["failed"][0]["error"]
    assert {p["id"]: p["mask"] for p in summary["written"]} == {"ext1": "file", "ext2": "estimated"}
    assert summary["threshold_source"] == "saved operating point" and summary["spacing"] == [0.98, 0.98, 1.0]
    for p in summary["written"]:
        sid = p["id"]
        assert p["outputs"] == {"detections": str(out / f"{sid}_detections.csv"),
                                "detection_labels": str(out / f"{sid}_detections.nii.gz"),
                                "qc": str(out / f"{sid}_qc.png"),
                                "probability_map": str(out / f"{sid}_cmb_prob.nii.gz"),
                                "candidates": str(out / f"{sid}_candidates.csv")}
        assert p["n_candidates"] == len((out / f"{sid}_candidates.csv").read_text().splitlines()) - 1
        assert p["n_detections"] == len((out / f"{sid}_detections.csv").read_text().splitlines()) - 1
        assert (out / f"{sid}_qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "summary.csv", newline="") as f:
        status = {r["id"]: (r["status"], r["n_detections"], r["n_candidates"]) for r in csv.DictReader(f)}
    assert status == {"broken": ("failed", "", ""), **{p["id"]: ("written", str(p["n_detections"]), str(p["n_candidates"]))
                                                      for p in summary["written"]}}
    with open(out / "detections.csv", newline="") as f:  # the folder's table: every scan's detections
        assert len(list(csv.DictReader(f))) == sum(p["n_detections"] for p in summary["written"])
    ref = nib.load(str(ext / "ext1_swi.nii.gz"))
    prob = nib.load(str(out / "ext1_cmb_prob.nii.gz"))
    assert prob.shape == ref.shape and np.allclose(prob.affine, ref.affine)
    pdata = np.asarray(prob.dataobj)
    assert pdata.dtype == np.float32 and 0.0 <= pdata.min() and pdata.max() <= 1.0 and pdata.max() > 0
    with open(out / "candidates.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["image"] == "ext1_swi.nii.gz"]
    assert rows
    for r in rows[:20]:
        ijk = [int(r["i"]), int(r["j"]), int(r["k"])]
        world = nib.affines.apply_affine(ref.affine, ijk)
        np.testing.assert_allclose(world, [float(r["x"]), float(r["y"]), float(r["z"])], atol=1e-3)
        assert pdata[tuple(ijk)] == pytest.approx(float(r["probability"]), abs=1e-6) or pdata[tuple(ijk)] >= float(
            r["probability"])
    assert (out / "ext2_cmb_prob.nii.gz").is_file()
    assert not (out / "broken_cmb_prob.nii.gz").exists()


def test_metadata_verifies(meta_schema):
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=meta_schema)

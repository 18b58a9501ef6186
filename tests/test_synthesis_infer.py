"""Whole-volume inference on known tensors and files (cmb_synthesis.synthesis.inference)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cmb_synthesis.data.batch import BatchInferenceError
from cmb_synthesis.synthesis.inference import find_scans, run_inference, synthesize_volume
from cmb_synthesis.synthesis.networks import CMBGenerator


class DarkenUnderMask(torch.nn.Module):
    """A stand-in generator with a known effect: halves the intensity under the mask channel."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, mask=None):
        img, m = (x[:, :1], x[:, 1:]) if mask is None else (x, mask)
        return img * (1 - 0.5 * (m > 0).float())


def test_synthesize_volume_covers_whole_volume_with_z_overlap():
    img = torch.rand(1, 40, 36, 50)
    mask = torch.zeros_like(img)
    mask[0, 10:12, 10:12, 45:48] = 1  # near the end of z: the last window must cover it
    out = synthesize_volume(DarkenUnderMask(), img, mask, patch=(40, 36, 16), overlap=0.5)
    expected = img * (1 - 0.5 * mask)
    assert out.shape == img.shape
    assert torch.allclose(out, expected, atol=1e-5)
    # an untrained residual generator is the identity, also across window seams
    g = CMBGenerator(channels=2, n_res_blocks=0, stem_kernel=3)
    assert torch.allclose(synthesize_volume(g, img, mask, patch=(40, 36, 16)), img, atol=1e-6)


def _write(path, arr, affine):
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def _write_scan(folder, sid, affine, **arrays):
    """``<sid>_<key>.nii.gz`` in ``folder`` for each array (``swi``, ``brainmask``, ``mask``, ...)."""
    folder.mkdir(exist_ok=True)
    for key, arr in arrays.items():
        _write(folder / f"{sid}_{key}.nii.gz", arr, affine)


def test_run_inference_folder_keeps_space_and_reports_bad_scans(tmp_path):
    pytest.importorskip("transforms.pipelines")
    rng = np.random.default_rng(0)
    # a non-RAS (LPS-like) affine: outputs must still be in the input's orientation
    affine = np.diag([-0.98, -0.98, 1.0, 1.0])
    affine[:3, 3] = [80, 70, -20]
    shape = (48, 40, 36)
    img = (100 + 20 * rng.random(shape)).astype(np.float32)
    bm = np.zeros(shape, np.uint8)
    bm[4:44, 4:36, 2:34] = 1
    mask = np.zeros(shape, np.uint16)
    mask[20:23, 18:21, 15:18] = 1
    src = tmp_path / "in"
    _write_scan(src, "s1", affine, swi=img, brainmask=bm, mask=mask)
    (src / "bad_swi.nii.gz").write_bytes(b"not a nifti")
    _write(src / "bad_mask.nii.gz", mask, affine)
    jobs = find_scans(src)
    assert [j.id for j in jobs] == ["bad", "s1"] and jobs[1].mask.endswith("s1_mask.nii.gz")

    out = tmp_path / "out"
    with pytest.raises(BatchInferenceError, match=r"(?s)1 of 2 scans failed.*bad_swi.nii.gz: ValueError: .*not a readable"):
        run_inference(src, out, G_HP=DarkenUnderMask(), patch=(48, 40, 16), overlap=0.5)
    syn = nib.load(str(out / "s1_synthetic.nii.gz"))
    lab = nib.load(str(out / "s1_synthetic_cmb.nii.gz"))
    assert syn.shape == shape and np.allclose(syn.affine, affine) and np.allclose(lab.affine, affine)
    data = syn.get_fdata()
    outside = mask == 0
    assert np.allclose(data[outside], img[outside], atol=1e-3)  # untouched voxels keep their exact values
    # darkened where the mask is: the change of the [0, 1] image mapped back through the brain percentile scale
    lo, hi = np.percentile(img[bm > 0], 0), np.percentile(img[bm > 0], 99.5)
    expected = img - 0.5 * (np.clip(img, lo, hi) - lo)
    assert np.allclose(data[mask > 0], expected[mask > 0], atol=0.05)
    assert data[mask > 0].mean() < img[mask > 0].mean() - 2
    assert np.array_equal(np.asarray(lab.dataobj) > 0, mask > 0)
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["n_inputs"] == 2 and summary["direction"] == "pathological" and not summary["skipped"]
    assert [(f["id"], Path(f["image"]).name) for f in summary["failed"]] == [("bad", "bad_swi.nii.gz")]
    assert "not a readable NIfTI" in summary["failed"][0]["error"]
    (written,) = summary["written"]
    assert written["id"] == "s1" and written["n"] == 1 and written["mask"] == "given"
    assert written["outputs"] == {"synthetic": str(out / "s1_synthetic.nii.gz"),
                                  "synthetic_cmb": str(out / "s1_synthetic_cmb.nii.gz")}
    with open(out / "summary.csv", newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert rows["s1"]["status"] == "written" and rows["s1"]["n"] == "1"
    assert rows["bad"]["status"] == "failed" and "not a readable NIfTI" in rows["bad"]["message"]
    # existing outputs are skipped unless overwrite
    res = run_inference(src, out, G_HP=DarkenUnderMask(), patch=(48, 40, 16), raise_on_error=False)
    assert [e["id"] for e in res["skipped"]] == ["s1"] and res["skipped"][0]["n"] == 1


def test_run_inference_reads_a_dicom_series_and_writes_back_in_its_space(tmp_path):
    """A DICOM series folder is a scan like a NIfTI file: read through ``to_canonical``, outputs in the series'
    patient space (the exact inverse of the reorientation)."""
    pytest.importorskip("itk")
    from test_external_data import _write_dicom_series

    from cmb_synthesis.data.scans import from_canonical, to_canonical

    rng = np.random.default_rng(1)
    shape = (48, 40, 36)
    ras = np.diag([0.98, 0.98, 1.0, 1.0])
    ras[:3, 3] = [-20, -15, -10]
    vol = np.rint(1000 + 200 * rng.random(shape)).astype(np.int16)
    lps_img = nib.Nifti1Image(vol, ras).as_reoriented(nib.orientations.axcodes2ornt(("L", "P", "S")))
    src = tmp_path / "in"
    _write_dicom_series(np.asarray(lps_img.dataobj), lps_img.affine, src / "d1")
    can = to_canonical(src / "d1")
    bm = np.zeros(can.array.shape, np.uint8)
    bm[4:44, 4:36, 2:34] = 1
    mask = np.zeros(can.array.shape, np.uint8)
    mask[20:23, 18:21, 15:18] = 1
    _write(src / "d1_brainmask.nii.gz", bm, can.affine)
    _write(src / "d1_mask.nii.gz", mask, can.affine)

    out = tmp_path / "out"
    summary = run_inference(src, out, G_HP=DarkenUnderMask(), patch=(48, 40, 16))
    assert [(e["id"], e["n"]) for e in summary["written"]] == [("d1", 1)]
    syn, lab = nib.load(str(out / "d1_synthetic.nii.gz")), nib.load(str(out / "d1_synthetic_cmb.nii.gz"))
    assert syn.shape == lab.shape == can.source_shape
    assert np.allclose(syn.affine, can.source_affine, atol=1e-4) and np.allclose(lab.affine, can.source_affine, atol=1e-4)
    source = from_canonical(can.array, can)
    lesion = from_canonical(mask, can) > 0
    assert np.array_equal(np.asarray(lab.dataobj) > 0, lesion)
    data = syn.get_fdata()
    assert np.allclose(data[~lesion], source[~lesion], atol=1e-3)
    lo, hi = np.percentile(can.array[bm > 0], 0), np.percentile(can.array[bm > 0], 99.5)
    expected = source - 0.5 * (np.clip(source, lo, hi) - lo)  # the darkening mapped back through the scale
    assert np.allclose(data[lesion], expected[lesion], atol=0.05) and data[lesion].mean() < source[lesion].mean() - 20


def test_scans_without_a_brain_mask_nifti_and_dicom_get_one_estimated(tmp_path, tiny_cohort):
    """A phantom scan delivered without ``<id>_brainmask`` (as NIfTI, and as an LPS DICOM series): synthesis
    inference estimates the brain mask (MNI152 registration) and paints lesions sampled inside it."""
    pytest.importorskip("itk")
    from dicom_writer import write_dicom_series

    from cmb_synthesis.data.scans import to_canonical
    from transforms.lesion_mask import LesionBank

    base = Path(tiny_cohort).parent
    item = next(i for i in json.loads(Path(tiny_cohort).read_text())["training"] if i.get("group") == "healthy")
    src = tmp_path / "in"
    src.mkdir()
    img = nib.load(str(base / item["image"]))
    nib.save(img, str(src / "h1_swi.nii.gz"))  # alone: no brain mask, no lesion mask
    truth = to_canonical(base / item["brainmask"], dtype=None).array > 0
    vol = np.rint(np.asarray(img.dataobj, np.float32)).astype(np.int16)
    lps = nib.Nifti1Image(vol, img.affine).as_reoriented(nib.orientations.axcodes2ornt(("L", "P", "S")))
    write_dicom_series(np.asarray(lps.dataobj), src / "h2", affine_ras=lps.affine)

    lab, bm = np.zeros((20, 20, 20), np.int64), np.ones((20, 20, 20), np.uint8)
    lab[8:10, 8:10, 8:10] = 1
    bank = LesionBank.from_arrays([lab], [bm], spacing=(0.98, 0.98, 1.0))
    out = tmp_path / "out"
    summary = run_inference(src, out, G_HP=DarkenUnderMask(), lesion_bank=bank, n_lesions=4, seed=1,
                            patch=(160, 146, 32))
    written = {e["id"]: e for e in summary["written"]}
    assert sorted(written) == ["h1", "h2"] and not summary["failed"]
    for sid in ("h1", "h2"):
        e = written[sid]
        assert e["brainmask"] == "estimated" and e["mask"] == "sampled" and e["n"] >= 1
        assert "estimated brain mask" in e["message"]
        labels = to_canonical(out / f"{sid}_synthetic_cmb.nii.gz", dtype=None).array
        assert labels.shape == truth.shape
        # the sampled lesions lie in the (true) brain: the estimated mask put them there
        assert truth[labels > 0].mean() > 0.95
    with pytest.raises(BatchInferenceError, match="estimate_brainmask is off"):
        run_inference(src, tmp_path / "out2", G_HP=DarkenUnderMask(), lesion_bank=bank, patch=(160, 146, 32),
                      estimate_brainmask=False)


class LiftEverywhere(torch.nn.Module):
    """A stand-in generator that drifts everywhere: adds 0.2 to every voxel (as a badly trained G_PH lifts the
    background)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, mask=None):
        img = x[:, :1] if mask is None else x
        return (img + 0.2).clamp(0, 1)


@pytest.mark.parametrize("direction", ["pathological", "pseudo_healthy"])
def test_inference_changes_nothing_outside_the_brain(tmp_path, direction):
    rng = np.random.default_rng(1)
    affine = np.diag([0.98, 0.98, 1.0, 1.0])
    shape = (40, 36, 32)
    img = np.zeros(shape, np.float32)
    bm = np.zeros(shape, np.uint8)
    bm[8:32, 8:28, 6:26] = 1
    img[bm > 0] = (100 + 20 * rng.random(int(bm.sum()))).astype(np.float32)
    mask = np.zeros(shape, np.uint16)
    mask[18:21, 16:19, 14:17] = 1
    src = tmp_path / "in"
    _write_scan(src, "s1", affine, swi=img, brainmask=bm, mask=mask)
    G = LiftEverywhere()
    run_inference(src, tmp_path / "out", G_HP=G, G_PH=G, direction=direction, patch=(48, 48, 32))
    name = "s1_synthetic.nii.gz" if direction == "pathological" else "s1_pseudohealthy.nii.gz"
    out = np.asarray(nib.load(str(tmp_path / "out" / name)).dataobj)
    from scipy import ndimage

    near_brain = ndimage.binary_dilation(bm > 0, iterations=2)
    np.testing.assert_array_equal(out[~near_brain], img[~near_brain])  # the background is untouched
    assert float((out - img)[bm > 0].mean()) > 0.5  # the generator's change inside the brain is written

"""Whole-volume inference on known tensors and files (cmb_synthesis.synthesis.inference)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from cmb_synthesis.synthesis.networks import CMBGenerator
from cmb_synthesis.synthesis.inference import find_scans, run_inference, synthesize_volume


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
    src.mkdir()
    _write(src / "s1_swi.nii.gz", img, affine)
    _write(src / "s1_brainmask.nii.gz", bm, affine)
    _write(src / "s1_mask.nii.gz", mask, affine)
    (src / "bad_swi.nii.gz").write_bytes(b"not a nifti")
    jobs = find_scans(src)
    assert [j.id for j in jobs] == ["bad", "s1"] and jobs[1].mask.endswith("s1_mask.nii.gz")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"1 written, 0 skipped, 1 failed.*bad"):
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
    assert "bad" in summary["failed"] and "bad_swi.nii.gz" in summary["failed"]["bad"]
    # existing outputs are skipped unless overwrite
    res = run_inference(src, out, G_HP=DarkenUnderMask(), patch=(48, 40, 16), raise_on_error=False)
    assert res["skipped"] == ["s1"]

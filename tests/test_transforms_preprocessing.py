"""transforms.intensity / transforms.checks / transforms.pipelines.preprocessing on known arrays and bad files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from transforms.checks import CheckSWId
from transforms.intensity import PercentileScaled, invert_percentile_scale, percentile_scale
from transforms.pipelines import preprocessing

AFF = np.diag([0.98, 0.98, 1.0, 1.0])


def _save(path, arr, aff=AFF):
    nib.save(nib.Nifti1Image(arr, aff), str(path))
    return str(path)


@pytest.fixture
def scan(tmp_path):
    """(image, brainmask, label) files: 24x20x18, brain box with a bright outlier outside it."""
    rng = np.random.default_rng(0)
    img = (rng.random((24, 20, 18)) * 100 + 50).astype(np.float32)
    img[0, 0, 0] = 5000.0  # outside the brain: must not drive the percentiles
    bm = np.zeros(img.shape, np.uint8)
    bm[4:20, 3:17, 2:16] = 1
    lab = np.zeros(img.shape, np.uint16)
    lab[8:10, 8:10, 8:10] = 1
    lab[14, 12, 6] = 2
    return {
        "image": _save(tmp_path / "s_swi.nii.gz", img),
        "brainmask": _save(tmp_path / "s_brainmask.nii.gz", bm),
        "label": _save(tmp_path / "s_cmb.nii.gz", lab),
        "_arrays": (img, bm, lab),
    }


def test_percentile_scale_exact_on_known_values():
    x = np.arange(1001, dtype=np.float32)  # 0..1000: percentile p is exactly 10 * p
    out, lo, hi = percentile_scale(x, lower=0.0, upper=99.5)
    assert (lo, hi) == (0.0, 995.0)
    np.testing.assert_allclose(out[:996], x[:996] / 995.0, rtol=1e-6)
    assert (out[996:] == 1.0).all() and out.min() == 0.0
    np.testing.assert_allclose(invert_percentile_scale(out[:996], lo, hi), x[:996], atol=1e-3)


def test_percentiles_from_mask_voxels_only():
    x = torch.zeros(1, 4, 4, 4)
    m = torch.zeros(1, 4, 4, 4, dtype=torch.uint8)
    m[0, 1:3, 1:3, 1:3] = 1
    x[m.bool()] = torch.linspace(10, 20, 8)
    x[0, 0, 0, 0] = 1000.0
    out, lo, hi = percentile_scale(x, m, 0.0, 100.0)
    assert (lo, hi) == pytest.approx((10.0, 20.0))
    assert out[m.bool()].min() == 0 and out[m.bool()].max() == pytest.approx(1.0)
    assert out[0, 0, 0, 0] == 1.0  # clipped


def test_preprocessing_pipeline(scan):
    img, bm, lab = scan["_arrays"]
    d = preprocessing()({k: v for k, v in scan.items() if not k.startswith("_")})
    x = d["image"]
    assert x.shape == (1, 24, 20, 18) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    lo, hi = x.meta["percentile_scale"]
    exp_lo, exp_hi = np.percentile(img[bm > 0].astype(np.float64), [0.0, 99.5])
    assert (lo, hi) == pytest.approx((exp_lo, exp_hi), rel=1e-6)
    # invertible inside the unclipped range
    inside = (img >= lo) & (img <= hi)
    back = invert_percentile_scale(x[0].numpy(), lo, hi)
    np.testing.assert_allclose(back[inside], img[inside], rtol=1e-5)
    assert d["brainmask"].dtype == torch.uint8 and d["label"].dtype == torch.int32
    assert np.array_equal(d["label"][0].numpy(), lab.astype(np.int32))
    np.testing.assert_allclose(x.affine.numpy(), AFF)


def test_preprocessing_reorients_to_ras(tmp_path, scan):
    img, bm, _ = scan["_arrays"]
    flip = AFF.copy()
    flip[0, 0] = -0.98
    flip[0, 3] = 0.98 * 23
    f_img = _save(tmp_path / "lps_swi.nii.gz", img[::-1].copy(), flip)
    f_bm = _save(tmp_path / "lps_bm.nii.gz", bm[::-1].copy(), flip)
    d = preprocessing(label_keys=())({"image": f_img, "brainmask": f_bm})
    ref = preprocessing(label_keys=())({"image": scan["image"], "brainmask": scan["brainmask"]})
    torch.testing.assert_close(d["image"].as_tensor(), ref["image"].as_tensor())


def test_percentile_scaled_without_mask_key():
    x = torch.arange(101, dtype=torch.float32).reshape(1, 101, 1, 1).expand(1, 101, 2, 2).clone()
    d = PercentileScaled(mask_key=None, upper=100.0)({"image": x})
    assert float(d["image"].max()) == 1.0 and float(d["image"].min()) == 0.0


# ----------------------------------------------------------------------------------------------- bad input
def _run(files, **kw):
    return preprocessing(**kw)(files)


@pytest.mark.parametrize(
    "case, match",
    [
        ("2d", "3-D volume"),
        ("4d", "4-D series with 3 volumes"),
        ("shape", "shape"),
        ("affine", "affine differs"),
        ("nan", "NaN"),
        ("inf", "Inf"),
        ("constant", "constant image"),
        ("nonbinary", "binary 0/1"),
        ("emptymask", "empty"),
        ("notimage", "cannot read image"),
    ],
)
def test_bad_input_names_file(tmp_path, scan, case, match):
    img, bm, _ = scan["_arrays"]
    files = {"image": scan["image"], "brainmask": scan["brainmask"]}
    bad = tmp_path / f"bad_{case}.nii.gz"
    if case == "2d":
        files["image"] = _save(bad, img[:, :, 0].copy())
    elif case == "4d":
        files["image"] = _save(bad, np.stack([img] * 3, -1))
    elif case == "shape":
        files["brainmask"] = _save(bad, bm[:-2].copy())
    elif case == "affine":
        a = AFF.copy()
        a[:3, 3] = 5.0
        files["brainmask"] = _save(bad, bm, a)
    elif case in ("nan", "inf"):
        x = img.copy()
        x[3, 3, 3] = np.nan if case == "nan" else np.inf
        files["image"] = _save(bad, x)
    elif case == "constant":
        files["image"] = _save(bad, np.full(img.shape, 7.0, np.float32))
    elif case == "nonbinary":
        m = bm.copy()
        m[5, 5, 5] = 2
        files["brainmask"] = _save(bad, m)
    elif case == "emptymask":
        files["brainmask"] = _save(bad, np.zeros_like(bm))
    elif case == "notimage":
        bad.write_text("this is not a NIfTI file")
        files["image"] = str(bad)
    with pytest.raises(ValueError, match=match) as e:
        _run(files, label_keys=())
    assert str(bad) in str(e.value)


def test_missing_file_names_file(tmp_path, scan):
    missing = str(tmp_path / "nope_swi.nii.gz")
    with pytest.raises(FileNotFoundError, match="nope_swi.nii.gz"):
        _run({"image": missing, "brainmask": scan["brainmask"]}, label_keys=())


def test_constant_inside_mask_is_refused():
    x = torch.ones(1, 6, 6, 6)
    x[0, 0, 0, 0] = 2.0  # not constant overall, constant inside the mask
    m = torch.zeros(1, 6, 6, 6, dtype=torch.uint8)
    m[0, 2:4, 2:4, 2:4] = 1
    with pytest.raises(ValueError, match="constant image inside the mask"):
        PercentileScaled()({"image": x, "brainmask": m})


def test_check_labels_must_be_integers():
    x = torch.rand(1, 5, 5, 5)
    with pytest.raises(ValueError, match="non-negative integer"):
        CheckSWId(label_keys=("label",))({"image": x, "label": torch.full((1, 5, 5, 5), 0.5)})


def test_invertd_maps_output_back_to_input_space_and_range(tmp_path, scan):
    """MONAI ``Invertd`` undoes the RAS reorientation and the percentile scaling of a network output."""
    from monai.transforms import Invertd

    img, bm, _ = scan["_arrays"]
    lps = AFF.copy()
    lps[0, 0], lps[1, 1] = -0.98, -0.98
    f_img = _save(tmp_path / "lps_swi.nii.gz", img, lps)
    f_bm = _save(tmp_path / "lps_bm.nii.gz", bm, lps)
    pre = preprocessing(label_keys=())
    d = pre({"image": f_img, "brainmask": f_bm})
    assert not np.allclose(d["image"][0].numpy(), np.clip(img, 0, None) / img.max())  # it was reoriented
    d["pred"] = d["image"].clone()  # an identity "network": its output carries the image's operations
    out = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(d)["pred"]
    lo, hi = d["image"].meta["percentile_scale"]
    inside = (img >= lo) & (img <= hi)
    np.testing.assert_allclose(out[0].numpy()[inside], img[inside], rtol=1e-5)
    np.testing.assert_allclose(out[0].numpy()[img > hi], hi, rtol=1e-5)  # clipped voxels return at the clip


def test_dicom_series_folder_via_itk(tmp_path):
    """A DICOM series folder is read by MONAI's ITK reader and reoriented to RAS (ITK stores LPS)."""
    itk = pytest.importorskip("itk")
    vol = (np.random.default_rng(0).random((16, 14, 6)) * 1000 + 100).astype(np.int16)
    folder = tmp_path / "series"
    folder.mkdir()
    img = itk.image_from_array(np.ascontiguousarray(vol.transpose(2, 1, 0)))  # ITK arrays are (z, y, x)
    img.SetSpacing([0.98, 0.98, 1.0])
    names = [str(folder / f"IM{k + 1:04d}.dcm") for k in range(vol.shape[2])]
    writer = itk.ImageSeriesWriter[type(img), itk.Image[itk.SS, 2]].New(Input=img, ImageIO=itk.GDCMImageIO.New(), FileNames=names)
    writer.Update()
    d = preprocessing(mask_keys=(), label_keys=())({"image": str(folder)})
    expected, lo, hi = percentile_scale(vol[::-1, ::-1].astype(np.float32), None, 0.0, 99.5)  # LPS -> RAS
    np.testing.assert_allclose(d["image"][0].numpy(), expected, atol=1e-6)
    assert d["image"].meta["percentile_scale"] == pytest.approx((lo, hi))
    empty = tmp_path / "empty_series"
    empty.mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match="empty_series"):
        preprocessing(mask_keys=(), label_keys=())({"image": str(empty)})


def test_preprocessing_of_arrays_without_loading():
    rng = np.random.default_rng(1)
    x = (rng.random((10, 9, 8)) * 50 + 5).astype(np.float32)
    m = np.zeros((10, 9, 8), np.uint8)
    m[2:8, 2:7, 2:6] = 1
    d = preprocessing(label_keys=(), load=False, channel_dim="no_channel")({"image": x, "brainmask": m})
    expected, lo, hi = percentile_scale(x, m)
    np.testing.assert_allclose(d["image"][0].numpy(), expected, atol=1e-6)
    assert d["image"].meta["percentile_scale"] == pytest.approx((lo, hi)) and d["brainmask"].dtype == torch.uint8
    with pytest.raises(ValueError, match="empty"):
        preprocessing(label_keys=(), load=False, channel_dim="no_channel")({"image": x, "brainmask": 0 * m})

"""External SWI: NIfTI in other orientations / anisotropic spacing and DICOM series made from a phantom subject.

Each volume is derived from a phantom subject (world coordinates preserved), loaded through
``transforms.pipelines.preprocessing`` (canonical RAS) and through :mod:`cmb_synthesis.data.scans`, and results
are written back in the input's space and header geometry.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import aff2axcodes, axcodes2ornt, io_orientation, ornt_transform

from cmb_synthesis.data import __main__ as external_cli
from cmb_synthesis.data import scans as external
from dicom_writer import write_dicom_series

ANISO_SPACING = (0.98, 0.98, 3.0)


@pytest.fixture(scope="module")
def subject(tiny_cohort):
    """Paths of the first test subject of the tiny phantom cohort."""
    from monai.data import load_decathlon_datalist

    item = load_decathlon_datalist(tiny_cohort, True, "test")[0]
    return {k: item[k] for k in ("image", "brainmask", "label")}


def _reorient(src: str, dst: Path, codes: tuple[str, str, str], descrip: bytes = b"external scanner") -> Path:
    """Same voxels and world coordinates, stored with axis codes ``codes`` (axes permuted/flipped)."""
    img = nib.load(src)
    out = img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt(codes)))
    out.header["descrip"] = descrip
    out.set_sform(out.affine, code=2)  # aligned-anatomical sform, scanner qform: must survive the round trip
    out.set_qform(out.affine, code=1)
    nib.save(out, str(dst))
    assert aff2axcodes(nib.load(str(dst)).affine) == codes
    return dst


def _anisotropic(src: str, dst: Path, order: int, codes=("L", "P", "S")) -> Path:
    """Resample ``src`` to 0.98 x 0.98 x 3 mm (thick slices), stored in ``codes`` orientation."""
    from nibabel.processing import resample_from_to

    img = nib.load(src)
    shape, affine = external._resampling_grid(img.shape, img.affine, ANISO_SPACING)
    thick = resample_from_to(img, (shape, affine), order=order, mode="nearest")
    data = np.asarray(thick.dataobj)
    data = data.astype(np.float32) if order else np.rint(data).astype(np.uint8)
    thick = nib.Nifti1Image(data, thick.affine)
    thick = thick.as_reoriented(ornt_transform(io_orientation(thick.affine), axcodes2ornt(codes)))
    thick.header["descrip"] = b"thick-slice SWI"
    thick.set_sform(thick.affine, code=1)
    thick.set_qform(thick.affine, code=1)
    nib.save(thick, str(dst))
    return dst


def _pipeline():
    from transforms.pipelines import preprocessing

    return preprocessing(keys=("image",), mask_keys=("brainmask",), label_keys=("label",))


def _assert_same_geometry_and_header(a: Path, b: Path) -> None:
    ia, ib = nib.load(str(a)), nib.load(str(b))
    assert ia.shape == ib.shape
    np.testing.assert_allclose(ia.affine, ib.affine, atol=1e-5)
    for field in ("qform_code", "sform_code", "xyzt_units", "descrip", "dim_info"):
        assert ia.header[field] == ib.header[field], field
    np.testing.assert_allclose(ia.header["pixdim"][1:4], ib.header["pixdim"][1:4], atol=1e-5)
    np.testing.assert_allclose(ia.header.get_sform(), ib.header.get_sform(), atol=1e-5)
    np.testing.assert_allclose(ia.header.get_qform(), ib.header.get_qform(), atol=1e-5)


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("S", "R", "A"), ("P", "I", "L")])
def test_reoriented_nifti_loads_to_the_same_canonical_volume(subject, tmp_path, codes):
    """LPS and axis-permuted NIfTI give exactly the RAS volume of the original (pipeline and helper)."""
    paths = {k: _reorient(subject[k], tmp_path / f"{k}.nii.gz", codes) for k in subject}
    pre = _pipeline()
    ref, out = pre(dict(subject)), pre({k: str(v) for k, v in paths.items()})
    for k in ("image", "brainmask", "label"):
        assert tuple(out[k].shape) == tuple(ref[k].shape)
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(ref[k]))
        np.testing.assert_allclose(np.asarray(out[k].affine), np.asarray(ref[k].affine), atol=1e-4)
        assert aff2axcodes(np.asarray(out[k].affine)) == ("R", "A", "S")
    c_ref, c_out = external.to_canonical(subject["image"]), external.to_canonical(paths["image"])
    np.testing.assert_array_equal(c_out.array, c_ref.array)
    np.testing.assert_allclose(c_out.affine, c_ref.affine, atol=1e-5)
    # the helper's canonical grid is the pipeline's grid
    np.testing.assert_allclose(np.asarray(out["image"].affine), c_out.affine, atol=1e-4)


def test_roundtrip_writes_back_in_input_space_and_header(subject, tmp_path):
    """Canonical processing, then write_like: exactly the input's voxels, affine and header; atomic; no overwrite."""
    src = _reorient(subject["image"], tmp_path / "swi_pil.nii.gz", ("P", "I", "L"))
    can = external.to_canonical(src)
    out = tmp_path / "out" / "swi_pil_processed.nii.gz"
    external.write_like(can.array, src, out)
    _assert_same_geometry_and_header(out, src)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), np.asarray(nib.load(str(src)).dataobj))

    # an integer label map computed in the canonical grid keeps its type and values
    lab = external.to_canonical(subject["label"], dtype=None)
    assert np.issubdtype(lab.array.dtype, np.integer)
    lab_out = tmp_path / "out" / "label_back.nii.gz"
    external.write_like(lab.array, lab, lab_out)
    back = nib.load(str(lab_out))
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(nib.load(subject["label"]).dataobj))
    assert back.get_data_dtype() == lab.array.dtype

    # never over an input, never over an existing output unless asked, and no partial files on failure
    with pytest.raises(ValueError, match="refusing to write over an input"):
        external.write_like(can.array, src, src)
    with pytest.raises(ValueError, match="refusing to write over an input"):
        external.write_like(can.array, src, tmp_path / "other.nii.gz", inputs=(tmp_path / "other.nii.gz",))
    before = out.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="swi_pil_processed"):
        external.write_like(can.array * 0, src, out)
    assert out.stat().st_mtime_ns == before
    external.write_like(can.array * 0, src, out, overwrite=True)
    assert float(np.abs(nib.load(str(out)).get_fdata()).max()) == 0.0
    with pytest.raises(ValueError, match="does not match the canonical grid"):
        external.write_like(can.array[:-1], src, tmp_path / "out" / "bad.nii.gz")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["label_back.nii.gz", "swi_pil_processed.nii.gz"]


def test_anisotropic_nifti_processed_at_model_spacing_and_written_back(subject, tmp_path):
    src = _anisotropic(subject["image"], tmp_path / "thick_swi.nii.gz", order=1)
    src_mask = _anisotropic(subject["brainmask"], tmp_path / "thick_mask.nii.gz", order=0)
    native = nib.load(str(src))
    assert aff2axcodes(native.affine) == ("L", "P", "S")
    np.testing.assert_allclose(native.header.get_zooms(), ANISO_SPACING, atol=1e-4)

    # the preprocessing pipeline: canonical RAS, native anisotropic spacing kept
    from transforms.pipelines import preprocessing

    data = preprocessing(keys=("image",), mask_keys=("brainmask",), label_keys=())(
        {"image": str(src), "brainmask": str(src_mask)}
    )
    assert aff2axcodes(np.asarray(data["image"].affine)) == ("R", "A", "S")
    np.testing.assert_allclose(np.asarray(data["image"].pixdim), ANISO_SPACING, atol=1e-4)
    assert tuple(data["image"].shape[1:]) == native.shape[:3]

    # the helper resamples to the model's 0.98 x 0.98 x 1 mm grid: close to the original phantom voxels
    orig = nib.load(subject["image"])
    can = external.to_canonical(src, spacing=(0.98, 0.98, 1.0))
    assert can.resampled and np.allclose(can.spacing, (0.98, 0.98, 1.0), atol=1e-4)
    assert all(abs(a - b) <= 1 for a, b in zip(can.array.shape, orig.shape))
    # aligned with the original voxels: best match at zero shift (thick slices lose small veins/CMBs, hence
    # the moderate absolute level)
    n = min(can.array.shape[2], orig.shape[2]) - 4
    a, b = can.array[..., 2 : 2 + n], orig.get_fdata(dtype=np.float32)
    brain = np.asarray(nib.load(subject["brainmask"]).dataobj)[..., 2 : 2 + n] > 0
    corr = {dz: np.corrcoef(a[brain], b[..., 2 + dz : 2 + dz + n][brain])[0, 1] for dz in (-2, -1, 0, 1, 2)}
    assert max(corr, key=corr.get) == 0 and corr[0] > 0.8, corr

    # written back on the thick-slice grid, with its affine and header
    out = tmp_path / "thick_swi_processed.nii.gz"
    external.write_like(can.array, can, out)
    _assert_same_geometry_and_header(out, src)
    back, ref = nib.load(str(out)).get_fdata(), native.get_fdata()
    assert np.abs(back - ref).mean() / np.abs(ref).mean() < 0.05
    # labels go back with nearest-neighbour interpolation: still binary, same mask
    mask_can = external.to_canonical(src_mask, spacing=(0.98, 0.98, 1.0), order=0, dtype=np.uint8)
    mask_out = tmp_path / "thick_mask_processed.nii.gz"
    external.write_like(mask_can.array, mask_can, mask_out)
    m_back, m_ref = np.asarray(nib.load(str(mask_out)).dataobj), np.asarray(nib.load(str(src_mask)).dataobj)
    assert set(np.unique(m_back)) <= {0, 1}
    dice = 2 * np.logical_and(m_back, m_ref).sum() / (m_back.sum() + m_ref.sum())
    assert dice > 0.97, dice


def _write_dicom_series(volume: np.ndarray, affine_ras: np.ndarray, folder: Path) -> None:
    """Write a (X, Y, Z) int16 volume as an MR DICOM series (one file per slice) with ITK/GDCM."""
    assert not folder.exists()
    write_dicom_series(volume, folder, affine_ras=affine_ras)


def test_dicom_series_from_phantom(subject, tmp_path):
    """A DICOM series written from a phantom subject (LPS storage) loads as the phantom's RAS volume."""
    orig = nib.load(subject["image"])
    vol = orig.get_fdata(dtype=np.float32)
    scaled = np.rint(vol / vol.max() * 3000).astype(np.int16)
    lps = nib.Nifti1Image(scaled, orig.affine).as_reoriented(
        ornt_transform(io_orientation(orig.affine), axcodes2ornt(("L", "P", "S")))
    )
    folder = tmp_path / "dicom" / "series1"
    _write_dicom_series(np.asarray(lps.dataobj), lps.affine, folder)
    assert len(list(folder.glob("*.dcm"))) == orig.shape[2]

    data = _pipeline()({"image": str(folder), "brainmask": subject["brainmask"], "label": subject["label"]})
    np.testing.assert_allclose(np.asarray(data["image"].affine), orig.affine, atol=1e-3)
    ref = _pipeline()(dict(subject, image=str(_nifti(scaled, orig, tmp_path / "scaled.nii.gz"))))
    np.testing.assert_allclose(np.asarray(data["image"]), np.asarray(ref["image"]), atol=1e-6)

    can = external.to_canonical(folder)
    np.testing.assert_array_equal(can.array, scaled.astype(np.float32))
    np.testing.assert_allclose(can.affine, orig.affine, atol=1e-3)
    # a result computed in the canonical grid is written as NIfTI in the series' patient space
    out = tmp_path / "dicom_result.nii.gz"
    external.write_like(can.array > 1500, can, out, dtype=np.uint8)
    res = nib.load(str(out))
    np.testing.assert_allclose(res.affine, can.source_affine, atol=1e-6)
    expected = external.from_canonical(can.array > 1500, can)
    np.testing.assert_array_equal(np.asarray(res.dataobj), expected.astype(np.uint8))
    with pytest.raises(ValueError, match="refusing to write over an input"):
        external.write_like(can.array, can, folder)

    # the command line: DICOM series -> canonical NIfTI for the bundles, and a result back to the series' grid
    nifti = tmp_path / "series1_ras.nii.gz"
    assert external_cli.main(["to-canonical", str(folder), str(nifti)]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(str(nifti)).dataobj), can.array)
    result = tmp_path / "series1_result.nii.gz"
    nib.save(nib.Nifti1Image((can.array > 1500).astype(np.uint8), nib.load(str(nifti)).affine), str(result))
    back = tmp_path / "series1_result_native.nii.gz"
    assert external_cli.main(["back", str(result), str(folder), str(back)]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(str(back)).dataobj), expected.astype(np.uint8))
    assert external_cli.main(["back", str(result), str(folder), str(back)]) == 1  # exists: kept unless --overwrite
    assert external_cli.main(["to-canonical", str(nifti), str(nifti), "--overwrite"]) == 1  # never over the input


def _nifti(arr: np.ndarray, like: nib.Nifti1Image, path: Path) -> Path:
    nib.save(nib.Nifti1Image(arr, like.affine), str(path))
    return path


def test_bad_external_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.nii.gz"):
        external.to_canonical(tmp_path / "nothing.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.nii.gz: not a readable NIfTI"):
        external.to_canonical(junk)
    four_d = _nifti(np.zeros((4, 4, 4, 2), np.float32), nib.Nifti1Image(np.zeros((1, 1, 1)), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(ValueError, match="4d.nii.gz: expected a 3-D volume"):
        external.to_canonical(four_d)
    nan = np.zeros((4, 4, 4), np.float32)
    nan[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="nan.nii.gz: contains NaN"):
        external.to_canonical(_nifti(nan, nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz"))
    empty = tmp_path / "empty_series"
    empty.mkdir()
    (empty / "x.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(ValueError, match="empty_series: not a readable DICOM series"):
        external.to_canonical(empty)
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*")), os.listdir(tmp_path)

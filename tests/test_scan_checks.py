"""Input geometry checks: DICOM series choice and slice gaps, plausible voxel sizes, spacing-noise robustness."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cmb_synthesis.data.brainmask import estimate_brainmask
from cmb_synthesis.data.dicom import list_series
from cmb_synthesis.data.geometry import canonical_spacing, check_spacing
from cmb_synthesis.data.scans import read_image, to_canonical
from cmb_synthesis.detection.inference import probability_map
from dicom_writer import write_dicom_series

UID_A = "1.2.826.0.1.3680043.8.498.91001"
UID_B = "1.2.826.0.1.3680043.8.498.91002"


def _write_series(volume: np.ndarray, folder: Path, uid: str, description: str, prefix: str = "IM",
                  spacing: tuple[float, float, float] = (0.9, 0.8, 1.5)) -> list[Path]:
    """An axial MR DICOM series (one file per slice, LPS axes) of a (X, Y, Z) int16 volume."""
    return write_dicom_series(volume, folder, series_uid=uid, description=description, prefix=prefix, spacing=spacing)


def _volume(seed: int, shape=(8, 9, 12)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3000, size=shape).astype(np.int16)


def test_dicom_series_with_a_missing_or_corrupt_slice_is_refused(tmp_path):
    vol = _volume(0)
    folder = tmp_path / "gap"
    files = _write_series(vol, folder, UID_A, "SWI")
    np.testing.assert_array_equal(to_canonical(folder, dtype=None).array, vol[::-1, ::-1])  # LPS -> RAS
    files[6].unlink()  # IM0007.dcm
    with pytest.raises(ValueError, match=r"gap: DICOM series .*expected 1\.5 mm between slices, found 3 mm between "
                                         r"IM0006\.dcm .* and IM0008\.dcm") as e:
        to_canonical(folder)
    assert "unreadable" not in str(e.value)
    corrupt = tmp_path / "corrupt"
    files = _write_series(vol, corrupt, UID_A, "SWI")
    files[3].write_bytes(b"\0" * 300)  # IM0004.dcm: truncated to garbage
    with pytest.raises(ValueError, match=r"corrupt: .*not evenly spaced.*IM0003\.dcm.*IM0005\.dcm.*unreadable files "
                                         r"in the folder: IM0004\.dcm"):
        read_image(corrupt / "IM0001.dcm")
    dup = tmp_path / "duplicate"  # two acquisitions at the same positions in one series
    _write_series(vol, dup, UID_A, "SWI", prefix="E1_")
    _write_series(vol, dup, UID_A, "SWI", prefix="E2_")
    with pytest.raises(ValueError, match="duplicate: .*two slices at the same position"):
        to_canonical(dup)


def test_folder_with_several_series_needs_a_series_uid(tmp_path):
    folder = tmp_path / "exam"
    swi, phase = _volume(1), _volume(2)
    _write_series(swi, folder, UID_A, "SWI magnitude", prefix="A")
    _write_series(phase, folder, UID_B, "SWI phase", prefix="B")
    (folder / "notes.txt").write_text("not dicom")
    series, unreadable = list_series(folder)
    assert [(s.uid, s.description, len(s.files)) for s in series] == [(UID_A, "SWI magnitude", 12),
                                                                      (UID_B, "SWI phase", 12)]
    assert unreadable == ["notes.txt"]
    with pytest.raises(ValueError, match=rf"exam: 2 DICOM series in one folder.*{UID_A} \('SWI magnitude', 12 "
                                         rf"files\); {UID_B} \('SWI phase', 12 files\)"):
        to_canonical(folder)
    for uid, vol in ((UID_A, swi), (UID_B, phase)):
        can = to_canonical(folder, series_uid=uid, dtype=None)
        np.testing.assert_array_equal(can.array, vol[::-1, ::-1])  # LPS storage -> RAS
        np.testing.assert_allclose(can.spacing, (0.9, 0.8, 1.5), atol=1e-5)
    # one file of the folder selects its own series
    np.testing.assert_array_equal(to_canonical(folder / "B0003.dcm", dtype=None).array, phase[::-1, ::-1])
    with pytest.raises(ValueError, match=rf"exam: no DICOM series with SeriesInstanceUID 1\.2\.3.*{UID_B}"):
        read_image(folder, series_uid="1.2.3")


def _header_only_nifti(path: Path, zooms: tuple[float, float, float], shape=(512, 512, 512)) -> Path:
    """A .nii whose header announces ``shape`` float32 voxels of size ``zooms`` but holds no voxel data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(np.diag([*zooms, 1.0]), code=1)
    hdr.set_zooms(zooms)
    hdr["vox_offset"] = 352
    hdr["magic"] = b"n+1"
    path.write_bytes(hdr.binaryblock + b"\0" * 4)
    return path


def test_implausible_spacing_is_refused_before_reading_voxels(tmp_path):
    tiny = _header_only_nifti(tmp_path / "micrometres.nii", (0.001, 0.001, 0.001))
    with pytest.raises(ValueError, match=r"micrometres\.nii: implausible voxel spacing \(0\.001, 0\.001, 0\.001\)"):
        to_canonical(tiny, spacing=(0.98, 0.98, 1.0))
    thick = _header_only_nifti(tmp_path / "thick.nii", (1.0, 1.0, 50.0), shape=(4, 4, 4))
    with pytest.raises(ValueError, match=r"thick\.nii: implausible voxel spacing \(1\.0, 1\.0, 50\.0\).*0\.1-10 mm"):
        read_image(thick)
    with pytest.raises(ValueError, match="implausible target spacing"):
        to_canonical(thick, spacing=(0.001, 1.0, 1.0), spacing_range=(0.1, 60.0))
    ok = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.diag([1.0, 1.0, 50.0, 1.0])), str(ok))
    assert to_canonical(ok, spacing_range=(0.1, 60.0)).spacing == (1.0, 1.0, 50.0)  # configurable
    assert to_canonical(ok, spacing_range=None).array.shape == (4, 4, 4)


def test_spacing_far_from_training_spacing_is_logged(tmp_path, caplog):
    # voxel axes (A, S, L): the 3 mm axis is S in canonical order
    affine = np.array([[0, 0, -1.0, 0], [0.98, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1]])
    assert canonical_spacing(affine) == (1.0, 0.98, 3.0)
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), affine), str(path))
    with caplog.at_level(logging.WARNING, logger="cmb_synthesis.data.geometry"):
        can = to_canonical(path, expected_spacing=(1.0, 1.0, 2.5))
        assert not caplog.records
        to_canonical(path, expected_spacing=(0.98, 0.98, 1.0))
    assert can.array.shape == (6, 4, 5)
    assert len(caplog.records) == 1 and "oblique.nii.gz" in caplog.text and "3.00x" in caplog.text
    assert check_spacing(affine, "x", expected_spacing=(1.0, 0.98, 3.0)) == (1.0, 0.98, 3.0)


def test_mm_to_voxel_conversions_ignore_spacing_noise():
    clean, noisy = (1.0, 1.0, 1.0), (1.00000003, 1.0, 0.99999997)
    coords = np.array([[10, 10, 10], [3, 4, 5], [11, 10, 10]])
    probs = np.array([0.9, 0.4, 0.6])
    for r in (1.0, 1.5, 2.0, 3.0):
        a = probability_map((20, 20, 20), coords, probs, clean, radius_mm=r)
        b = probability_map((20, 20, 20), coords, probs, noisy, radius_mm=r)
        np.testing.assert_array_equal(a, b)
        if r == int(r):  # the voxel exactly r mm away is inside the ball (boundary included)
            assert b[10 - int(r), 10, 10] == np.float32(0.9) and b[10, 10 + int(r), 10] == np.float32(0.9)
    # brain-mask erosion of 1 mm at 0.4 mm voxels: 2.5 voxels, whatever the noise
    rng = np.random.default_rng(0)
    vol = np.zeros((40, 40, 40))
    g = np.meshgrid(*[np.arange(40)] * 3, indexing="ij")
    vol[np.sqrt(sum((x - 20.0) ** 2 for x in g)) < 14] = 1.0
    vol += 0.05 * rng.standard_normal(vol.shape)
    np.testing.assert_array_equal(estimate_brainmask(vol, (0.4, 0.4, 0.4), method="otsu"),
                                  estimate_brainmask(vol, (0.39999999, 0.4, 0.4), method="otsu"))

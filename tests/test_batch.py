"""The batch-inference driver (cmb_synthesis.data.batch) through both bundles' ``run_inference``: the plan and the
output folder are checked before any scan, a scan's outputs are one unit, ids are unique, stale temporaries are
removed, file modes follow the umask, and a scan with nothing to paint fails."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cmb_synthesis.data import io
from cmb_synthesis.data.batch import BatchInferenceError, BatchJob, check_jobs
from cmb_synthesis.data.naming import unique_scan_ids
from cmb_synthesis.detection import inference as detection
from cmb_synthesis.synthesis.inference import run_inference
from transforms.lesion_mask import LesionBank

SHAPE = (48, 40, 36)
AFFINE = np.diag([-0.98, 0.98, 1.0, 1.0])
PATCH = (48, 40, 16)


class Darken(torch.nn.Module):
    """A stand-in generator: scales the intensity under the mask channel by ``factor``; counts its calls."""

    def __init__(self, factor: float = 0.5):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.factor, self.calls = factor, 0

    def forward(self, x):
        self.calls += 1
        return x[:, :1] * (1 - self.factor * (x[:, 1:] > 0).float())


def _save(path: Path, arr: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(arr, AFFINE), str(path))
    return path


def _scan(folder: Path, name: str, seed: int, mask: str = "lesion", brainmask: bool = True) -> Path:
    """``<name>.nii.gz`` (a noisy SWI) with ``<id>_brainmask`` and, unless ``mask="none"``, ``<id>_mask`` beside
    it: one 3-voxel cube lesion in the brain (``"lesion"``), an all-zero mask (``"empty"``) or a lesion outside
    the brain mask (``"outside"``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sid = name[: -len("_swi")] if name.endswith("_swi") else name
    image = _save(folder / f"{name}.nii.gz", (100 + 20 * rng.random(SHAPE)).astype(np.float32))
    if brainmask:
        bm = np.zeros(SHAPE, np.uint8)
        bm[4:44, 4:36, 2:34] = 1
        _save(folder / f"{sid}_brainmask.nii.gz", bm)
    if mask != "none":
        lab = np.zeros(SHAPE, np.uint16)
        if mask == "lesion":
            lab[20:23, 18:21, 15:18] = 1
        elif mask == "outside":
            lab[0:2, 0:2, 0:2] = 1
        _save(folder / f"{sid}_mask.nii.gz", lab)
    return image


def _detector():
    from cmb_synthesis.detection.classifier import build_classifier

    torch.manual_seed(0)
    return build_classifier("classifier", patch_size=(32, 32, 16), channels=(4, 8), strides=(2, 2), num_res_units=1).eval()


def _fail_saving(monkeypatch, marker: str) -> None:
    """Make nibabel raise ``OSError("disk full")`` when writing a file whose name contains ``marker``."""
    real_save = nib.save

    def save(img, filename, *a, **k):
        if marker in os.path.basename(str(filename)):
            raise OSError("disk full")
        return real_save(img, filename, *a, **k)

    monkeypatch.setattr(nib, "save", save)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_ids_that_leave_the_output_folder_are_refused_before_any_output(tmp_path):
    src = tmp_path / "in"
    items = []
    for n, sid in enumerate(("../../x/evil", str(tmp_path / "abs" / "evil"))):
        image = _scan(src, f"s{n}_swi", n)
        items.append({"image": image.name, "brainmask": f"s{n}_brainmask.nii.gz", "mask": f"s{n}_mask.nii.gz",
                      "group": "healthy", "id": sid})
    (src / "datalist.json").write_text(json.dumps({"test": items}))
    before, G = _tree(tmp_path), Darken()
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(ValueError, match="refused before any scan") as info:
        run_inference(src / "datalist.json", out, G_HP=G, patch=PATCH)
    msg = str(info.value)
    assert "'../../x/evil' is not a plain name" in msg and f"{tmp_path / 'abs' / 'evil'}' is not a plain name" in msg
    assert "outside the output folder" in msg
    assert G.calls == 0 and _tree(tmp_path) == before  # nothing created, not even the output folder


def test_check_jobs_names_every_problem_of_a_plan(tmp_path):
    out = tmp_path / "out"
    jobs = [
        BatchJob(".hidden", "a.nii.gz", {"x": out / ".hidden_x.nii.gz"}),
        BatchJob("dup", "b.nii.gz", {"x": out / "dup_x.nii.gz"}),
        BatchJob("dup", "c.nii.gz", {"x": out / "dup_y.nii.gz"}),
        BatchJob("far", "d.nii.gz", {"x": tmp_path / "elsewhere" / "far_x.nii.gz"}),
        BatchJob("same", "e.nii.gz", {"x": out / "dup_x.nii.gz"}),
        BatchJob("over", str(out / "over_x.nii.gz"), {"x": out / "over_x.nii.gz"}),
    ]
    with pytest.raises(ValueError) as info:
        check_jobs(jobs, out)
    msg = str(info.value)
    assert "5 problem(s)" in msg
    assert "a.nii.gz: id '.hidden' starts with '.'" in msg
    assert "id 'dup' is used by b.nii.gz, c.nii.gz" in msg
    assert "d.nii.gz: output x" in msg and "outside the output folder" in msg
    assert "dup_x.nii.gz: planned for both b.nii.gz and e.nii.gz" in msg
    assert "over_x.nii.gz: refusing to write over an input file" in msg
    check_jobs(jobs[1:2], out)  # a sound plan passes


@pytest.mark.e2e
def test_synthesis_overwrite_rerun_failing_mid_scan_keeps_the_previous_pair(tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    for n in (1, 2):
        _scan(src, f"s{n}_swi", n)
    run_inference(src, out, G_HP=Darken(0.5), patch=PATCH)
    first = {p.name: p.read_bytes() for p in out.glob("*.nii.gz")}
    assert len(first) == 4
    # the label is written, then writing the image fails: neither file of s1 may change
    _fail_saving(monkeypatch, ".s1_synthetic.nii.gz.")
    with pytest.raises(BatchInferenceError, match="(?s)1 of 2 scans failed.*s1_swi.nii.gz: OSError: disk full"):
        run_inference(src, out, G_HP=Darken(0.9), patch=PATCH, overwrite=True)
    now = {p.name: p.read_bytes() for p in out.glob("*.nii.gz")}
    assert now["s1_synthetic.nii.gz"] == first["s1_synthetic.nii.gz"]
    assert now["s1_synthetic_cmb.nii.gz"] == first["s1_synthetic_cmb.nii.gz"]
    assert now["s2_synthetic.nii.gz"] != first["s2_synthetic.nii.gz"]  # the other scan was redone
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.e2e
def test_detection_overwrite_rerun_failing_keeps_the_previous_candidate_rows(tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "det"
    for n in (1, 2):
        _scan(src, f"s{n}_swi", n)
    detection.run_inference(_detector(), src, out, threshold=0.5)
    rows = (out / "candidates.csv").read_text().splitlines()
    s1 = {name: (out / name).read_bytes() for name in ("s1_cmb_prob.nii.gz", "s1_candidates.csv")}
    assert any(r.startswith("s1_swi.nii.gz,") for r in rows) and any(r.startswith("s2_swi.nii.gz,") for r in rows)
    _fail_saving(monkeypatch, ".s1_cmb_prob.nii.gz.")
    with pytest.raises(BatchInferenceError, match="1 of 2 scans failed"):
        detection.run_inference(_detector(), src, out, overwrite=True, threshold=0.5)
    assert {name: (out / name).read_bytes() for name in s1} == s1
    again = (out / "candidates.csv").read_text().splitlines()
    assert again[0] == rows[0] and sorted(again) == sorted(rows)  # s1's earlier rows kept, s2's rewritten


def test_unique_scan_ids_from_the_path():
    assert unique_scan_ids(["d/x.nii.gz", "d/x_swi.nii.gz", "d/y_swi.nii.gz"]) == ["x", "x_swi", "y"]
    assert unique_scan_ids(["s1/swi.nii.gz", "s2/swi.nii.gz"]) == ["s1_swi", "s2_swi"]
    assert unique_scan_ids(["a/x.nii.gz", "b/y.nii.gz"], ["x", None]) == ["x", "y"]
    assert unique_scan_ids(["a/x.nii.gz", "b/x.nii.gz"], ["x", None]) == ["x", "b_x"]  # given ids are kept
    with pytest.raises(ValueError, match="id 's' for a/x.nii.gz, b/y.nii.gz"):
        unique_scan_ids(["a/x.nii.gz", "b/y.nii.gz"], ["s", "s"])
    with pytest.raises(ValueError, match="scan ids must be unique"):
        unique_scan_ids(["a/x.nii.gz", "a/x.nii.gz"])


@pytest.mark.e2e
def test_clashing_ids_are_made_unique_and_every_scan_is_processed(tmp_path):
    # detection: x.nii.gz beside x_swi.nii.gz (both map to "x")
    src = tmp_path / "det_in"
    _scan(src, "x", 1)
    _scan(src, "x_swi", 2)
    summary = detection.run_inference(_detector(), src, tmp_path / "det", threshold=0.5)
    assert {(e["id"], Path(e["image"]).name) for e in summary["written"]} == {("x", "x.nii.gz"), ("x_swi", "x_swi.nii.gz")}
    assert summary["n_inputs"] == 2 and not summary["skipped"] and not summary["failed"]
    a, b = (nib.load(str(tmp_path / "det" / f"{i}_cmb_prob.nii.gz")).get_fdata() for i in ("x", "x_swi"))
    assert a.shape == b.shape == SHAPE

    # synthesis: a datalist with s1/swi.nii.gz and s2/swi.nii.gz (both map to "swi")
    items = []
    for n in (1, 2):
        _scan(tmp_path / "syn_in" / f"s{n}", "swi", 10 + n)
        items.append({"image": f"s{n}/swi.nii.gz", "brainmask": f"s{n}/swi_brainmask.nii.gz",
                      "mask": f"s{n}/swi_mask.nii.gz", "group": "healthy"})
    (tmp_path / "syn_in" / "datalist.json").write_text(json.dumps({"training": items}))
    out = tmp_path / "syn"
    summary = run_inference(tmp_path / "syn_in" / "datalist.json", out, G_HP=Darken(), patch=PATCH)
    assert sorted(e["id"] for e in summary["written"]) == ["s1_swi", "s2_swi"] and not summary["failed"]
    for n in (1, 2):  # each output comes from its own input (equal outside the lesion)
        src_img = nib.load(str(tmp_path / "syn_in" / f"s{n}" / "swi.nii.gz")).get_fdata()
        syn = nib.load(str(out / f"s{n}_swi_synthetic.nii.gz")).get_fdata()
        assert np.allclose(syn[:10], src_img[:10], atol=1e-3)
    # ids given twice: refused, listing both files, nothing written
    for it in items:
        it["id"] = "same"
    (tmp_path / "syn_in" / "datalist.json").write_text(json.dumps({"training": items}))
    with pytest.raises(ValueError, match=r"id 'same' for .*s1/swi.nii.gz, .*s2/swi.nii.gz"):
        run_inference(tmp_path / "syn_in" / "datalist.json", tmp_path / "syn2", G_HP=Darken(), patch=PATCH)
    assert not (tmp_path / "syn2").exists()


def test_unwritable_output_folder_is_refused_before_any_scan(tmp_path, monkeypatch):
    src = tmp_path / "in"
    _scan(src, "s1_swi", 1)
    G = Darken()
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="a_file: output folder is an existing file"):
        run_inference(src, a_file, G_HP=G, patch=PATCH)
    with pytest.raises(NotADirectoryError, match="a_file/sub: cannot create the output folder, a parent is a file"):
        detection.run_inference(_detector(), src, a_file / "sub", threshold=0.5)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):  # root ignores permission bits: deny access the way the OS would
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == read_only else real_access(p, mode, **k))
        with pytest.raises(PermissionError, match="read_only: output folder is not writable"):
            run_inference(src, read_only, G_HP=G, patch=PATCH)
    finally:
        read_only.chmod(0o755)
    assert G.calls == 0 and list(read_only.iterdir()) == []


@pytest.mark.e2e
def test_stale_temporaries_are_removed_and_outputs_inside_the_input_folder_are_not_inputs(tmp_path):
    src = tmp_path / "in"
    for n in (1, 2):
        _scan(src, f"s{n}_swi", n)
    # a killed write left a complete-looking temporary scan in the input folder, and temporaries in the output
    (src / ".s1_swi.nii.gz.ab12cd34.tmp.nii.gz").write_bytes((src / "s1_swi.nii.gz").read_bytes())
    out = src / "det"
    out.mkdir()
    stale = [out / ".s1_cmb_prob.nii.gz.q1w2e3r4.tmp.nii.gz", out / ".candidates.csv.zz_99xyz.tmp.csv"]
    for p in stale:
        p.write_bytes(b"half")
    (out / ".cohort.abcdefgh.tmp").mkdir()
    (out / ".cohort.abcdefgh.tmp" / "x.nii.gz").write_bytes(b"half")
    (out / ".keep").write_text("user file")
    (out / "notes.txt").write_text("user file")
    summary = detection.run_inference(_detector(), src, out, threshold=0.5)
    assert summary["n_inputs"] == 2 and sorted(e["id"] for e in summary["written"]) == ["s1", "s2"]
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert hidden == [".keep"] and (out / "notes.txt").read_text() == "user file"
    # the output folder, now inside the input folder and full of outputs, is not taken for a DICOM series
    again = detection.run_inference(_detector(), src, out, threshold=0.5)
    assert again["n_inputs"] == 2 and sorted(e["id"] for e in again["skipped"]) == ["s1", "s2"] and not again["failed"]
    # the same for synthesis (a folder input)
    syn = run_inference(src, src / "syn", G_HP=Darken(), patch=PATCH)
    assert sorted(e["id"] for e in syn["written"]) == ["s1", "s2"]
    syn = run_inference(src, src / "syn", G_HP=Darken(), patch=PATCH)
    assert syn["n_inputs"] == 2 and sorted(e["id"] for e in syn["skipped"]) == ["s1", "s2"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_modes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        json_path = io.write_json({"a": 1}, tmp_path / "x.json")
        nii = io.save_nifti(np.zeros((2, 2, 2), np.float32), np.eye(4), tmp_path / "x.nii.gz")
        with io.atomic_outputs({"a": tmp_path / "a.csv", "b": tmp_path / "b.csv"}) as tmp:
            for p in tmp.values():
                p.write_text("x\n")
        with io.atomic_directory(tmp_path / "folder") as d:
            (d / "f.txt").write_text("x")
        with io.atomic_directory(tmp_path / "folder", overwrite=True) as d:  # replacing a folder, too
            (d / "g.txt").write_text("x")
    finally:
        os.umask(old)
    for p in (json_path, nii, tmp_path / "a.csv", tmp_path / "b.csv"):
        assert _mode(p) == 0o666 & ~umask, p
    assert _mode(tmp_path / "folder") == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv", "folder", "x.json", "x.nii.gz"]


def _bank(size: int = 2) -> LesionBank:
    """A lesion bank of one ``size``-voxel cube lesion."""
    lab, bm = np.zeros((20, 20, 20), np.int64), np.ones((20, 20, 20), np.uint8)
    lab[8:8 + size, 8:8 + size, 8:8 + size] = 1
    return LesionBank.from_arrays([lab], [bm], spacing=(0.98, 0.98, 1.0))


@pytest.mark.e2e
def test_a_scan_with_nothing_to_paint_fails_and_writes_nothing(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _scan(src, "ok_swi", 1)
    _scan(src, "empty_swi", 2, mask="empty")
    _scan(src, "outside_swi", 3, mask="outside")
    _scan(src, "sampled_swi", 4, mask="none")
    _scan(src, "nobrain_swi", 5, mask="none", brainmask=False)
    with pytest.raises(BatchInferenceError, match="4 of 5 scans failed") as info:
        run_inference(src, out, G_HP=Darken(), patch=PATCH, lesion_bank=_bank(), n_lesions=0)
    failed = {f["id"]: f["error"] for f in info.value.failures}
    assert "no lesion to paint: the mask" in failed["empty"] and "empty_mask.nii.gz is empty" in failed["empty"]
    assert "no lesion to paint: all 1 lesions of" in failed["outside"] and "outside the brain mask" in failed["outside"]
    assert "no lesion to paint: 0 lesions placed (n_lesions=0" in failed["sampled"]
    # no brain mask beside it: one is estimated (synthesis inference's fallback), then nothing is placed
    assert "no lesion to paint: 0 lesions placed" in failed["nobrain"] and "brain mask (estimated)" in failed["nobrain"]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["ok_synthetic.nii.gz", "ok_synthetic_cmb.nii.gz"]
    with open(out / "summary.csv", newline="") as f:
        status = {r["id"]: r["status"] for r in csv.DictReader(f)}
    assert status == {"empty": "failed", "nobrain": "failed", "ok": "written", "outside": "failed", "sampled": "failed"}
    # sampled lesions when they fit; none when the brain mask is smaller than every lesion of the bank
    summary = run_inference(src, out, G_HP=Darken(), patch=PATCH, lesion_bank=_bank(), n_lesions=2, raise_on_error=False)
    (sampled,) = [e for e in summary["written"] if e["id"] == "sampled"]
    assert sampled["n"] == 2 and sampled["mask"] == "sampled"
    tiny = tmp_path / "tiny"
    _scan(tiny, "t_swi", 6, mask="none")
    bm = np.zeros(SHAPE, np.uint8)
    bm[18:23, 18:23, 18:23] = 1
    _save(tiny / "t_brainmask.nii.gz", bm)
    with pytest.raises(BatchInferenceError, match="t_swi.nii.gz: .*no lesion to paint"):
        run_inference(tiny, tmp_path / "out_tiny", G_HP=Darken(), patch=PATCH, lesion_bank=_bank(8), n_lesions=2)
    assert not list((tmp_path / "out_tiny").glob("*.nii.gz"))

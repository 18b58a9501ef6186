"""Bad inputs and faults through the real commands: ``python -m monai.bundle run ...`` of both bundles,
``python -m cmb_synthesis.evaluation`` and ``python -m cmb_synthesis.phantom``, as subprocesses at small size.

For every case: a non-zero exit (or the documented behaviour), ONE final ``error: ...`` line on stderr naming
the file and the problem (no traceback), no output half-written, nothing written outside the output folder (nor
into the working directory, nor into the bundle folders) and the inputs untouched. The bundles run from a copy
of their folder holding untrained networks built with train.yaml's settings (``models/model.pt``,
``models/G_HP.pt``); nothing is trained. The bad scans of detection inference share one batch run (a batch
reports each bad scan and goes on). Each case gets its own folder (inputs, output, an empty working
directory); the commands run once per module, two at a time, and each test checks one of them.
``docs/deployment.md`` ("Bad input or fault -> what the bundle does") lists each case with its test.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SHAPE = (64, 64, 32)
AFFINE = np.diag([0.98, 0.98, 1.0, 1.0])
TIMEOUT_S = 300
PASSWD = Path("/etc/passwd")


# ----------------------------------------------------------------------------------------------------- helpers


def _swi(seed: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """(X, Y, Z) float32 SWI-like volume: noisy tissue around 100 with three dark 2-voxel balls (CMB-like)."""
    rng = np.random.default_rng(seed)
    vol = (100 + 5 * rng.standard_normal(shape)).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    for centre in ((20, 20, 16), (40, 36, 12), (30, 46, 20)):
        vol[((grid - np.array(centre)) ** 2).sum(-1) <= 4] = 20.0
    return vol


def _save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _brainmask(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    bm = np.zeros(shape, np.uint8)
    bm[4:-4, 4:-4, 2:-2] = 1
    return bm


def _snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (files) or ``"dir"`` of everything under ``root``."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _outside(snapshot: dict[str, str], *folders: str) -> dict[str, str]:
    """The entries of ``snapshot`` that are none of ``folders`` nor under one."""
    return {k: v for k, v in snapshot.items() if not any(k == f or k.startswith(f + os.sep) for f in folders)}


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error: ...`` line a failed command ends with (non-zero exit, no traceback anywhere)."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert sum(ln.startswith("error: ") for ln in lines) == 1, proc.stderr[-3000:]
    return lines[-1]


def _summary_rows(out: Path) -> dict[str, tuple[str, str]]:
    """``summary.csv`` of a batch: id -> (status, message)."""
    with open(out / "summary.csv", newline="") as f:
        return {r["id"]: (r["status"], r["message"]) for r in csv.DictReader(f)}


class _Payload:
    """Pickles as a call of ``os.mkdir(marker)``: unpickling it with plain ``pickle`` creates ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


# ------------------------------------------------------------------------------------------- the cases' inputs


def _bundle_args(run_id: str, bundle: Path, overlay: str | None, *args: str) -> list[str]:
    """``-m monai.bundle run RUN_ID`` with the bundle copy's train.yaml (and ``overlay``) and ``args``."""
    files = [str(bundle / "configs" / "train.yaml")] + ([str(bundle / "configs" / overlay)] if overlay else [])
    return ["-m", "monai.bundle", "run", run_id, "--config_file", repr(files), "--bundle_root", str(bundle), *args]


# input name -> (the file its failure message names first, the problem it states)
BAD_SCANS = {
    "truncated_swi.nii.gz": ("truncated_swi.nii.gz", "truncated or corrupt voxel data (EOFError"),
    "empty_swi.nii.gz": ("empty_swi.nii.gz", "not a readable NIfTI image"),
    "text_swi.nii.gz": ("text_swi.nii.gz", "not a readable NIfTI image"),
    "flat_swi.nii.gz": ("flat_swi.nii.gz", "expected a 3-D volume, got shape (64, 64)"),
    "multi_swi.nii.gz": ("multi_swi.nii.gz", "expected a 3-D volume, got shape (64, 64, 32, 3)"),
    "nan_swi.nii.gz": ("nan_swi.nii.gz", "contains NaN or Inf voxels"),
    "zero_swi.nii.gz": ("zero_swi.nii.gz", "no brain mask beside it and none can be estimated"),
    "zeromasked_swi.nii.gz": ("zeromasked_swi.nii.gz", "constant image (all voxels 0.0); nothing to rescale"),
    "othermask_swi.nii.gz": ("othermask_brainmask.nii.gz", "brainmask shape (1, 32, 32, 16) does not match image"),
    "micro_swi.nii": ("micro_swi.nii", "implausible voxel spacing (0.001, 0.001, 0.001)"),
    "thick_swi.nii.gz": ("thick_swi.nii.gz", "implausible voxel spacing (1.0, 1.0, 50.0)"),
    "exam": ("exam", "2 DICOM series in one folder; choose one with series_uid"),
}


def _batch(root: Path, bundles: dict[str, Path]) -> list[str]:
    """Detection inference on a folder with two good scans whose ids clash (``x.nii.gz``, ``x_swi.nii.gz``),
    one bad scan per :data:`BAD_SCANS` entry, and the temporary copy of a good scan that a killed write would
    leave (hidden: not an input)."""
    from test_scan_checks import UID_A, UID_B, _header_only_nifti, _write_series

    src = root / "in"
    _save(src / "x.nii.gz", _swi(1))
    _save(src / "x_swi.nii.gz", _swi(2))
    good = (src / "x.nii.gz").read_bytes()
    (src / "truncated_swi.nii.gz").write_bytes(good[: len(good) // 2])
    (src / "empty_swi.nii.gz").write_bytes(b"")
    (src / "text_swi.nii.gz").write_text("subject,age\n001,71\n")
    _save(src / "flat_swi.nii.gz", _swi(3)[:, :, 16])
    _save(src / "multi_swi.nii.gz", np.stack([_swi(4)] * 3, -1))
    nan = _swi(5)
    nan[30, 30, 10] = np.nan
    _save(src / "nan_swi.nii.gz", nan)
    _save(src / "zero_swi.nii.gz", np.zeros(SHAPE, np.float32))
    _save(src / "zeromasked_swi.nii.gz", np.zeros(SHAPE, np.float32))
    _save(src / "zeromasked_brainmask.nii.gz", _brainmask())
    _save(src / "othermask_swi.nii.gz", _swi(6))
    _save(src / "othermask_brainmask.nii.gz", _brainmask((32, 32, 16)))
    _header_only_nifti(src / "micro_swi.nii", (0.001, 0.001, 0.001))  # a 512**3 header without voxels
    _save(src / "thick_swi.nii.gz", _swi(7, (64, 64, 4)), np.diag([1.0, 1.0, 50.0, 1.0]))
    vol = np.random.default_rng(8).integers(0, 3000, size=(16, 16, 8)).astype(np.int16)
    _write_series(vol, src / "exam", UID_A, "SWI magnitude", prefix="A")
    _write_series(vol, src / "exam", UID_B, "SWI phase", prefix="B")
    (src / ".x_swi.nii.gz.ab12cd34.tmp.nii.gz").write_bytes((src / "x_swi.nii.gz").read_bytes())
    return _bundle_args("inference", bundles["cmb_detection"], "inference.yaml", "--dataset_dir", str(src),
                        "--output_dir", str(root / "out"), "--threshold", "0.5")


def _pickle(root: Path, bundles: dict[str, Path]) -> list[str]:
    """Detection inference with a ``model.pt`` holding the right weights plus a pickled call."""
    _save(root / "in" / "s1_swi.nii.gz", _swi(1))
    state = torch.load(bundles["cmb_detection"] / "models" / "model.pt", weights_only=True)
    torch.save({**state, "payload": _Payload(str(root / "payload_ran"))}, root / "model.pt")
    return _bundle_args("inference", bundles["cmb_detection"], "inference.yaml", "--dataset_dir", str(root / "in"),
                        "--output_dir", str(root / "out"), "--model_path", str(root / "model.pt"))


def _output_file(root: Path, bundles: dict[str, Path]) -> list[str]:
    """Detection inference whose output folder is an existing file."""
    _save(root / "in" / "s1_swi.nii.gz", _swi(1))
    (root / "results").write_text("a file where the output folder should go\n")
    return _bundle_args("inference", bundles["cmb_detection"], "inference.yaml", "--dataset_dir", str(root / "in"),
                        "--output_dir", str(root / "results"), "--threshold", "0.5")


def _phantom_output_file(root: Path, bundles: dict[str, Path]) -> list[str]:
    """The phantom generator whose output folder is an existing file."""
    (root / "results").write_text("a file where the cohort should go\n")
    return ["-m", "cmb_synthesis.phantom", "--output", str(root / "results")]


def _overrides(root: Path, bundles: dict[str, Path]) -> list[str]:
    """Detection inference with two misspelt keys and a non-integer epoch count."""
    return _bundle_args("inference", bundles["cmb_detection"], "inference.yaml", "--max_epoch", "2", "--overwite",
                        "true", "--max_epochs", "1.5", "--output_dir", str(root / "out"))


def _cuda(root: Path, bundles: dict[str, Path]) -> list[str]:
    """Detection inference on ``--device cuda`` (run with ``CUDA_VISIBLE_DEVICES=""``: no CUDA device)."""
    return _bundle_args("inference", bundles["cmb_detection"], "inference.yaml", "--device", "cuda",
                        "--output_dir", str(root / "out"))


def _empty_validation(root: Path, bundles: dict[str, Path]) -> list[str]:
    """Detection training on a datalist with two labelled training scans and an empty validation list."""
    data, items = root / "data", []
    for n in (1, 2):
        lab = np.zeros(SHAPE, np.uint16)
        lab[19:22, 19:22, 15:18] = 1
        _save(data / f"s{n}_swi.nii.gz", _swi(n))
        _save(data / f"s{n}_brainmask.nii.gz", _brainmask())
        _save(data / f"s{n}_cmb.nii.gz", lab)
        items.append({"image": f"s{n}_swi.nii.gz", "brainmask": f"s{n}_brainmask.nii.gz", "label": f"s{n}_cmb.nii.gz",
                      "group": "pathological", "id": f"s{n}"})
    (data / "datalist.json").write_text(json.dumps({"training": items, "validation": []}))
    return _bundle_args("training", bundles["cmb_detection"], None, "--datalist", str(data / "datalist.json"),
                        "--max_epochs", "1", "--epoch_length", "1", "--ckpt_dir", str(root / "models"),
                        "--log_dir", str(root / "runs"), "--cache_dir", str(root / "cache"))


def _healthy_scan(folder: Path, sid: str, seed: int) -> dict[str, str]:
    """``<sid>_swi.nii.gz`` with its brain mask and a one-lesion mask; the datalist item naming them."""
    lab = np.zeros(SHAPE, np.uint16)
    lab[30:33, 30:33, 14:17] = 1
    _save(folder / f"{sid}_swi.nii.gz", _swi(seed))
    _save(folder / f"{sid}_brainmask.nii.gz", _brainmask())
    _save(folder / f"{sid}_mask.nii.gz", lab)
    return {"image": f"{sid}_swi.nii.gz", "brainmask": f"{sid}_brainmask.nii.gz", "mask": f"{sid}_mask.nii.gz",
            "group": "healthy"}


def _evil_ids(root: Path, bundles: dict[str, Path]) -> list[str]:
    """Synthesis inference on a datalist whose ids are ``../../x/evil`` and an absolute path."""
    src = root / "in"
    items = [{**_healthy_scan(src, "s1", 1), "id": "../../x/evil"},
             {**_healthy_scan(src, "s2", 2), "id": str(root / "abs" / "evil")}]
    (src / "datalist.json").write_text(json.dumps({"test": items}))
    return _bundle_args("inference", bundles["cmb_synthesis"], "inference.yaml", "--dataset_dir",
                        str(src / "datalist.json"), "--output_dir", str(root / "a" / "b" / "out"))


def _passwd(root: Path, bundles: dict[str, Path]) -> list[str]:
    """Synthesis inference on a datalist with a good scan and an item naming ``../../../etc/passwd``
    (relative to the datalist's folder) as its image."""
    src = root / "in"
    good = _healthy_scan(src, "s1", 1)
    sneaky = {"image": os.path.relpath(PASSWD, src), "group": "healthy", "mask": good["mask"]}
    (src / "datalist.json").write_text(json.dumps({"test": [good, sneaky]}))
    return _bundle_args("inference", bundles["cmb_synthesis"], "inference.yaml", "--dataset_dir",
                        str(src / "datalist.json"), "--output_dir", str(root / "out"))


CMB_CENTRES = ((20, 20, 16), (40, 36, 12), (30, 46, 20))


def _evaluation(root: Path, bundles: dict[str, Path]) -> list[str]:
    """``python -m cmb_synthesis.evaluation`` of a candidates CSV (one hit, two false positives) against a
    0/255 binary label holding 3 CMBs."""
    data = root / "data"
    label = np.zeros(SHAPE, np.uint8)
    for c in CMB_CENTRES:
        label[c[0] - 1:c[0] + 2, c[1] - 1:c[1] + 2, c[2] - 1:c[2] + 2] = 255
    _save(data / "s1_swi.nii.gz", _swi(1))
    _save(data / "s1_cmb.nii.gz", label)
    (data / "datalist.json").write_text(json.dumps({"test": [{"image": "s1_swi.nii.gz", "label": "s1_cmb.nii.gz"}]}))
    with open(root / "candidates.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "i", "j", "k", "x", "y", "z", "probability"])
        for ijk, p in ((CMB_CENTRES[0], 0.9), ((5, 5, 5), 0.4), ((58, 8, 26), 0.2)):
            w.writerow(["s1_swi.nii.gz", *ijk, *nib.affines.apply_affine(AFFINE, ijk).round(4), p])
    return ["-m", "cmb_synthesis.evaluation", "--candidates", str(root / "candidates.csv"), "--datalist",
            str(data / "datalist.json"), "--output_dir", str(root / "report"), "--n_bootstrap", "20"]


# case -> (input builder returning the command's arguments, extra environment)
CASES: dict[str, tuple[Callable[[Path, dict[str, Path]], list[str]], dict[str, str]]] = {
    "batch": (_batch, {}),
    "passwd": (_passwd, {}),
    "empty_validation": (_empty_validation, {}),
    "evaluation": (_evaluation, {}),
    "pickle": (_pickle, {}),
    "evil_ids": (_evil_ids, {}),
    "output_file": (_output_file, {}),
    "overrides": (_overrides, {}),
    "cuda": (_cuda, {"CUDA_VISIBLE_DEVICES": ""}),
    "phantom_output_file": (_phantom_output_file, {}),
}


@dataclass
class Case:
    """One command of the module: its folder ``root`` (inputs, outputs, the empty working directory ``cwd``),
    the snapshot of ``root`` and the sha256 of ``/etc/passwd`` taken before the command ran, the finished
    process."""

    root: Path
    before: dict[str, str] = field(default_factory=dict)
    passwd_sha256: str | None = None
    proc: subprocess.CompletedProcess | None = None

    @property
    def cwd(self) -> Path:
        return self.root / "cwd"

    @property
    def after(self) -> dict[str, str]:
        return _snapshot(self.root)


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """Copies of both bundles' configs with untrained networks of train.yaml's settings in ``models/``:
    the detection classifier (``model.pt``) and the synthesis generator (``G_HP.pt``)."""
    root = tmp_path_factory.mktemp("bundles")
    made = {}
    for name, key, weights in (("cmb_detection", "network_def", "model.pt"), ("cmb_synthesis", "G_HP", "G_HP.pt")):
        dst = root / name
        shutil.copytree(REPO / "bundles" / name / "configs", dst / "configs")
        (dst / "models").mkdir()
        parser = ConfigParser()
        parser.read_config(str(dst / "configs" / "train.yaml"))
        parser["device"] = "cpu"
        torch.manual_seed(0)
        torch.save(parser.get_parsed_content(key).state_dict(), dst / "models" / weights)
        made[name] = dst
    return made


@pytest.fixture(scope="module")
def bundle_snapshots(bundles) -> dict[str, dict[str, str]]:
    """The bundle copies' contents before any command ran."""
    return {name: _snapshot(path) for name, path in bundles.items()}


@pytest.fixture(scope="module")
def cases(bundles, bundle_snapshots, tmp_path_factory) -> dict[str, Case]:
    """Every case of :data:`CASES`, built in its own folder and run (two commands at a time, longest first)."""
    made: dict[str, Case] = {}
    commands = {}
    for name, (build, env) in CASES.items():
        case = Case(tmp_path_factory.mktemp(name))
        case.cwd.mkdir()
        commands[name] = (build(case.root, bundles), env)
        case.before = _snapshot(case.root)
        if PASSWD.is_file():
            case.passwd_sha256 = hashlib.sha256(PASSWD.read_bytes()).hexdigest()
        made[name] = case

    def run(name: str) -> subprocess.CompletedProcess:
        args, env = commands[name]
        run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, encoding="utf-8",
                              errors="replace", cwd=made[name].cwd, env=run_env, timeout=TIMEOUT_S)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for name, proc in zip(made, pool.map(run, made)):
            made[name].proc = proc
    return made


# ------------------------------------------------------------------------------------------- detection inference


def test_detection_batch_reports_every_bad_scan_and_processes_the_rest(cases):
    case = cases["batch"]
    src, out = case.root / "in", case.root / "out"
    line = _error_line(case.proc)
    n_bad = len(BAD_SCANS)
    assert line.startswith(f"error: BatchInferenceError: {n_bad} of {n_bad + 2} scans failed"), line
    for name, (named, problem) in BAD_SCANS.items():
        assert f"{src / name}: ValueError: {src / named}: {problem}" in line, (name, line)
    assert "SWI magnitude" in line and "SWI phase" in line  # the two series are listed
    assert "(0.001, 0.001, 0.001) mm" in line  # refused from the header, before the 512 MiB of voxels were read

    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["n_inputs"] == n_bad + 2 and not summary["skipped"]  # the hidden temporary is not an input
    assert {(e["id"], Path(e["image"]).name) for e in summary["written"]} == {("x", "x.nii.gz"),
                                                                              ("x_swi", "x_swi.nii.gz")}
    assert sorted(Path(f["image"]).name for f in summary["failed"]) == sorted(BAD_SCANS)
    rows = _summary_rows(out)
    assert {i: s for i, (s, _) in rows.items()} == {"x": "written", "x_swi": "written",
                                                    **{f["id"]: "failed" for f in summary["failed"]}}
    for f in summary["failed"]:
        assert rows[f["id"]][1] == f["error"] and BAD_SCANS[Path(f["image"]).name][1] in f["error"]
    # both good scans (ids clashing) have both outputs, no bad scan has any, nothing half-written
    for sid in ("x", "x_swi"):
        assert nib.load(str(out / f"{sid}_cmb_prob.nii.gz")).shape == SHAPE
        assert (out / f"{sid}_candidates.csv").is_file()
    with open(out / "candidates.csv", newline="") as f:
        assert {r["image"] for r in csv.DictReader(f)} == {"x.nii.gz", "x_swi.nii.gz"}
    expected = {"candidates.csv", "detections.csv", "inference_summary.json", "summary.csv"} | {
        f"{sid}_{suffix}" for sid in ("x", "x_swi")
        for suffix in ("cmb_prob.nii.gz", "candidates.csv", "detections.csv", "detections.nii.gz", "qc.png")}
    assert {p.name for p in out.iterdir()} == expected
    # inputs untouched, nothing written outside the output folder (nor into the working directory)
    assert _outside(case.after, "out") == case.before


def test_weights_with_a_pickle_payload_are_refused_without_running_it(cases):
    case = cases["pickle"]
    line = _error_line(case.proc)
    assert line.startswith(f"error: {case.root / 'model.pt'}: not a weights-only PyTorch checkpoint"), line
    assert not (case.root / "payload_ran").exists()  # the payload did not run
    assert case.after == case.before  # refused before any scan: not even the output folder was created


def test_an_output_folder_that_is_a_file_is_refused(cases):
    case = cases["output_file"]
    a_file = case.root / "results"
    assert _error_line(case.proc).startswith(f"error: {a_file}: output folder is an existing file, not a folder")
    assert case.after == case.before
    case = cases["phantom_output_file"]  # exit status 2 for bad input, documented in the module
    assert case.proc.returncode == 2 and "Traceback" not in case.proc.stderr
    assert case.proc.stderr.strip().splitlines() == [f"error: {case.root / 'results'}: exists and is not a directory"]
    assert case.after == case.before


# ------------------------------------------------------------------------------------------------ command line


def test_misspelt_and_non_integer_overrides_are_refused_naming_the_closest_key(cases, bundles):
    case = cases["overrides"]
    line = _error_line(case.proc)
    assert line.startswith("error: unknown options --max_epoch (did you mean --max_epochs?), --overwite (did you "
                           "mean --overwrite?): not a setting of "), line
    assert str(bundles["cmb_detection"] / "configs" / "inference.yaml") in line
    assert line.endswith("--max_epochs must be an integer (the default is 6), got 1.5")
    assert case.after == case.before


def test_cuda_without_cuda_is_refused(cases):
    case = cases["cuda"]
    assert _error_line(case.proc) == "error: CUDA is not available on this machine; use --device cpu"
    assert case.after == case.before


def test_detection_training_with_an_empty_validation_list_is_refused(cases):
    case = cases["empty_validation"]
    datalist = case.root / "data" / "datalist.json"
    line = _error_line(case.proc)
    assert line.startswith(f"error: {datalist}: the 'validation' list is empty; it needs at least one item"), line
    # nothing trained or saved (the run's own folders aside, nothing written); the inputs are untouched
    assert not [p for p in (case.root / "models").rglob("*") if p.is_file()]
    assert _outside(case.after, "models", "runs", "cache") == case.before


def test_no_command_wrote_into_the_bundle_folders(cases, bundles, bundle_snapshots):
    assert {name: _snapshot(path) for name, path in bundles.items()} == bundle_snapshots


# ------------------------------------------------------------------------------------------- synthesis inference


def test_synthesis_datalist_ids_that_leave_the_output_folder_are_refused(cases):
    case = cases["evil_ids"]
    src = case.root / "in"
    line = _error_line(case.proc)
    assert line.startswith("error: batch refused before any scan was processed ("), line
    assert f"{src / 's1_swi.nii.gz'}: id '../../x/evil' is not a plain name" in line
    assert f"{src / 's2_swi.nii.gz'}: id '{case.root / 'abs' / 'evil'}' is not a plain name" in line
    assert case.after == case.before  # nothing created, not even the output folder


@pytest.mark.skipif(not PASSWD.is_file(), reason="no /etc/passwd on this system")
def test_synthesis_datalist_naming_a_system_file_fails_that_scan_only(cases):
    case = cases["passwd"]
    out = case.root / "out"
    line = _error_line(case.proc)
    assert line.startswith("error: BatchInferenceError: 1 of 2 scans failed"), line
    assert f"{PASSWD}: ValueError: {PASSWD}: not a readable NIfTI image" in line  # read, refused, never written
    assert {i: s for i, (s, _) in _summary_rows(out).items()} == {"s1": "written", "passwd": "failed"}
    assert {p.name for p in out.iterdir()} == {"s1_synthetic.nii.gz", "s1_synthetic_cmb.nii.gz",
                                                "inference_summary.json", "summary.csv"}
    assert nib.load(str(out / "s1_synthetic.nii.gz")).shape == SHAPE
    assert _outside(case.after, "out") == case.before
    assert hashlib.sha256(PASSWD.read_bytes()).hexdigest() == case.passwd_sha256


# -------------------------------------------------------------------------------------------------- evaluation


def test_evaluation_counts_each_cmb_of_a_binary_0_255_label(cases):
    case = cases["evaluation"]
    assert case.proc.returncode == 0, case.proc.stderr
    metrics = json.loads((case.root / "report" / "metrics.json").read_text())
    assert metrics["n_lesions"] == 3 and metrics["n_lesions_hit"] == 1  # not 1 lesion of value 255
    assert metrics["sensitivity_at_fp"]["10"] == pytest.approx(1 / 3)
    assert "1 scans, 3 lesions; sensitivity at 10 FP/scan 0.333" in case.proc.stdout
    assert {p.name for p in (case.root / "report").iterdir()} == {"metrics.json", "froc.csv", "froc.png"}
    assert _outside(case.after, "report") == case.before

"""Bundles that travel: each bundle runs from a copy of its folder placed anywhere, once the package is installed.

For each bundle, the folder as shared (configs/, docs/, LICENSE; no data, no models) is copied to a temporary
directory under another name; a tiny model is trained there and its ``inference`` is run from another working
directory with ``--bundle_root`` pointing at the copy, through ``python -m monai.bundle`` subprocesses as a
user would run them. Also: bundle-root resolution of a copy, configs free of repository paths, the metadata's
``required_packages_version`` (the package and every runtime dependency) and the licence files.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from cmb_synthesis import bundle_utils

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("cmb_synthesis", "cmb_detection")
# what a shared bundle folder holds (models/ come from training or large_files.yml, data/ is generated)
SHARED = ("configs", "docs", "LICENSE")

SYNTHESIS_NET = {"g_channels": 2, "g_res_blocks": 1}
SYNTHESIS_TRAIN = {**SYNTHESIS_NET, "patch_size": [32, 32, 16], "batch_size": 2, "epoch_length": 2, "max_epochs": 1,
                   "val_interval": 1, "val_patches_per_volume": 1, "val_shape_repeats": 1, "image_interval": 1, "d_channels": 2,
                   "n_critic": 1}
DETECTION_NET = {"channels": [4, 8], "strides": [2, 2], "num_res_units": 1, "patch_size": [24, 24, 16]}
DETECTION_TRAIN = {**DETECTION_NET, "batch_size": 8, "epoch_length": 3, "max_epochs": 1, "val_interval": 1}


def _copy_bundle(name: str, dest: Path) -> Path:
    """Copy the shareable part of ``bundles/<name>`` to ``dest`` (a new folder whose name differs from ``name``)."""
    src = REPO / "bundles" / name
    dest.mkdir(parents=True)
    for part in SHARED:
        if (src / part).is_dir():
            shutil.copytree(src / part, dest / part)
        else:
            shutil.copy2(src / part, dest / part)
    return dest


def _bundle_command(run_id: str, configs: list[Path], cwd: Path, **overrides) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run <run_id> --config_file "[...]" --key value ...`` in ``cwd``, one thread."""
    files = "[" + ",".join(f"'{c}'" for c in configs) + "]" if len(configs) > 1 else str(configs[0])
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", files]
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    # the package as installed; PYTHONPATH stands in for `pip install .` where the checkout is not installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CMB_PROGRESS": "log",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def _repository_outputs(name: str) -> dict[str, int]:
    """Files (and their mtimes) where a run that fell back to the repository layout would write: the repository
    bundle's folders other than configs/ and docs/, and the repository's top-level entries."""
    bundle = REPO / "bundles" / name
    found = {str(p): p.stat().st_mtime_ns for p in bundle.rglob("*")
             if p.is_file() and p.relative_to(bundle).parts[0] not in ("configs", "docs")}
    found.update({str(p): 0 for p in REPO.iterdir()})
    return found


def _scans(datalist: str, group: str, n: int, dest: Path) -> list[str]:
    """Copy the first ``n`` scans of ``group`` (with their brain masks) from the cohort into ``dest``; their ids."""
    root = Path(datalist).parent
    items = json.loads(Path(datalist).read_text())
    chosen = [it for split in ("test", "validation", "training") for it in items.get(split, [])
              if it["group"] == group][:n]
    dest.mkdir(parents=True)
    for it in chosen:
        for key in ("image", "brainmask"):
            shutil.copy2(root / it[key], dest / Path(it[key]).name)
    return [it["id"] for it in chosen]


def _check_summary(out: Path, ids: list[str]) -> None:
    """Every input was written (no failures) and every output the summary lists exists."""
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["failed"] == [], summary["failed"]
    assert sorted(w["id"] for w in summary["written"]) == sorted(ids)
    for w in summary["written"]:
        assert w["outputs"], w
        for path in w["outputs"].values():
            p = Path(path) if Path(path).is_absolute() else out / path
            assert p.is_file() and p.stat().st_size > 0, f"{w['id']}: listed output {p} missing"


@pytest.mark.e2e
@pytest.mark.parametrize("name", BUNDLES)
def test_a_copied_bundle_trains_and_infers_from_anywhere(name, tiny_cohort, tmp_path):
    """Copy the bundle folder elsewhere under another name; train there (the bundle root read from the config
    file's path); infer from another working directory with --bundle_root pointing at the copy."""
    before = _repository_outputs(name)
    copy = _copy_bundle(name, tmp_path / "site" / f"{name}_copy")
    work = tmp_path / "work"
    work.mkdir()
    cohort_dir = str(Path(tiny_cohort).parent)
    if name == "cmb_synthesis":
        train = {**SYNTHESIS_TRAIN, "datalist": tiny_cohort, "dataset_dir": cohort_dir}
        infer = {**SYNTHESIS_NET, "n_lesions": 3}
        scans = tmp_path / "scans"
        ids = _scans(tiny_cohort, "healthy", 2, scans)
        written = {"G_HP.pt", "G_PH.pt", "lesion_bank.npz", "metrics.json"}
    else:
        train = {**DETECTION_TRAIN, "datalist": tiny_cohort}
        infer = dict(DETECTION_NET)
        scans = tmp_path / "scans"
        ids = _scans(tiny_cohort, "pathological", 2, scans)
        written = {"model.pt", "train_metrics.json"}

    _bundle_command("training", [copy / "configs" / "train.yaml"], work, device="cpu", **train)
    assert written <= {p.name for p in (copy / "models").iterdir()}  # the copy is the bundle root

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    _bundle_command("inference", [copy / "configs" / "train.yaml", copy / "configs" / "inference.yaml"], elsewhere,
                    bundle_root=copy, dataset_dir=scans, output_dir=out, device="cpu", **infer)
    _check_summary(out, ids)

    assert not any(elsewhere.iterdir()) and not any(work.iterdir())  # nothing in the working directories
    assert _repository_outputs(name) == before  # nor in the repository


def test_bundle_root_of_a_copy_is_the_parent_of_its_configs_folder(tmp_path):
    copy = tmp_path / "anywhere" / "my_detector"
    files = f"['{copy}/configs/train.yaml','{copy}/configs/inference.yaml']"
    for argv in (["m", "run", "inference", "--config_file", files],
                 ["m", "run", "training", f"--config_file={copy}/configs/train.yaml"]):
        assert bundle_utils.bundle_root("cmb_detection", argv=argv) == str(copy.resolve())


def test_sibling_bundle_is_found_beside_a_copy_or_named_in_the_error(tmp_path):
    det, syn = tmp_path / "cmb_detection", tmp_path / "cmb_synthesis"
    (det / "configs").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"cmb_synthesis.*--synthesis_bundle DIR"):
        bundle_utils.sibling_bundle(det, "cmb_synthesis", "--synthesis_bundle")
    (syn / "configs").mkdir(parents=True)
    (syn / "configs" / "train.yaml").write_text("{}")
    assert bundle_utils.sibling_bundle(det, "cmb_synthesis") == str(syn.resolve())


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


@pytest.mark.parametrize("name", BUNDLES)
def test_configs_hold_no_repository_paths(name):
    """No config value depends on the repository layout: folders come from @bundle_root, nothing climbs out of
    the bundle or names the repository's bundles/ folder."""
    from monai.bundle import ConfigParser

    for cfg in sorted((REPO / "bundles" / name / "configs").glob("*.yaml")):
        for s in _strings(ConfigParser.load_config_file(str(cfg))):
            assert "bundles/" not in s and "../" not in s and str(REPO) not in s, f"{cfg.name}: {s!r}"


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


@pytest.mark.parametrize("name", BUNDLES)
def test_metadata_names_the_package_and_every_runtime_dependency(name, meta_schema):
    from monai.bundle import verify_metadata

    meta_file = REPO / "bundles" / name / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=meta_schema)
    meta = json.loads(meta_file.read_text())
    assert meta["version"] in meta["changelog"]
    required = meta["required_packages_version"]
    cfg = _setup_cfg()
    assert required[cfg["metadata"]["name"]] == cfg["metadata"]["version"]  # the package itself
    runtime = {re.split(r"[<>=!~ ;\[]", r.strip())[0].lower() for r in cfg["options"]["install_requires"].split("\n")
               if r.strip()}
    own_fields = {"monai", "torch", "numpy"}  # monai_version, pytorch_version, numpy_version
    assert runtime - own_fields <= set(required), f"missing: {sorted(runtime - own_fields - set(required))}"
    for package, version in required.items():
        if package != cfg["metadata"]["name"]:
            assert metadata.version(package) == version, f"{package}: installed {metadata.version(package)}"


def test_licences_ship_with_the_code_and_the_bundles():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    for name in BUNDLES:
        assert (REPO / "bundles" / name / "LICENSE").read_text() == text
        assert "Apache-2.0" in json.loads((REPO / "bundles" / name / "configs" / "metadata.json").read_text())["copyright"]
    files = _setup_cfg()["metadata"]["license_files"].split()
    assert {"LICENSE", "docs/data_license.txt"} <= set(files) and all((REPO / f).is_file() for f in files)
    # the data terms name the template files the phantom reads from nilearn's wheel, and their MNI notice
    from nilearn.datasets import struct

    data_terms = (REPO / "docs" / "data_license.txt").read_text()
    for path in (struct.MNI152_FILE_PATH, struct.GM_MNI152_FILE_PATH, struct.WM_MNI152_FILE_PATH):
        assert Path(path).is_file() and Path(path).name in data_terms
    assert "Louis Collins" in data_terms and "McGill University" in data_terms and "generated" in data_terms

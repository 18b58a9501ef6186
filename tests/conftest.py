"""Shared fixtures: one tiny phantom cohort per test session (generated once, reused by every test), and the
MONAI bundle metadata schema."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist (setup.cfg: -n 2): the workers share the cores, so each gets its share of threads, for its own
    # torch ops and for the commands it runs in subprocesses (oversubscribed, a CPU training step is ~10x slower)
    from transforms.threads import usable_cpus  # torch-free: torch must not be imported before this

    _share = usable_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, min(int(os.environ["OMP_NUM_THREADS"]), _share)))

# The MONAI model-zoo metadata schema, kept in the ``shared`` folder beside the repository (never downloaded).
META_SCHEMA = Path(__file__).resolve().parents[1].parent / "shared" / "monai" / "meta_schema_20240725.json"

TINY_SPLIT = dict(
    n_train_pathological=3,
    n_train_healthy=2,
    n_val_pathological=1,
    n_val_healthy=1,
    n_test_pathological=2,
    n_test_healthy=0,
)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """A small phantom cohort (full-size subjects, few of them); returns the ``datalist.json`` path."""
    from cmb_synthesis.phantom import generate_cohort

    out = tmp_path_factory.mktemp("cohort") / "phantom"
    return str(generate_cohort(out, preset="default", seed=7, **TINY_SPLIT))


@pytest.fixture(scope="session")
def meta_schema() -> str:
    """Path of the bundle metadata JSON schema (``../shared/monai/meta_schema_20240725.json`` relative to the
    repository root); fails, naming the expected path, when the file is missing."""
    if not META_SCHEMA.is_file():
        pytest.fail(
            f"MONAI metadata schema not found: expected {META_SCHEMA} (the 'shared' folder beside the repository; "
            "copy meta_schema_20240725.json there, it is not downloaded)"
        )
    return str(META_SCHEMA)


@pytest.fixture(scope="session", autouse=True)
def repository_bundles_stay_clean():
    """Fails the session if a test wrote into the repository's bundles (a config parsed with its default
    ``bundle_root`` / ``datalist`` generates the 31-subject phantom cohort there, minutes of CPU, and writes
    TensorBoard runs): every test must give its runs a temporary bundle root and the tiny cohort."""
    bundles = Path(__file__).resolve().parents[1] / "bundles"
    watched = [bundles / b / d for b in ("cmb_synthesis", "cmb_detection") for d in ("data", "runs")]
    before = {p for p in watched if p.exists()}
    yield
    # files only: train.yaml's initialize creates the (empty) parent folder of the default dataset_dir
    made = sorted(str(p) for p in watched if p not in before and p.exists() and any(f.is_file() for f in p.rglob("*")))
    assert not made, f"tests wrote into the repository's bundles: {made}"

"""Shared fixtures: one tiny phantom cohort per test session (generated once, reused by every test)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

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

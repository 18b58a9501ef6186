"""The CPU budget of this process: how many CPUs it may use, and BLAS held to one thread.

Torch-free on purpose: ``tests/conftest.py`` sets ``OMP_NUM_THREADS`` from :func:`usable_cpus` before torch is
imported. Used by the FRST's numpy threads (:func:`transforms.frst.default_workers`), the study's side-by-side runs
(:func:`cmb_synthesis.study.runner.run_study`) and the test workers.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

__all__ = ["usable_cpus", "blas_single_thread"]


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask on Linux (a container or ``taskset`` may allow fewer
    than the machine has), else ``os.cpu_count()``; at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def blas_single_thread() -> Any:
    """Context holding BLAS to one thread (when our own threads share the cores, and so that a result does not
    depend on how a threaded BLAS splits a product); a no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")

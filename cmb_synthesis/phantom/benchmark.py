"""The ``benchmark`` preset: a harder, two-site cohort with hundreds of test CMBs.

Everything here is opt-in through phantom options (``subject.REALISM_OPTIONS``); the ``default`` and ``paper``
presets never read it, so their cohorts stay byte-identical for a seed.

- :data:`BENCHMARK_OPTIONS`: small CMBs with partial-volume blooming and a spread of contrast (some faint),
  vein bifurcations and vessels in cross-section, basal-ganglia mineralisation, choroid-plexus and pineal
  calcifications, flow voids and air-bone susceptibility artefacts (``docs/phantom.md``).
- :data:`SITES`: per-site acquisition (noise, bias field, slice thickness, artefact strength); subjects of each
  split and group alternate between the sites (:func:`assign_sites`).
- :func:`plan_lesion_counts`: lesion counts per pathological subject drawn at cohort level (the default
  log-normal count), topped up so every split holds at least ``min_mean_lesions`` CMBs per pathological scan;
  the test split of the preset (40 scans) is thus planned with >= 320 CMBs (8 per scan).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cmb_synthesis.phantom.lesions import sample_count

__all__ = [
    "BENCHMARK_COUNTS", "BENCHMARK_OPTIONS", "SITES", "MIN_MEAN_LESIONS", "REALISM_PRESETS",
    "plan_lesion_counts", "assign_sites", "site_options",
]

BENCHMARK_COUNTS: dict[str, int] = dict(n_train_pathological=12, n_train_healthy=6, n_val_pathological=10,
                                        n_val_healthy=3, n_test_pathological=40, n_test_healthy=0)

BENCHMARK_OPTIONS: dict[str, Any] = dict(
    lesion_model="benchmark",        # small CMBs, partial-volume blooming, contrast spread (lesions.py)
    deposit_median_mm=2.7,           # haemosiderin deposit median diameter (apparent: x bloom 1.1-1.7)
    lesion_depth=(0.6, 0.9),         # core darkening of most CMBs (darker than veins: 0.35-0.6)
    faint_fraction=0.1,              # faint CMBs ...
    faint_depth=(0.35, 0.55),        # ... with this core darkening
    n_vein_branches=10,              # vein bifurcations (a branch leaving a vein)
    n_cross_vessels=8,               # short vessels running through the axial slices (dots in 2-D)
    mineralisation_rate=1.2,         # Poisson mean of basal-ganglia mineralisation foci
    pineal_prob=0.6,                 # pineal calcification
    choroid_prob=0.5,                # choroid-plexus (glomus) calcifications, mostly bilateral
    flow_void_prob=0.5,              # each of the 7 large arterial segments at the skull base
    artefact_depth=(0.25, 0.5),      # air-bone susceptibility smear, peak darkening (times artefact_scale)
)
# calibrated on the validation split with the real-only detector (docs/phantom.md "How it was calibrated",
# docs/results/calibration/rounds.json, scripts/calibrate_benchmark.py)

# Per-site acquisition; "A" is the paper's protocol (0.98 x 0.98 x 1.0 mm), "B" a thicker-slice, noisier
# scanner. Slice thickness is the through-plane slice profile; the voxel grid stays 0.98 x 0.98 x 1.0 mm.
SITES: dict[str, dict[str, Any]] = {
    "A": dict(snr=(24.0, 34.0), bias=0.12, slice_thickness_mm=1.0, artefact_scale=1.15),
    "B": dict(snr=(20.0, 23.5), bias=0.28, slice_thickness_mm=1.5, artefact_scale=0.85),
}

MIN_MEAN_LESIONS = 8.0

# presets that use the realism options: phantom options, sites, planned lesions per pathological scan
REALISM_PRESETS: dict[str, dict[str, Any]] = {
    "benchmark": dict(options=BENCHMARK_OPTIONS, sites=SITES, min_mean_lesions=MIN_MEAN_LESIONS),
}


def plan_lesion_counts(
    seed: int,
    split: str,
    n_pathological: int,
    min_mean_lesions: float = MIN_MEAN_LESIONS,
    median: float = 5.0,
    maximum: int = 30,
) -> list[int]:
    """Planned CMB count of each pathological subject of ``split`` (plan order), deterministic in ``seed``.

    Counts follow the default log-normal (``lesions.sample_count``: right-skewed, in [1, ``maximum``]); when
    their sum falls short of ``ceil(min_mean_lesions * n_pathological)`` one lesion at a time is added to a
    random subject still under ``maximum``. Returns a list of ``n_pathological`` ints.
    """
    if n_pathological < 0:
        raise ValueError(f"n_pathological must be >= 0, got {n_pathological}")
    if min_mean_lesions > maximum:
        raise ValueError(f"min_mean_lesions {min_mean_lesions} exceeds the per-subject maximum {maximum}")
    split_code = {"training": 1, "validation": 2, "test": 3}[split]
    rng = np.random.default_rng([int(seed), 0x5EED, split_code])
    counts = [sample_count(rng, median, maximum=maximum) for _ in range(n_pathological)]
    target = math.ceil(min_mean_lesions * n_pathological - 1e-9)
    while sum(counts) < target:
        room = [n for n, c in enumerate(counts) if c < maximum]
        counts[room[int(rng.integers(len(room)))]] += 1
    return counts


def assign_sites(n: int, sites: Sequence[str]) -> list[str]:
    """Sites of ``n`` subjects of one split and group: alternating ``sites[0], sites[1], ...``."""
    return [sites[i % len(sites)] for i in range(n)]


def site_options(site: str, sites: Mapping[str, Mapping[str, Any]] = SITES) -> dict[str, Any]:
    """Phantom options of ``site`` (a copy), with ``site`` itself recorded."""
    if site not in sites:
        raise ValueError(f"unknown site {site!r}; choose one of {sorted(sites)}")
    return {**sites[site], "site": site}

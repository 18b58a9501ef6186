"""The embedded SWI phantom cohort: MNI152 anatomy, veins (the mimics) and ground-truth cerebral microbleeds.

Python API: :func:`generate_cohort`, :func:`ensure_cohort`, :func:`simulate_subject`, :data:`PRESETS`.
Command line: ``python -m cmb_synthesis.phantom --output DIR [--preset default|paper|benchmark] [--seed S]``.
See ``docs/phantom.md``.
"""

from cmb_synthesis.phantom.benchmark import SITES
from cmb_synthesis.phantom.cohort import (PRESETS, SPLIT_KEYS, ensure_cohort, generate_cohort, planned_lesions,
                                         write_subject)
from cmb_synthesis.phantom.mimics import MIMIC_CODES, MIMIC_TYPES
from cmb_synthesis.phantom.subject import (DEFAULT_OPTIONS, REALISM_OPTIONS, TISSUE_CODES, PhantomSubject,
                                          simulate_subject)

__all__ = [
    "PRESETS", "SPLIT_KEYS", "SITES", "DEFAULT_OPTIONS", "REALISM_OPTIONS", "TISSUE_CODES", "MIMIC_TYPES",
    "MIMIC_CODES", "PhantomSubject", "generate_cohort", "ensure_cohort", "planned_lesions", "simulate_subject",
    "write_subject",
]

"""The embedded SWI phantom cohort: MNI152 anatomy, veins (the mimics) and ground-truth cerebral microbleeds.

Python API: :func:`generate_cohort`, :func:`ensure_cohort`, :func:`simulate_subject`, :data:`PRESETS`.
Command line: ``python -m cmb_synthesis.phantom --output DIR [--preset default|paper] [--seed S]``.
See ``docs/phantom.md``.
"""

from cmb_synthesis.phantom.cohort import PRESETS, SPLIT_KEYS, ensure_cohort, generate_cohort, write_subject
from cmb_synthesis.phantom.subject import DEFAULT_OPTIONS, TISSUE_CODES, PhantomSubject, simulate_subject

__all__ = [
    "PRESETS", "SPLIT_KEYS", "DEFAULT_OPTIONS", "TISSUE_CODES", "PhantomSubject",
    "generate_cohort", "ensure_cohort", "simulate_subject", "write_subject",
]

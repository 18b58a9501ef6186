"""Mask-guided 3-D cycle-consistent synthesis of cerebral microbleeds (CMBs) on SWI, and a CMB detector.

Implements Faryna et al., "Adversarial cycle-consistent synthesis of cerebral microbleeds for data
augmentation" as MONAI components. Modules:

- :mod:`cmb_synthesis.phantom`: the embedded SWI phantom cohort (MNI152 anatomy, veins, ground-truth CMBs).
- :mod:`cmb_synthesis.data.io`: atomic output and checked NIfTI input.
- :mod:`cmb_synthesis.bundle_utils`: helpers called from bundle configs.
"""

__version__ = "0.1.0"

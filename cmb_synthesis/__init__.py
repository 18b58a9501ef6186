"""Mask-guided 3-D cycle-consistent synthesis of cerebral microbleeds (CMBs) on SWI, and a CMB detector.

Implements Faryna et al., "Adversarial cycle-consistent synthesis of cerebral microbleeds for data
augmentation" as MONAI components (custom transforms live in the separate ``transforms`` package).
Sub-packages, by role (``docs/architecture.md`` has the module map and the data flows):

- :mod:`cmb_synthesis.data`: datalists, scan loading (NIfTI/DICOM, canonical frame), naming, labels, atomic I/O.
- :mod:`cmb_synthesis.synthesis`: the mask-guided CycleGAN (networks, losses, engine, metrics, inference).
- :mod:`cmb_synthesis.detection`: FRST candidates and the CNN classifier (training data, inference).
- :mod:`cmb_synthesis.evaluation`: the hit rule, FROC with bootstrap CIs, reports.
- :mod:`cmb_synthesis.training`: Ignite handlers, exact resume, released-weight checks.
- :mod:`cmb_synthesis.study`: the augmentation study as resumable stages.
- :mod:`cmb_synthesis.phantom`: the embedded SWI phantom cohort (MNI152 anatomy, veins, ground-truth CMBs).
- :mod:`cmb_synthesis.bundle_utils`: helpers called from bundle configs.
- :mod:`cmb_synthesis.bundle_cli`: checks of ``monai.bundle run`` command-line overrides, one-line errors.
"""

__version__ = "0.1.0"

"""The two-stage CMB detector: FRST candidates, then a CNN classifier of candidate-centred patches.

- :mod:`~cmb_synthesis.detection.candidates`: FRST candidates of a scan (content-cached), their hit-rule targets.
- :mod:`~cmb_synthesis.detection.classifier`: ``build_classifier`` (MONAI networks configured from the bundle).
- :mod:`~cmb_synthesis.detection.training`: candidate patch sets, the balanced sampler, the CPM metric.
- :mod:`~cmb_synthesis.detection.inference`: whole-scan detection, split evaluation, batch inference.
"""

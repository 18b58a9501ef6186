"""The augmentation study (the paper's Table 1 and Figure 3) as resumable, content-addressed stages.

- :mod:`~cmb_synthesis.study.stages`: ``Stage``/``StageRunner`` (output folders named by input hashes), ``run_bundle``.
- :mod:`~cmb_synthesis.study.runner`: ``run_study``: synthesis, synthetic cohort, six detectors, evaluation, bootstrap.
"""

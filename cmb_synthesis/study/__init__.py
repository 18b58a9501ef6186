"""The augmentation study (the paper's Table 1 and Figure 3) as a learning curve of resumable, content-addressed
stages.

- :mod:`~cmb_synthesis.study.stages`: ``Stage``/``StageRunner`` (output folders named by input hashes), ``run_bundle``.
- :mod:`~cmb_synthesis.study.protocol`: the strict low-data protocol: K values, nested subsets per seed, subset datalists.
- :mod:`~cmb_synthesis.study.runner`: ``run_study``: per K and seed, synthesis on those K scans, synthetic cohort,
  detector arms, evaluation; pooled statistics.
- :mod:`~cmb_synthesis.study.report`: ``results.md``, ``table1.md``, ``learning_curve.png``.
"""

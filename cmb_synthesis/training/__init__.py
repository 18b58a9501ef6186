"""Training infrastructure shared by both bundles: Ignite handlers, exact resume, released-weight checks.

- :mod:`~cmb_synthesis.training.handlers`: NaN/Inf guard, TensorBoard image grid, weight export, metrics JSON.
- :mod:`~cmb_synthesis.training.resume`: ``EpochReseed``, ``latest_checkpoint``, ``KeyMetricState``.
- :mod:`~cmb_synthesis.training.weights`: sha256 checks against ``large_files.yml``, safe weight loading.
"""

"""Scoring detections: the hit rule, FROC with bootstrap CIs, reports and candidate files.

- :mod:`~cmb_synthesis.evaluation.hits`: the one hit rule (``hit_lesions``, ``match_candidates``, ``ScanResult``).
- :mod:`~cmb_synthesis.evaluation.froc`: FROC curve, sensitivity at FP rates, CPM, (paired) bootstrap CIs.
- :mod:`~cmb_synthesis.evaluation.report`: ``metrics.json``/``froc.csv``/``froc.png``, ``candidates.csv`` I/O.
- ``python -m cmb_synthesis.evaluation``: evaluate a candidates CSV against a datalist split.
"""

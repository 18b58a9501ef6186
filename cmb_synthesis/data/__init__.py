"""Data in and out: datalists, scans, file naming, lesion labels, brain masks, atomic writes.

- :mod:`~cmb_synthesis.data.io`: atomic file/folder output, refusal to overwrite inputs, NIfTI/JSON/CSV writers.
- :mod:`~cmb_synthesis.data.datalist`: the one datalist reader (``read_datalist``, ``load_split``, groups).
- :mod:`~cmb_synthesis.data.scans`: NIfTI/DICOM reading, canonical (RAS) frame and back, ``load_scan``.
- :mod:`~cmb_synthesis.data.dicom`: DICOM series with checked geometry (one series per read, even slices).
- :mod:`~cmb_synthesis.data.geometry`: voxel-size sanity (implausible spacings refused, unusual ones warned).
- :mod:`~cmb_synthesis.data.batch`: ``run_batch``, the one batch-inference driver (checked plan, atomic outputs).
- :mod:`~cmb_synthesis.data.naming`: scan ids, derived-file suffixes, files beside a scan, a folder's inputs.
- :mod:`~cmb_synthesis.data.brainmask`: a fallback brain mask for scans delivered without one.
- ``python -m cmb_synthesis.data``: ``to-canonical`` / ``back`` for external scans.
"""

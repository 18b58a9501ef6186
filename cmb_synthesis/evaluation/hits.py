"""The hit rule (one implementation for FROC evaluation, candidate labelling and the CPM validation metric).

LUNA16's convention: a candidate *hits* a lesion when its voxel lies inside that lesion's instance mask.
Several hits on one lesion count once, with the highest probability, and the other hits are ignored (neither
true nor false positives). A candidate on no lesion is a false positive (FP).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ScanResult", "hit_lesions", "scan_result", "match_candidates"]


@dataclass
class ScanResult:
    """Detection outcome of one scan.

    Attributes:
        scan_id: identifier of the scan.
        lesion_scores: (n_lesions,) best probability among the candidates hitting each lesion, NaN when the
            lesion was not hit.
        fp_scores: (n_fp,) probabilities of the false-positive candidates.
        label_split: the scan's lesion labels were a binary mask, split into connected components.
    """

    scan_id: str
    lesion_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fp_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    label_split: bool = False

    def __post_init__(self) -> None:
        self.lesion_scores = np.asarray(self.lesion_scores, dtype=np.float64).reshape(-1)
        self.fp_scores = np.asarray(self.fp_scores, dtype=np.float64).reshape(-1)
        if np.isnan(self.fp_scores).any():
            raise ValueError(f"scan {self.scan_id}: false-positive probabilities contain NaN")


def hit_lesions(coords: np.ndarray, instance_labels: np.ndarray, name: str = "scan") -> np.ndarray:
    """The hit rule per candidate: (N,) int64 instance label of the lesion each candidate's voxel lies in
    (0: a false positive).

    Args:
        coords: (N, 3) integer voxel indices in ``instance_labels``' grid (integral floats accepted).
        instance_labels: (X, Y, Z) or (1, X, Y, Z) integer labels, 0 background.
        name: used in errors.

    Raises:
        ValueError: non-integer coordinates or candidates outside the volume.
    """
    lab = instance_labels.detach().cpu().numpy() if hasattr(instance_labels, "detach") else np.asarray(instance_labels)
    if lab.ndim == 4 and lab.shape[0] == 1:
        lab = lab[0]
    if lab.ndim != 3:
        raise ValueError(f"{name}: instance labels must be 3-D, got shape {lab.shape}")
    coords = np.asarray(coords).reshape(-1, 3)
    if len(coords) and not np.issubdtype(coords.dtype, np.integer):
        if not np.allclose(coords, np.round(coords)):
            raise ValueError(f"{name}: candidate voxel coordinates must be integers")
        coords = np.round(coords)
    coords = coords.astype(np.int64)
    bad = np.nonzero(np.any((coords < 0) | (coords >= np.array(lab.shape)), axis=1))[0]
    if len(bad):
        raise ValueError(f"{name}: candidate {int(bad[0])} at voxel {coords[bad[0]].tolist()} lies outside "
                         f"the image of shape {tuple(lab.shape)}")
    if not len(coords):
        return np.zeros(0, np.int64)
    return lab[coords[:, 0], coords[:, 1], coords[:, 2]].astype(np.int64)


def scan_result(scan_id: str, hit_ids: np.ndarray, probs: np.ndarray, lesion_ids: np.ndarray) -> ScanResult:
    """A :class:`ScanResult` from per-candidate hits.

    Args:
        hit_ids: (N,) lesion hit by each candidate (0: false positive), e.g. from :func:`hit_lesions`.
        probs: (N,) candidate probabilities.
        lesion_ids: every lesion of the scan (positive ids), hit or not: unhit lesions count as missed.
    """
    hit_ids = np.asarray(hit_ids, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if len(probs) != len(hit_ids):
        raise ValueError(f"scan {scan_id}: {len(hit_ids)} candidates but {len(probs)} probabilities")
    if np.isnan(probs).any():
        raise ValueError(f"scan {scan_id}: candidate probabilities contain NaN")
    lesion_ids = np.unique(np.asarray(lesion_ids, dtype=np.int64))
    lesion_ids = lesion_ids[lesion_ids > 0]
    is_hit = hit_ids > 0
    unknown = np.setdiff1d(hit_ids[is_hit], lesion_ids)
    if len(unknown):
        raise ValueError(f"scan {scan_id}: candidates hit lesions {unknown[:5].tolist()} that are not in its lesion list")
    best = np.full(len(lesion_ids), -np.inf)
    if is_hit.any():
        np.maximum.at(best, np.searchsorted(lesion_ids, hit_ids[is_hit]), probs[is_hit])
    return ScanResult(str(scan_id), np.where(np.isneginf(best), np.nan, best), probs[~is_hit])


def match_candidates(scan_id: str, coords: np.ndarray, probs: np.ndarray, instance_labels: np.ndarray) -> ScanResult:
    """Apply the hit rule to one scan.

    Args:
        scan_id: identifier used in errors and results.
        coords: (N, 3) integer voxel indices of the candidates in ``instance_labels``' grid.
        probs: (N,) candidate probabilities (any real scores; higher = more likely a CMB).
        instance_labels: 3-D integer array, 0 background, one positive label per lesion (pass a binary mask
            through :func:`transforms.labels.as_instance_labels` first).

    Returns:
        ScanResult with one entry per distinct positive label (sorted by label).
    """
    labels = np.asarray(instance_labels)
    hits = hit_lesions(coords, labels, f"scan {scan_id}")
    return scan_result(scan_id, hits, probs, np.unique(labels))

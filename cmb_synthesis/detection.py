"""Two-stage CMB detector around the FRST candidates and the CNN classifier (``cmb_detection`` bundle).

Pipeline per scan (training, validation, evaluation and external inference all use :func:`load_scan`):

1. :func:`load_scan`: NIfTI file or DICOM series (``cmb_synthesis.external.to_canonical``: exact closest-RAS
   reorientation, no resampling) -> ``transforms.pipelines.preprocessing`` (checks naming the file, brain-mask
   percentile clip [0, 99.5] and rescale to [0, 1]). Without a brain mask file, :func:`estimate_brainmask`
   (Otsu threshold, largest component, hole filling) is used.
2. :func:`scan_candidates`: ``transforms.frst.FRSTCandidatesd`` (3-D FRST, local maxima in the brain mask, NMS,
   cap per scan); the (N, 3) voxels and scores are cached on disk by a content hash of the preprocessed image,
   mask, spacing and FRST settings (``cache_dir/<sha256>.npz``), so repeated runs skip the FRST.
3. :func:`label_candidates`: the FROC hit rule (a candidate is positive when its voxel lies inside a lesion's
   instance mask); negatives are the rest (mostly veins and other dark tubes: hard negatives). Healthy scans
   contribute negatives only.
4. ``transforms.patches.CandidatePatchesd``: candidate-centred patches (default 32 x 32 x 16, zero padded).
5. Training: ``monai.engines.SupervisedTrainer`` over :class:`CandidateSet` samples drawn by
   :func:`balanced_sampler` (``WeightedRandomSampler``, fixed positive fraction per epoch); validation with
   ``SupervisedEvaluator`` and :class:`CandidateCPM` (candidate-level FROC CPM on the validation scans).
6. :func:`detect_scan` -> probabilities; :func:`run_evaluation` (``candidates.csv`` + FROC report via
   ``cmb_synthesis.froc``) and :func:`run_inference` (external data: ``candidates.csv`` and
   ``<id>_cmb_prob.nii.gz`` in the input's space; bad scans reported and skipped; non-zero exit at the end).

Training-data selection for the augmentation study (``--training_data real|synthetic|real+synthetic``) is
:func:`training_items`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.data import MetaTensor
from scipy import ndimage

from cmb_synthesis.io import PathLike, atomic_output

__all__ = [
    "TRAINING_DATA",
    "CANDIDATE_CACHE_VERSION",
    "estimate_brainmask",
    "find_brainmask",
    "load_scan",
    "scan_candidates",
    "label_candidates",
    "to_source_voxels",
    "CandidateSet",
    "build_candidate_set",
    "patch_transforms",
    "balanced_sampler",
    "load_split",
    "training_items",
    "CandidateCPM",
    "load_classifier",
    "predict_patches",
    "detect_scan",
    "probability_map",
    "run_evaluation",
    "find_inputs",
    "run_inference",
    "BatchInferenceError",
]

logger = logging.getLogger(__name__)

TRAINING_DATA = ("real", "synthetic", "real+synthetic")
CANDIDATE_CACHE_VERSION = 1
_DERIVED_SUFFIXES = ("_brainmask", "_cmb", "_tissue", "_veins", "_cmb_prob", "_synthetic_cmb", "_label", "_mask",
                     "_lesions")


# ------------------------------------------------------------------------------------------- loading
def estimate_brainmask(image: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), smooth_mm: float = 2.0,
                       erode_mm: float = 1.0) -> np.ndarray:
    """A simple brain (head foreground) mask for scans delivered without one.

    Gaussian smoothing (``smooth_mm``) -> Otsu threshold over all voxels -> largest 26-connected component ->
    3-D hole filling, then slice-wise (axial) hole filling (dark CMBs, veins and ventricles inside the brain
    are kept) -> erosion by ``erode_mm`` (drops the bright rim of partial-volume voxels). This is a fallback
    for external data: it is a head mask rather than a skull-stripped brain, so FRST candidates may appear at
    the scalp; supply ``<id>_brainmask.nii.gz`` beside the scan for better specificity.

    Args:
        image: (X, Y, Z) intensities (any positive scale).
        spacing: voxel size in mm.

    Returns:
        (X, Y, Z) uint8 mask in {0, 1}.

    Raises:
        ValueError: a constant image (no threshold exists) or an empty mask.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3:
        raise ValueError(f"estimate_brainmask: expected a 3-D image, got shape {img.shape}")
    sm = ndimage.gaussian_filter(img, [smooth_mm / s for s in spacing]) if smooth_mm > 0 else img
    lo, hi = float(sm.min()), float(sm.max())
    if hi <= lo:
        raise ValueError("estimate_brainmask: constant image, cannot threshold")
    hist, edges = np.histogram(sm, bins=256, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2  # Otsu: maximise the between-class variance
    thr = centres[int(np.argmax(between[:-1]))]
    fg = sm > thr
    lab, n = ndimage.label(fg, structure=np.ones((3, 3, 3)))
    if n == 0:
        raise ValueError("estimate_brainmask: no foreground above the Otsu threshold")
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    fg = lab == int(np.argmax(sizes))
    fg = ndimage.binary_fill_holes(fg)
    for k in range(fg.shape[2]):
        fg[..., k] = ndimage.binary_fill_holes(fg[..., k])
    if erode_mm > 0:
        r = [max(1, int(round(erode_mm / s))) for s in spacing]
        fg = ndimage.binary_erosion(fg, structure=np.ones([2 * x + 1 for x in r], bool))
    if not fg.any():
        raise ValueError("estimate_brainmask: the estimated mask is empty")
    return fg.astype(np.uint8)


def _strip_nifti(name: str) -> str:
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def scan_id_of(path: PathLike) -> str:
    """``sub-001`` for ``sub-001_swi.nii.gz`` (the ``_swi`` suffix dropped), a folder's name for DICOM."""
    stem = _strip_nifti(Path(path).name)
    return stem[: -len("_swi")] if stem.endswith("_swi") else stem


def find_brainmask(image_path: PathLike) -> Path | None:
    """``<id>_brainmask.nii.gz`` (or ``.nii``) beside ``image_path`` (``<id>_swi.nii.gz`` or ``<id>.nii.gz``)."""
    p = Path(image_path)
    stem = _strip_nifti(p.name)
    for base in {scan_id_of(p), stem}:
        for suf in (".nii.gz", ".nii"):
            cand = p.parent / f"{base}_brainmask{suf}"
            if cand.is_file():
                return cand
    return None


def _meta_tensor(array: np.ndarray, affine: np.ndarray, source: str) -> MetaTensor:
    return MetaTensor(torch.as_tensor(np.ascontiguousarray(array)), affine=torch.as_tensor(affine, dtype=torch.float64),
                      meta={"filename_or_obj": source, "original_channel_dim": "no_channel"})


def load_scan(
    image: PathLike,
    brainmask: PathLike | None = None,
    label: PathLike | None = None,
    scan_id: str | None = None,
    lower: float = 0.0,
    upper: float = 99.5,
    estimate_mask: bool = True,
) -> dict[str, Any]:
    """Load and preprocess one scan for the detector.

    Args:
        image: SWI NIfTI file or DICOM series (folder).
        brainmask: 0/1 brain mask on the image's grid; ``None``: :func:`estimate_brainmask` (if
            ``estimate_mask``, else a ``ValueError``).
        label: CMB instance labels on the image's grid (optional; training/evaluation).
        scan_id: identifier (default from the file name, see :func:`scan_id_of`).
        lower, upper: intensity percentiles (inside the brain mask) mapped to 0 and 1.

    Returns:
        dict with ``image`` (1, X, Y, Z) float32 MetaTensor in [0, 1], RAS; ``brainmask`` (1, X, Y, Z) uint8;
        ``label`` (1, X, Y, Z) int32 or None; ``spacing`` (3,) mm; ``affine`` (4, 4) of the RAS grid;
        ``canonical`` (:class:`cmb_synthesis.external.CanonicalImage`, to go back to the input's grid);
        ``id``, ``source`` (path), ``mask_source`` ("file" or "estimated").

    Raises:
        FileNotFoundError / ValueError naming the file (missing, unreadable, NaN, masks on another grid, ...).
    """
    from cmb_synthesis.external import to_canonical
    from transforms.pipelines import preprocessing

    can = to_canonical(image, dtype=np.float32)
    data: dict[str, Any] = {"image": _meta_tensor(can.array, can.affine, str(image))}
    mask_keys: tuple[str, ...] = ("brainmask",)
    if brainmask is not None:
        bm = to_canonical(brainmask, dtype=None)
        data["brainmask"] = _meta_tensor(bm.array, bm.affine, str(brainmask))
        mask_source = "file"
    elif estimate_mask:
        data["brainmask"] = _meta_tensor(estimate_brainmask(can.array, can.spacing), can.affine, f"{image} (estimated mask)")
        mask_source = "estimated"
    else:
        raise ValueError(f"{image}: no brain mask given")
    label_keys: tuple[str, ...] = ()
    if label is not None:
        lab = to_canonical(label, dtype=None)
        data["label"] = _meta_tensor(lab.array, lab.affine, str(label))
        label_keys = ("label",)
    d = preprocessing(keys=("image",), mask_keys=mask_keys, label_keys=label_keys, lower=lower, upper=upper,
                      load=False)(data)
    return {
        "image": d["image"],
        "brainmask": d["brainmask"],
        "label": d.get("label"),
        "spacing": tuple(float(s) for s in can.spacing),
        "affine": np.asarray(can.affine, dtype=np.float64),
        "canonical": can,
        "id": scan_id or scan_id_of(image),
        "source": str(image),
        "mask_source": mask_source,
    }


# -------------------------------------------------------------------------------------- candidates
def _frst_settings(frst: Mapping[str, Any] | None) -> dict[str, Any]:
    s = dict(frst or {})
    for k, v in list(s.items()):
        if isinstance(v, (list, tuple)):
            s[k] = [float(x) for x in v]
    return s


def _cache_key(image: np.ndarray, mask: np.ndarray, spacing: Sequence[float], settings: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CANDIDATE_CACHE_VERSION, "spacing": [round(float(s), 6) for s in spacing],
                         "shape": list(image.shape), "frst": settings}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(image, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    return h.hexdigest()


def scan_candidates(
    scan: Mapping[str, Any], frst: Mapping[str, Any] | None = None, cache_dir: PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """FRST candidates of a preprocessed scan (from :func:`load_scan`), cached by content.

    Args:
        scan: dict with ``image`` and ``brainmask`` (1, X, Y, Z) and ``spacing``.
        frst: keyword arguments of ``transforms.frst.FRSTCandidatesd`` (radii_mm, beta, max_candidates, ...);
            empty: the FRST defaults tuned on the phantom training split.
        cache_dir: folder of ``<sha256>.npz`` files (None: no cache). The key covers the image and mask
            voxels, the spacing and the settings, so a changed scan or setting never reuses a stale result.

    Returns:
        ``(coords, scores)``: (N, 3) int64 voxel indices in the RAS grid of ``scan`` and (N,) FRST scores,
        strongest first.
    """
    from transforms.frst import FRSTCandidatesd

    settings = _frst_settings(frst)
    img = np.asarray(scan["image"][0], dtype=np.float32)
    mask = np.asarray(scan["brainmask"][0], dtype=np.uint8)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{_cache_key(img, mask, scan['spacing'], settings)}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    return z["coords"].astype(np.int64), z["scores"].astype(np.float64)
            except Exception:  # truncated/corrupt cache file: recompute and replace it
                logger.warning("%s: unreadable candidate cache file, recomputing", path)
    out = FRSTCandidatesd(keys="image", mask_key="brainmask", spacing=scan["spacing"], **settings)(
        {"image": img[None], "brainmask": mask[None]})
    coords, scores = np.asarray(out["candidates"], np.int64).reshape(-1, 3), np.asarray(out["candidates_score"], np.float64)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, coords=coords, scores=scores)
    return coords, scores


def label_candidates(coords: np.ndarray, instance_labels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Hit rule per candidate: ``(targets (N,) float32 in {0, 1}, lesion_ids (N,) int64, 0 for none)``.

    ``instance_labels`` is (X, Y, Z) or (1, X, Y, Z); a candidate is positive when its voxel has a non-zero
    label (the lesion it hits), as in ``cmb_synthesis.froc.match_candidates``.
    """
    lab = instance_labels.detach().cpu().numpy() if isinstance(instance_labels, torch.Tensor) else np.asarray(instance_labels)
    if lab.ndim == 4 and lab.shape[0] == 1:
        lab = lab[0]
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 3)
    if len(coords) and ((coords < 0).any() or (coords >= np.array(lab.shape)).any()):
        raise ValueError(f"label_candidates: candidate voxels outside the label volume of shape {lab.shape}")
    ids = lab[coords[:, 0], coords[:, 1], coords[:, 2]].astype(np.int64) if len(coords) else np.zeros(0, np.int64)
    return (ids > 0).astype(np.float32), ids


def to_source_voxels(coords: np.ndarray, affine: np.ndarray, source_affine: np.ndarray) -> np.ndarray:
    """Map (N, 3) voxel indices of the canonical (RAS) grid to the input file's voxel grid (same world point)."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 3)
    if not len(coords):
        return np.zeros((0, 3), np.int64)
    m = np.linalg.inv(np.asarray(source_affine, np.float64)) @ np.asarray(affine, np.float64)
    src = coords @ m[:3, :3].T + m[:3, 3]
    return np.rint(src).astype(np.int64)


@dataclass
class CandidateSet:
    """Candidate patches of a list of scans.

    Attributes:
        samples: one dict per candidate: ``image`` (1, PX, PY, PZ) float16 patch (cast to float32 by
            :func:`patch_transforms`), ``label`` (1,) float32 target (1: hits a lesion), ``scan`` (index into
            ``scans``), ``lesion`` (hit instance label, 0 none), ``score`` (FRST score).
        scans: one dict per scan: ``id``, ``group``, ``n_lesions``, ``n_candidates``, ``n_lesions_hit``.
    """

    samples: list[dict[str, Any]] = field(default_factory=list)
    scans: list[dict[str, Any]] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        """(N,) targets of the samples (for :func:`balanced_sampler`)."""
        return np.array([float(s["label"][0]) for s in self.samples], dtype=np.float32)

    def summary(self) -> dict[str, Any]:
        n_les = sum(s["n_lesions"] for s in self.scans)
        hit = sum(s["n_lesions_hit"] for s in self.scans)
        n_pos = int(self.labels.sum()) if self.samples else 0
        return {"n_scans": len(self.scans), "n_lesions": n_les, "n_lesions_hit": hit,
                "candidate_sensitivity": hit / n_les if n_les else None, "n_candidates": len(self.samples),
                "n_positive": n_pos, "n_negative": len(self.samples) - n_pos,
                "candidates_per_scan": len(self.samples) / len(self.scans) if self.scans else 0.0}


def build_candidate_set(
    items: Sequence[Mapping[str, Any]],
    patch_size: Sequence[int] = (32, 32, 16),
    frst: Mapping[str, Any] | None = None,
    cache_dir: PathLike | None = None,
    name: str = "candidates",
) -> CandidateSet:
    """Candidates, hit-rule targets and candidate-centred patches of every scan in ``items``.

    Args:
        items: datalist items with absolute ``image``, ``brainmask`` and ``label`` paths (``label`` may be
            absent for healthy scans: all their candidates are negatives), optional ``id`` and ``group``.
        patch_size: patch size (PX, PY, PZ), centred on the candidate (``transforms.patches.CandidatePatchesd``).
        frst, cache_dir: see :func:`scan_candidates`.
        name: used in the log line.

    Raises:
        FileNotFoundError / ValueError naming the file of a bad item (a training set is not silently thinned).
    """
    from transforms.patches import CandidatePatchesd

    extract = CandidatePatchesd(keys=("image",), candidates_key="candidates", patch_size=patch_size)
    out = CandidateSet()
    for n, it in enumerate(items):
        scan = load_scan(it["image"], it.get("brainmask"), it.get("label"), scan_id=it.get("id"))
        coords, scores = scan_candidates(scan, frst, cache_dir)
        if scan["label"] is not None:
            targets, lesion_ids = label_candidates(coords, scan["label"])
            all_ids = np.unique(np.asarray(scan["label"]))
            n_les = int((all_ids > 0).sum())
        else:
            targets, lesion_ids, n_les = np.zeros(len(coords), np.float32), np.zeros(len(coords), np.int64), 0
        patches = extract({"image": scan["image"], "candidates": coords})["image"].to(torch.float16)
        for c in range(len(coords)):
            out.samples.append({"image": patches[c], "label": torch.tensor([targets[c]], dtype=torch.float32),
                                "scan": n, "lesion": int(lesion_ids[c]), "score": float(scores[c])})
        hit = len(np.unique(lesion_ids[lesion_ids > 0]))
        out.scans.append({"id": scan["id"], "group": it.get("group", "pathological" if n_les else "healthy"),
                          "n_lesions": n_les, "n_candidates": int(len(coords)), "n_lesions_hit": int(hit)})
    s = out.summary()
    logger.info("%s: %d scans, %d candidates (%d positive), candidate sensitivity %s", name, s["n_scans"],
                s["n_candidates"], s["n_positive"], s["candidate_sensitivity"])
    return out


def patch_transforms(cda: bool | str = False, **cda_kwargs: Any):
    """Per-sample transforms of candidate patches: float32 cast, plus the paper's cDA when ``cda`` is true.

    ``cda_kwargs`` go to ``transforms.augment.classical_augmentation`` (image key ``image`` only: the target
    is a class, not a map; applied to the candidate patch, which is cheap on the CPU).
    """
    from monai.transforms import CastToTyped, Compose

    steps: list[Any] = [CastToTyped(keys="image", dtype=torch.float32)]
    if _as_bool(cda):
        from transforms.augment import classical_augmentation

        steps.append(classical_augmentation(image_keys=("image",), label_keys=(), **cda_kwargs))
    return Compose(steps)


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        if v.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if v.strip().lower() in ("false", "0", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean (true/false), got {v!r}")
    return bool(v)


def balanced_sampler(
    labels: Sequence[float] | np.ndarray, pos_fraction: float = 0.5, num_samples: int | None = None, seed: int = 0
) -> torch.utils.data.WeightedRandomSampler:
    """``WeightedRandomSampler`` drawing positives with probability ``pos_fraction`` (with replacement).

    Each positive gets weight ``pos_fraction / n_pos`` and each negative ``(1 - pos_fraction) / n_neg``; with
    no positives (e.g. only healthy scans) all samples are uniform. ``num_samples`` defaults to the number of
    samples; the generator is seeded for reproducible epochs.
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if not len(y):
        raise ValueError("balanced_sampler: no samples (no candidates were found in the training scans)")
    if not 0.0 < pos_fraction < 1.0:
        raise ValueError(f"balanced_sampler: pos_fraction must be in (0, 1), got {pos_fraction}")
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        w = np.ones_like(y)
    else:
        w = np.where(pos, pos_fraction / n_pos, (1.0 - pos_fraction) / n_neg)
    g = torch.Generator()
    g.manual_seed(int(seed))
    return torch.utils.data.WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), int(num_samples or len(y)),
                                                  replacement=True, generator=g)


# --------------------------------------------------------------------------------------- datalists
def load_split(datalist: PathLike, split: str) -> list[dict[str, Any]]:
    """Items of ``split`` with absolute paths; every named file must exist.

    Raises:
        FileNotFoundError: the datalist or a file it names is missing (both named).
        ValueError: not JSON or no such split.
    """
    from monai.data import load_decathlon_datalist

    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: datalist does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if split not in raw:
        raise ValueError(f"{path}: no {split!r} list (has {sorted(raw)})")
    items = load_decathlon_datalist(str(path), True, split, base_dir=str(path.parent))
    for n, it in enumerate(items):
        if "image" not in it:
            raise ValueError(f"{path}: {split}[{n}] has no 'image'")
        for key in ("image", "label", "brainmask"):
            if key in it and isinstance(it[key], str) and not Path(it[key]).exists():
                raise FileNotFoundError(f"{path}: {split}[{n}] names {key} file {it[key]}, which does not exist")
    return items


def training_items(
    datalist: PathLike,
    training_data: str = "real",
    synthetic_dir: PathLike | None = None,
    ratio: float = 1.0,
    seed: int = 0,
    split: str = "training",
) -> list[dict[str, Any]]:
    """Scans the classifier is trained on, for the augmentation study's three data settings.

    - ``"real"``: every item of ``split`` of ``datalist`` (pathological and healthy; healthy scans give
      vein-mimic negatives).
    - ``"synthetic"``: the ``training`` list of ``synthetic_dir/datalist.json`` (synthetic pathological scans:
      ``image``, ``label`` instance mask, ``brainmask``, written by the synthesis inference); no real scan.
    - ``"real+synthetic"``: the real items plus synthetic scans mixed 1:1 with the real pathological scans
      (``round(ratio * n_real_pathological)`` synthetic scans drawn without replacement with ``seed``, or all of
      them when there are fewer).

    Raises:
        ValueError: unknown ``training_data``; a synthetic setting without a ``synthetic_dir/datalist.json``.
        FileNotFoundError: a datalist or a file it names is missing.
    """
    mode = str(training_data).strip().lower().replace(" ", "")
    if mode not in TRAINING_DATA:
        raise ValueError(f"training_data must be one of {TRAINING_DATA}, got {training_data!r}")
    real = load_split(datalist, split) if mode != "synthetic" else []
    if mode == "real":
        return real
    if not synthetic_dir:
        raise ValueError(f"training_data={mode!r} needs --synthetic_dir (a folder with a datalist.json)")
    syn_list = Path(synthetic_dir) / "datalist.json"
    if not syn_list.is_file():
        raise FileNotFoundError(f"{syn_list}: synthetic datalist does not exist (run the synthesis inference first)")
    synthetic = load_split(syn_list, "training")
    for it in synthetic:
        it.setdefault("group", "pathological")
        it["synthetic"] = True
    if not synthetic:
        raise ValueError(f"{syn_list}: the 'training' list is empty")
    if mode == "synthetic":
        return synthetic
    n_path = sum(1 for it in real if it.get("group", "pathological") == "pathological")
    n = min(len(synthetic), int(round(float(ratio) * n_path)))
    picked = random.Random(int(seed)).sample(range(len(synthetic)), n)
    return real + [synthetic[i] for i in sorted(picked)]


# -------------------------------------------------------------------------------- validation metric
class CandidateCPM(Metric):
    """Candidate-level FROC CPM for ``SupervisedEvaluator`` (key metric for model selection).

    Every evaluated sample is one candidate with ``scan`` and ``lesion`` entries in the batch (from
    :class:`CandidateSet`) and a probability in the output's ``pred``. At the end, each scan's lesions
    (``scans``: the set's per-scan inventory, so lesions that no candidate hit count as missed) are matched
    (best probability per lesion, other candidates are FPs) and ``cmb_synthesis.froc.evaluate`` gives the CPM
    (mean sensitivity at 1/8 ... 8 FP/scan). Returns 0.0 when the scans hold no lesion.
    """

    def __init__(self, scans: Sequence[Mapping[str, Any]], pred_key: str = "pred", device: Any = "cpu") -> None:
        self.scans = list(scans)
        self.pred_key = pred_key
        super().__init__(output_transform=lambda x: x, device=device)

    def reset(self) -> None:
        self._probs: list[float] = []
        self._scan: list[int] = []
        self._lesion: list[int] = []

    def update(self, output: Sequence[Any]) -> None:
        probs, scans, lesions = output
        self._probs += [float(p) for p in torch.as_tensor(probs).detach().cpu().reshape(-1)]
        self._scan += [int(s) for s in torch.as_tensor(scans).reshape(-1)]
        self._lesion += [int(v) for v in torch.as_tensor(lesions).reshape(-1)]

    def iteration_completed(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, list):  # decollated
            probs = [torch.as_tensor(o[self.pred_key]).reshape(-1)[0] for o in output]
            scans = [b["scan"] for b in batch]
            lesions = [b["lesion"] for b in batch]
        else:
            probs, scans, lesions = output[self.pred_key], batch["scan"], batch["lesion"]
        self.update((torch.as_tensor(probs), torch.as_tensor(scans), torch.as_tensor(lesions)))

    def compute(self) -> float:
        from cmb_synthesis.froc import ScanResult, evaluate

        probs, scan_idx, lesion = np.array(self._probs), np.array(self._scan, int), np.array(self._lesion, int)
        results = []
        for i, sc in enumerate(self.scans):
            sel = scan_idx == i
            p, les = probs[sel], lesion[sel]
            fp = p[les == 0]
            hits = {}
            for v, pr in zip(les[les > 0], p[les > 0]):
                hits[int(v)] = max(hits.get(int(v), -np.inf), float(pr))
            scores = list(hits.values()) + [np.nan] * max(0, int(sc["n_lesions"]) - len(hits))
            results.append(ScanResult(str(sc["id"]), np.array(scores, float), fp))
        if sum(len(r.lesion_scores) for r in results) == 0:
            logger.warning("CandidateCPM: validation scans hold no lesion; CPM set to 0")
            return 0.0
        return float(evaluate(results, n_bootstrap=0)["cpm"])


# ------------------------------------------------------------------------------------------- inference
def load_classifier(network: torch.nn.Module, path: PathLike, device: Any = "cpu") -> torch.nn.Module:
    """Load the best-model weights (``models/model.pt``, weights-only, hash-checked when listed) into
    ``network``, move it to ``device`` and set eval mode.

    Raises:
        FileNotFoundError: no such file (train first). ValueError: not a weights-only checkpoint, or weights
        that do not fit ``network`` (the network settings differ from the training run's).
    """
    from cmb_synthesis.weights import load_network_weights

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: classifier weights not found (run the bundle's `training` first)")
    try:
        load_network_weights(network, path, map_location="cpu")
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the configured network (network settings differ from the "
                         f"training run's?): {e}") from e
    return network.to(device).eval()


@torch.no_grad()
def predict_patches(network: torch.nn.Module, patches: torch.Tensor, batch_size: int = 128, device: Any = "cpu") -> np.ndarray:
    """Sigmoid probabilities (N,) of (N, 1, PX, PY, PZ) patches, in batches."""
    network.eval()
    out = []
    for s in range(0, len(patches), int(batch_size)):
        x = patches[s:s + int(batch_size)].to(device=device, dtype=torch.float32)
        out.append(torch.sigmoid(network(x).float()).reshape(-1).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def detect_scan(
    network: torch.nn.Module,
    scan: Mapping[str, Any],
    patch_size: Sequence[int] = (32, 32, 16),
    frst: Mapping[str, Any] | None = None,
    cache_dir: PathLike | None = None,
    batch_size: int = 128,
    device: Any = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates and their CMB probabilities for one preprocessed scan.

    Returns:
        ``(coords (N, 3) int64 in the scan's RAS grid, probabilities (N,) in [0, 1], FRST scores (N,))``.
    """
    from transforms.patches import CandidatePatchesd

    coords, scores = scan_candidates(scan, frst, cache_dir)
    patches = CandidatePatchesd(keys=("image",), patch_size=patch_size)({"image": scan["image"], "candidates": coords})["image"]
    return coords, predict_patches(network, patches, batch_size, device), scores


def probability_map(shape: Sequence[int], coords: np.ndarray, probs: np.ndarray, spacing: Sequence[float],
                    radius_mm: float = 1.5) -> np.ndarray:
    """(X, Y, Z) float32 map: each candidate's probability on a ball of ``radius_mm`` around it (max where
    balls overlap), 0 elsewhere."""
    out = np.zeros(tuple(int(s) for s in shape), np.float32)
    half = [max(0, int(np.floor(radius_mm / s))) for s in spacing]
    grid = np.stack(np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij"), -1).reshape(-1, 3)
    ball = grid[((grid * np.asarray(spacing)) ** 2).sum(1) <= radius_mm ** 2 + 1e-9]
    order = np.argsort(probs, kind="stable")  # ascending: higher probabilities written last (max)
    for c, p in zip(np.asarray(coords)[order], np.asarray(probs)[order]):
        pts = c[None] + ball
        ok = np.all((pts >= 0) & (pts < np.array(out.shape)), axis=1)
        pts = pts[ok]
        out[pts[:, 0], pts[:, 1], pts[:, 2]] = np.maximum(out[pts[:, 0], pts[:, 1], pts[:, 2]], p)
    return out


def _rows(scan: Mapping[str, Any], coords: np.ndarray, probs: np.ndarray) -> list[dict[str, Any]]:
    """candidates.csv rows in the input file's voxel grid and world coordinates."""
    from cmb_synthesis.froc import candidate_rows

    can = scan["canonical"]
    src = to_source_voxels(coords, scan["affine"], can.source_affine)
    return candidate_rows(Path(scan["source"]).name, src, probs, can.source_affine)


def run_evaluation(
    network: torch.nn.Module,
    datalist: PathLike,
    output_dir: PathLike,
    split: str = "test",
    patch_size: Sequence[int] = (32, 32, 16),
    frst: Mapping[str, Any] | None = None,
    cache_dir: PathLike | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 128,
    device: Any = "cpu",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Detect on every scan of ``split`` and write the FROC report.

    Writes into ``output_dir`` (atomically): ``candidates.csv`` (image, i, j, k in the image file's voxel grid,
    x, y, z world mm, probability), ``metrics.json`` (``cmb_synthesis.froc.evaluate`` plus a ``candidate_stage``
    block: candidate sensitivity and candidates per scan, and ``extra``), ``froc.csv`` and ``froc.png``.
    A datalist naming a missing file raises ``FileNotFoundError`` naming it before anything is computed.
    """
    from cmb_synthesis.froc import evaluate, match_candidates, write_candidates_csv, write_report

    items = load_split(datalist, split)
    if not items:
        raise ValueError(f"{datalist}: split {split!r} is empty")
    results, rows, n_cand = [], [], []
    for it in items:
        scan = load_scan(it["image"], it.get("brainmask"), it.get("label"), scan_id=it.get("id"))
        if scan["label"] is None:
            raise ValueError(f"{datalist}: {split} item {it['image']} has no label to evaluate against")
        coords, probs, _ = detect_scan(network, scan, patch_size, frst, cache_dir, batch_size, device)
        results.append(match_candidates(scan["id"], coords, probs, np.asarray(scan["label"][0])))
        rows += _rows(scan, coords, probs)
        n_cand.append(len(coords))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_candidates_csv(rows, out / "candidates.csv")
    metrics = evaluate(results, n_bootstrap=n_bootstrap, seed=seed)
    n_les = sum(len(r.lesion_scores) for r in results)
    hit = sum(int((~np.isnan(r.lesion_scores)).sum()) for r in results)
    metrics["candidate_stage"] = {"candidate_sensitivity": hit / n_les if n_les else None, "n_lesions_hit": hit,
                                  "candidates_per_scan_mean": float(np.mean(n_cand)),
                                  "candidates_per_scan_max": int(np.max(n_cand))}
    metrics.update({"split": split, "datalist": str(datalist), **dict(extra or {})})
    write_report(metrics, out)
    logger.info("evaluation on %s (%d scans, %d lesions): sensitivity at 10 FP/scan %s, CPM %.3f; report in %s",
                split, metrics["n_scans"], metrics["n_lesions"], metrics["sensitivity_at_fp"].get("10"),
                metrics["cpm"], out)
    return metrics


def find_inputs(dataset_dir: PathLike) -> list[Path]:
    """SWI inputs of a folder: NIfTI files (not masks/labels/outputs: names ending ``_brainmask``, ``_cmb``,
    ``_tissue``, ``_veins``, ``_cmb_prob``, ...) and sub-folders (DICOM series), sorted by name."""
    d = Path(dataset_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: dataset folder does not exist")
    found = []
    for p in sorted(d.iterdir()):
        if p.is_dir():
            found.append(p)
        elif p.name.endswith((".nii", ".nii.gz")) and not _strip_nifti(p.name).endswith(_DERIVED_SUFFIXES):
            found.append(p)
    return found


class BatchInferenceError(RuntimeError):
    """Some scans of a batch failed; the others were processed. ``failures``: [{"image", "error"}]."""

    def __init__(self, failures: list[dict[str, str]], n_total: int) -> None:
        self.failures = failures
        lines = "\n".join(f"  {f['image']}: {f['error']}" for f in failures)
        super().__init__(f"{len(failures)} of {n_total} scans failed (the others were processed):\n{lines}")


def run_inference(
    network: torch.nn.Module,
    dataset_dir: PathLike,
    output_dir: PathLike,
    patch_size: Sequence[int] = (32, 32, 16),
    frst: Mapping[str, Any] | None = None,
    cache_dir: PathLike | None = None,
    batch_size: int = 128,
    device: Any = "cpu",
    prob_radius_mm: float = 1.5,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Detect CMBs on every SWI in ``dataset_dir`` (NIfTI files or DICOM series folders).

    Per scan ``<id>`` (``<id>_swi.nii.gz`` -> ``<id>``): brain mask ``<id>_brainmask.nii.gz`` beside it when
    present, else :func:`estimate_brainmask`; writes ``<id>_cmb_prob.nii.gz`` (float32 candidate
    probabilities on balls of ``prob_radius_mm``, in the input's voxel grid, affine and header) and
    ``<id>_candidates.csv`` (that scan's rows), each atomically. A scan whose two outputs already exist is
    skipped (its rows are read back) unless ``overwrite``. After all scans: ``candidates.csv`` (all
    successful scans) and ``inference_summary.json`` (``processed``, ``skipped``, ``failed``). A bad scan is
    logged and skipped; if any failed, :class:`BatchInferenceError` is raised at the end with a summary
    (non-zero exit of ``monai.bundle run``).
    """
    from cmb_synthesis.external import write_like
    from cmb_synthesis.froc import read_candidates_csv, write_candidates_csv
    from cmb_synthesis.io import write_json

    inputs = find_inputs(dataset_dir)
    if not inputs:
        raise ValueError(f"{dataset_dir}: no SWI inputs (NIfTI files or DICOM folders) found")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() == Path(dataset_dir).resolve():
        raise ValueError(f"{out}: output folder must differ from the input folder")
    rows: list[dict[str, Any]] = []
    done, skipped, failures = [], [], []
    for path in inputs:
        try:
            sid = scan_id_of(path)
            prob_path, rows_path = out / f"{sid}_cmb_prob.nii.gz", out / f"{sid}_candidates.csv"
            if not overwrite and prob_path.exists() and rows_path.exists():
                rows += read_candidates_csv(rows_path)
                skipped.append({"image": str(path), "id": sid, "probability_map": str(prob_path)})
                logger.info("%s: outputs exist, skipped (use --overwrite true to replace)", path.name)
                continue
            mask = find_brainmask(path) if path.is_file() else None
            scan = load_scan(path, mask, scan_id=sid)
            coords, probs, _ = detect_scan(network, scan, patch_size, frst, cache_dir, batch_size, device)
            pmap = probability_map(scan["image"].shape[1:], coords, probs, scan["spacing"], prob_radius_mm)
            write_like(pmap, scan["canonical"], prob_path, dtype=np.float32, overwrite=True,
                       inputs=[p for p in (path, mask) if p is not None])
            scan_rows = _rows(scan, coords, probs)
            write_candidates_csv(scan_rows, rows_path)
            rows += scan_rows
            done.append({"image": str(path), "id": scan["id"], "n_candidates": int(len(coords)),
                         "mask": scan["mask_source"], "probability_map": str(prob_path)})
            logger.info("%s: %d candidates, max probability %.3f", path.name, len(coords),
                        float(probs.max()) if len(probs) else 0.0)
        except Exception as e:  # noqa: BLE001 - a batch job reports every bad scan and goes on
            failures.append({"image": str(path), "error": f"{type(e).__name__}: {e}"})
            logger.error("%s: skipped (%s: %s)", path, type(e).__name__, e)
    write_candidates_csv(rows, out / "candidates.csv")
    summary = {"processed": done, "skipped": skipped, "failed": failures, "n_inputs": len(inputs)}
    write_json(summary, out / "inference_summary.json")
    if failures:
        raise BatchInferenceError(failures, len(inputs))
    return summary

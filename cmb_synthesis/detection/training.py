"""Stage 2 training data of the detector: candidate patches with hit-rule targets, the balanced sampler,
the augmentation study's training-data settings, and the CPM validation metric.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.transforms import CastToTyped, Compose

from cmb_synthesis.data.datalist import load_split
from cmb_synthesis.data.io import PathLike
from cmb_synthesis.data.scans import load_scan
from cmb_synthesis.detection.candidates import label_candidates, scan_candidates
from cmb_synthesis.evaluation.froc import evaluate
from cmb_synthesis.evaluation.hits import ScanResult, scan_result
from cmb_synthesis.progress import progress
from transforms.augment import classical_augmentation
from transforms.patches import CandidatePatchesd

__all__ = ["TRAINING_DATA", "CandidateSet", "build_candidate_set", "patch_transforms", "balanced_sampler",
           "training_items", "CandidateCPM"]

logger = logging.getLogger(__name__)

TRAINING_DATA = ("real", "synthetic", "real+synthetic")


@dataclass
class CandidateSet:
    """Candidate patches of a list of scans.

    Attributes:
        samples: one dict per candidate: ``image`` (1, PX, PY, PZ) float16 patch (cast to float32 by
            :func:`patch_transforms`), ``label`` (1,) float32 target (1: hits a lesion), ``scan`` (index into
            ``scans``), ``lesion`` (hit instance label, 0 none), ``score`` (FRST score).
        scans: one dict per scan: ``id``, ``group``, ``n_lesions``, ``lesion_ids``,
            ``n_candidates``, ``n_lesions_hit``, ``label_split`` (a binary mask was split into components).
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
    spacing: Sequence[float] | None = None,
) -> CandidateSet:
    """Candidates, hit-rule targets and candidate-centred patches of every scan in ``items``.

    Args:
        items: datalist items with absolute ``image``, ``brainmask`` and ``label`` paths (``label`` may be
            absent for healthy scans: all their candidates are negatives), optional ``id`` and ``group``.
        patch_size: patch size (PX, PY, PZ), centred on the candidate (``transforms.patches.CandidatePatchesd``).
        frst, cache_dir: see :func:`scan_candidates`.
        name: used in the log line (and the progress line).
        spacing: the classifier's grid (mm, train.yaml ``spacing``): every scan is resampled to it
            (:func:`cmb_synthesis.data.scans.load_scan`); None keeps each scan's voxels.

    Raises:
        FileNotFoundError / ValueError naming the file of a bad item (a training set is not silently thinned).
    """
    extract = CandidatePatchesd(keys=("image",), candidates_key="candidates", patch_size=patch_size)
    out = CandidateSet()
    for n, it in enumerate(progress(list(items), f"{name} candidates")):
        scan = load_scan(it["image"], it.get("brainmask"), it.get("label"), scan_id=it.get("id"), spacing=spacing)
        coords, scores = scan_candidates(scan, frst, cache_dir)
        if scan["label"] is not None:
            targets, lesion_ids = label_candidates(coords, scan["label"])
            all_ids = np.unique(np.asarray(scan["label"]))
            all_ids = all_ids[all_ids > 0]
        else:
            targets, lesion_ids = np.zeros(len(coords), np.float32), np.zeros(len(coords), np.int64)
            all_ids = np.zeros(0, np.int64)
        n_les = len(all_ids)
        patches = extract({"image": scan["image"], "candidates": coords})["image"].to(torch.float16)
        for c in range(len(coords)):
            out.samples.append({"image": patches[c], "label": torch.tensor([targets[c]], dtype=torch.float32),
                                "scan": n, "lesion": int(lesion_ids[c]), "score": float(scores[c])})
        hit = len(np.unique(lesion_ids[lesion_ids > 0]))
        out.scans.append({"id": scan["id"], "group": it.get("group", "pathological" if n_les else "healthy"),
                          "n_lesions": n_les, "lesion_ids": [int(v) for v in all_ids],
                          "n_candidates": int(len(coords)), "n_lesions_hit": int(hit),
                          "label_split": bool(scan.get("label_split", False))})
    s = out.summary()
    logger.info("%s: %d scans, %d candidates (%d positive), candidate sensitivity %s", name, s["n_scans"],
                s["n_candidates"], s["n_positive"], s["candidate_sensitivity"])
    return out


def patch_transforms(cda: bool | str = False, slice_blur_prob: float = 0.0,
                     slice_blur_sigma: Sequence[float] = (0.3, 1.0), **cda_kwargs: Any):
    """Per-sample transforms of candidate patches: float32 cast, the paper's cDA when ``cda`` is true, and an
    optional through-plane blur.

    ``cda_kwargs`` go to ``transforms.augment.classical_augmentation`` (image key ``image`` only: the target
    is a class, not a map; applied to the candidate patch, which is cheap on the CPU).

    ``slice_blur_prob``: probability of a Gaussian blur along the patch's third (S, slice) axis only, with a
    sigma drawn from ``slice_blur_sigma`` (voxels of the training grid; MONAI ``RandGaussianSmoothd``). A
    scan acquired with thicker slices (e.g. 0.5 x 0.5 x 2 mm) and resampled to the training grid shows its
    CMBs smeared along S like this (a 2-3 mm slice profile is a sigma of about 0.6-0.9 mm), so the blur trains
    the classifier for such scans; 0 (default): off.
    """
    from monai.transforms import RandGaussianSmoothd

    steps: list[Any] = [CastToTyped(keys="image", dtype=torch.float32)]
    if _as_bool(cda):
        steps.append(classical_augmentation(image_keys=("image",), label_keys=(), **cda_kwargs))
    p = float(slice_blur_prob)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"slice_blur_prob must be in [0, 1], got {slice_blur_prob}")
    if p > 0:
        lo, hi = (float(v) for v in slice_blur_sigma)
        if not 0.0 <= lo <= hi:
            raise ValueError(f"slice_blur_sigma must be (low, high) with 0 <= low <= high, got {slice_blur_sigma}")
        steps.append(RandGaussianSmoothd(keys="image", sigma_x=(0.0, 0.0), sigma_y=(0.0, 0.0), sigma_z=(lo, hi), prob=p))
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
    (mean sensitivity at 1/8 ... 8 FP/scan). Returns 0.0 when the scans hold no lesion. The per-scan results
    stay in ``last_results`` (the operating point saved with the best model is computed from them,
    :class:`cmb_synthesis.detection.operating_point.OperatingPointWriter`).
    """

    def __init__(self, scans: Sequence[Mapping[str, Any]], pred_key: str = "pred", device: Any = "cpu") -> None:
        self.scans = list(scans)
        self.pred_key = pred_key
        #: the per-scan results of the last :meth:`compute` (read by the operating-point handler)
        self.last_results: list[ScanResult] = []
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
        probs, scan_idx, lesion = np.array(self._probs), np.array(self._scan, int), np.array(self._lesion, int)
        results = []
        for i, sc in enumerate(self.scans):
            hits = lesion[scan_idx == i]
            ids = sc.get("lesion_ids")
            if ids is None:  # an inventory with counts only: unhit lesions get ids of their own
                ids = np.unique(hits[hits > 0])
                extra = max(0, int(sc["n_lesions"]) - len(ids))
                ids = np.concatenate([ids, int(ids.max(initial=0)) + 1 + np.arange(extra)])
            results.append(scan_result(str(sc["id"]), hits, probs[scan_idx == i], ids))
        self.last_results = results
        if sum(len(r.lesion_scores) for r in results) == 0:
            logger.warning("CandidateCPM: validation scans hold no lesion; CPM set to 0")
            return 0.0
        return float(evaluate(results, n_bootstrap=0)["cpm"])

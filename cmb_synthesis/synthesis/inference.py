"""Whole-volume synthesis with trained generators (the ``inference`` run of the ``cmb_synthesis`` bundle).

- :func:`synthesize_volume`: one preprocessed volume through ``G_HP`` (or ``G_PH``) patch-wise, 160 x 146 x 32
  windows with 50 % overlap along z, blended with a Gaussian weight along z (MONAI ``SlidingWindowInferer``).
- :func:`run_inference`: every healthy SWI of a folder (NIfTI files or DICOM series folders) or
  ``datalist.json`` -> ``<id>_synthetic.nii.gz`` and ``<id>_synthetic_cmb.nii.gz`` (instance labels), or with
  ``direction="pseudo_healthy"`` every pathological SWI with its mask -> ``<id>_pseudohealthy.nii.gz``. Scans
  are read with :func:`cmb_synthesis.data.scans.to_canonical` and results written back with
  :func:`~cmb_synthesis.data.scans.write_like`: in the input's voxel grid, affine and header, in the input's
  intensity range. The batch (output checks, one unit per scan, skip/overwrite, summary and
  :class:`~cmb_synthesis.data.batch.BatchInferenceError`) is :func:`cmb_synthesis.data.batch.run_batch`.

Masks: for healthy scans, ``<id>_mask.nii.gz`` beside the image (or a datalist item's ``mask`` key) when
present, otherwise sampled with :class:`transforms.lesion_mask.RandLesionMaskd` from a saved
:class:`~transforms.lesion_mask.LesionBank` (``models/lesion_bank.npz``, written by training) inside the brain
mask, seeded per scan by ``(seed, id)``. The brain mask is ``<id>_brainmask.nii.gz`` beside the image (or a
datalist item's ``brainmask``); without one it is estimated by registering nilearn's MNI152 template to the
scan (:func:`cmb_synthesis.data.brainmask.estimate_brainmask`, ``docs/brainmask.md``; ``estimate_brainmask=False``
refuses such scans instead). The brain mask also restricts the intensity percentiles, as in training. Pathological scans use ``<id>_mask.nii.gz``,
``<id>_cmb.nii.gz`` or the datalist ``label``. Binary masks are split into connected components (one lesion
each, :func:`transforms.labels.as_instance_labels`). A scan with nothing to paint (an empty given mask,
one outside the brain mask, or no sampled lesion placed) fails instead of being written unchanged.

Intensity: the generator works on the percentile-scaled image ``x`` in [0, 1]; the output is
``input + invert(G(x)) - invert(x)``, i.e. the generator's change mapped back through the inverse percentile
scale and added to the untouched input, so voxels the generator leaves alone keep their exact values
(including those above the 99.5th percentile that the scaling clipped).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn
from monai.inferers import SlidingWindowInferer
from monai.networks.utils import eval_mode
from scipy import ndimage

from cmb_synthesis.data.batch import BatchJob, run_batch
from cmb_synthesis.data.brainmask import estimate_brainmask as _estimate_brainmask
from cmb_synthesis.data.datalist import SPLITS, load_split
from cmb_synthesis.data.io import PathLike
from cmb_synthesis.data.naming import find_beside, find_inputs, unique_scan_ids
from cmb_synthesis.data.scans import CanonicalImage, as_meta_tensor, load_lesion_labels, to_canonical, write_like
from cmb_synthesis.synthesis.codes import random_codes
from cmb_synthesis.training.weights import load_network_weights
from transforms.intensity import invert_percentile_scale
from transforms.lesion_mask import LesionBank, RandLesionMaskd
from transforms.pipelines import preprocessing

__all__ = ["synthesize_volume", "find_scans", "first_scans", "load_scan", "run_inference", "ScanJob", "DIRECTIONS", "OUTPUTS"]

logger = logging.getLogger(__name__)

DIRECTIONS = ("pathological", "pseudo_healthy")
# output name -> file suffix, per direction
OUTPUTS = {
    "pathological": {"synthetic": "_synthetic.nii.gz", "synthetic_cmb": "_synthetic_cmb.nii.gz"},
    "pseudo_healthy": {"pseudohealthy": "_pseudohealthy.nii.gz"},
}


def synthesize_volume(
    G: nn.Module,
    image: torch.Tensor,
    mask: torch.Tensor,
    patch: Sequence[int] = (160, 146, 32),
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    sigma_scale: Sequence[float] = (1.0, 1.0, 0.125),
    device: torch.device | str | None = None,
    amp: bool = False,
    code_seed: int = 0,
    code: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run generator ``G`` over a whole volume patch-wise.

    Args:
        G: ``G_HP`` or ``G_PH`` (:class:`~cmb_synthesis.synthesis.networks.CMBGenerator`), called on 2-channel patches.
        image: (1, X, Y, Z) float in [0, 1] (percentile-scaled, RAS); mask: (1, X, Y, Z), non-zero = lesion.
        patch: window size; the paper's 160 x 146 x 32 (volumes smaller than it are padded, larger ones tiled).
        overlap: overlap along z (x and y windows do not overlap when the window spans the plane).
        mode, sigma_scale: blending of overlapping windows (``"gaussian"``: weights peak at the window centre
            along z; sigma 1.0 x the window along x/y makes the in-plane weight nearly flat).
        device: where the windows run (default: the generator's device); the stitched output stays on CPU.
        code_seed, code: a contrast-code generator (``G.mask_code``, :mod:`cmb_synthesis.synthesis.codes`)
            paints each lesion (instance label of ``mask``) at a darkness rank drawn from U(0, 1) with
            ``code_seed``, or as the code map ``code`` (1, X, Y, Z) says. Other generators ignore both.

    Returns:
        (1, X, Y, Z) float32 tensor in [0, 1] on CPU.
    """
    if image.ndim != 4 or image.shape != mask.shape:
        raise ValueError(f"image and mask must both be (1, X, Y, Z), got {tuple(image.shape)} and {tuple(mask.shape)}")
    if device is None:
        device = next(G.parameters()).device
    inferer = SlidingWindowInferer(
        roi_size=tuple(int(p) for p in patch),
        sw_batch_size=sw_batch_size,
        overlap=(0.0, 0.0, float(overlap)),
        mode=mode,
        sigma_scale=tuple(float(s) for s in sigma_scale),
        padding_mode="replicate",
        sw_device=device,
        device="cpu",
        progress=False,
    )
    channel = (mask > 0).float()
    if getattr(getattr(G, "module", G), "mask_code", False):
        if code is not None:
            if code.shape != mask.shape:
                raise ValueError(f"code map {tuple(code.shape)} and mask {tuple(mask.shape)} differ in shape")
            channel = code.float()
        else:
            channel = random_codes(mask[None], torch.Generator().manual_seed(int(code_seed)))[0]
    x = torch.cat([image.float(), channel], dim=0)[None]
    dev_type = torch.device(device).type
    with eval_mode(G), torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=amp):
        out = inferer(x, lambda t: G(t).float())
    return out[0].float().clamp(0.0, 1.0)


@dataclass
class ScanJob:
    """One input scan: ``id``, ``image`` path (NIfTI file or DICOM folder), optional ``brainmask`` / ``mask`` /
    ``tissue`` paths."""

    id: str
    image: str
    brainmask: str | None = None
    mask: str | None = None
    tissue: str | None = None
    extra: dict = field(default_factory=dict)


def _str(path: Any) -> str | None:
    return str(path) if path else None


def find_scans(dataset_dir: PathLike, direction: str = "pathological", exclude: Sequence[PathLike] = ()) -> list[ScanJob]:
    """The scans to process, with unique ids.

    From ``datalist.json`` (a file, or inside ``dataset_dir``): every item of the ``training`` / ``validation``
    / ``test`` lists whose ``group`` is healthy (``pathological`` direction) or pathological
    (``pseudo_healthy``), an item without ``group`` counting as wanted; its ``id`` when given. Otherwise the
    folder's inputs (:func:`cmb_synthesis.data.naming.find_inputs`: NIfTI files that are not derived files such
    as ``*_mask``/``*_brainmask``, and DICOM series folders; hidden/temporary files and the folders in
    ``exclude`` are skipped) with ``<id>_brainmask`` / ``<id>_mask`` (or ``<id>_cmb`` for pseudo-healthy) /
    ``<id>_tissue`` beside them. Ids that clash are made unique from the path
    (:func:`~cmb_synthesis.data.naming.unique_scan_ids`).

    Raises:
        FileNotFoundError: ``dataset_dir`` does not exist or holds no scan.
        ValueError: unknown ``direction``; a datalist that is not valid; ids that cannot be made unique.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    path = Path(dataset_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path}: dataset folder/datalist does not exist")
    datalist = path if path.is_file() else path / "datalist.json"
    want = "healthy" if direction == "pathological" else "pathological"
    jobs: list[ScanJob] = []
    if datalist.is_file():
        items = [it for split in SPLITS for it in load_split(datalist, split, check_files=False, missing_ok=True)
                 if it.get("group", want) == want]
        ids = unique_scan_ids([it["image"] for it in items], [_str(it.get("id")) for it in items])
        for sid, it in zip(ids, items):
            mask = it.get("mask") or (it.get("label") if direction == "pseudo_healthy" else None)
            jobs.append(ScanJob(sid, it["image"], _str(it.get("brainmask")), _str(mask), _str(it.get("tissue"))))
    else:
        images = find_inputs(path, exclude=tuple(exclude))
        for sid, img in zip(unique_scan_ids(images), images):
            mask = find_beside(img, "_mask")
            if mask is None and direction == "pseudo_healthy":
                mask = find_beside(img, "_cmb")
            jobs.append(ScanJob(sid, str(img), _str(find_beside(img, "_brainmask")), _str(mask),
                                _str(find_beside(img, "_tissue"))))
    if not jobs:
        raise FileNotFoundError(f"{path}: no {want} SWI scans found")
    return jobs


def first_scans(datalist: PathLike, split: str) -> tuple[ScanJob, ScanJob]:
    """The first healthy and the first pathological scan of ``split`` in ``datalist`` (a ``datalist.json``), as
    :func:`find_scans` jobs: the one to paint (``pathological`` direction) and the one to clean
    (``pseudo_healthy``). Raises ``ValueError`` naming the datalist when the split lacks either group."""
    items = load_split(datalist, split)
    jobs = []
    for group, direction in (("healthy", "pathological"), ("pathological", "pseudo_healthy")):
        ids = {i.get("id") for i in items if i.get("group") == group}
        found = [j for j in find_scans(datalist, direction) if j.id in ids]
        if not found:
            raise ValueError(f"{datalist}: the {split!r} split has no {group} scan")
        jobs.append(found[0])
    return jobs[0], jobs[1]


def _scan_seed(seed: int, sid: str) -> int:
    return (zlib.crc32(sid.encode()) ^ int(seed)) % (2**31)


def _plain(v: Any) -> torch.Tensor:
    return v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(np.asarray(v))


def _check_inputs(job: ScanJob, direction: str, bank: Any, estimate_mask: bool = True) -> None:
    """Refuse, before loading anything, a scan that has no mask and cannot get one (naming what is missing)."""
    if job.mask:
        return
    here = Path(job.image).parent
    sid = job.id
    if direction == "pseudo_healthy":
        raise ValueError(f"{job.image}: pseudo-healthy synthesis needs a lesion mask: no {here / (sid + '_mask.nii.gz')} "
                         f"or {here / (sid + '_cmb.nii.gz')} beside it (nor a datalist 'label' / 'mask')")
    if bank is None:
        raise ValueError(f"{job.image}: no lesion mask ({here / (sid + '_mask.nii.gz')} or a datalist 'mask') and no "
                         "lesion bank (models/lesion_bank.npz, written by training) to sample one from")
    if not job.brainmask and not estimate_mask:
        raise ValueError(f"{job.image}: sampling a lesion mask needs a brain mask: no {here / (sid + '_brainmask.nii.gz')} "
                         "beside the image (nor a datalist 'brainmask'), and estimate_brainmask is off")


def load_scan(
    job: ScanJob, direction: str = "pathological", bank: Any = None, n_lesions: int | None = None, seed: int = 0,
    estimate_brainmask: bool = True, mask_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Preprocess one scan as in training and get its lesion mask (given or sampled).

    Args:
        job: the scan (image: NIfTI file or DICOM series folder) and its masks.
        estimate_brainmask: without a brain mask file, estimate one
            (:func:`cmb_synthesis.data.brainmask.estimate_brainmask`, MNI152 template registration); False: the
            scan goes without a brain mask (percentiles over the whole volume; sampling a mask is refused).

    Returns a dict: ``image`` (1, X, Y, Z) float tensor in [0, 1] (RAS), ``label`` (1, X, Y, Z) int32 instance
    labels (RAS, at least one lesion), ``brainmask`` (1, X, Y, Z) uint8 or None, ``lo``/``hi`` (the percentile
    scale), ``canonical`` (:class:`~cmb_synthesis.data.scans.CanonicalImage` of the input, to write back),
    ``n_lesions`` (lesions in ``label``), ``mask_source`` (``"given"`` / ``"sampled"``), ``brainmask_source``
    (``"file"`` / ``"estimated"`` / None), ``label_split`` (a binary mask was split into connected components).

    Raises:
        ValueError / FileNotFoundError naming the file: unreadable inputs, a missing mask/brain mask/bank, a
        brain mask that cannot be estimated, or nothing to paint ("no lesion to paint ...": an empty mask, one
        outside the brain mask, none placed).
    """
    _check_inputs(job, direction, bank, estimate_brainmask)
    verb = "paint" if direction == "pathological" else "remove"
    can = to_canonical(job.image, dtype=np.float32)
    data: dict[str, Any] = {"image": as_meta_tensor(can.array, can.affine, str(job.image))}
    keys: dict[str, tuple[str, ...]] = {"mask_keys": (), "label_keys": (), "extra_keys": ()}
    bm_source = None
    if job.brainmask:
        bm = to_canonical(job.brainmask, dtype=None)
        data["brainmask"], keys["mask_keys"] = as_meta_tensor(bm.array, bm.affine, job.brainmask), ("brainmask",)
        bm_source = "file"
    elif estimate_brainmask:
        try:
            est = _estimate_brainmask(can.array, can.spacing, affine=can.affine)
        except ValueError as e:
            raise ValueError(f"{job.image}: no brain mask beside it and none can be estimated ({e})") from e
        data["brainmask"] = as_meta_tensor(est, can.affine, f"{job.image} (estimated brain mask)")
        keys["mask_keys"], bm_source = ("brainmask",), "estimated"
        logger.info("%s: no brain mask given; estimated one by MNI152 registration (%d voxels)", job.image,
                    int(est.sum()))
    label_split = False
    if job.mask:
        data["label"], label_split = load_lesion_labels(job.mask)
        keys["label_keys"] = ("label",)
    elif job.tissue:  # guides where sampled lesions may go
        tis = to_canonical(job.tissue, dtype=None)
        data["tissue"], keys["extra_keys"] = as_meta_tensor(tis.array, tis.affine, job.tissue), ("tissue",)
    data = preprocessing(keys=("image",), load=False, **keys)(data)
    if job.mask:
        label = _plain(data["label"]).numpy()
        if not (label > 0).any():
            raise ValueError(f"{job.image}: no lesion to {verb}: the mask {job.mask} is empty")
        if "brainmask" in data:
            inside = np.unique(label[(label > 0) & (_plain(data["brainmask"]).numpy() > 0)])
            n_all = len(np.unique(label[label > 0]))
            where = job.brainmask or "estimated by MNI152 registration"
            if inside.size == 0:
                raise ValueError(f"{job.image}: no lesion to {verb}: all {n_all} lesions of {job.mask} lie outside "
                                 f"the brain mask ({where})")
            if inside.size < n_all:
                logger.warning("%s: %d of %d lesions of %s lie outside the brain mask (%s)", job.image,
                               n_all - inside.size, n_all, job.mask, where)
    else:
        sampler = RandLesionMaskd(keys=("image",), brainmask_key="brainmask", output_key="label", bank=bank,
                                  n_lesions=n_lesions, **dict(mask_options or {}))
        sampler.set_random_state(_scan_seed(seed, job.id))
        try:
            data = sampler(data)
        except ValueError as e:
            raise ValueError(f"{job.image}: no lesion to paint: {e}") from e
        if int(data["label_n_lesions"]) == 0:
            raise ValueError(f"{job.image}: no lesion to paint: 0 lesions placed (n_lesions={n_lesions}; the "
                             f"bank's lesions do not fit in the brain mask {job.brainmask or '(estimated)'}?)")
    image, label = data["image"], _plain(data["label"])
    lo, hi = (float(v) for v in image.meta["percentile_scale"])
    bm = data.get("brainmask")
    return {
        "image": _plain(image).float(),
        "label": label,
        "brainmask": None if bm is None else _plain(bm),
        "lo": lo,
        "hi": hi,
        "canonical": can,
        "n_lesions": int(torch.unique(label[label > 0]).numel()),
        "mask_source": "given" if job.mask else "sampled",
        "brainmask_source": bm_source,
        "label_split": bool(label_split),
    }


def _synthesise(
    job: BatchJob, tmp: dict[str, Path], G: nn.Module, direction: str, bank: Any, n_lesions: int | None, seed: int,
    patch: Sequence[int], overlap: float, device: Any, amp: bool, estimate_brainmask: bool = True,
    contrast_rank: float | None = None, mask_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One scan of :func:`run_inference`: synthesise and write each output to its temporary path ``tmp[name]``."""
    scan = load_scan(job.extra["scan"], direction, bank, n_lesions, seed, estimate_brainmask, mask_options)
    x, y, lo, hi = scan["image"], scan["label"], scan["lo"], scan["hi"]
    can: CanonicalImage = scan["canonical"]
    code = None if contrast_rank is None else random_codes(y[None], ranks=float(contrast_rank))[0]
    out = synthesize_volume(G, x, y, patch=patch, overlap=overlap, device=device, amp=amp,
                            code_seed=_scan_seed(seed + 1, job.id), code=code)
    delta = np.asarray(invert_percentile_scale(out[0].numpy(), lo, hi)) - np.asarray(
        invert_percentile_scale(x[0].numpy(), lo, hi)
    )
    if scan["brainmask"] is not None:
        # nothing outside the brain (dilated by 2 voxels) changes: lesions are painted and removed inside it, and
        # a generator's drift on the background (G_PH of the CPU preset lifts it) must not reach the output
        delta = np.where(ndimage.binary_dilation(scan["brainmask"][0].numpy() > 0, iterations=2), delta, 0.0)
    result = (can.array + delta).astype(np.float32)
    if direction == "pathological":
        lab = y[0].cpu().numpy()
        if lab.max() > np.iinfo(np.uint16).max:
            raise ValueError(f"{job.image}: {int(lab.max())} lesion labels do not fit the uint16 label file")
        write_like(lab.astype(np.uint16), can, tmp["synthetic_cmb"], dtype=np.uint16, overwrite=True, inputs=job.inputs)
        write_like(result, can, tmp["synthetic"], dtype=np.float32, overwrite=True, inputs=job.inputs)
        done = "painted"
    else:
        write_like(result, can, tmp["pseudohealthy"], dtype=np.float32, overwrite=True, inputs=job.inputs)
        done = "removed"
    n = scan["n_lesions"]
    bm_note = ", estimated brain mask" if scan["brainmask_source"] == "estimated" else ""
    return {"n": n, "mask": scan["mask_source"], "brainmask": scan["brainmask_source"] or "none",
            "label_split": scan["label_split"], "message": f"{n} lesions {done} ({scan['mask_source']} mask{bm_note})"}


def _count_lesions(job: BatchJob) -> dict[str, Any]:
    """Summary info of a skipped scan: the lesions in its existing label output (pathological direction)."""
    if "synthetic_cmb" not in job.outputs:
        return {}
    lab = np.asarray(nib.load(str(job.outputs["synthetic_cmb"])).dataobj)
    return {"n": int(np.unique(lab[lab > 0]).size)}


def run_inference(
    dataset_dir: PathLike,
    output_dir: PathLike,
    G_HP: nn.Module | None = None,
    G_PH: nn.Module | None = None,
    ckpt_dir: PathLike | None = None,
    direction: str = "pathological",
    lesion_bank: Any = None,
    n_lesions: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    patch: Sequence[int] = (160, 146, 32),
    overlap: float = 0.5,
    device: torch.device | str | None = None,
    amp: bool = False,
    raise_on_error: bool = True,
    estimate_brainmask: bool = True,
    contrast_rank: float | None = None,
    mask_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Synthesise CMBs on every healthy scan (or remove them: ``direction="pseudo_healthy"``).

    Args:
        dataset_dir: a folder of SWI NIfTI files or DICOM series folders (optionally with ``<id>_brainmask`` /
            ``<id>_mask`` beside them) or a ``datalist.json`` (or a folder holding one); see :func:`find_scans`.
        output_dir: where outputs go (created; must be writable and differ from the input folder).
        G_HP, G_PH: the generator for the chosen direction (built by the config).
        ckpt_dir: if given, ``G_HP.pt`` / ``G_PH.pt`` are loaded from it (weights only, sha256-checked against
            the bundle's ``large_files.yml`` when listed, via :func:`cmb_synthesis.training.weights.load_network_weights`).
        lesion_bank: a ``LesionBank`` or the path of a saved ``.npz`` for scans without a mask; None = masks
            must be given.
        n_lesions: lesions per sampled mask (None: the sampler's default); seed: sampling seed.
        overwrite: replace existing outputs (default: skip scans whose outputs all exist).
        patch, overlap, device, amp: see :func:`synthesize_volume`.
        raise_on_error: raise :class:`~cmb_synthesis.data.batch.BatchInferenceError` at the end when any scan
            failed (after processing the rest).
        estimate_brainmask: scans without a brain mask file get one estimated by MNI152 template registration
            (:func:`cmb_synthesis.data.brainmask.estimate_brainmask`); False: they go without (and cannot have
            a lesion mask sampled).
        contrast_rank: with a contrast-code ``G_HP`` (``contrast_code`` in train.yaml), paint every lesion at this
            darkness rank in [0, 1] (0 the lightest real CMBs of its size, 0.5 the median, 1 the darkest); None:
            a random rank per lesion (seeded per scan by ``(seed, id)``), so the painted CMBs have the real ones'
            spread of contrast. Ignored by generators without codes and by ``pseudo_healthy``.
        mask_options: more keyword arguments of the mask sampler (``RandLesionMaskd``) for scans without a mask,
            as in training (train.yaml's ``lesion_mask_options``, e.g. ``dark_percentile``).

    Returns:
        the summary of :func:`cmb_synthesis.data.batch.run_batch` plus ``direction`` (also in
        ``output_dir/inference_summary.json``; one row per scan in ``summary.csv``, ``n`` = lesions).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if contrast_rank is not None and not (isinstance(contrast_rank, (int, float)) and 0.0 <= float(contrast_rank) <= 1.0):
        raise ValueError(f"contrast_rank must be a number in [0, 1] (or null: a random rank per lesion), got {contrast_rank!r}")
    name = "G_HP" if direction == "pathological" else "G_PH"
    G = G_HP if direction == "pathological" else G_PH
    if G is None:
        raise ValueError(f"direction {direction!r} needs the generator {name}")
    if ckpt_dir is not None:
        weights = Path(ckpt_dir) / f"{name}.pt"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: trained {name} weights not found (train the bundle first)")
        load_network_weights(G, weights, map_location="cpu")
    if device is not None:
        G = G.to(device)
    if isinstance(lesion_bank, (str, Path)):
        if not Path(lesion_bank).is_file():
            if direction == "pathological":
                logger.warning("%s: no lesion bank; only scans with a mask beside them can be processed", lesion_bank)
            lesion_bank = None
        else:
            lesion_bank = LesionBank.load(lesion_bank)
    out = Path(output_dir)
    scans = find_scans(dataset_dir, direction, exclude=(out,))
    src = Path(dataset_dir)
    jobs = [
        BatchJob(s.id, s.image, {k: out / f"{s.id}{suffix}" for k, suffix in OUTPUTS[direction].items()},
                 inputs=tuple(p for p in (s.image, s.brainmask, s.mask, s.tissue) if p), extra={"scan": s})
        for s in scans
    ]

    def process(job: BatchJob, tmp: dict[str, Path]) -> dict[str, Any]:
        return _synthesise(job, tmp, G, direction, lesion_bank, n_lesions, seed, patch, overlap, device, amp,
                           estimate_brainmask, contrast_rank, mask_options)

    return run_batch(jobs, process, out, overwrite=overwrite, input_dirs=(src.parent if src.is_file() else src,),
                     existing=_count_lesions, raise_on_error=raise_on_error, summary_extra={"direction": direction})

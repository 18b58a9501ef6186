"""Whole-volume synthesis with trained generators (the ``inference`` run of the ``cmb_synthesis`` bundle).

- :func:`synthesize_volume`: one preprocessed volume through ``G_HP`` (or ``G_PH``) patch-wise, 160 x 146 x 32
  windows with 50 % overlap along z, blended with a Gaussian weight along z (MONAI ``SlidingWindowInferer``).
- :func:`run_inference`: every healthy SWI of a folder or ``datalist.json`` -> ``<id>_synthetic.nii.gz`` and
  ``<id>_synthetic_cmb.nii.gz`` (instance labels), or with ``direction="pseudo_healthy"`` every pathological
  SWI with its mask -> ``<id>_pseudohealthy.nii.gz``. Outputs are in the input's space (same shape, affine
  and header), in the input's intensity range, written atomically, never over an input, skipped when present
  unless ``overwrite``. A bad scan is reported and skipped; the summary is written to
  ``inference_summary.json`` and, when any scan failed, a ``RuntimeError`` lists them (non-zero exit).

Masks: for healthy scans, ``<id>_mask.nii.gz`` beside the image (or a datalist item's ``mask`` key) when
present, otherwise sampled with :class:`transforms.lesion_mask.RandLesionMaskd` from a saved
:class:`~transforms.lesion_mask.LesionBank` (``models/lesion_bank.npz``, written by training), seeded per scan
by ``(seed, id)``. Pathological scans use ``<id>_mask.nii.gz``, ``<id>_cmb.nii.gz`` or the datalist ``label``.

Intensity: the generator works on the percentile-scaled image ``x`` in [0, 1]; the output is
``input + invert(G(x)) - invert(x)``, i.e. the generator's change mapped back through the inverse percentile
scale and added to the untouched input, so voxels the generator leaves alone keep their exact values
(including those above the 99.5th percentile that the scaling clipped).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn
from monai.data import load_decathlon_datalist
from monai.inferers import SlidingWindowInferer
from monai.networks.utils import eval_mode
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from cmb_synthesis.data.io import check_not_input, load_nifti, save_nifti, write_json
from cmb_synthesis.training.weights import load_network_weights
from transforms.intensity import invert_percentile_scale
from transforms.lesion_mask import LesionBank, RandLesionMaskd
from transforms.pipelines import preprocessing

__all__ = ["synthesize_volume", "find_scans", "load_scan", "run_inference", "ScanJob", "DIRECTIONS"]

logger = logging.getLogger(__name__)

DIRECTIONS = ("pathological", "pseudo_healthy")
_DERIVED = ("_mask", "_brainmask", "_cmb", "_tissue", "_veins", "_synthetic", "_synthetic_cmb", "_pseudohealthy")


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
    x = torch.cat([image.float(), (mask > 0).float()], dim=0)[None]
    dev_type = torch.device(device).type
    with eval_mode(G), torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=amp):
        out = inferer(x, lambda t: G(t).float())
    return out[0].float().clamp(0.0, 1.0)


@dataclass
class ScanJob:
    """One input scan: ``id``, ``image`` path, optional ``brainmask`` / ``mask`` / ``tissue`` paths."""

    id: str
    image: str
    brainmask: str | None = None
    mask: str | None = None
    tissue: str | None = None
    extra: dict = field(default_factory=dict)


def _strip(name: str) -> str:
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _beside(image: Path, sid: str, suffix: str) -> str | None:
    folder = image.parent
    for ext in (".nii.gz", ".nii"):
        p = folder / f"{sid}{suffix}{ext}"
        if p.is_file():
            return str(p)
    return None


def find_scans(dataset_dir: str | Path, direction: str = "pathological") -> list[ScanJob]:
    """The scans to process: from ``datalist.json`` (a file, or inside ``dataset_dir``) every item of the
    ``training``/``validation``/``test`` lists whose ``group`` is healthy (``pathological`` direction) or
    pathological (``pseudo_healthy``); otherwise every ``*_swi.nii.gz`` (or, if none, every ``*.nii.gz`` that
    is not a derived file such as ``*_mask``/``*_brainmask``) in the folder.

    Raises:
        FileNotFoundError: ``dataset_dir`` does not exist or holds no image.
        ValueError: unknown ``direction``.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    path = Path(dataset_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path}: dataset folder/datalist does not exist")
    datalist = path if path.is_file() else path / "datalist.json"
    jobs: list[ScanJob] = []
    want = "healthy" if direction == "pathological" else "pathological"
    if datalist.is_file():
        keys = [k for k in ("training", "validation", "test") if k in json.loads(datalist.read_text())]
        for key in keys:
            for item in load_decathlon_datalist(str(datalist), True, key):
                if item.get("group", want) != want:
                    continue
                sid = str(item.get("id") or _strip(Path(item["image"]).name))
                mask = item.get("mask") or (item.get("label") if direction == "pseudo_healthy" else None)
                jobs.append(ScanJob(sid, item["image"], item.get("brainmask"), mask, item.get("tissue")))
    else:
        images = sorted(path.glob("*_swi.nii.gz")) or sorted(
            p for p in path.glob("*.nii*") if not any(_strip(p.name).endswith(s) for s in _DERIVED)
        )
        for img in images:
            base = _strip(img.name)
            sid = base[: -len("_swi")] if base.endswith("_swi") else base
            mask = _beside(img, sid, "_mask")
            if mask is None and direction == "pseudo_healthy":
                mask = _beside(img, sid, "_cmb")
            jobs.append(ScanJob(sid, str(img), _beside(img, sid, "_brainmask"), mask, _beside(img, sid, "_tissue")))
    if not jobs:
        raise FileNotFoundError(f"{path}: no {want} SWI scans found")
    return jobs


def _scan_seed(seed: int, sid: str) -> int:
    return (zlib.crc32(sid.encode()) ^ int(seed)) % (2**31)


def _to_native(ras: np.ndarray, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Undo the RAS reorientation of preprocessing (axis permutations and flips only)."""
    native = apply_orientation(ras, ornt_transform(axcodes2ornt("RAS"), io_orientation(affine)))
    if tuple(native.shape) != tuple(shape):
        raise ValueError(f"cannot map the RAS result {ras.shape} back to the input shape {tuple(shape)}")
    return native


def _instance_labels(mask: np.ndarray) -> np.ndarray:
    """Binary masks become connected-component instance labels; instance masks are kept."""
    mask = np.asarray(mask)
    if mask.max() <= 1:
        mask, _ = ndimage.label(mask > 0)
    return mask.astype(np.uint16)


def load_scan(
    job: ScanJob, direction: str = "pathological", bank: Any = None, n_lesions: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Preprocess one scan as in training and get its mask (given or sampled).

    Returns a dict: ``image`` (1, X, Y, Z) float tensor in [0, 1] (RAS), ``label`` (1, X, Y, Z) instance labels
    (RAS), ``brainmask`` (or None), ``lo``/``hi`` (the percentile scale), ``orig``/``affine``/``header`` of the
    input file (native orientation).

    Raises:
        ValueError / FileNotFoundError: naming the file, for unreadable inputs or a missing mask/brain mask.
    """
    orig, affine, header = load_nifti(job.image)
    data: dict[str, Any] = {"image": job.image}
    mask_keys: tuple[str, ...] = ()
    label_keys: tuple[str, ...] = ()
    if job.brainmask:
        data["brainmask"], mask_keys = job.brainmask, ("brainmask",)
    extra_keys: tuple[str, ...] = ()
    if job.mask:
        data["label"], label_keys = job.mask, ("label",)
    elif direction == "pseudo_healthy":
        raise ValueError(f"{job.image}: pseudo-healthy synthesis needs a lesion mask (<id>_mask.nii.gz or datalist label)")
    elif job.tissue:  # guides where sampled lesions may go
        data["tissue"], extra_keys = job.tissue, ("tissue",)
    data = preprocessing(keys=("image",), mask_keys=mask_keys, label_keys=label_keys, extra_keys=extra_keys)(data)
    if "label" not in data:
        if bank is None:
            raise ValueError(f"{job.image}: no mask beside the image and no lesion bank to sample one from")
        if "brainmask" not in data:
            raise ValueError(f"{job.image}: sampling a lesion mask needs a brain mask (<id>_brainmask.nii.gz)")
        sampler = RandLesionMaskd(keys=("image",), brainmask_key="brainmask", output_key="label", bank=bank, n_lesions=n_lesions)
        sampler.set_random_state(_scan_seed(seed, job.id))
        data = sampler(data)
    image, label = data["image"], data["label"]
    lo, hi = (float(v) for v in image.meta["percentile_scale"])

    def plain(v: Any) -> torch.Tensor:
        return v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(np.asarray(v))

    bm = data.get("brainmask")
    return {
        "image": plain(image).float(),
        "label": plain(label),
        "brainmask": None if bm is None else plain(bm),
        "lo": lo,
        "hi": hi,
        "orig": orig,
        "affine": affine,
        "header": header,
    }


def _process(
    job: ScanJob,
    G: nn.Module,
    direction: str,
    output_dir: Path,
    bank: Any,
    n_lesions: int | None,
    seed: int,
    patch: Sequence[int],
    overlap: float,
    device: Any,
    amp: bool,
) -> dict[str, str]:
    scan = load_scan(job, direction, bank, n_lesions, seed)
    x, y, lo, hi = scan["image"], scan["label"], scan["lo"], scan["hi"]
    orig, affine, header = scan["orig"], scan["affine"], scan["header"]
    out = synthesize_volume(G, x, y, patch=patch, overlap=overlap, device=device, amp=amp)
    delta = np.asarray(invert_percentile_scale(out[0].numpy(), lo, hi)) - np.asarray(
        invert_percentile_scale(x[0].numpy(), lo, hi)
    )
    result = orig + _to_native(delta.astype(np.float32), affine, orig.shape)
    inputs = [job.image, job.brainmask, job.mask, job.tissue]
    if direction == "pathological":
        out_img, out_lab = output_dir / f"{job.id}_synthetic.nii.gz", output_dir / f"{job.id}_synthetic_cmb.nii.gz"
        for p in (out_img, out_lab):
            check_not_input(p, inputs)
        lab = _instance_labels(_to_native(y[0].cpu().numpy(), affine, orig.shape))
        save_nifti(lab, affine, out_lab, dtype=np.uint16, header=header)
        save_nifti(result.astype(np.float32), affine, out_img, dtype=np.float32, header=header)
        return {"synthetic": str(out_img), "synthetic_cmb": str(out_lab)}
    out_img = output_dir / f"{job.id}_pseudohealthy.nii.gz"
    check_not_input(out_img, inputs)
    save_nifti(result.astype(np.float32), affine, out_img, dtype=np.float32, header=header)
    return {"pseudohealthy": str(out_img)}


def run_inference(
    dataset_dir: str | Path,
    output_dir: str | Path,
    G_HP: nn.Module | None = None,
    G_PH: nn.Module | None = None,
    ckpt_dir: str | Path | None = None,
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
) -> dict[str, Any]:
    """Synthesise CMBs on every healthy scan (or remove them: ``direction="pseudo_healthy"``).

    Args:
        dataset_dir: a folder of SWI NIfTI files (with ``<id>_brainmask``/``<id>_mask`` beside them) or a
            ``datalist.json`` (or a folder holding one); see :func:`find_scans`.
        output_dir: where outputs go (created). Never the inputs' files.
        G_HP, G_PH: the generator for the chosen direction (built by the config).
        ckpt_dir: if given, ``G_HP.pt`` / ``G_PH.pt`` are loaded from it (weights only, sha256-checked against
            the bundle's ``large_files.yml`` when listed, via :func:`cmb_synthesis.training.weights.load_network_weights`).
        lesion_bank: a ``LesionBank`` or the path of a saved ``.npz`` for scans without a mask; None = masks
            must be given.
        n_lesions: lesions per sampled mask (None: the sampler's default); seed: sampling seed.
        overwrite: replace existing outputs (default: skip scans whose outputs exist).
        patch, overlap, device, amp: see :func:`synthesize_volume`.
        raise_on_error: raise ``RuntimeError`` at the end when any scan failed (after processing the rest).

    Returns:
        summary dict: ``written``, ``skipped``, ``failed`` (id -> error), also saved to
        ``output_dir/inference_summary.json``.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
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
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    jobs = find_scans(dataset_dir, direction)
    summary: dict[str, Any] = {"direction": direction, "written": {}, "skipped": [], "failed": {}}
    suffix = "_synthetic.nii.gz" if direction == "pathological" else "_pseudohealthy.nii.gz"
    for job in jobs:
        if (output_dir / f"{job.id}{suffix}").exists() and not overwrite:
            summary["skipped"].append(job.id)
            logger.info("%s: output exists, skipped (use --overwrite true to replace)", job.id)
            continue
        try:
            summary["written"][job.id] = _process(
                job, G, direction, output_dir, lesion_bank, n_lesions, seed, patch, overlap, device, amp
            )
            logger.info("%s: written", job.id)
        except Exception as e:  # a bad scan must not stop the batch
            summary["failed"][job.id] = f"{type(e).__name__}: {e}"
            logger.error("%s: FAILED: %s", job.id, e)
    write_json(summary, output_dir / "inference_summary.json")
    msg = f"{len(summary['written'])} written, {len(summary['skipped'])} skipped, {len(summary['failed'])} failed"
    logger.info("inference summary: %s", msg)
    if summary["failed"] and raise_on_error:
        details = "; ".join(f"{k}: {v}" for k, v in summary["failed"].items())
        raise RuntimeError(f"inference: {msg}. Failed scans: {details}")
    return summary

"""Training and validation data of the mask-guided CycleGAN (paper section 2, "Lesion synthesis framework").

Each training item is one CycleGAN step's worth of patches (every tensor (1, X, Y, Z), images in [0, 1]):

- ``x_h``, ``y_hp``, ``brainmask_h``: a healthy patch and a semi-random pathology mask drawn by
  :class:`transforms.lesion_mask.RandLesionMaskd` from the training lesion bank; the crop is centred on a
  random voxel of the sampled lesions (``RandCropByPosNegLabeld``, pos only), the centre shifted inwards where
  the patch would leave the volume, so the voxel stays inside the patch and every patch has something to
  paint. When the patch spans the whole axial plane (the paper's 160 x 146 x 32 on 160 x 146 scans) only z
  varies: the 32 slices around a sampled lesion.
- ``x_p``, ``y_p``, ``brainmask_p``: a pathological patch with its own lesion mask; lesion-containing crops are
  oversampled (``pos : neg`` = ``pos_ratio : 1``).
- ``x_p2``, ``y_p2``: an independent pathological patch (another random scan and crop) and its mask, the critic ``D_P``'s real sample.

Volumes are preprocessed once (``transforms.pipelines.preprocessing``: load, RAS, checks, brain-mask
percentile clip [0, 99.5] and rescale to [0, 1]) and cached in memory by MONAI ``CacheDataset``; only the
random mask sampling and cropping run per step.

Random streams: :class:`CycleGANPatchDataset` seeds its nested random transforms from its own seed, so a
``set_random_state`` (MONAI's ``DataLoader`` and its per-worker ``worker_init_fn``, ``EpochReseed``) reseeds the
whole pipeline, and each ``DataLoader`` worker draws its own stream (seeded from ``torch.initial_seed()`` of the
worker, itself drawn from the main process's torch generator: reproducible with a fixed seed).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset
from monai.data.utils import set_rnd
from monai.transforms import Compose, DeleteItemsd, FgBgToIndicesd, Lambdad, Randomizable, RandCropByPosNegLabeld
from monai.utils import MAX_SEED

from cmb_synthesis.data.datalist import load_groups, load_split, split_groups
from transforms.lesion_mask import LesionAllowedRegiond, LesionBank, RandLesionMaskd
from transforms.pipelines import preprocessing

logger = logging.getLogger(__name__)

__all__ = [
    "lesion_bank",
    "healthy_patch_transforms",
    "pathological_patch_transforms",
    "CycleGANPatchDataset",
    "training_dataset",
    "validation_patches",
]


def lesion_bank(datalist: str | Path, split: str = "training", fallback: LesionBank | None = None, **kwargs: Any) -> LesionBank:
    """The :class:`~transforms.lesion_mask.LesionBank` of the pathological items of ``split`` (``kwargs``:
    ``bins``, ``sigma``, ``floor``); ``fallback`` (e.g. the training bank) when ``split`` has no lesion map.

    Raises:
        FileNotFoundError: the datalist or a file it names is missing. ValueError: no pathological item with a
        ``label`` (and no ``fallback``).
    """
    _, patho = split_groups(load_split(datalist, split))
    patho = [i for i in patho if i.get("label")]
    if not patho and fallback is not None:
        logger.warning("%s: split %r has no pathological items with a 'label' map; using the given fallback bank", datalist, split)
        return fallback
    if not patho:
        raise ValueError(f"{datalist}: split {split!r} has no pathological items with a 'label' map")
    return LesionBank.from_items(patho, **kwargs)


def _preprocessing(items: Sequence[dict] = ()) -> Compose:
    """Training preprocessing; the tissue map is carried along (it guides lesion placement) when every item has one."""
    extra = ("tissue",) if items and all(i.get("tissue") for i in items) else ()
    return preprocessing(keys=("image",), mask_keys=("brainmask",), label_keys=("label",), extra_keys=extra)


def _crop(
    patch_size: Sequence[int], pos: float, neg: float, indices: bool = False, num_samples: int = 1
) -> RandCropByPosNegLabeld:
    """Crops centred on a lesion voxel (odds ``pos``) or a brain voxel (odds ``neg``); MONAI moves a centre
    inwards where the patch would leave the volume, so the chosen voxel is always inside the patch."""
    return RandCropByPosNegLabeld(
        keys=("image", "label", "brainmask"),
        label_key="label",
        spatial_size=tuple(int(s) for s in patch_size),
        pos=pos,
        neg=neg,
        num_samples=int(num_samples),
        image_key="brainmask",
        image_threshold=0,
        fg_indices_key="label_fg_indices" if indices else None,
        bg_indices_key="label_bg_indices" if indices else None,
        allow_smaller=False,
    )


def _to_numpy(x: Any) -> np.ndarray:
    """Plain arrays: indexing a MetaTensor of a million indices at every crop is slow."""
    return np.asarray(x.as_tensor() if hasattr(x, "as_tensor") else x)


def healthy_patch_transforms(
    bank: Any, patch_size: Sequence[int], n_lesions: int | None = None, crops_per_mask: int = 1,
    mask_options: Mapping[str, Any] | None = None,
) -> Compose:
    """For healthy volumes: the region where lesions may lie (deterministic, so a ``CacheDataset`` keeps it with the
    volume), then the random part: sample a lesion mask into ``label``, then ``crops_per_mask`` patches,
    each centred on a random voxel of the sampled lesions (one mask sample serves several crops because
    sampling is the costly step). Returns a list of ``crops_per_mask`` dicts. ``mask_options``: more keyword
    arguments of :class:`transforms.lesion_mask.RandLesionMaskd` (e.g. ``dark_percentile``).

    The centre is shifted inwards where the patch would leave the volume, so the chosen lesion voxel is inside
    every patch (a weighted crop restricted to fully-inside centres would degenerate to a uniform draw when
    the patch spans a whole axis, as the paper's 160 x 146 x 32 does on 160 x 146 planes).
    """
    sampler = RandLesionMaskd(keys=("image",), brainmask_key="brainmask", output_key="label", bank=bank,
                              n_lesions=n_lesions, allowed_key="lesion_allowed", **dict(mask_options or {}))
    return Compose(
        [
            sampler.region,  # deterministic: a CacheDataset computes the allowed region once per volume
            sampler,
            # not needed any more; uncropped items would be copied per crop
            DeleteItemsd(keys=("tissue", "lesion_allowed")),
            _crop(patch_size, pos=1.0, neg=0.0, num_samples=crops_per_mask),
        ]
    )


def pathological_patch_transforms(patch_size: Sequence[int], pos_ratio: float = 3.0, indices: bool = False) -> Compose:
    """Random part for pathological volumes: crops centred on a lesion voxel with odds ``pos_ratio : 1``,
    otherwise on a brain voxel (lesion oversampling). ``indices``: use cached ``fg_indices``/``bg_indices``
    (``FgBgToIndicesd``: ``label_fg_indices``/``label_bg_indices``) instead of scanning the volume at every crop."""
    return Compose([_crop(patch_size, pos=pos_ratio, neg=1.0, indices=indices)])


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, list) else x


class CycleGANPatchDataset(torch.utils.data.Dataset, Randomizable):
    """Pairs healthy and pathological patch datasets into CycleGAN items (keys in the module docstring).

    Each item draws its healthy patch from a buffer refilled from a random healthy volume (one sampled mask
    gives several crops), and two pathological volumes at random (``x_p`` and the independent ``x_p2``).
    ``length`` sets the epoch size (default ``max(n_h, n_p)``).

    Random state: :meth:`set_random_state` also reseeds the random transforms of ``healthy`` and
    ``pathological`` (MONAI's ``set_rnd`` stops at this object, being ``Randomizable`` itself) and empties the
    healthy buffer, so the items after a reseed depend on the seed only. Inside a ``DataLoader`` worker that
    was not reseeded by a ``worker_init_fn`` (a plain torch ``DataLoader``), the first item reseeds from the
    worker's ``torch.initial_seed()``: workers never repeat each other's draws.
    """

    def __init__(self, healthy: torch.utils.data.Dataset, pathological: torch.utils.data.Dataset, length: int | None = None, seed: int = 0):
        if len(healthy) == 0 or len(pathological) == 0:
            raise ValueError("CycleGANPatchDataset needs at least one healthy and one pathological volume")
        self.healthy, self.pathological = healthy, pathological
        self.length = int(length) if length else max(len(healthy), len(pathological))
        self._buffer: list[dict] = []
        self._worker_seeded: tuple[int, int] | None = None  # (worker id, seed) of the reseed in this worker
        self.set_random_state(seed)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> CycleGANPatchDataset:
        """Seed this dataset and, from its stream, the nested random transforms; empty the healthy buffer."""
        super().set_random_state(seed=seed, state=state)
        set_rnd(self.healthy, int(self.R.randint(MAX_SEED)))  # each its own seed from this object's stream
        set_rnd(self.pathological, int(self.R.randint(MAX_SEED)))
        self._buffer = []
        info = torch.utils.data.get_worker_info()
        self._worker_seeded = None if info is None else (info.id, info.seed)
        return self

    def __len__(self) -> int:
        return self.length

    def randomize(self, data: Any = None) -> None:
        n = len(self.pathological)
        self._j, self._k = self.R.randint(n), self.R.randint(n)

    def _healthy_patch(self) -> dict:
        if not self._buffer:
            crops = self.healthy[self.R.randint(len(self.healthy))]
            self._buffer = list(crops) if isinstance(crops, list) else [crops]
        return self._buffer.pop()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        if info is not None and self._worker_seeded != (info.id, info.seed):
            self.set_random_state(seed=info.seed % MAX_SEED)  # a worker without MONAI's worker_init_fn
        self.randomize()
        h = self._healthy_patch()
        p = _first(self.pathological[self._j])
        p2 = _first(self.pathological[self._k])
        return {
            "x_h": h["image"], "y_hp": h["label"], "brainmask_h": h["brainmask"],
            "x_p": p["image"], "y_p": p["label"], "brainmask_p": p["brainmask"],
            "x_p2": p2["image"], "y_p2": p2["label"],
        }  # fmt: skip


def _as_plain(data: dict) -> dict:
    """Drop metadata (MetaTensor -> Tensor) so batches collate fast and identical across keys."""
    out = {}
    for k in ("image", "label", "brainmask"):
        v = data[k]
        v = v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(np.asarray(v))
        out[k] = v.float() if k == "image" else (v > 0).to(torch.uint8) if k == "brainmask" else v.to(torch.int32)
    return out


def training_dataset(
    datalist: str | Path,
    bank: Any,
    patch_size: Sequence[int] = (64, 64, 16),
    length: int | None = None,
    n_lesions: int | None = None,
    pos_ratio: float = 3.0,
    crops_per_mask: int = 4,
    split: str = "training",
    cache_rate: float = 1.0,
    num_workers: int = 0,
    seed: int = 0,
    mask_options: Mapping[str, Any] | None = None,
) -> CycleGANPatchDataset:
    """The training :class:`CycleGANPatchDataset`: cached preprocessed volumes + per-step sampling/cropping.

    Args:
        datalist: decathlon ``datalist.json`` with ``group`` per item (the phantom's format).
        bank: a :class:`transforms.lesion_mask.LesionBank` (or the path of a saved ``.npz``).
        patch_size: crop size (X, Y, Z); the paper uses (160, 146, 32), the CPU preset (64, 64, 16).
        length: items per epoch; n_lesions: lesions per sampled mask (None: the sampler's default).
        pos_ratio: lesion-centred : random crops for pathological patches.
        crops_per_mask: healthy crops cut from one sampled mask.
        cache_rate, num_workers: MONAI ``CacheDataset`` settings (preprocessing runs once per volume).
        mask_options: more keyword arguments of the healthy volumes' mask sampler (``RandLesionMaskd``).
    """
    healthy, patho = load_groups(datalist, split)
    pre = list(_preprocessing(healthy + patho).flatten().transforms)  # flat, so CacheDataset caches up to the first random step
    h_ds = CacheDataset(
        healthy,
        Compose(pre + list(healthy_patch_transforms(bank, patch_size, n_lesions, crops_per_mask, mask_options).transforms) + [_as_plain]),
        cache_rate=cache_rate,
        num_workers=num_workers,
        copy_cache=False,  # the random steps never modify the cached volumes in place
        progress=False,
    )
    p_ds = CacheDataset(
        patho,
        Compose(
            pre
            + [
                FgBgToIndicesd(keys="label", image_key="brainmask", image_threshold=0),
                Lambdad(keys=("label_fg_indices", "label_bg_indices"), func=_to_numpy),
            ]
            + list(pathological_patch_transforms(patch_size, pos_ratio, indices=True).transforms)
            + [_as_plain]
        ),
        cache_rate=cache_rate,
        num_workers=num_workers,
        copy_cache=False,  # the random steps never modify the cached volumes in place
        progress=False,
    )
    return CycleGANPatchDataset(h_ds, p_ds, length=length, seed=seed)


def validation_patches(
    datalist: str | Path,
    bank: Any,
    patch_size: Sequence[int] = (64, 64, 16),
    patches_per_volume: int = 4,
    n_lesions: int | None = None,
    split: str = "validation",
    seed: int = 12345,
    mask_options: Mapping[str, Any] | None = None,
    shape_repeats: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """A fixed list of validation items (same keys as training, no ``x_p2``), drawn once with ``seed``
    (``mask_options``: more keyword arguments of the healthy volumes' mask sampler, as in training).

    Healthy volumes get sampled masks and lesion-centred crops; pathological volumes lesion-centred crops of
    their real lesions. The two lists are paired by index (the shorter one cycles), so every patch is used.

    ``shape_repeats`` (None: off) paints every lesion shape of ``bank`` exactly that many times, one lesion per
    healthy patch, as it is (no flip, rotation or size jitter; only rescaled to the volume's voxel size), each at a
    location drawn as in training on the healthy volumes in turn; ``patches_per_volume`` then applies to the
    pathological volumes only. With the bank of the split whose real lesions the realism metrics compare with,
    painted and real lesions then have the same size composition by construction: randomly drawn shapes match it
    only on average, and with a few dozen lesions the draw's larger share of large lesions alone moved the
    classifier two-sample AUC (issue 11: 36 % vs 24 % of lesions of 40+ voxels in one evaluation).
    """
    if shape_repeats is not None and int(shape_repeats) < 1:
        raise ValueError(f"shape_repeats must be >= 1 (None: masks drawn at random), got {shape_repeats}")
    healthy, patho = load_groups(datalist, split)
    pre = _preprocessing(healthy + patho)
    # the deterministic allowed region once per volume, the random steps per patch (the same seeds as the whole
    # Compose: set_random_state seeds only its random transforms, in order)
    h_steps = healthy_patch_transforms(bank, patch_size, n_lesions, mask_options=mask_options).transforms
    region = [t for t in h_steps if isinstance(t, LesionAllowedRegiond)]
    h_rand = Compose([t for t in h_steps if not isinstance(t, LesionAllowedRegiond)])
    p_rand = Compose([_crop(patch_size, pos=1.0, neg=0.0)])  # validation: lesion-centred only
    h_rand.set_random_state(seed)
    p_rand.set_random_state(seed + 1)
    volumes = [Compose(region)(pre(dict(item))) for item in healthy]
    if shape_repeats is not None:
        if not volumes:
            raise ValueError(f"{datalist}: split {split!r} has no healthy scans to paint on")
        h_patches = _each_shape_patches(volumes, bank, patch_size, int(shape_repeats), seed, mask_options)
    else:  # a fresh mask per patch
        h_patches = [_as_plain(_first(h_rand(dict(vol)))) for vol in volumes for _ in range(patches_per_volume)]
    p_patches = []
    for item in patho:
        vol = pre(dict(item))
        for _ in range(patches_per_volume):
            p_patches.append(_as_plain(_first(p_rand(dict(vol)))))
    n = max(len(h_patches), len(p_patches))
    out = []
    for i in range(n):
        h, p = h_patches[i % len(h_patches)], p_patches[i % len(p_patches)]
        out.append({
            "x_h": h["image"], "y_hp": h["label"], "brainmask_h": h["brainmask"],
            "x_p": p["image"], "y_p": p["label"], "brainmask_p": p["brainmask"],
        })  # fmt: skip
    return out


def _each_shape_patches(
    volumes: Sequence[dict], bank: Any, patch_size: Sequence[int], repeats: int, seed: int,
    mask_options: Mapping[str, Any] | None = None,
) -> list[dict]:
    """Healthy patches, each centred on one lesion of ``bank`` painted alone: every shape ``repeats`` times, on
    ``volumes`` (preprocessed, with their ``lesion_allowed`` region) in turn; a shape that finds no place on one
    volume is tried on the next ones (skipped, with a warning, when none has room)."""
    options = {k: v for k, v in dict(mask_options or {}).items() if k not in ("rotate90", "flip", "scale_range")}
    crop = Compose([_crop(patch_size, pos=1.0, neg=0.0)])
    crop.set_random_state(seed + 2)
    out, turn = [], 0
    for r in range(repeats):
        for k, shape in enumerate(bank.shapes):
            one = LesionBank([shape], counts=[1], prior=bank.prior, tissue_fraction=bank.tissue_fraction,
                             spacing=bank.spacing)
            sampler = RandLesionMaskd(keys=("image",), brainmask_key="brainmask", output_key="label", bank=one,
                                      n_lesions=1, rotate90=False, flip=False, scale_range=(1.0, 1.0),
                                      allowed_key="lesion_allowed", **options)
            sampler.set_random_state(seed + 7919 * r + k)
            for attempt in range(len(volumes)):
                d = sampler(dict(volumes[(turn + attempt) % len(volumes)]))
                if d["label_n_lesions"]:
                    break
            else:
                logger.warning("validation patches: lesion shape %d (%d voxels) found no place on any healthy volume",
                               k, int(shape.sum()))
                continue
            turn += 1
            d.pop("lesion_allowed", None)
            d.pop("tissue", None)
            out.append(_as_plain(_first(crop(d))))
    return out

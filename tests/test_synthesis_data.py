"""Training and validation patches of the CycleGAN (cmb_synthesis/synthesis/data.py): lesion-centred healthy
patches at the paper's 160 x 146 x 32 (whole-plane crops of the 160 x 146 phantom scans) and the CPU preset's
size, distinct random streams per DataLoader worker, reproducibility, and exact reseeding (``EpochReseed``)."""

from __future__ import annotations

import json
import types

import monai
import nibabel as nib
import pytest
import torch

from cmb_synthesis.data.datalist import load_groups, load_split
from cmb_synthesis.synthesis.data import lesion_bank, training_dataset, validation_patches
from cmb_synthesis.training.resume import EpochReseed

PAPER_PATCH = (160, 146, 32)
KEYS = ("x_h", "y_hp", "brainmask_h", "x_p", "y_p", "brainmask_p", "x_p2", "y_p2")


@pytest.fixture(scope="module")
def bank(tiny_cohort):
    return lesion_bank(tiny_cohort)


@pytest.fixture(scope="module")
def one_of_each(tiny_cohort, tmp_path_factory) -> str:
    """A datalist with one healthy and one pathological training scan: every difference between draws then
    comes from the random transforms (mask sampling and crops), not from the choice of scan."""
    healthy, patho = load_groups(tiny_cohort, "training")
    out = tmp_path_factory.mktemp("one_of_each") / "datalist.json"
    out.write_text(json.dumps({"training": [healthy[0], patho[0]], "validation": load_split(tiny_cohort, "validation")}))
    return str(out)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def _draws(ds, n: int) -> list[dict]:
    return [ds[i] for i in range(n)]


@pytest.mark.parametrize("patch_size", [PAPER_PATCH, (32, 32, 16)])
def test_every_healthy_patch_holds_its_sampled_lesions_inside_the_brain(tiny_cohort, bank, patch_size):
    """50 healthy training patches (4 crops per sampled mask) and the validation patches: each carries a
    non-empty sampled mask, all of it inside the brain; at 160 x 146 x 32 the crop is the whole axial plane."""
    if patch_size == PAPER_PATCH:  # the phantom's axial plane is the paper's: the crop spans it, only z varies
        assert nib.load(load_groups(tiny_cohort, "training")[0][0]["image"]).shape[:2] == PAPER_PATCH[:2]
    ds = training_dataset(tiny_cohort, bank, patch_size=patch_size, length=50, seed=3)
    for i in range(50):
        item = ds[i]
        assert tuple(item["x_h"].shape) == (1, *patch_size)
        lesion, brain = item["y_hp"] > 0, item["brainmask_h"] > 0
        assert lesion.sum() > 0, f"healthy patch {i} has an empty mask"
        assert not (lesion & ~brain).any(), f"healthy patch {i}: mask voxels outside the brain"
    val = validation_patches(tiny_cohort, bank, patch_size=patch_size, patches_per_volume=4)
    assert len(val) >= 4 and all((v["y_hp"] > 0).any() and (v["y_p"] > 0).any() for v in val)


def test_same_seed_same_items_without_global_seeding(one_of_each, bank):
    """Items depend on the dataset's seed alone (the nested random transforms are seeded from it)."""
    a = _draws(training_dataset(one_of_each, bank, patch_size=(32, 32, 16), length=6, seed=5), 6)
    b = _draws(training_dataset(one_of_each, bank, patch_size=(32, 32, 16), length=6, seed=5), 6)
    c = _draws(training_dataset(one_of_each, bank, patch_size=(32, 32, 16), length=6, seed=6), 6)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not all(_same(x, y) for x, y in zip(a, c))


def test_reseeding_restarts_the_stream_exactly(one_of_each, bank):
    """``EpochReseed`` (resume determinism): after a reseed the items depend on (seed, epoch) only, not on what
    was drawn before (the healthy crop buffer is emptied, the nested transforms are reseeded)."""
    ds = training_dataset(one_of_each, bank, patch_size=(32, 32, 16), length=8, seed=0)
    loader = monai.data.DataLoader(ds, batch_size=1, num_workers=0)
    engine = types.SimpleNamespace(state=types.SimpleNamespace(epoch=3), data_loader=loader)
    reseed = EpochReseed(seed=0, rank=0)
    _draws(ds, 3)  # part of a buffer of 4 crops left over
    reseed(engine)
    first = _draws(ds, 5)
    reseed(engine)
    again = _draws(ds, 5)
    assert all(_same(x, y) for x, y in zip(first, again))


@pytest.mark.parametrize("loader_cls", [monai.data.DataLoader, torch.utils.data.DataLoader])
def test_dataloader_workers_draw_different_patches_reproducibly(one_of_each, bank, loader_cls):
    """Two workers (MONAI's loader with its worker_init_fn, and a plain torch loader without one) draw different
    masks and crops; the same torch seed gives the same batches."""
    ds = training_dataset(one_of_each, bank, patch_size=(32, 32, 16), length=4, seed=0)

    def batches(seed: int) -> list[dict]:
        torch.manual_seed(seed)
        return list(loader_cls(ds, batch_size=1, shuffle=False, num_workers=2))

    run = batches(0)
    assert len(run) == 4 and set(run[0]) == set(KEYS)
    # batch 0 comes from worker 0, batch 1 from worker 1 (round robin): their first draws must differ
    assert not torch.equal(run[0]["y_hp"], run[1]["y_hp"])
    assert not torch.equal(run[0]["x_p"], run[1]["x_p"])
    assert all(_same(x, y) for x, y in zip(run, batches(0)))
    assert not all(_same(x, y) for x, y in zip(run, batches(1)))


def test_shape_matched_validation_paints_every_bank_shape_once_per_repeat(tiny_cohort):
    """``shape_repeats``: one healthy patch per (repeat, bank lesion), each holding exactly one painted lesion whose
    voxel count is that bank shape's (no jitter: the tiny cohort's scans share the bank's voxel size), inside the
    brain; the painted sizes are then the bank's sizes, repeated, so the composition matches by construction."""
    bank = lesion_bank(tiny_cohort, split="validation")
    val = validation_patches(tiny_cohort, bank, patch_size=(32, 32, 16), patches_per_volume=2, shape_repeats=2)
    sizes = []
    for v in val[: 2 * len(bank)]:  # paired with pathological patches by index; the healthy list is the longer
        lesion = v["y_hp"] > 0
        assert not (lesion & ~(v["brainmask_h"] > 0)).any()
        labels = torch.unique(v["y_hp"][lesion])
        assert len(labels) == 1, "shape-matched patches carry one painted lesion each"
        sizes.append(int(lesion.sum()))
    assert len(val) >= 2 * len(bank)
    assert sorted(sizes) == sorted(list(bank.sizes) * 2)
    again = validation_patches(tiny_cohort, bank, patch_size=(32, 32, 16), patches_per_volume=2, shape_repeats=2)
    assert all(_same(a, b) for a, b in zip(val, again))
    with pytest.raises(ValueError, match="shape_repeats"):
        validation_patches(tiny_cohort, bank, patch_size=(32, 32, 16), shape_repeats=0)

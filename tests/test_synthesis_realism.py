"""cmb_synthesis.synthesis.realism: radial profiles of lesions and the classifier two-sample test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cmb_synthesis.synthesis.realism import lesion_measurements, profile_summary, realism_report, two_sample_auc


def _patch(rng: np.random.Generator, lesions: list[tuple[int, int, int]], kind: str, noise: float = 0.01):
    """A 40^3 tissue patch (0.6) with lesions: ``blooming`` dark centre blurred outwards, or ``flat`` discs."""
    img = np.full((40, 40, 40), 0.6, np.float32) + rng.normal(0, noise, (40, 40, 40)).astype(np.float32)
    mask = np.zeros((40, 40, 40), np.uint8)
    g = np.indices(img.shape).transpose(1, 2, 3, 0)
    for c in lesions:
        r = np.sqrt(((g - np.array(c)) ** 2).sum(-1))
        mask[r <= 1.5] = 1
        if kind == "blooming":
            img *= (1 - 0.65 * np.exp(-(r ** 2) / (2 * 1.1 ** 2))).astype(np.float32)
        else:
            img[r <= 1.5] *= 0.66
    return img, mask


def test_profile_of_a_blooming_lesion_is_dark_at_the_centre_and_recovers():
    img, mask = _patch(np.random.default_rng(0), [(20, 20, 20)], "blooming")
    prof, patches = lesion_measurements(img, mask)
    assert prof.shape == (1, 5) and patches.shape == (1, 343)
    assert prof[0, 0] == pytest.approx(0.35, abs=0.03)  # 1 - 0.65 at the centre
    assert np.all(np.diff(prof[0]) > 0) and prof[0, 4] > 0.95  # monotone recovery to the tissue level


def test_lesions_too_close_to_the_patch_border_are_skipped_and_components_are_lesions():
    img, mask = _patch(np.random.default_rng(1), [(20, 20, 20), (3, 20, 20), (20, 30, 12)], "flat")
    prof, _ = lesion_measurements(img, mask)
    assert len(prof) == 2  # the lesion 3 voxels from the border has no full reference ring
    lab, n = ndimage.label(mask)
    assert n == 3


def test_profile_summary_and_centre_ratio():
    real = np.array([[0.4, 0.6, 0.9, 1.0, 1.0], [0.36, 0.56, 0.88, 1.0, 1.0]])
    flat = np.array([[0.66, 0.79, 1.0, 1.0, 1.0]])
    s = profile_summary(real, flat)
    assert s["centre_ratio"] == pytest.approx(0.66 / 0.38)
    assert s["profile_error"] == pytest.approx(0.66 - 0.38)
    assert s["n_real"] == 2 and s["n_synthetic"] == 1


def test_two_sample_auc_separates_flat_from_blooming_and_not_blooming_from_blooming():
    rng = np.random.default_rng(2)
    centres = [(10, 10, 10), (10, 28, 10), (28, 10, 28), (28, 28, 28), (10, 20, 28), (28, 20, 10)]

    def collect(kind: str, n_patches: int):
        profs, pats = [], []
        for _ in range(n_patches):
            p, q = lesion_measurements(*_patch(rng, centres, kind, noise=0.03))
            profs.append(p)
            pats.append(q)
        return profs, pats

    real_p, real_x = collect("blooming", 5)
    flat_p, flat_x = collect("flat", 5)
    more_p, more_x = collect("blooming", 5)
    assert two_sample_auc(np.concatenate(real_x), np.concatenate(flat_x)) > 0.95
    assert abs(two_sample_auc(np.concatenate(real_x), np.concatenate(more_x)) - 0.5) < 0.2
    rep = realism_report(real_p, flat_p, real_x, flat_x)
    assert rep["realism_auc"] > 0.95 and rep["centre_ratio"] > 1.3
    assert np.isnan(two_sample_auc(np.zeros((1, 3)), np.ones((5, 3))))
    # repeated cross-validation: the mean of the AUCs with fold seeds seed, seed + 1, ...
    a, b = np.concatenate(real_x), np.concatenate(more_x)
    single = [two_sample_auc(a, b, seed=s) for s in (3, 4, 5)]
    assert two_sample_auc(a, b, seed=3, n_repeats=3) == pytest.approx(np.mean(single))
    with pytest.raises(ValueError, match="n_repeats"):
        two_sample_auc(a, b, n_repeats=0)


def test_realism_metric_accumulates_a_round_and_compares_with_the_reference():
    from cmb_synthesis.synthesis.realism import REALISM_METRICS, RealismMetric, batch_measurements

    rng = np.random.default_rng(3)
    centres = [(10, 10, 10), (28, 28, 28), (10, 28, 20)]
    real = [_patch(rng, centres, "blooming", noise=0.03) for _ in range(4)]
    flat = [_patch(rng, centres, "flat", noise=0.03) for _ in range(4)]
    reference = batch_measurements(np.stack([r[0] for r in real])[:, None], np.stack([r[1] for r in real])[:, None])
    metrics = {n: RealismMetric(n, reference=reference) for n in REALISM_METRICS}
    for m in metrics.values():
        m.reset()
    for img, mask in flat:  # one evaluator iteration per painted patch
        out = {"realism": {"synthetic": batch_measurements(img[None, None], mask[None, None]),
                           "real": (np.zeros((0, 5)), np.zeros((0, 343)))}}
        for m in metrics.values():
            m.update(out)
    values = {n: m.compute() for n, m in metrics.items()}
    assert values["realism_auc"] > 0.9 and values["centre_ratio"] > 1.3
    assert values["profile_real_0"] == pytest.approx(0.35, abs=0.05)
    assert values["profile_synthetic_0"] == pytest.approx(0.66, abs=0.05)
    assert values["profile_error"] == pytest.approx(values["profile_synthetic_0"] - values["profile_real_0"], abs=1e-9)
    with pytest.raises(ValueError, match="unknown realism metric"):
        RealismMetric("realness")

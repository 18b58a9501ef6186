"""Synthesis quality metrics (beyond the paper, which reports none).

All statistics are accumulated as sums over a validation set, then turned into ratios, so patches of any
size and any number of lesions combine exactly. Definitions (images in [0, 1], masks non-zero = lesion,
``B`` the brain mask, ``dil_r`` a cubic dilation by ``r`` voxels):

- ``identity_mae``: mean ``|G_HP(x_h, y) - x_h|`` over ``B & ~dil_2(y)`` (healthy tissue away from the mask).
- lesion contrast of an image ``I`` under mask ``y``: ``mean(I in y) / mean(I in shell)`` with
  ``shell = B & dil_s(y) & ~y`` (surrounding tissue, ``s = 2`` voxels). Dark CMBs give < 1; no lesion ~ 1.
- ``contrast_synthetic`` (``I = G_HP(x_h, y)``), ``contrast_real`` (``I = x_p`` under its own mask),
  ``contrast_healthy_input`` (``I = x_h`` under the sampled mask: the before-painting baseline).
- ``lesion_fidelity``: ``(1 - contrast_synthetic) / (1 - contrast_real)``: 1.0 = synthetic lesions are as dark
  against their surroundings as real ones, 0 = nothing painted, > 1 = darker than real.
- ``contrast_ratio``: ``contrast_synthetic / contrast_real`` (1.0 = same contrast).
- ``removal_contrast``: contrast of ``G_PH(x_p, y_p)`` under ``y_p`` (1.0 = lesions gone, ``contrast_real`` =
  untouched); ``removal_identity_mae``: mean ``|G_PH(x_p, y_p) - x_p|`` over ``B & ~dil_2(y_p)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from ignite.metrics import Metric

__all__ = ["dilate", "synthesis_stats", "metrics_from_stats", "SynthesisMetric", "METRIC_NAMES", "STAT_KEYS"]

STAT_KEYS = (
    "id_h_sum", "id_h_n",
    "syn_in_sum", "syn_in_n", "syn_shell_sum", "syn_shell_n",
    "hin_in_sum", "hin_shell_sum",
    "real_in_sum", "real_in_n", "real_shell_sum", "real_shell_n",
    "rem_in_sum", "rem_shell_sum",
    "id_p_sum", "id_p_n",
)  # fmt: skip

METRIC_NAMES = (
    "identity_mae",
    "contrast_synthetic",
    "contrast_healthy_input",
    "contrast_real",
    "lesion_fidelity",
    "contrast_ratio",
    "removal_contrast",
    "removal_identity_mae",
)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Cubic binary dilation of a (B, 1, X, Y, Z) mask by ``radius`` voxels (bool output, same shape)."""
    m = (mask > 0).float()
    if radius <= 0:
        return m > 0
    return F.max_pool3d(m, kernel_size=2 * radius + 1, stride=1, padding=radius) > 0


def synthesis_stats(
    x_h: torch.Tensor,
    y_hp: torch.Tensor,
    fake_p: torch.Tensor,
    x_p: torch.Tensor,
    y_p: torch.Tensor,
    fake_h: torch.Tensor,
    brainmask_h: torch.Tensor | None = None,
    brainmask_p: torch.Tensor | None = None,
    shell: int = 2,
    margin: int = 2,
) -> dict[str, float]:
    """Sums for :func:`metrics_from_stats` from one batch. All tensors (B, 1, X, Y, Z); returns python floats."""

    def brain(bm: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(like, dtype=torch.bool) if bm is None else bm > 0

    bh, bp = brain(brainmask_h, x_h), brain(brainmask_p, x_p)
    in_h, in_p = (y_hp > 0) & bh, (y_p > 0) & bp
    shell_h, shell_p = dilate(y_hp, shell) & ~(y_hp > 0) & bh, dilate(y_p, shell) & ~(y_p > 0) & bp
    away_h, away_p = bh & ~dilate(y_hp, margin), bp & ~dilate(y_p, margin)

    def s(img: torch.Tensor, region: torch.Tensor) -> float:
        return float(img.float()[region].double().sum())

    def n(region: torch.Tensor) -> float:
        return float(region.sum())

    return {
        "id_h_sum": s((fake_p - x_h).abs(), away_h), "id_h_n": n(away_h),
        "syn_in_sum": s(fake_p, in_h), "syn_in_n": n(in_h),
        "syn_shell_sum": s(fake_p, shell_h), "syn_shell_n": n(shell_h),
        "hin_in_sum": s(x_h, in_h), "hin_shell_sum": s(x_h, shell_h),
        "real_in_sum": s(x_p, in_p), "real_in_n": n(in_p),
        "real_shell_sum": s(x_p, shell_p), "real_shell_n": n(shell_p),
        "rem_in_sum": s(fake_h, in_p), "rem_shell_sum": s(fake_h, shell_p),
        "id_p_sum": s((fake_h - x_p).abs(), away_p), "id_p_n": n(away_p),
    }  # fmt: skip


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def metrics_from_stats(t: Mapping[str, float]) -> dict[str, float]:
    """Turn summed statistics into the metrics named in :data:`METRIC_NAMES` (NaN where undefined)."""

    def contrast(in_key: str, shell_key: str, n_in: str, n_shell: str) -> float:
        return _ratio(_ratio(t[in_key], t[n_in]), _ratio(t[shell_key], t[n_shell]))

    c_syn = contrast("syn_in_sum", "syn_shell_sum", "syn_in_n", "syn_shell_n")
    c_real = contrast("real_in_sum", "real_shell_sum", "real_in_n", "real_shell_n")
    return {
        "identity_mae": _ratio(t["id_h_sum"], t["id_h_n"]),
        "contrast_synthetic": c_syn,
        "contrast_healthy_input": contrast("hin_in_sum", "hin_shell_sum", "syn_in_n", "syn_shell_n"),
        "contrast_real": c_real,
        "lesion_fidelity": _ratio(1.0 - c_syn, 1.0 - c_real),
        "contrast_ratio": _ratio(c_syn, c_real),
        "removal_contrast": contrast("rem_in_sum", "rem_shell_sum", "real_in_n", "real_shell_n"),
        "removal_identity_mae": _ratio(t["id_p_sum"], t["id_p_n"]),
    }


class SynthesisMetric(Metric):
    """Ignite metric accumulating :func:`synthesis_stats` dicts (the evaluator's output) over an epoch and
    returning one of :data:`METRIC_NAMES`. Sums are all-reduced across processes (DDP-safe)."""

    def __init__(self, name: str = "identity_mae", output_transform: Callable = lambda x: x, device: str = "cpu"):
        if name not in METRIC_NAMES:
            raise ValueError(f"unknown synthesis metric {name!r}; choose from {METRIC_NAMES}")
        self.metric_name = name
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._sums = torch.zeros(len(STAT_KEYS), dtype=torch.float64)

    def update(self, output: Mapping[str, float]) -> None:
        self._sums += torch.tensor([float(output[k]) for k in STAT_KEYS], dtype=torch.float64)

    def iteration_completed(self, engine: Any) -> None:
        # the output is a dict of sums, not the (y_pred, y) pair ignite expects by default
        self.update(self._output_transform(engine.state.output))

    def compute(self) -> float:
        import ignite.distributed as idist

        sums = idist.all_reduce(self._sums.clone()) if idist.get_world_size() > 1 else self._sums
        return metrics_from_stats(dict(zip(STAT_KEYS, sums.tolist())))[self.metric_name]

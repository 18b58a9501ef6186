"""Ignite/MONAI engines of the mask-guided CycleGAN: :class:`CycleGANTrainer` and :class:`SynthesisEvaluator`.

The trainer's iteration (:meth:`CycleGANTrainer._iteration`) is the only new logic: ``n_critic`` critic steps
for ``D_P`` and ``D_H`` and one generator step for ``G_HP`` and ``G_PH``. Everything else (checkpoints,
resume, logging, TensorBoard, validation, the NaN guard, progress bar) is attached as handlers by the bundle
config, as in any MONAI workflow.

Batch format (a dict of (B, 1, X, Y, Z) tensors, see :mod:`cmb_synthesis.synthesis.data`): ``x_h`` healthy
patch in [0, 1], ``y_hp`` its sampled lesion mask, ``brainmask_h``; ``x_p`` pathological patch, ``y_p`` its
lesion mask, ``brainmask_p``; ``x_p2`` an independent pathological patch (the critic's real sample) and ``y_p2``
its mask (needed by mask-conditioned critics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.engines import Evaluator, Trainer
from monai.engines.workflow import Workflow
from monai.networks.utils import eval_mode, train_mode
from monai.utils.enums import ForwardMode

from cmb_synthesis.synthesis.metrics import synthesis_stats
from cmb_synthesis.synthesis.realism import batch_measurements

__all__ = ["CycleGANTrainer", "SynthesisEvaluator", "prepare_cycle_batch", "loss_output", "BATCH_KEYS"]

BATCH_KEYS = ("x_h", "y_hp", "brainmask_h", "x_p", "y_p", "brainmask_p", "x_p2", "y_p2")
_MASK_KEYS = ("y_hp", "y_p", "y_p2", "brainmask_h", "brainmask_p")


def prepare_cycle_batch(
    batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """Move the batch's known keys to ``device`` as plain float tensors; masks become binary {0, 1}.

    Raises:
        ValueError: a required key (``x_h``, ``y_hp``, ``x_p``, ``y_p``) is missing.
    """
    missing = [k for k in ("x_h", "y_hp", "x_p", "y_p") if k not in batchdata]
    if missing:
        raise ValueError(f"synthesis batch lacks keys {missing}; it has {sorted(batchdata)}")
    out: dict[str, torch.Tensor] = {}
    for k in BATCH_KEYS:
        if k not in batchdata:
            continue
        v = batchdata[k]
        v = v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(v)
        v = (v > 0).float() if k in _MASK_KEYS else v.float()
        out[k] = v.to(device=device, non_blocking=non_blocking, **kwargs)
    return out


def _scalars(out: Mapping[str, Any]) -> dict[str, float]:
    return {k: v.item() for k, v in out.items() if isinstance(v, torch.Tensor) and v.ndim == 0}


def loss_output(
    generator: Mapping[str, Any],
    critic_P: Mapping[str, Any],
    critic_H: Mapping[str, Any],
    lesion_critics: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, float]:
    """The trainer's ``engine.state.output`` from its objectives' outputs, whatever terms they name.

    Every scalar (0-d tensor) of the generator objective's output keeps its name (``G`` and each term, e.g.
    ``CC``, ``ID``, ``AM``, ``GAN``); a critic objective's ``loss`` becomes ``D_P`` / ``D_H`` and its other
    scalars get the critic's suffix (``W`` -> ``W_P``, ``GP`` -> ``GP_P``); ``GP`` is the mean of ``GP_P``
    and ``GP_H``. ``lesion_critics`` (``{"P_lesion": out, "H_lesion": out}``, the lesion-focused critics) are
    named the same way with their side (``D_P_lesion``, ``W_P_lesion``, ``GP_P_lesion``); they do not enter
    ``GP``. Images (non-scalar tensors) are left out. Returns python floats.
    """
    out = _scalars(generator)
    for side, crit in (("P", critic_P), ("H", critic_H), *(lesion_critics or {}).items()):
        for k, v in _scalars(crit).items():
            out[f"D_{side}" if k == "loss" else f"{k}_{side}"] = v
    if "GP_P" in out and "GP_H" in out:
        out["GP"] = 0.5 * (out["GP_P"] + out["GP_H"])
    return out


class CycleGANTrainer(Trainer):
    """MONAI trainer of the mask-guided 3-D CycleGAN (paper Fig. 1): ``G_HP``, ``G_PH``, ``D_P``, ``D_H``.

    Args:
        device: where the networks and batches live.
        max_epochs: epochs to run; ``epoch_length`` iterations each (default: the loader's length).
        train_data_loader: yields batches as described in the module docstring.
        G_HP, G_PH: generators (:class:`~cmb_synthesis.synthesis.networks.CMBGenerator`), possibly DDP-wrapped.
        D_P, D_H: critics (:class:`~cmb_synthesis.synthesis.networks.CMBCritic`), possibly DDP-wrapped.
        g_optimizer: optimiser over both generators' parameters.
        d_optimizer: optimiser over both critics' parameters.
        critic_objective_P, critic_objective_H: the critics' objectives
            (:class:`~cmb_synthesis.synthesis.losses.CriticObjective` of ``D_P`` / ``D_H``, possibly DDP-wrapped),
            called as ``(real, fake, real_mask, fake_mask)``: ``D_P`` with ``(x_p2, x~_p, y_p2, y_hp)``,
            ``D_H`` with ``(x_h, x~_h, y_hp, y_p)`` (the masks are used by mask-conditioned critics only).
        generator_objective: the generators' objective
            (:class:`~cmb_synthesis.synthesis.losses.GeneratorObjective` with its weighted loss terms, possibly
            DDP-wrapped), called as ``(x_h, y_hp, x_p, y_p, brainmask_h, brainmask_p)``.
        critic_objective_P_lesion, critic_objective_H_lesion: optional lesion-focused critics' objectives (ours;
            :class:`~cmb_synthesis.synthesis.losses.LesionCriticObjective` of ``D_P_lesion`` / ``D_H_lesion``,
            possibly DDP-wrapped; None: none), called like ``critic_objective_P`` / ``critic_objective_H`` and
            trained in the same critic steps by ``d_optimizer`` (which must hold their parameters); frozen in the
            generator step like ``D_P``/``D_H``.
        n_critic: critic steps per generator step (WGAN-GP: 5). The critic steps reuse the iteration's real
            samples and the fakes of the current generators (one data batch per Ignite iteration) with a
            fresh interpolation ``eps`` each step.
        amp: autocast in ``amp_dtype`` (bf16 by default, no grad scaler needed); the gradient penalty stays fp32.
        train_handlers: Ignite/MONAI handlers to attach (checkpoints, stats, validation, NaN guard, ...).
        lesion_code: a :class:`~cmb_synthesis.synthesis.codes.ContrastCode` (ours; None: binary masks): every
            iteration turns ``y_hp`` into a code map with a random darkness rank per lesion and ``y_p`` into the
            measured ranks of its real lesions; every network and loss then gets the code maps (all but a
            ``mask_code`` ``G_HP`` read them as ``mask > 0``).

    ``engine.state.output`` after each iteration (:func:`loss_output`): a dict of python floats, ``G`` the
    total generator loss and every generator term's unweighted value under its name (the default terms
    ``CC``, ``ID``, ``AM``, ``GAN``), ``D_P``/``D_H`` the critic losses of the last critic step, ``W_P``/``W_H``
    their Wasserstein estimates ``E[D(real)] - E[D(fake)]``, ``GP_P``/``GP_H`` their penalties and ``GP`` the
    mean of both; with lesion-focused critics also ``D_P_lesion``, ``W_P_lesion``, ``GP_P_lesion`` (and ``_H_``).
    ``engine.state.synthesis_images`` holds the first sample's x_h, y_hp, x~_p, reconstruction,
    x_p, y_p and x~_h (detached, for image grids).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Any,
        G_HP: nn.Module,
        G_PH: nn.Module,
        D_P: nn.Module,
        D_H: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        critic_objective_P: nn.Module,
        critic_objective_H: nn.Module,
        generator_objective: nn.Module,
        critic_objective_P_lesion: nn.Module | None = None,
        critic_objective_H_lesion: nn.Module | None = None,
        epoch_length: int | None = None,
        n_critic: int = 5,
        non_blocking: bool = False,
        prepare_batch: Callable = prepare_cycle_batch,
        iteration_update: Callable[[Engine, Any], Any] | None = None,
        key_train_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        amp_dtype: torch.dtype | str = torch.bfloat16,
        optim_set_to_none: bool = True,
        to_kwargs: dict | None = None,
        lesion_code: Any = None,
    ) -> None:
        if n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {n_critic}")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            amp=amp,
            decollate=False,
            to_kwargs=to_kwargs,
        )
        self.G_HP, self.G_PH, self.D_P, self.D_H = G_HP, G_PH, D_P, D_H
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.n_critic = int(n_critic)
        self.critic_objective_P, self.critic_objective_H = critic_objective_P, critic_objective_H
        self.generator_objective = generator_objective
        self.lesion_objectives = {
            k: v for k, v in (("P_lesion", critic_objective_P_lesion), ("H_lesion", critic_objective_H_lesion)) if v is not None
        }
        self.amp_dtype = getattr(torch, amp_dtype) if isinstance(amp_dtype, str) else amp_dtype
        self.optim_set_to_none = optim_set_to_none
        self.lesion_code = lesion_code

    def run(self) -> None:  # type: ignore[override]
        """Run training (resumes from ``self.state`` when a checkpoint was loaded). No grad scaler: amp is bf16."""
        self.scaler = None
        Workflow.run(self)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.state.device).type, dtype=self.amp_dtype)

    @staticmethod
    def _set_requires_grad(nets: Sequence[nn.Module], flag: bool) -> None:
        for net in nets:
            for p in net.parameters():
                p.requires_grad_(flag)

    def _iteration(self, engine: Engine, batchdata: dict[str, torch.Tensor]) -> dict[str, float]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        b = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        x_h, y_hp, x_p, y_p = b["x_h"], b["y_hp"], b["x_p"], b["y_p"]
        x_p2, y_p2 = (b["x_p2"], b.get("y_p2")) if "x_p2" in b else (x_p, y_p)
        bm_h, bm_p = b.get("brainmask_h"), b.get("brainmask_p")
        if self.lesion_code is not None:
            # contrast codes (codes.py): a random darkness rank per lesion to paint, the measured one of real lesions
            y_hp, y_p = self.lesion_code.random(y_hp), self.lesion_code.measure(x_p, y_p, bm_p)
        lesion_critics = tuple(getattr(o, "module", o).critic for o in self.lesion_objectives.values())
        nets_g, nets_d = (self.G_HP, self.G_PH), (self.D_P, self.D_H, *lesion_critics)

        # critic steps: D_P tells real x_p2 from x~_p = G_HP(x_h, y_hp); D_H tells real x_h from x~_h = G_PH(x_p, y_p)
        with train_mode(*nets_g, *nets_d):
            self._set_requires_grad(nets_d, True)
            with torch.no_grad(), self._autocast():
                fake_p = self.G_HP(x_h, y_hp).float()
                fake_h = self.G_PH(x_p, y_p).float()
            for _ in range(self.n_critic):
                self.d_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
                with self._autocast():
                    out_p = self.critic_objective_P(x_p2, fake_p, y_p2, y_hp)
                    out_h = self.critic_objective_H(x_h, fake_h, y_hp, y_p)
                    # lesion-focused critics (ours): the same real/fake pairs, cropped at the lesions
                    out_l = {
                        k: obj(x_p2, fake_p, y_p2, y_hp) if k == "P_lesion" else obj(x_h, fake_h, y_hp, y_p)
                        for k, obj in self.lesion_objectives.items()
                    }
                loss_d = out_p["loss"].float() + out_h["loss"].float()
                for o in out_l.values():
                    loss_d = loss_d + o["loss"].float()
                loss_d.backward()
                self.d_optimizer.step()

            # generator step: both cycles, critics frozen
            self._set_requires_grad(nets_d, False)
            self.g_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
            with self._autocast():
                g = self.generator_objective(x_h, y_hp, x_p, y_p, bm_h, bm_p)
            g["G"].float().backward()
            self.g_optimizer.step()
            self._set_requires_grad(nets_d, True)

        engine.state.synthesis_images = {
            "x_h": x_h[0].detach(), "y_hp": y_hp[0].detach(), "fake_p": g["fake_p"][0], "rec_h": g["rec_h"][0],
            "x_p": x_p[0].detach(), "y_p": y_p[0].detach(), "fake_h": g["fake_h"][0],
        }  # fmt: skip
        return loss_output(g, out_p, out_h, out_l)


class SynthesisEvaluator(Evaluator):
    """Validation evaluator: runs ``G_HP`` on healthy patches with sampled masks and ``G_PH`` on pathological
    patches with their masks, and outputs :func:`~cmb_synthesis.synthesis.metrics.synthesis_stats` sums that
    :class:`~cmb_synthesis.synthesis.metrics.SynthesisMetric` metrics turn into identity / fidelity / removal.

    Batches carry ``x_h``, ``y_hp``, ``brainmask_h``, ``x_p``, ``y_p``, ``brainmask_p`` (no ``x_p2``). With
    ``realism`` the output also holds ``realism``: per-lesion radial profiles and patches of the painted and
    the real lesions (:func:`~cmb_synthesis.synthesis.realism.batch_measurements`) for
    :class:`~cmb_synthesis.synthesis.realism.RealismMetric`. With ``lesion_code`` (a
    :class:`~cmb_synthesis.synthesis.codes.ContrastCode`) ``G_HP`` paints each sampled lesion at a random darkness
    rank, the same at every round (seeded by ``code_seed`` and the batch's index).
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Any,
        G_HP: nn.Module,
        G_PH: nn.Module,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = prepare_cycle_batch,
        key_val_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        amp_dtype: torch.dtype | str = torch.bfloat16,
        shell: int = 2,
        margin: int = 2,
        realism: bool = True,
        lesion_code: Any = None,
        code_seed: int = 0,
    ) -> None:
        kwargs = {} if metric_cmp_fn is None else {"metric_cmp_fn": metric_cmp_fn}
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            val_handlers=val_handlers,
            amp=amp,
            mode=ForwardMode.EVAL,
            decollate=False,
            **kwargs,
        )
        self.G_HP, self.G_PH = G_HP, G_PH
        self.amp_dtype = getattr(torch, amp_dtype) if isinstance(amp_dtype, str) else amp_dtype
        self.shell, self.margin, self.realism = shell, margin, bool(realism)
        self.lesion_code, self.code_seed = lesion_code, int(code_seed)

    def _iteration(self, engine: Engine, batchdata: dict[str, torch.Tensor]) -> dict[str, float]:
        b = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        ctx = (
            torch.autocast(device_type=torch.device(engine.state.device).type, dtype=self.amp_dtype)
            if self.amp
            else contextlib.nullcontext()
        )
        if self.lesion_code is not None:
            # the same ranks at every round: a generator seeded by the batch's index in the (fixed) validation set
            gen = torch.Generator().manual_seed(self.code_seed * 1_000_003 + engine.state.iteration)
            b = dict(b, y_hp=self.lesion_code.random(b["y_hp"].cpu(), gen).to(b["y_hp"].device))
        with eval_mode(self.G_HP, self.G_PH), ctx:
            fake_p = self.G_HP(b["x_h"], b["y_hp"]).float()
            fake_h = self.G_PH(b["x_p"], b["y_p"]).float()
        out: dict[str, Any] = synthesis_stats(
            b["x_h"], b["y_hp"], fake_p, b["x_p"], b["y_p"], fake_h,
            b.get("brainmask_h"), b.get("brainmask_p"), shell=self.shell, margin=self.margin,
        )  # fmt: skip
        if self.realism:
            out["realism"] = {
                "synthetic": batch_measurements(fake_p, b["y_hp"], b.get("brainmask_h")),
                "real": batch_measurements(b["x_p"], b["y_p"], b.get("brainmask_p")),
            }
        return out

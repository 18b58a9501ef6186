"""Ignite handlers for the synthesis bundle that MONAI/Ignite do not already provide.

- :class:`NonFiniteLossGuard`: stop training on a NaN/Inf loss term with a clear message; attached FIRST so
  that no checkpoint of the broken iteration is written (the last good one stays on disk).
- :class:`SynthesisImageGrid`: central axial slices of x_h, y_hp, x~_p, reconstruction, x_p, y_p, x~_h as
  one image in TensorBoard.
- :class:`ExportNetworks`: ``G_HP.pt``, ``G_PH.pt``, ... (state dicts) written atomically when training ends.
- :class:`MetricsJSONWriter`: the evaluator's metrics (every validation round, with history) to a JSON file.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler

from cmb_synthesis.data.io import atomic_output, write_json
from cmb_synthesis.training.resume import latest_checkpoint

__all__ = ["NonFiniteLossGuard", "SynthesisImageGrid", "ExportNetworks", "MetricsJSONWriter", "NetworkEMA"]

class NonFiniteLossGuard:
    """Stop training when any numeric value in ``engine.state.output`` is NaN or Inf.

    Raises ``FloatingPointError`` naming the term, its value, the iteration and the last good checkpoint
    folder. Attach it before the checkpoint savers (first in ``train_handlers``) so the broken state is never
    saved.
    """

    def __init__(self, ckpt_dir: str | None = None, name: str | None = None) -> None:
        self.ckpt_dir = ckpt_dir
        self.logger = logging.getLogger(name or __name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        items = out.items() if isinstance(out, Mapping) else [("output", out)]
        for key, value in items:
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue
                value = value.item()
            if isinstance(value, (int, float)) and not math.isfinite(value):
                last = latest_checkpoint(self.ckpt_dir, required=False) if self.ckpt_dir else ""
                msg = (
                    f"non-finite loss {key}={value} at iteration {engine.state.iteration} (epoch "
                    f"{engine.state.epoch}); training stopped. Last good checkpoint: {last or 'none saved yet'}"
                )
                self.logger.error(msg)
                raise FloatingPointError(msg)


class SynthesisImageGrid:
    """Every ``interval`` iterations, write the central axial slice of ``engine.state.synthesis_images``
    (x_h | y_hp | x~_p | rec_h | x_p | y_p | x~_h) as one grey image to TensorBoard (tag ``synthesis``)."""

    ORDER = ("x_h", "y_hp", "fake_p", "rec_h", "x_p", "y_p", "fake_h")

    def __init__(self, summary_writer: Any = None, log_dir: str = "./runs", interval: int = 50, tag: str = "synthesis"):
        self._writer = summary_writer
        self.log_dir, self.interval, self.tag = log_dir, int(interval), tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    @classmethod
    def grid(cls, images: Mapping[str, torch.Tensor]) -> np.ndarray:
        """(1, H, W * n) float32 in [0, 1]: the central axial slices side by side."""
        tiles = []
        for k in cls.ORDER:
            if k in images:
                v = images[k].detach().float().cpu()[0]
                tiles.append(v[:, :, v.shape[-1] // 2].clamp(0, 1).T.flip(0).numpy())
        return np.concatenate(tiles, axis=1)[None]

    def __call__(self, engine: Engine) -> None:
        images = getattr(engine.state, "synthesis_images", None)
        if not images:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        self._writer.add_image(self.tag, self.grid(images), engine.state.iteration, dataformats="CHW")
        self._writer.flush()


class ExportNetworks:
    """At ``Events.COMPLETED`` write each network's ``state_dict`` to ``save_dir/<name>.pt`` atomically
    (e.g. ``G_HP.pt``, the file inference loads). DDP wrappers are unwrapped."""

    def __init__(self, save_dir: str, networks: Mapping[str, torch.nn.Module]) -> None:
        self.save_dir, self.networks = Path(save_dir), dict(networks)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        for name, net in self.networks.items():
            net = getattr(net, "module", net)
            with atomic_output(self.save_dir / f"{name}.pt") as tmp:
                torch.save(net.state_dict(), tmp)


def _scalar(value: Any) -> float | None:
    """``value`` as a Python float when it is a real scalar (Python, NumPy or a one-element tensor), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, np.ndarray) and value.size == 1 and np.issubdtype(value.dtype, np.number):
        return float(value.item())
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        return float(value.item())
    return None


class MetricsJSONWriter:
    """Write the evaluator's metrics to ``path`` (JSON) after every validation round: the latest values under
    ``metrics``, every round under ``history``, the trainer's iteration/epoch and wall time, plus ``extra``."""

    def __init__(self, path: str, trainer: Engine | None = None, extra: Mapping[str, Any] | None = None) -> None:
        self.path, self.trainer, self.extra = Path(path), trainer, dict(extra or {})
        self.history: list[dict[str, Any]] = []
        self._t0 = time.time()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = {k: f for k, v in engine.state.metrics.items() if (f := _scalar(v)) is not None}
        record: dict[str, Any] = {"metrics": metrics}
        if self.trainer is not None:
            record.update(iteration=self.trainer.state.iteration, epoch=self.trainer.state.epoch)
        else:  # a MONAI evaluator run by ValidationHandler carries the trainer's epoch
            record["epoch"] = engine.state.epoch
        record["elapsed_s"] = round(time.time() - self._t0, 1)
        self.history.append(record)
        write_json({**record, **self.extra, "history": self.history}, self.path)


class NetworkEMA:
    """Exponential moving averages of several networks (Ignite's :class:`~ignite.handlers.EMAHandler`, one per
    network, attached under distinct state names ``ema_momentum_<name>``).

    ``ema[name]`` is the averaged copy of network ``name`` (``theta_ema <- (1 - m) theta_ema + m theta`` after
    every iteration), for evaluation and export: it smooths the iteration-to-iteration swings of adversarial
    training. Put the copies in the checkpoint's ``save_dict`` so that a resumed run continues the averages.

    Args:
        networks: ``{name: network}``, e.g. ``{"G_HP": G_HP, "G_PH": G_PH}``.
        momentum: ``m`` per iteration (0.01: an average over about the last 100 iterations).
        warmup_iters: iterations over which ``m`` falls from 1 to ``momentum`` (early weights are forgotten).
    """

    def __init__(self, networks: Mapping[str, torch.nn.Module], momentum: float = 0.01, warmup_iters: int | None = 100):
        if not 0.0 < float(momentum) < 1.0:
            raise ValueError(f"NetworkEMA: momentum must be in (0, 1), got {momentum}")
        warm = int(warmup_iters) if warmup_iters else None
        self.handlers = {
            name: EMAHandler(net, momentum=float(momentum), momentum_warmup=0.99 if warm else None, warmup_iters=warm)
            for name, net in networks.items()
        }

    def __getitem__(self, name: str) -> torch.nn.Module:
        return self.handlers[name].ema_model

    def attach(self, engine: Engine) -> None:
        for name, h in self.handlers.items():
            h.attach(engine, name=f"ema_momentum_{name}")

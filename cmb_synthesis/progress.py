"""Progress of long loops: a ``tqdm`` bar on a terminal, ``i/N`` lines with elapsed and remaining time in the log
otherwise (batch jobs, ``nohup`` runs, CI), so that every long loop says how far it is and how long it will take.

Use :func:`progress` around any iterable with a known length::

    for item in progress(items, "inference"):
        ...

Set ``CMB_PROGRESS=bar|log|off`` to force one form (default: ``bar`` when stderr is a terminal, else ``log``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress", "format_seconds"]

T = TypeVar("T")
logger = logging.getLogger("cmb_synthesis.progress")


def format_seconds(seconds: float) -> str:
    """``3725.2`` -> ``"1h02m05s"``, ``65`` -> ``"1m05s"``, ``4.2`` -> ``"4s"``."""
    s = int(round(max(0.0, float(seconds))))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


def _mode() -> str:
    mode = os.environ.get("CMB_PROGRESS", "").strip().lower()
    if mode in ("bar", "log", "off"):
        return mode
    return "bar" if getattr(sys.stderr, "isatty", lambda: False)() else "log"


def progress(iterable: Iterable[T], desc: str, total: int | None = None, min_interval_s: float = 10.0,
             log: logging.Logger | None = None) -> Iterator[T]:
    """Iterate over ``iterable`` reporting progress as ``desc: i/N (elapsed ..., remaining ~...)``.

    Args:
        iterable: the loop's items.
        desc: what is being done (``"phantom subjects"``, ``"inference"``).
        total: number of items (default ``len(iterable)`` when it has one).
        min_interval_s: log form: at most one line per this many seconds (the first and last item always).
        log: logger of the log form (default ``cmb_synthesis.progress``, INFO level).
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    mode = _mode()
    if mode == "bar":
        from tqdm.auto import tqdm

        yield from tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True)
        return
    if mode == "off":
        yield from iterable
        return
    log = log or logger
    start = last = time.monotonic()
    i = 0
    for item in iterable:
        yield item
        i += 1
        now = time.monotonic()
        if i == 1 or i == total or now - last >= min_interval_s:
            last = now
            elapsed = now - start
            if total:
                remaining = elapsed / i * (total - i)
                log.info("%s: %d/%d (elapsed %s, remaining ~%s)", desc, i, total, format_seconds(elapsed),
                         format_seconds(remaining))
            else:
                log.info("%s: %d (elapsed %s)", desc, i, format_seconds(elapsed))

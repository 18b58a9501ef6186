"""Helpers that bundle configs call through ``$`` expressions.

Bundles in ``bundles/`` are run from the repository root (``--config_file bundles/NAME/configs/train.yaml``)
or, model-zoo style, from inside the bundle (``--config_file configs/train.yaml``). :func:`bundle_root`
finds the bundle folder in both cases so that ``models/``, ``logs/`` and the default dataset land inside it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["bundle_root"]


def _config_files_from_argv(argv: Sequence[str]) -> list[str]:
    for i, arg in enumerate(argv):
        value = None
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        value = value.strip()
        if value.startswith("["):
            try:
                parsed = ast.literal_eval(value)
                return [str(v) for v in parsed]
            except (ValueError, SyntaxError):
                return [v.strip(" '\"") for v in value.strip("[]").split(",") if v.strip()]
        return [value]
    return []


def bundle_root(name: str, argv: Sequence[str] | None = None) -> str:
    """Return the folder of bundle ``name``.

    Order: the parent of the ``configs/`` folder of the first ``--config_file`` on the command line; else the
    current directory if it is the bundle (has ``configs/``); else ``./bundles/<name>``; else the current
    directory. Configs use it as ``bundle_root: "$cmb_synthesis.bundle_utils.bundle_root('cmb_synthesis')"``
    and any run can still override it with ``--bundle_root DIR``.
    """
    files = _config_files_from_argv(sys.argv if argv is None else argv)
    if files:
        cfg = Path(files[0]).resolve()
        parent = cfg.parent
        return str(parent.parent if parent.name == "configs" else parent)
    cwd = Path.cwd()
    if (cwd / "configs").is_dir() and cwd.name == name:
        return str(cwd)
    candidate = cwd / "bundles" / name
    if candidate.is_dir():
        return str(candidate)
    return str(cwd)

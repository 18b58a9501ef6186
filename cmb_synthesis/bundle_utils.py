"""Helpers that bundle configs call through ``$`` expressions.

Bundles in ``bundles/`` are run from the repository root (``--config_file bundles/NAME/configs/train.yaml``)
or, model-zoo style, from inside the bundle (``--config_file configs/train.yaml``). :func:`bundle_root`
finds the bundle folder in both cases so that ``models/``, ``logs/`` and the default dataset land inside it.
:func:`command_line`, the first ``initialize`` entry of every config, refuses misspelt or ill-typed
command-line overrides and makes a failing run end with one ``error: ...`` line
(:mod:`cmb_synthesis.bundle_cli`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from monai.bundle import ConfigParser

from cmb_synthesis.bundle_cli import check_overrides, install_excepthook, parse_bundle_argv

__all__ = ["bundle_root", "command_line", "is_bundle_main"]

_checked: set[tuple[str, ...]] = set()


def is_bundle_main() -> bool:
    """Whether this process is ``python -m monai.bundle ...`` (also under ``torchrun -m``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) in ("monai.bundle.__main__", "monai.bundle")


def command_line(argv: Sequence[str] | None = None) -> None:
    """Check the ``python -m monai.bundle run ...`` command line of this process; report failures in one line.

    Call it as the first ``initialize`` entry: ``initialize: ["$cmb_synthesis.bundle_utils.command_line()", ...]``.
    It installs a ``sys.excepthook`` printing ``error: <root cause>`` (full traceback with ``--debug true``),
    then refuses, with one message, override keys that the merged config files do not define (naming the
    closest known key; a config can list accepted new keys, fnmatch patterns, in ``allowed_new_keys``),
    non-integer values for integer settings and a ``--device`` this machine lacks. Outside ``python -m
    monai.bundle`` (a test, ``monai.bundle.run(...)`` from Python) it does nothing unless ``argv`` is given;
    each command line is checked once per process.

    Args:
        argv: the command line, ``sys.argv`` by default.

    Raises:
        CommandLineError: a refused override (MONAI wraps it; the hook prints it as one line).
        ValueError: a config file or the args_file cannot be read.
    """
    if argv is None:
        if not is_bundle_main():
            return
        argv = sys.argv
    key = tuple(str(a) for a in argv)
    if key in _checked:
        return
    _checked.add(key)
    parsed = parse_bundle_argv(key)
    if parsed is None:
        return
    install_excepthook(debug=parsed.debug)
    if parsed.command != "run" or not parsed.config_files:
        return
    config = ConfigParser.load_config_files(parsed.config_files)
    check_overrides(
        parsed.overrides, config, source=" + ".join(parsed.config_files), tracking=parsed.run_args.get("tracking")
    )


def bundle_root(name: str, argv: Sequence[str] | None = None) -> str:
    """Return the folder of bundle ``name``.

    Order: the parent of the ``configs/`` folder of the first ``--config_file`` on the command line; else the
    current directory if it is the bundle (has ``configs/``); else ``./bundles/<name>``; else the current
    directory. Configs use it as ``bundle_root: "$cmb_synthesis.bundle_utils.bundle_root('cmb_synthesis')"``
    and any run can still override it with ``--bundle_root DIR``.
    """
    parsed = parse_bundle_argv(sys.argv if argv is None else argv)
    files = parsed.config_files if parsed is not None else []
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

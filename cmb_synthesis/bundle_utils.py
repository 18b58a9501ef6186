"""Helpers that bundle configs call through ``$`` expressions.

Bundles in ``bundles/`` are run from the repository root (``--config_file bundles/NAME/configs/train.yaml``),
model-zoo style from inside the bundle (``--config_file configs/train.yaml``), or from a copy of the bundle
folder placed anywhere once the package is installed (``--config_file /elsewhere/NAME/configs/train.yaml``,
optionally ``--bundle_root /elsewhere/NAME``). :func:`bundle_root` finds the bundle folder in every case (the
parent of the first config file's ``configs/`` folder), so that ``models/``, ``runs/``, ``eval/`` and the
default dataset land inside the bundle that runs, never in the repository or the working directory.
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

__all__ = ["bundle_root", "command_line", "is_bundle_main", "sibling_bundle"]

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


def sibling_bundle(root: str | Path, name: str, override: str = "") -> str:
    """Return the bundle folder ``name`` beside the bundle at ``root`` (``<parent of root>/<name>``).

    The augmentation study of ``cmb_detection`` runs the ``cmb_synthesis`` bundle too; in the repository and in
    a copy of both bundle folders side by side, it is the sibling folder. Configs use it as
    ``synthesis_bundle: "$cmb_synthesis.bundle_utils.sibling_bundle(@bundle_root, 'cmb_synthesis', '--synthesis_bundle')"``.

    Args:
        root: the running bundle's folder (``@bundle_root``).
        name: the other bundle's folder name.
        override: the command-line option that points at the other bundle elsewhere (named in the error).

    Raises:
        FileNotFoundError: ``<parent>/<name>/configs/train.yaml`` does not exist; the message names the folder
            searched and the override.
    """
    folder = Path(root).resolve().parent / name
    if not (folder / "configs" / "train.yaml").is_file():
        hint = f", or give {override} DIR" if override else ""
        raise FileNotFoundError(f"{folder / 'configs' / 'train.yaml'}: the {name} bundle was not found beside "
                                f"{Path(root).resolve()}; copy the {name} bundle folder there{hint}")
    return str(folder)

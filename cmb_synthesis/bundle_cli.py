"""The bundles' command line: check ``python -m monai.bundle run`` arguments and report failures in one line.

MONAI's ``python -m monai.bundle run <run_id> --config_file FILE --key value`` (python-fire) merges every
``--key value`` into the config, so a misspelt key (``--max_epoch 2``) is silently ignored and ``--max_epochs
1.5`` quietly trains 2 epochs; a failure ends in a long chain of ``RuntimeError("Failed to evaluate ...")``
tracebacks. This module reads the command line the way fire does (:func:`parse_bundle_argv`), checks the
overrides against the merged config files (:func:`check_overrides`) and installs a ``sys.excepthook`` that
prints the root cause as one ``error: ...`` line (:func:`install_excepthook`). Bundle configs reach it through
:func:`cmb_synthesis.bundle_utils.command_line`.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import logging
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from fire.parser import DefaultParseValue, SeparateFlagArgs
from monai.bundle import ConfigParser
from monai.bundle.scripts import create_workflow, run
from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS, ID_SEP_KEY
from monai.bundle.workflows import ConfigWorkflow

__all__ = [
    "CommandLineError",
    "BundleArgs",
    "RUN_ARGUMENTS",
    "ALLOWED_NEW_KEYS_ID",
    "parse_bundle_argv",
    "config_ids",
    "check_overrides",
    "check_device",
    "root_cause",
    "error_line",
    "install_excepthook",
]

# ``run``'s own parameters in positional order (``run training`` sets run_id), then the other keyword
# arguments that MONAI consumes instead of merging into the config (create_workflow, ConfigWorkflow)
_RUN_POSITIONAL = tuple(
    n for n, p in inspect.signature(run).parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD
)
RUN_ARGUMENTS: frozenset[str] = frozenset(
    n
    for fn in (run, create_workflow, ConfigWorkflow.__init__)
    for n, p in inspect.signature(fn).parameters.items()
    if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
)
# keys every bundle run accepts on top of the config ids: --debug true shows full tracebacks
_ALWAYS_ACCEPTED = frozenset({"debug"})
# a config entry listing extra keys (fnmatch patterns, e.g. "frst#*") that may be added from the command line
ALLOWED_NEW_KEYS_ID = "allowed_new_keys"
_EXPRESSION_PREFIXES = ("$", "@", "%")
# ids are written with "#" here (MONAI accepts "#" and "::")
_SEP = "#"
# MONAI's wrappers around the error raised while evaluating a config item
_WRAPPER_PREFIXES = ("Failed to evaluate", "Failed to instantiate")


class CommandLineError(ValueError):
    """A command-line argument that the bundle refuses (unknown key, wrong type, unusable device)."""


@dataclass
class BundleArgs:
    """One ``python -m monai.bundle COMMAND ...`` command line, parsed as python-fire parses it.

    Attributes:
        command: the ``monai.bundle`` function, e.g. ``"run"``.
        run_args: values of MONAI's own arguments (``config_file``, ``run_id``, ``meta_file``, ...).
        overrides: every other ``--key value`` pair (config overrides), values parsed by fire
            (``"2"`` -> 2, ``"1.5"`` -> 1.5, ``"['a','b']"`` -> list); ``args_file`` pairs included.
    """

    command: str
    run_args: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def config_files(self) -> list[str]:
        """The ``config_file`` value as a list of paths (``[]`` when none was given)."""
        files = self.run_args.get("config_file")
        if files is None:
            return []
        if isinstance(files, str):
            return [f.strip() for f in files.split(",")] if "," in files else [files]
        return [str(f) for f in files]

    @property
    def debug(self) -> bool:
        """``--debug true``: show full tracebacks."""
        return str(self.overrides.get("debug", False)).lower() in ("true", "1", "yes")


def _is_flag(arg: str) -> bool:
    # fire's rule: a leading hyphen that does not start a negative number
    return arg.startswith("--") or re.match(r"^-[a-zA-Z]", arg) is not None


def parse_bundle_argv(argv: Sequence[str]) -> BundleArgs | None:
    """Parse ``sys.argv`` of ``python -m monai.bundle COMMAND ...`` with fire's keyword rules.

    ``--key value``, ``--key=value``, ``--flag`` (True), ``--noflag`` (False), hyphens in keys read as
    underscores, arguments after a lone ``--`` belong to fire. Positional arguments fill ``run``'s parameters
    in order (``run training`` -> ``run_id='training'``). With ``args_file``, its pairs are defaults that the
    command line overrides, as in MONAI's ``update_kwargs``.

    Returns:
        the parsed arguments, or None when ``argv`` names no command.

    Raises:
        ValueError: the ``args_file`` cannot be read.
    """
    if len(argv) < 2 or _is_flag(argv[1]):
        return None
    args, _fire_flags = SeparateFlagArgs(list(argv[2:]))
    keywords: dict[str, Any] = {}
    positional: list[Any] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if not _is_flag(arg):
            positional.append(DefaultParseValue(arg))
            continue
        stripped = arg.lstrip("-")
        if "=" in stripped:
            key, value = stripped.split("=", 1)
        else:
            key, value = stripped, None
        key = key.replace("-", "_")
        if value is None and (i + 1 == len(args) or _is_flag(args[i + 1])):
            # bool syntax: --flag is True, --noflag is False unless "noflag" is one of run's own names
            if key.startswith("no") and key not in RUN_ARGUMENTS:
                key, value = key[2:], "False"
            else:
                value = "True"
        elif value is None:
            value, skip = args[i + 1], True
        keywords[key] = DefaultParseValue(value)
    for name in _RUN_POSITIONAL:
        if positional and name not in keywords:
            keywords[name] = positional.pop(0)
    parsed = BundleArgs(command=argv[1])
    if keywords.get("args_file"):
        for key, value in _read_args_file(str(keywords["args_file"])).items():
            keywords.setdefault(key, value)
    for key, value in keywords.items():
        (parsed.run_args if key in RUN_ARGUMENTS else parsed.overrides)[key] = value
    return parsed


def _read_args_file(path: str) -> dict[str, Any]:
    try:
        content = ConfigParser.load_config_file(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the args_file ({e})") from e
    if not isinstance(content, dict):
        raise ValueError(f"{path}: the args_file must hold key: value pairs")
    return content


def _walk(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(config, Mapping):
        children: Iterator[tuple[Any, Any]] = iter(config.items())
    elif isinstance(config, list):
        children = enumerate(config)
    else:
        return
    for key, value in children:
        key_id = f"{prefix}{_SEP}{key}" if prefix else str(key)
        yield key_id, value
        yield from _walk(value, key_id)


def config_ids(config: Mapping[str, Any]) -> dict[str, Any]:
    """Every id of a config (``a``, ``a#b``, ``a#0#c``) mapped to its value."""
    return dict(_walk(config))


def _normalize(key: str) -> str:
    return key.replace(ID_SEP_KEY, _SEP).replace("::", _SEP)


def _is_expression(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(_EXPRESSION_PREFIXES)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer_problem(key: str, default: Any, value: Any) -> str | None:
    """Why ``value`` cannot replace the integer (or list of integers) ``default``; None when it can."""
    if value is None or _is_expression(value) or (isinstance(value, str) and value.lower() in ("null", "none")):
        return None  # YAML's null as the command line spells it (e.g. --lr_decay_start null: a constant lr)
    if _is_int(default) and not _is_int(value):
        return f"--{key} must be an integer (the default is {default}), got {value!r}"
    if isinstance(default, list) and default and all(_is_int(d) for d in default) and isinstance(value, list):
        if not all(_is_int(v) or _is_expression(v) for v in value):
            return f"--{key} must be a list of integers (the default is {default}), got {value!r}"
    return None


def check_device(name: Any) -> torch.device:
    """``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``) as a device usable on this machine.

    Raises:
        CommandLineError: not a device name, CUDA requested without CUDA, or a CUDA index this machine lacks.
    """
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CommandLineError(f"--device {name!r} is not a device (use cpu, cuda or cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandLineError("CUDA is not available on this machine; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise CommandLineError(
                f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    return dev


def check_overrides(
    overrides: Mapping[str, Any],
    config: Mapping[str, Any],
    source: str = "the config",
    tracking: Any = None,
) -> None:
    """Refuse overrides that the merged ``config`` does not define or that do not fit its defaults.

    Accepted keys: every id of ``config`` (nested ids with ``#`` or ``::``), ``debug``, ``_meta_...``, the
    tracking settings' keys when ``tracking`` names a MONAI default (``"mlflow"``), and the fnmatch patterns
    listed in the config's ``allowed_new_keys`` entry. An override of an integer default must be an integer
    (lists of integers element-wise); ``$``/``@``/``%`` expressions pass unchecked, ``None`` is ignored as
    MONAI ignores it. A plain ``device`` value must name a device of this machine (:func:`check_device`).

    Args:
        overrides: ``key -> value`` pairs from the command line (fire-parsed values).
        config: the merged content of the config files.
        source: how error messages name the config files.
        tracking: the ``tracking`` argument of the run, if any.

    Raises:
        CommandLineError: one message naming every refused key, with the closest known key where one exists.
    """
    ids = config_ids(config)
    accepted = set(ids) | _ALWAYS_ACCEPTED
    if isinstance(tracking, str) and tracking in DEFAULT_EXP_MGMT_SETTINGS:
        accepted |= set(DEFAULT_EXP_MGMT_SETTINGS[tracking].get("configs", {}))
    patterns = config.get(ALLOWED_NEW_KEYS_ID) or []
    patterns = [patterns] if isinstance(patterns, str) else [str(p) for p in patterns]
    unknown, problems = [], []
    for raw_key, value in overrides.items():
        key = _normalize(str(raw_key))
        if key in ids:
            problem = _integer_problem(raw_key, ids[key], value)
            if problem:
                problems.append(problem)
        elif not (key in accepted or key.startswith("_meta_") or any(fnmatch.fnmatchcase(key, p) for p in patterns)):
            close = difflib.get_close_matches(key, sorted(accepted | RUN_ARGUMENTS), n=1, cutoff=0.6)
            unknown.append(f"--{raw_key}" + (f" (did you mean --{close[0]}?)" if close else ""))
    if unknown:
        problems.insert(
            0,
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not a setting of {source}"
            f" (a config accepts new keys listed in its '{ALLOWED_NEW_KEYS_ID}')",
        )
    if problems:
        raise CommandLineError("; ".join(problems))
    device = overrides.get("device")
    if device is not None and not _is_expression(device):
        check_device(device)


def _next_in_chain(exc: BaseException) -> BaseException | None:
    if exc.__cause__ is not None:
        return exc.__cause__
    return None if exc.__suppress_context__ else exc.__context__


def root_cause(exc: BaseException) -> BaseException:
    """The error that MONAI's ``RuntimeError("Failed to evaluate/instantiate ...")`` wrappers are about.

    Walks ``__cause__``/``__context__`` through those wrappers only: an exception that wraps its cause with a
    message of its own (``ValueError("datalist.json: not valid JSON (...)")``) is the one reported.
    """
    seen = {id(exc)}
    while isinstance(exc, RuntimeError) and str(exc).startswith(_WRAPPER_PREFIXES):
        inner = _next_in_chain(exc)
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        exc = inner
    return exc


def error_line(exc: BaseException) -> str:
    """One line ``error: <message>`` for ``exc`` (its :func:`root_cause`), newlines folded into spaces.

    ``ValueError``/``OSError``/``KeyError`` messages stand alone (they name the file and the problem); other
    types are prefixed with their name (``error: ZeroDivisionError: division by zero``).
    """
    cause = root_cause(exc)
    if isinstance(cause, KeyError) and len(cause.args) == 1:
        message = str(cause.args[0])
    else:
        message = str(cause)
    message = " ".join(message.split()) or type(cause).__name__
    if not isinstance(cause, (ValueError, OSError, KeyError)):
        message = f"{type(cause).__name__}: {message}"
    return f"error: {message}"


_installed: dict[str, Any] = {}


def install_excepthook(debug: bool = False) -> None:
    """Make an uncaught exception print :func:`error_line` on stderr (exit status 1) instead of a traceback.

    Logged exceptions (MONAI's ``StatsHandler`` logs a failing Ignite run with ``logger.exception``) keep their
    message but lose the traceback. With ``debug=True`` (``--debug true``) tracebacks are printed and logged as
    usual. ``KeyboardInterrupt`` and ``SystemExit`` keep Python's own handling. Installing again only updates
    ``debug``.
    """
    _installed["debug"] = debug
    if "previous" in _installed:
        return
    previous: Callable[..., Any] = sys.excepthook
    _installed["previous"] = previous
    make_record = logging.getLogRecordFactory()

    def record_without_traceback(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if not _installed["debug"]:
            record.exc_info, record.exc_text = None, None
        return record

    logging.setLogRecordFactory(record_without_traceback)

    def hook(etype: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if _installed["debug"] or not issubclass(etype, Exception):
            previous(etype, value, tb)
            return
        try:
            line = error_line(value)
            if not isinstance(root_cause(value), CommandLineError):
                line += " (--debug true shows the traceback)"
        except Exception:  # never lose the original error to a formatting problem
            traceback.print_exception(etype, value, tb)
            return
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    sys.excepthook = hook

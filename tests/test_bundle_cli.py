"""The bundles' command line: refused overrides, integer settings, empty validation lists, one-line errors.

Unit tests of :mod:`cmb_synthesis.bundle_cli`, then real ``python -m monai.bundle run`` subprocesses on a tiny
config written here that wires :func:`cmb_synthesis.bundle_utils.command_line` the way the bundle configs do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmb_synthesis import bundle_cli, bundle_utils
from cmb_synthesis.bundle_cli import (
    CommandLineError,
    check_device,
    check_overrides,
    error_line,
    parse_bundle_argv,
    root_cause,
)
from cmb_synthesis.data.datalist import load_split

REPO = Path(__file__).resolve().parents[1]

CONFIG = {
    "bundle_root": "$cmb_synthesis.bundle_utils.bundle_root('x')",
    "max_epochs": 3,
    "lr": 0.001,
    "patch_size": [8, 8, 4],
    "amp": False,
    "network": {"_target_": "Net", "channels": 4},
    "frst": {},
    "allowed_new_keys": ["frst#*"],
}


def test_parse_bundle_argv_reads_the_command_line_as_fire_does(tmp_path):
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"config_file": "from_args.yaml", "lr": 0.1, "seed": 5}))
    argv = [
        "/site/monai/bundle/__main__.py", "run", "training", "--config_file", "['a/configs/t.yaml','p.yaml']",
        "--max-epochs=2", "--amp", "--noverbose", "--seed", "-1", "--network::channels", "8",
        f"--args_file={args_file}", "--", "--help",
    ]  # fmt: skip
    parsed = parse_bundle_argv(argv)
    assert parsed is not None and parsed.command == "run"
    assert parsed.run_args["run_id"] == "training"
    assert parsed.config_files == ["a/configs/t.yaml", "p.yaml"]  # the command line wins over the args_file
    assert parsed.overrides == {"max_epochs": 2, "amp": True, "verbose": False, "seed": -1, "network::channels": 8,
                                "lr": 0.1}  # fmt: skip
    assert not parsed.debug and parse_bundle_argv([*argv[:3], "--debug", "true"]).debug
    assert parse_bundle_argv(["x", "run", "--config_file", "a.yaml,b.yaml"]).config_files == ["a.yaml", "b.yaml"]
    assert parse_bundle_argv(["pytest", "-q"]) is None
    # bundle_root keeps reading the first config file's bundle folder
    assert bundle_utils.bundle_root("x", argv=argv) == str((Path("a")).resolve())


def test_unknown_override_is_refused_naming_the_closest_key():
    with pytest.raises(CommandLineError) as err:
        check_overrides({"max_epoch": 2, "overwite": True, "network#chanels": 2}, CONFIG, source="train.yaml")
    msg = str(err.value)
    assert "--max_epoch (did you mean --max_epochs?)" in msg
    assert "--network#chanels (did you mean --network#channels?)" in msg
    assert "--overwite" in msg and "not a setting of train.yaml" in msg
    # a typo of one of MONAI run's own arguments is suggested too
    with pytest.raises(CommandLineError, match="did you mean --config_file"):
        check_overrides({"config_fil": "a.yaml"}, CONFIG)
    # every config id (nested with # or ::), --debug, metadata and allowed_new_keys patterns are accepted
    check_overrides(
        {"max_epochs": 2, "network#channels": 8, "network::_target_": "N", "patch_size#2": 8, "debug": True,
         "_meta_#version": "1", "frst#radii": [1, 2]},
        CONFIG,
    )  # fmt: skip
    with pytest.raises(CommandLineError, match="--frsts"):
        check_overrides({"frsts#radii": [1]}, CONFIG)


@pytest.mark.parametrize(
    "key,value,ok",
    [
        ("max_epochs", 1.5, False),
        ("max_epochs", 2.0, False),
        ("max_epochs", "two", False),
        ("max_epochs", True, False),
        ("max_epochs", 2, True),
        ("max_epochs", "$@lr * 1000", True),
        ("max_epochs", None, True),  # MONAI ignores None overrides
        ("network#channels", 4.5, False),
        ("patch_size", [8, 8, 4.5], False),
        ("patch_size", [16, 16, 8], True),
        ("patch_size#0", 1.5, False),
        ("lr", 1, True),  # only integer defaults are checked
        ("amp", "true", True),
    ],
)
def test_integer_settings_refuse_other_values(key, value, ok):
    if ok:
        check_overrides({key: value}, CONFIG)
        return
    with pytest.raises(CommandLineError, match=f"--{key} must be"):
        check_overrides({key: value}, CONFIG)


def test_device_must_exist_on_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CommandLineError, match=r"^CUDA is not available on this machine; use --device cpu$"):
        check_overrides({"device": "cuda"}, {"device": "$torch.device('cpu')"})
    with pytest.raises(CommandLineError, match="not a device"):
        check_device("gpu")
    assert check_device("cpu") == torch.device("cpu")
    check_overrides({"device": "$torch.device('cuda')"}, {"device": "cpu"})  # expressions are not evaluated here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(CommandLineError, match="has 1 CUDA device"):
        check_device("cuda:3")


def test_load_split_nonempty_refuses_an_empty_list(tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "validation": []}))
    assert load_split(datalist, "validation") == []
    with pytest.raises(ValueError, match=rf"^{datalist}: the 'validation' list is empty"):
        load_split(datalist, "validation", nonempty=True)
    assert load_split(datalist, "test", missing_ok=True) == []
    with pytest.raises(ValueError, match="no 'test' list"):
        load_split(datalist, "test", missing_ok=True, nonempty=True)


def test_error_line_reports_the_root_cause_in_one_line():
    def chain(inner: BaseException) -> RuntimeError:
        try:
            try:
                raise inner
            except Exception as e:
                raise RuntimeError("Failed to evaluate ConfigExpression: \n$f(@x)") from e
        except RuntimeError as e:
            try:
                raise RuntimeError("Failed to instantiate component 'T' with keywords: a\n set '_mode_=debug'") from e
            except RuntimeError as outer:
                return outer

    assert error_line(chain(ValueError("/x/datalist.json: no 'validation' list\n(has ['training'])"))) == (
        "error: /x/datalist.json: no 'validation' list (has ['training'])"
    )
    assert error_line(chain(KeyError("id='x' is not found"))) == "error: id='x' is not found"
    assert error_line(chain(ZeroDivisionError("division by zero"))) == "error: ZeroDivisionError: division by zero"
    # an error that wraps its cause with its own message is the one reported
    try:
        try:
            json.loads("{")
        except json.JSONDecodeError as e:
            raise ValueError("/x/datalist.json: not valid JSON") from e
    except ValueError as own:
        assert root_cause(chain(own)) is own
    bare = RuntimeError("Failed to evaluate ConfigExpression: $x")
    assert root_cause(bare) is bare


# ----------------------------------------------------------------------------- real monai.bundle subprocesses

TRAIN_YAML = """\
imports:
  - "$import cmb_synthesis"
  - "$import cmb_synthesis.bundle_utils"
  - "$import cmb_synthesis.data.datalist"
bundle_root: "$cmb_synthesis.bundle_utils.bundle_root('x')"
datalist: "$@bundle_root + '/datalist.json'"
max_epochs: 3
device: "$'cpu'"
extra: {}
allowed_new_keys: ["extra#*", "note"]
validation: "$cmb_synthesis.data.datalist.load_split(@datalist, 'validation', check_files=False, nonempty=True)"
initialize:
  - "$cmb_synthesis.bundle_utils.command_line()"
training:
  - "$print('validation items:', len(@validation))"
  - "$print('max_epochs:', @max_epochs, 'extra:', @extra)"
# an Ignite run failing inside its process function: MONAI's StatsHandler logs it with logger.exception
engine:
  _target_: ignite.engine.Engine
  process_function: "$lambda engine, batch: cmb_synthesis.data.datalist.load_split(@datalist, 'test')"
stats:
  _target_: StatsHandler
failing:
  - "$@stats.attach(@engine)"
  - "$@engine.run([0], max_epochs=1)"
"""


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A tiny bundle ``x/`` (configs/train.yaml, datalist.json with one validation item)."""
    root = tmp_path / "x"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "train.yaml").write_text(TRAIN_YAML)
    (root / "datalist.json").write_text(json.dumps({"training": [], "validation": [{"image": "a.nii.gz"}]}))
    return root


def _run_bundle(
    bundle: Path, *args: str, env: dict | None = None, run_id: str = "training"
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file",
           str(bundle / "configs" / "train.yaml"), *args]  # fmt: skip
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=bundle,
                          env=run_env, timeout=300)


def _last_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_bundle_run_accepts_known_and_allowed_overrides(bundle):
    proc = _run_bundle(bundle, "--max_epochs", "2", "--extra#lr", "0.5", "--note", "hi", "--debug", "false")
    assert proc.returncode == 0, proc.stderr
    assert "validation items: 1" in proc.stdout
    assert "max_epochs: 2 extra: {'lr': 0.5}" in proc.stdout


def test_bundle_run_refuses_unknown_and_non_integer_overrides(bundle):
    line = _last_error(_run_bundle(bundle, "--max_epoch", "2", "--overwite", "true"))
    assert line.startswith("error: unknown options --max_epoch (did you mean --max_epochs?), --overwite")
    assert str(bundle / "configs" / "train.yaml") in line
    line = _last_error(_run_bundle(bundle, "--max_epochs", "1.5"))
    assert line == "error: --max_epochs must be an integer (the default is 3), got 1.5"


@pytest.mark.parametrize(
    "content,problem",
    [
        ({"training": []}, "no 'validation' list (has ['training'])"),
        ({"training": [], "validation": []}, "the 'validation' list is empty"),
    ],
)
def test_bundle_run_datalist_error_is_one_line(bundle, content, problem):
    datalist = bundle / "datalist.json"
    datalist.write_text(json.dumps(content))
    line = _last_error(_run_bundle(bundle))
    assert line.startswith(f"error: {datalist}: {problem}")
    assert "validation items" not in line


def test_bundle_run_debug_shows_the_traceback(bundle):
    (bundle / "datalist.json").write_text(json.dumps({"training": []}))
    proc = _run_bundle(bundle, "--debug", "true")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "Failed to evaluate" in proc.stderr and "no 'validation' list" in proc.stderr


def test_bundle_run_failure_inside_an_ignite_engine_is_one_line(bundle):
    proc = _run_bundle(bundle, run_id="failing")
    line = _last_error(proc)  # also: no traceback logged on stdout
    assert line.startswith(f"error: {bundle / 'datalist.json'}: no 'test' list")
    assert "Exception: " in proc.stdout  # the handler's log line is kept, without its traceback
    proc = _run_bundle(bundle, "--debug", "true", run_id="failing")
    assert proc.returncode != 0 and "Traceback" in proc.stdout + proc.stderr


def test_bundle_run_refuses_cuda_without_cuda(bundle):
    line = _last_error(_run_bundle(bundle, "--device", "cuda", env={"CUDA_VISIBLE_DEVICES": ""}))
    assert line == "error: CUDA is not available on this machine; use --device cpu"


def test_command_line_does_nothing_outside_monai_bundle(monkeypatch):
    # pytest is __main__ here: no check of pytest's own argv and no excepthook
    hook = sys.excepthook
    monkeypatch.setattr(sys, "argv", ["x", "run", "--config_file", "/nonexistent.yaml", "--max_epoch", "1"])
    bundle_utils.command_line()
    assert sys.excepthook is hook
    assert bundle_cli.RUN_ARGUMENTS >= {"config_file", "meta_file", "logging_file", "run_id", "args_file", "tracking"}


def test_integer_options_take_yaml_null_as_the_command_line_spells_it():
    """An integer setting whose null means "off" (``lr_decay_start``: a constant lr) accepts ``null`` / ``None``
    from the command line; anything else that is not an integer is still refused."""
    from cmb_synthesis.bundle_cli import _integer_problem

    for value in (None, "null", "None", "NULL"):
        assert _integer_problem("lr_decay_start", 10, value) is None
    assert _integer_problem("lr_decay_start", 10, 12) is None
    assert _integer_problem("lr_decay_start", 10, "later") == "--lr_decay_start must be an integer (the default is 10), got 'later'"

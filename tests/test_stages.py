"""Content-addressed stage cache used by the augmentation study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmb_synthesis.study.stages import Stage, StageRunner, run_bundle


def _counting_stage(name, params, calls, depends=(), files=()):
    def run(folder: Path):
        calls.append(name)
        (folder / "out.txt").write_text(json.dumps(params))
        return {"value": params.get("x", 0) * 2}

    return Stage(name, params, run, depends=depends, files=files)


def test_stage_is_cached_and_rerun_only_when_inputs_change(tmp_path):
    calls: list[str] = []
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("a: 1\n")
    runner = StageRunner(tmp_path / "study", total=2, log=lambda s: None)
    a = _counting_stage("a", {"x": 1}, calls, files=[cfg])
    b = _counting_stage("b", {"x": 5}, calls, depends=[a])
    assert runner(a) == {"value": 2}
    assert runner(b) == {"value": 10}
    assert calls == ["a", "b"]

    # same content: both cached
    runner2 = StageRunner(tmp_path / "study", total=2, log=lambda s: None)
    runner2(_counting_stage("a", {"x": 1}, calls, files=[cfg]))
    runner2(_counting_stage("b", {"x": 5}, calls, depends=[_counting_stage("a", {"x": 1}, calls, files=[cfg])]))
    assert calls == ["a", "b"]

    # a config file changes: a and everything downstream rerun
    cfg.write_text("a: 2\n")
    a3 = _counting_stage("a", {"x": 1}, calls, files=[cfg])
    runner2(a3)
    runner2(_counting_stage("b", {"x": 5}, calls, depends=[a3]))
    assert calls == ["a", "b", "a", "b"]


def test_interrupted_stage_is_redone(tmp_path):
    calls: list[str] = []
    runner = StageRunner(tmp_path, log=lambda s: None)
    st = _counting_stage("s", {"x": 3}, calls)
    folder = runner.folder(st)
    folder.mkdir(parents=True)
    (folder / "partial.bin").write_bytes(b"half")  # no stage.json: an interrupted attempt
    assert runner(st) == {"value": 6}
    assert not (folder / "partial.bin").exists()
    assert calls == ["s"]


def test_failing_stage_leaves_no_done_marker(tmp_path):
    def boom(folder):
        raise RuntimeError("stage failed")

    runner = StageRunner(tmp_path, log=lambda s: None)
    st = Stage("bad", {}, boom)
    with pytest.raises(RuntimeError, match="stage failed"):
        runner(st)
    assert not runner.is_done(st)


def test_run_bundle_reports_the_failing_command(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("value: 1\ntraining: \"$int('not a number')\"\n")
    with pytest.raises(RuntimeError, match="bundle run 'training' failed"):
        run_bundle([cfg], "training", {"value": 2}, tmp_path / "log.txt")
    assert "monai.bundle" in (tmp_path / "log.txt").read_text()


def test_run_bundle_merges_config_files_in_order_and_passes_overrides(tmp_path):
    """The study's runs of a trained model: an overlay merged after the base config in a subprocess, with
    overrides of every type (list, dict, bool, None) reaching the run."""
    base, overlay, out = tmp_path / "train.yaml", tmp_path / "evaluate.yaml", tmp_path / "seen.json"
    base.write_text("imports: ['$import json']\nwidth: 8\nname: base\nflag: false\nextra: {}\nnothing: 1\n")
    overlay.write_text(
        "name: overlay\nevaluating:\n"
        "  - \"$open(@out, 'w').write(json.dumps({'width': @width, 'name': @name, 'flag': @flag, 'extra': @extra, "
        "'nothing': @nothing, 'sizes': @sizes}))\"\n"
    )
    run_bundle([base, overlay], "evaluating", {"out": str(out), "width": 4, "flag": True, "extra": {"a": [1, 2]},
                                               "nothing": None, "sizes": [24, 24, 16]}, tmp_path / "log.txt")
    assert json.loads(out.read_text()) == {"width": 4, "name": "overlay", "flag": True, "extra": {"a": [1, 2]},
                                           "nothing": None, "sizes": [24, 24, 16]}


def test_progress_lines_count_stages_and_give_elapsed_and_remaining_time(tmp_path):
    """Each stage logs [i/N] with the elapsed wall time and the remaining estimate; cached stages count too."""
    lines: list[str] = []
    calls: list[str] = []
    runner = StageRunner(tmp_path, total=3, log=lines.append)
    a, b = _counting_stage("a", {"x": 1}, calls), _counting_stage("b", {"x": 2}, calls)
    runner(a)
    runner(b)
    again = StageRunner(tmp_path, total=3, log=lines.append)
    again(a)
    again(_counting_stage("c", {"x": 3}, calls))
    assert lines[0].startswith("[1/3] a: running") and "elapsed" in lines[0] and "remaining unknown" in lines[0]
    assert lines[1].startswith("[1/3] a: done in") and "remaining ~" in lines[1]
    assert lines[3].startswith("[2/3] b: done in")
    assert lines[4] == f"[1/3] a: cached ({again.folder(a).name})"
    assert lines[5].startswith("[2/3] c: running") and lines[6].startswith("[2/3] c: done in")
    assert calls == ["a", "b", "c"]

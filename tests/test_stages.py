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


def test_a_resumable_stage_continues_its_interrupted_attempt(tmp_path):
    """A resumable stage (the study's training stages) is called again on the folder its killed attempt left:
    what that attempt wrote (a checkpoint) is still there; a finished record that lost its outputs starts again."""
    seen: list[list[str]] = []

    def train(folder: Path):
        seen.append(sorted(p.name for p in folder.iterdir()))
        if not (folder / "checkpoint_iteration=40.pt").exists():
            (folder / "checkpoint_iteration=40.pt").write_bytes(b"weights")
            raise RuntimeError("killed half-way")
        (folder / "model.pt").write_bytes(b"final")
        return {"resumed": True}

    runner = StageRunner(tmp_path, log=lambda s: None)
    st = Stage("train", {"x": 1}, train, outputs=["model.pt"], resumable=True)
    with pytest.raises(RuntimeError, match="killed"):
        runner(st)
    assert not runner.is_done(st)
    lines: list[str] = []
    assert StageRunner(tmp_path, log=lines.append)(st) == {"resumed": True}
    assert seen == [[], ["checkpoint_iteration=40.pt"]]
    assert any("resuming the interrupted attempt" in line for line in lines)

    (runner.folder(st) / "model.pt").unlink()  # a finished record whose output is gone: not resumed
    seen.clear()
    with pytest.raises(RuntimeError, match="killed"):  # started again from an empty folder
        StageRunner(tmp_path, log=lambda s: None)(st)
    assert seen == [[]]


def test_resume_override_needs_a_complete_checkpoint(tmp_path):
    """The study's training stages pass ``--resume true`` only when a complete interval checkpoint exists."""
    import torch

    from cmb_synthesis.study.runner import _resume_override

    models = tmp_path / "models"
    assert _resume_override(models) == {}
    models.mkdir()
    (models / "checkpoint_iteration=40.pt").write_bytes(b"truncated")  # killed while saving
    assert _resume_override(models) == {}
    torch.save({"G_HP": {}}, models / "checkpoint_iteration=20.pt")
    assert _resume_override(models) == {"resume": True}


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


def test_stages_run_on_demand_and_a_record_without_weights_resumes(tmp_path):
    """Asking for a finished stage visits nothing upstream; a stage whose declared outputs are gone (a record
    kept without its weights) is redone when something downstream needs it, and only then."""
    calls: list[str] = []

    def stage(name, depends=(), outputs=("out.txt",)):
        def run(folder: Path):
            calls.append(name)
            (folder / "out.txt").write_text(name)
            (folder / "weights.bin").write_bytes(b"w")
            return {"name": name}

        return Stage(name, {"n": name}, run, depends=depends, outputs=list(outputs))

    train = stage("train", outputs=("out.txt", "weights.bin"))
    evaluate = stage("evaluate", depends=[train])
    runner = StageRunner(tmp_path, log=lambda s: None)
    assert runner.plan([evaluate]) == (2, 2)
    assert runner(evaluate) == {"name": "evaluate"} and calls == ["train", "evaluate"]   # dependencies first

    (runner.folder(train) / "weights.bin").unlink()      # the committed record: weights not kept
    again = StageRunner(tmp_path, log=lambda s: None)
    assert not again.is_done(train) and again.is_done(evaluate)
    assert again.plan([evaluate]) == (1, 0)
    assert again(evaluate) == {"name": "evaluate"} and calls == ["train", "evaluate"]     # train not needed

    (runner.folder(evaluate) / "out.txt").unlink()       # now the evaluation is incomplete: both are redone
    lines: list[str] = []
    third = StageRunner(tmp_path, log=lines.append)
    assert third.plan([evaluate]) == (2, 2)
    third(evaluate)
    assert calls == ["train", "evaluate", "train", "evaluate"]
    assert any("lacks out.txt" in line for line in lines)


def test_a_stage_that_does_not_write_its_outputs_fails(tmp_path):
    runner = StageRunner(tmp_path, log=lambda s: None)
    st = Stage("lazy", {}, lambda folder: {}, outputs=["model.pt"])
    with pytest.raises(RuntimeError, match="without its outputs"):
        runner(st)
    assert not runner.is_done(st)


def test_runners_side_by_side_run_a_shared_stage_once(tmp_path):
    """Two threads (as the study's workers) asking for stages with a shared dependency: it runs once, the
    other runner waits on its lock and finds it finished."""
    import threading
    import time

    calls: list[str] = []
    gate = threading.Barrier(2)

    def shared_run(folder: Path):
        calls.append("shared")
        time.sleep(0.3)
        (folder / "out.txt").write_text("shared")
        return {}

    shared = Stage("shared", {}, shared_run, outputs=["out.txt"])
    tops = [_counting_stage(f"top{i}", {"x": i}, calls, depends=[shared]) for i in range(2)]
    runner = StageRunner(tmp_path, log=lambda s: None, parallel=2)

    def ask(st):
        gate.wait()
        runner(st)

    threads = [threading.Thread(target=ask, args=(t,)) for t in tops]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls.count("shared") == 1 and sorted(calls[1:]) == ["top0", "top1"]
    assert runner.done == 4 and runner.n_ran == 3


def test_expect_sets_the_total_and_the_eta_counts_each_kind_at_its_own_mean(tmp_path, monkeypatch):
    """``expect`` remembers the unfinished stages per kind: with one slow kind (10 s) and one quick kind (~0 s)
    run once each, two unfinished slow stages and one quick one leave ~20 s (one mean over all would say 15 s)."""
    clock = {"t": 0.0}
    monkeypatch.setattr("cmb_synthesis.study.stages.time.monotonic", lambda: clock["t"])

    def stage(name, x, seconds, depends=()):
        def run(folder: Path):
            clock["t"] += seconds
            return {}

        return Stage(name, {"x": x}, run, depends=depends)

    lines: list[str] = []
    runner = StageRunner(tmp_path, log=lines.append)
    quick = [stage("quick", i, 0.0) for i in range(2)]
    slow = [stage("slow", i, 10.0, depends=[quick[min(i, 1)]]) for i in range(3)]
    assert runner.expect(slow) == (5, 5) and runner.total == 5
    runner(slow[0])                      # runs quick 0 then slow 0
    assert lines[-1].startswith("[2/5] slow: done in") and lines[-1].endswith("remaining ~20s)"), lines[-1]
    runner(slow[1])                      # quick 1, then slow 1: one slow stage left
    assert lines[-1].endswith("remaining ~10s)"), lines[-1]

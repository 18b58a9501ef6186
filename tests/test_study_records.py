"""scripts/study_records.py: a study's evaluations packed for git and unpacked byte for byte."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("study_records", REPO / "scripts" / "study_records.py")
study_records = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study_records)


def _evaluation(folder: Path, probs: np.ndarray) -> None:
    """An evaluation stage as the detection bundle writes it: candidates.csv (csv module, float32 probabilities
    written as Python floats), metrics.json with a full-resolution step curve, stage.json."""
    folder.mkdir(parents=True)
    with open(folder / "candidates.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=study_records.COORDS + ["probability"])
        w.writeheader()
        for n, p in enumerate(probs):
            w.writerow({"image": f"sub-{n % 3:03d}_swi.nii.gz", "i": n, "j": 2 * n, "k": 3, "x": -1.5 * n, "y": 0.25,
                        "z": 34.5, "probability": float(p)})
    order = np.argsort(-probs)
    sens = np.minimum(np.arange(len(probs)) // 3, 5) / 5.0
    curve = {"fp_per_scan": (np.arange(len(probs)) / 3.0).tolist(), "sensitivity": sens.tolist(),
             "threshold": probs[order].astype(float).tolist()}
    (folder / "metrics.json").write_text(json.dumps({"sensitivity_at_fp": {"10": 0.8}, "curve": curve}))
    (folder / "stage.json").write_text(json.dumps({"name": "evaluate-real", "result": {}}))


def test_pack_then_unpack_gives_back_the_candidates_byte_for_byte_and_the_same_step_curve(tmp_path):
    rng = np.random.default_rng(0)
    study = tmp_path / "study"
    a, b = study / "stages" / "evaluate-real-aaa", study / "stages" / "evaluate-real+cDA-bbb"
    _evaluation(a, rng.random(40).astype(np.float32))
    _evaluation(b, rng.random(40).astype(np.float32))
    originals = {d: ((d / "candidates.csv").read_bytes(), json.loads((d / "metrics.json").read_text())) for d in (a, b)}

    (a / "stage.json").write_text(json.dumps({"name": "evaluate-real", "result": {
        "metrics": str(a / "metrics.json"), "elsewhere": "/opt/other/file.json"}}))
    assert study_records.pack(study, root=tmp_path) == 2
    record = json.loads((a / "stage.json").read_text())["result"]
    assert record == {"metrics": "study/stages/evaluate-real-aaa/metrics.json", "elsewhere": "/opt/other/file.json"}
    assert len(list((study / "packed").glob("candidates-*.csv.gz"))) == 1   # one table shared by both detectors
    for d in (a, b):
        (d / "candidates.csv").unlink()
        (d / "metrics.json").unlink()
    assert study_records.unpack(study) == 2
    for d, (cand, metrics) in originals.items():
        assert (d / "candidates.csv").read_bytes() == cand
        again = json.loads((d / "metrics.json").read_text())
        assert again["sensitivity_at_fp"] == metrics["sensitivity_at_fp"]
        full, kept = metrics["curve"], again["curve"]
        assert len(kept["fp_per_scan"]) < len(full["fp_per_scan"])
        # the same step curve: at every full-resolution FP rate, the last kept point gives the same sensitivity
        idx = np.searchsorted(kept["fp_per_scan"], full["fp_per_scan"], side="right") - 1
        assert np.array(kept["sensitivity"])[idx].tolist() == full["sensitivity"]


def test_pack_refuses_probabilities_it_cannot_restore_exactly(tmp_path):
    import pytest

    folder = tmp_path / "study" / "stages" / "evaluate-real-ccc"
    _evaluation(folder, np.array([0.5, 0.25], dtype=np.float32))
    text = (folder / "candidates.csv").read_text().replace("0.25", "0.1")   # 0.1 is no float32 value
    (folder / "candidates.csv").write_text(text)
    with pytest.raises(ValueError, match="cannot be packed losslessly"):
        study_records.pack(tmp_path / "study")

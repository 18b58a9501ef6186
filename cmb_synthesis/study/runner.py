"""The augmentation study (the paper's Table 1 and Figure 3), end to end, as resumable cached stages.

For each repeat (seed): pick the real training scans (all, or ``n_real_pathological`` pathological ones for the
low-data regime) -> train the synthesis bundle on them (or reuse ``synthesis_ckpt_dir``) -> paint CMBs on the
healthy training scans with sampled masks until there is one synthetic scan per real pathological scan (1:1)
-> train the detector six ways (real / synthetic / real+synthetic, each without and with cDA; same seed,
budget and validation-based model selection) -> evaluate all six on the same test split -> ``results.json``,
``results.md`` (Table 1 layout, paper's numbers beside ours), ``froc.png`` (Figure 3: without / with cDA, 95 %
CI bands) and the paired-bootstrap difference real+synthetic minus real at 10 FP/scan.

Every stage runs a bundle (``python -m monai.bundle run ...``) with overrides, in a folder named by a hash of
its inputs (:mod:`cmb_synthesis.study.stages`): rerunning after a change redoes only what changed, and an
interrupted study resumes at the first unfinished stage. Runs of a trained model (synthesis inference, detector
evaluation) merge their overlay over the training run's config files, model-zoo style
(``['configs/train.yaml', 'configs/paper.yaml', 'configs/inference.yaml']`` for the paper preset), and get the
training run's overrides, so they build the network that was trained. Entry point:
``bundles/cmb_detection/configs/study.yaml`` (run key ``study``) or :func:`run_study`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.bundle import run as bundle_run

from cmb_synthesis.evaluation.froc import paired_bootstrap_difference
from cmb_synthesis.evaluation.hits import ScanResult
from cmb_synthesis.evaluation.report import plot_froc_panels, scan_results_from_csv
from cmb_synthesis.data.datalist import load_split, read_datalist
from cmb_synthesis.data.io import atomic_output, write_json
from cmb_synthesis.study.stages import Stage, StageRunner, bundle_kwargs, run_bundle

__all__ = ["ARMS", "PAPER_TABLE1", "SYNTHESIS_INFERENCE_OVERLAY", "DETECTION_EVALUATION_OVERLAY", "run_study",
           "run_configs", "subset_datalist", "scan_results", "results_markdown"]

# (training_data, cda) in the paper's Table 1 order
ARMS: tuple[tuple[str, bool], ...] = (
    ("real", False), ("synthetic", False), ("real+synthetic", False),
    ("real", True), ("synthetic", True), ("real+synthetic", True),
)
# Faryna et al., Table 1 (sensitivity at 10 FP/patient) and the text (FP/patient at 90 % sensitivity)
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "real": {"sensitivity_at_10": 0.778, "fp_at_90": 27.3},
    "synthetic": {"sensitivity_at_10": 0.718, "fp_at_90": 31.4},
    "real+synthetic": {"sensitivity_at_10": 0.789, "fp_at_90": 23.7},
    "real+cDA": {"sensitivity_at_10": 0.805, "fp_at_90": 17.9},
    "synthetic+cDA": {"sensitivity_at_10": 0.801, "fp_at_90": 27.4},
    "real+synthetic+cDA": {"sensitivity_at_10": 0.824, "fp_at_90": 15.5},
}
# the overlays merged over a bundle's training configs for the runs of a trained model
SYNTHESIS_INFERENCE_OVERLAY = "configs/inference.yaml"
DETECTION_EVALUATION_OVERLAY = "configs/evaluate.yaml"


def arm_name(training_data: str, cda: bool) -> str:
    return training_data + ("+cDA" if cda else "")


def run_configs(train_configs: Sequence[str], overlay: str, configs: Sequence[str] | None = None) -> list[str]:
    """The config files of a run of a trained model (inference, evaluation): the training run's files, then the
    run's overlay, e.g. ``['configs/train.yaml', 'configs/paper.yaml', 'configs/inference.yaml']``.

    Args:
        train_configs: the config files the model was trained with (bundle-relative or absolute).
        overlay: the run's overlay (e.g. ``configs/inference.yaml``), merged last; used when ``configs`` is None.
        configs: an explicit list instead of ``[*train_configs, overlay]``; it must start with
            ``train_configs`` (same order), else the run would build another network than the one trained.

    Raises:
        ValueError: ``configs`` does not start with ``train_configs``.
    """
    train = [str(c) for c in train_configs]
    if configs is None:
        return [*train, str(overlay)]
    files = [str(c) for c in configs]
    if files[: len(train)] != train:
        raise ValueError(f"the configs of a run of a trained model must start with its training configs {train} "
                         f"(the network and its settings are defined there), got {files}")
    return files


def subset_datalist(datalist: str | os.PathLike, out: str | os.PathLike, n_real_pathological: int | None,
                    seed: int) -> dict[str, int]:
    """Write a datalist (absolute paths) keeping ``n_real_pathological`` pathological training scans.

    The scans kept are drawn with ``seed``; healthy training scans, validation and test are kept whole.
    ``None`` keeps every scan. Returns the counts.
    """
    src = Path(datalist)
    data = {k: v for k, v in read_datalist(src).items() if not isinstance(v, list)}
    for split in ("training", "validation", "test"):
        data[split] = load_split(src, split, missing_ok=True)
    path = [it for it in data["training"] if it.get("group") == "pathological"]
    healthy = [it for it in data["training"] if it.get("group") != "pathological"]
    if n_real_pathological is not None:
        k = int(n_real_pathological)
        if not 1 <= k <= len(path):
            raise ValueError(f"n_real_pathological must be in [1, {len(path)}] for {src}, got {k}")
        keep = sorted(np.random.default_rng(seed).choice(len(path), k, replace=False))
        path = [path[i] for i in keep]
    if not healthy:
        raise ValueError(f"{src}: the training split has no healthy scans to synthesise CMBs on")
    data["training"] = path + healthy
    write_json(data, out)
    return {"n_real_pathological": len(path), "n_healthy": len(healthy),
            "n_validation": len(data["validation"]), "n_test": len(data["test"])}


def scan_results(candidates_csv: str | os.PathLike, datalist: str | os.PathLike, split: str = "test") -> list[ScanResult]:
    """Per-scan matched candidates of a ``candidates.csv`` (for paired comparisons between models)."""
    return scan_results_from_csv(candidates_csv, datalist, split)


def _summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    fp90 = metrics["fp_per_scan_at_sensitivity_90"]
    return {
        "sensitivity_at_10": metrics["sensitivity_at_fp"].get("10"),
        "sensitivity_at_10_ci95": metrics["sensitivity_at_fp_ci95"].get("10"),
        "fp_at_90": fp90.get("value") if isinstance(fp90, Mapping) else fp90,
        "fp_at_90_ci95": fp90.get("ci95") if isinstance(fp90, Mapping) else None,
        "cpm": metrics.get("cpm"),
        "n_scans": metrics["n_scans"],
        "n_lesions": metrics["n_lesions"],
    }


def _fmt_ci(v: float | None, ci: Sequence[float | None] | None, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "not reached"
    scale, unit = (100.0, "") if pct else (1.0, "")
    s = f"{v * scale:.1f}{unit}"
    if ci and ci[0] is not None and ci[1] is not None:
        hi = "inf" if not math.isfinite(ci[1]) else f"{ci[1] * scale:.1f}"
        s += f" [{ci[0] * scale:.1f}, {hi}]"
    elif ci and ci[0] is not None:
        s += f" [{ci[0] * scale:.1f}, not reached]"
    return s


def results_markdown(results: Mapping[str, Any]) -> str:
    """The study's Markdown tables (Table 1 layout for the first repeat, paired differences per repeat, the
    spread over repeats) from a ``results.json`` dict."""
    reps = results["repeats"]
    lines = [
        "| Training data | cDA | Sensitivity at 10 FP/scan, % [95 % CI] | FP/scan at 90 % sensitivity [95 % CI] | CPM "
        "| Paper: sensitivity at 10 FP, % | Paper: FP at 90 % |",
        "|---|---|---|---|---|---|---|",
    ]
    first = reps[0]["arms"]
    for td, cda in ARMS:
        name = arm_name(td, cda)
        if name not in first:
            continue
        s = first[name]
        paper = PAPER_TABLE1.get(name, {})
        cpm = f"{s['cpm']:.3f}" if s.get("cpm") is not None else "-"
        lines.append(
            f"| {td} | {'yes' if cda else 'no'} | {_fmt_ci(s['sensitivity_at_10'], s['sensitivity_at_10_ci95'])} | "
            f"{_fmt_ci(s['fp_at_90'], s['fp_at_90_ci95'], pct=False)} | {cpm} | "
            f"{paper.get('sensitivity_at_10', float('nan')) * 100:.1f} | {paper.get('fp_at_90', float('nan')):.1f} |"
        )
    lines.append("")
    lines.append("Paired bootstrap over test scans (same resampled scans for both models), sensitivity at 10 FP/scan:")
    lines.append("")
    lines.append("| Comparison | Seed | Difference, percentage points [95 % CI] |")
    lines.append("|---|---|---|")
    for key in reps[0]["differences"]:
        for r in reps:
            d = r["differences"][key]
            lines.append(f"| {key} | {r['seed']} | {_fmt_ci(d['difference'], d['ci95'])} |")
    if len(reps) > 1:
        lines.append("")
        lines.append(f"Spread over {len(reps)} repeats (seeds {[r['seed'] for r in reps]}), sensitivity at 10 FP/scan:")
        lines.append("")
        lines.append("| Arm | mean | std | min | max |")
        lines.append("|---|---|---|---|---|")
        for name, sp in results["spread"].items():
            lines.append(f"| {name} | {sp['mean'] * 100:.1f} | {sp['std'] * 100:.1f} | {sp['min'] * 100:.1f} | {sp['max'] * 100:.1f} |")
    return "\n".join(lines) + "\n"


def run_study(
    output_dir: str | os.PathLike,
    datalist: str | os.PathLike,
    synthesis_bundle: str | os.PathLike,
    detection_bundle: str | os.PathLike,
    synthesis_train_configs: Sequence[str] = ("configs/train.yaml",),
    synthesis_inference_configs: Sequence[str] | None = None,
    detection_train_configs: Sequence[str] = ("configs/train.yaml",),
    detection_eval_configs: Sequence[str] | None = None,
    synthesis_overrides: Mapping[str, Any] | None = None,
    detection_overrides: Mapping[str, Any] | None = None,
    synthesis_ckpt_dir: str | os.PathLike | None = None,
    n_real_pathological: int | None = None,
    synthetic_per_real: float = 1.0,
    repeats: int = 1,
    seed: int = 0,
    n_bootstrap: int = 1000,
    arms: Sequence[Sequence[Any]] = ARMS,
    in_process: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the study; returns the content of ``results.json``.

    Args:
        output_dir: study folder (``stages/``, ``results.json``, ``results.md``, ``froc.png``).
        datalist: the cohort's ``datalist.json`` (decathlon: training with healthy + pathological scans,
            validation, test).
        synthesis_bundle, detection_bundle: bundle folders; the ``*_configs`` are relative to them.
        synthesis_train_configs, detection_train_configs: config files of the training runs, e.g.
            ``['configs/train.yaml', 'configs/paper.yaml']`` for a bundle's paper preset.
        synthesis_inference_configs, detection_eval_configs: config files of the synthesis inference and
            detector evaluation runs; ``None``: the training configs then ``configs/inference.yaml`` /
            ``configs/evaluate.yaml`` (overlays over them). An explicit list must start with the training
            configs (:func:`run_configs`).
        synthesis_overrides / detection_overrides: command-line overrides for every run of that bundle (e.g. the
            CPU or tiny preset's budgets), given to training and to the runs of the trained model alike.
        synthesis_ckpt_dir: a folder with trained ``G_HP.pt`` (+ ``lesion_bank.npz``): skip synthesis training.
        n_real_pathological: keep only this many real pathological training scans (low-data regime).
        synthetic_per_real: synthetic scans per real pathological scan (1.0 = the paper's 1:1).
        repeats, seed: repeats use seeds ``seed, seed + 1, ...`` for data subset, training and sampling.
        n_bootstrap: bootstrap resamples for every CI (percentile intervals, seed = the repeat's seed).
        arms: ``(training_data, cda)`` pairs; default the paper's six.
        in_process: run bundles in this process (faster start, used by the tests) instead of subprocesses.
    """
    out = Path(output_dir).resolve()  # stage datalists hold absolute paths (a relative one would resolve twice)
    out.mkdir(parents=True, exist_ok=True)
    syn_b, det_b = Path(synthesis_bundle).resolve(), Path(detection_bundle).resolve()
    syn_inf = [str(syn_b / c) for c in run_configs(synthesis_train_configs, SYNTHESIS_INFERENCE_OVERLAY,
                                                     synthesis_inference_configs)]
    det_eval = [str(det_b / c) for c in run_configs(detection_train_configs, DETECTION_EVALUATION_OVERLAY,
                                                     detection_eval_configs)]
    syn_train = [str(syn_b / c) for c in synthesis_train_configs]
    det_train = [str(det_b / c) for c in detection_train_configs]
    syn_over = dict(synthesis_overrides or {})
    det_over = dict(detection_overrides or {})
    arms = [(str(a[0]), bool(a[1]) if not isinstance(a[1], str) else a[1].lower() == "true") for a in arms]
    datalist = Path(datalist).resolve()
    code = [Path(__file__).resolve().parent]            # the package's code enters every stage key
    per_repeat = 1 + (0 if synthesis_ckpt_dir else 1) + 1 + 2 * len(arms)
    runner = StageRunner(out, total=per_repeat * int(repeats))
    cache_dir = out / "cache" / "candidates"
    launch = _launcher(in_process)

    results: dict[str, Any] = {"datalist": str(datalist), "n_real_pathological": n_real_pathological,
                               "synthetic_per_real": synthetic_per_real, "n_bootstrap": n_bootstrap, "repeats": []}
    for r in range(int(repeats)):
        rseed = int(seed) + r

        def make_subset(folder: Path, rseed=rseed) -> dict[str, Any]:
            return subset_datalist(datalist, folder / "datalist.json", n_real_pathological, rseed)

        st_data = Stage("datalist", {"n_real_pathological": n_real_pathological, "seed": rseed},
                        make_subset, files=[datalist])
        counts = runner(st_data)
        sub_list = runner.folder(st_data) / "datalist.json"

        if synthesis_ckpt_dir:
            syn_models = Path(synthesis_ckpt_dir).resolve()
            syn_key_stage: Sequence[Stage] = [st_data]
            syn_files = [syn_models]
        else:
            def train_synthesis(folder: Path, rseed=rseed) -> dict[str, Any]:
                launch(syn_train, "training", {
                    **syn_over, "bundle_root": str(syn_b), "datalist": str(sub_list), "ckpt_dir": str(folder / "models"),
                    "log_dir": str(folder / "runs"), "seed": rseed}, folder / "log.txt")
                return {"models": str(folder / "models")}

            st_syn = Stage("synthesis-train", {"seed": rseed, "overrides": syn_over}, train_synthesis,
                           depends=[st_data], files=[*syn_train, *code])
            syn_models = Path(runner(st_syn)["models"])
            syn_key_stage, syn_files = [st_syn], []

        n_needed = max(1, int(round(synthetic_per_real * counts["n_real_pathological"])))

        def synthesise(folder: Path, rseed=rseed, syn_models=syn_models, n_needed=n_needed) -> dict[str, Any]:
            healthy = [it for it in json.loads(sub_list.read_text())["training"] if it.get("group") != "pathological"]
            src = folder / "healthy_datalist.json"
            write_json({"training": healthy}, src)
            rounds = math.ceil(n_needed / len(healthy))
            items = []
            for q in range(rounds):
                rd = folder / f"round{q}"
                # the training run's overrides (network size, ...) on top of the same training configs
                launch(syn_inf, "inference", {
                    **syn_over, "bundle_root": str(syn_b), "dataset_dir": str(src), "output_dir": str(rd),
                    "ckpt_dir": str(syn_models), "lesion_bank_path": str(syn_models / "lesion_bank.npz"),
                    "seed": rseed * 1000 + q}, folder / f"log_round{q}.txt")
                for it in healthy:
                    if len(items) == n_needed:
                        break
                    sid = it["id"]
                    items.append({"image": str(rd / f"{sid}_synthetic.nii.gz"),
                                  "label": str(rd / f"{sid}_synthetic_cmb.nii.gz"),
                                  "brainmask": it["brainmask"], "tissue": it.get("tissue"),
                                  "group": "pathological", "id": f"{sid}_syn{q}", "source": it["image"]})
            for it in items:
                for k in ("image", "label"):
                    if not Path(it[k]).is_file():
                        raise FileNotFoundError(f"synthesis did not write {it[k]}")
            write_json({"name": "synthetic pathological scans", "training": items}, folder / "datalist.json")
            return {"synthetic_dir": str(folder), "n_synthetic": len(items)}

        st_synth = Stage("synthesise", {"seed": rseed, "n_needed": n_needed, "overrides": syn_over},
                         synthesise, depends=[st_data, *syn_key_stage], files=[*syn_inf, *syn_files, *code])
        synthetic_dir = runner(st_synth)["synthetic_dir"]

        arm_metrics: dict[str, Any] = {}
        arm_results: dict[str, list[ScanResult]] = {}
        for td, cda in arms:
            name = arm_name(td, cda)

            def train_detector(folder: Path, td=td, cda=cda, rseed=rseed) -> dict[str, Any]:
                launch(det_train, "training", {
                    **det_over, "bundle_root": str(det_b), "datalist": str(sub_list), "training_data": td,
                    "cda": cda, "synthetic_dir": synthetic_dir, "ckpt_dir": str(folder / "models"),
                    "log_dir": str(folder / "runs"), "cache_dir": str(cache_dir), "seed": rseed},
                    folder / "log.txt")
                return {"model": str(folder / "models" / "model.pt")}

            uses_synth = td != "real"
            st_tr = Stage(f"detector-{name}", {"training_data": td, "cda": cda, "seed": rseed, "overrides": det_over},
                          train_detector, depends=[st_data] + ([st_synth] if uses_synth else []),
                          files=[*det_train, *code])
            model = runner(st_tr)["model"]

            def evaluate_detector(folder: Path, model=model, td=td, cda=cda, rseed=rseed) -> dict[str, Any]:
                launch(det_eval, "evaluating", {
                    **det_over, "bundle_root": str(det_b), "datalist": str(sub_list), "model_path": model,
                    "output_dir": str(folder), "cache_dir": str(cache_dir), "n_bootstrap": n_bootstrap,
                    "seed": rseed, "training_data": td, "cda": cda}, folder / "log.txt")
                return {"metrics": str(folder / "metrics.json"), "candidates": str(folder / "candidates.csv")}

            st_ev = Stage(f"evaluate-{name}", {"seed": rseed, "n_bootstrap": n_bootstrap, "overrides": det_over},
                          evaluate_detector, depends=[st_tr], files=[*det_eval, *code])
            ev = runner(st_ev)
            metrics = json.loads(Path(ev["metrics"]).read_text())
            arm_metrics[name] = metrics
            arm_results[name] = scan_results(ev["candidates"], sub_list, "test")

        differences = {}
        for cda in (False, True):
            a, b = arm_name("real+synthetic", cda), arm_name("real", cda)
            if a in arm_results and b in arm_results:
                differences[f"{a} minus {b}"] = paired_bootstrap_difference(
                    arm_results[a], arm_results[b], fp_rate=10, n_bootstrap=n_bootstrap, seed=rseed)
        results["repeats"].append({
            "seed": rseed, "counts": counts, "n_synthetic": runner.result(st_synth)["n_synthetic"],
            "arms": {k: _summary(m) for k, m in arm_metrics.items()},
            "differences": differences,
            "stages": {"datalist": runner.folder(st_data).name, "synthesise": runner.folder(st_synth).name},
        })
        if r == 0:
            panels = [{arm_name(td, c): arm_metrics[arm_name(td, c)] for td, c in arms if c is cda and arm_name(td, c) in arm_metrics}
                      for cda in (False, True)]
            panels = [p for p in panels if p]
            plot_froc_panels(panels, out / "froc.png",
                                  title=["(a) without cDA", "(b) with cDA"][: len(panels)] if len(panels) == 2 else None)
    spread = {}
    for name in results["repeats"][0]["arms"]:
        vals = [rep["arms"][name]["sensitivity_at_10"] for rep in results["repeats"]]
        vals = np.array([v for v in vals if v is not None], dtype=float)
        if len(vals):
            spread[name] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                            "min": float(vals.min()), "max": float(vals.max())}
    results["spread"] = spread
    results["paper"] = PAPER_TABLE1
    write_json(results, out / "results.json")
    with atomic_output(out / "results.md") as tmp:
        tmp.write_text(results_markdown(results))
    print(f"study finished: {out / 'results.json'}, {out / 'results.md'}, {out / 'froc.png'}", flush=True)
    return results


Launcher = Callable[[Sequence[str], str, Mapping[str, Any], Path], None]


def _launcher(in_process: bool) -> Launcher:
    """``launch(config_files, run_id, overrides, log_file)``: a bundle run in a subprocess or in this process."""
    if not in_process:
        return run_bundle

    def launch(config_files: Sequence[str], run_id: str, overrides: Mapping[str, Any], log_file: Path) -> None:
        Path(log_file).write_text(f"in-process: {run_id} {list(config_files)} {json.dumps(overrides, default=str)}\n")
        files = [str(Path(f).resolve()) for f in config_files]
        handler = logging.FileHandler(log_file)
        logging.getLogger().addHandler(handler)
        try:
            bundle_run(run_id=run_id, config_file=files if len(files) > 1 else files[0], **bundle_kwargs(overrides))
        except Exception as e:
            raise RuntimeError(f"bundle run '{run_id}' ({files}) failed: {e}") from e
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()

    return launch

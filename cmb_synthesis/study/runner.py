"""The augmentation study as a learning curve (the paper's Table 1 and Figure 3, issue 12), end to end, as
resumable cached stages.

Strict low-data protocol (:mod:`cmb_synthesis.study.protocol`): for each seed and each K of ``k_values``
(default 2, 4, 8 and all real pathological training scans; subsets nested across K, deterministic in the seed)
-> a datalist with those K pathological + every healthy training scan -> train the synthesis bundle on exactly
that datalist (its recorded training ids are in the stage's ``stage.json`` and ``datalist.json``; reusing
``synthesis_ckpt_dir`` instead breaks the protocol and is recorded so) -> paint CMBs on the healthy training
scans with sampled masks until there is one synthetic scan per real pathological scan (1:1) -> train the
detector per arm (real / synthetic / real+synthetic, each without and with cDA; same seed, budget and
validation-based model selection) -> evaluate every arm on the same test split.

Statistics: per K, arm and seed the FROC metrics of :func:`cmb_synthesis.evaluation.froc.evaluate`
(sensitivity at 1/2/4/8/10 FP/scan with 95 % CI, FP/scan at 90 % sensitivity, CPM); per K and arm the mean
over seeds with a scan bootstrap shared by all seeds; per K the pooled paired bootstrap real+synthetic minus
real (same cDA setting) over test scans and seeds (:mod:`cmb_synthesis.evaluation.pooled`), with the per-seed
paired differences. Outputs in ``output_dir``: ``results.json``, ``results.md``, ``table1.md`` (K = all),
``learning_curve.png``, ``froc.png`` (Figure 3 for K = all, first seed) (:mod:`cmb_synthesis.study.report`).

Every stage runs a bundle (``python -m monai.bundle run ...``) with overrides, in a folder named by a hash of
its inputs (:mod:`cmb_synthesis.study.stages`): rerunning after a change redoes only what changed, and an
interrupted study resumes at the first unfinished stage; progress lines give i/N stages with elapsed and
remaining time. Runs of a trained model (synthesis inference, detector evaluation) merge their overlay over
the training run's config files, model-zoo style (``['configs/train.yaml', 'configs/paper.yaml',
'configs/inference.yaml']`` for the paper preset), and get the training run's overrides, so they build the
network that was trained. Entry point: ``bundles/cmb_detection/configs/study.yaml`` (run key ``study``) or
:func:`run_study`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from monai.bundle import run as bundle_run

from cmb_synthesis.data.io import atomic_output, write_json
from cmb_synthesis.evaluation.hits import ScanResult
from cmb_synthesis.evaluation.pooled import pooled_bootstrap, pooled_paired_bootstrap_difference
from cmb_synthesis.evaluation.report import plot_froc_panels, scan_results_from_csv
from cmb_synthesis.study.protocol import (k_label, nested_subsets, pathological_ids, resolve_k_values,
                                          subset_datalist, training_ids)
from cmb_synthesis.study.report import (ARMS, PAPER_TABLE1, arm_name, plot_learning_curve, results_markdown,
                                        table1_markdown)
from cmb_synthesis.study.stages import Stage, StageRunner, bundle_kwargs, run_bundle
from cmb_synthesis.training.resume import latest_checkpoint
from transforms.threads import usable_cpus

__all__ = ["ARMS", "PAPER_TABLE1", "DEFAULT_K_VALUES", "SYNTHESIS_INFERENCE_OVERLAY", "DETECTION_EVALUATION_OVERLAY",
           "run_study", "run_configs", "subset_datalist", "scan_results", "results_markdown", "arm_name"]

DEFAULT_K_VALUES: tuple[int | None, ...] = (2, 4, 8, None)
# the overlays merged over a bundle's training configs for the runs of a trained model
SYNTHESIS_INFERENCE_OVERLAY = "configs/inference.yaml"
DETECTION_EVALUATION_OVERLAY = "configs/evaluate.yaml"


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


def scan_results(candidates_csv: str | os.PathLike, datalist: str | os.PathLike, split: str = "test") -> list[ScanResult]:
    """Per-scan matched candidates of a ``candidates.csv`` (for paired comparisons between models)."""
    return scan_results_from_csv(candidates_csv, datalist, split)




def _summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The per-(K, arm, seed) numbers of an evaluation's ``metrics.json`` (fractions; FP/scan as they are)."""
    fp90 = metrics["fp_per_scan_at_sensitivity_90"]
    return {
        "sensitivity_at_fp": {r: metrics["sensitivity_at_fp"][r] for r in ("1", "2", "4", "8", "10")
                              if r in metrics["sensitivity_at_fp"]},
        "sensitivity_at_fp_ci95": {r: metrics["sensitivity_at_fp_ci95"][r] for r in ("1", "2", "4", "8", "10")
                                   if r in metrics["sensitivity_at_fp_ci95"]},
        "sensitivity_at_10": metrics["sensitivity_at_fp"].get("10"),
        "sensitivity_at_10_ci95": metrics["sensitivity_at_fp_ci95"].get("10"),
        "fp_at_90": fp90.get("value") if isinstance(fp90, Mapping) else fp90,
        "fp_at_90_ci95": fp90.get("ci95") if isinstance(fp90, Mapping) else None,
        "cpm": metrics.get("cpm"),
        "cpm_ci95": metrics.get("cpm_ci95"),
        "n_scans": metrics["n_scans"],
        "n_lesions": metrics["n_lesions"],
    }


def _versions() -> dict[str, Any]:
    """Software versions and the repository commit (``None`` outside a git checkout) for ``results.json``."""
    from importlib import metadata

    import monai
    import numpy
    import torch

    try:
        package = metadata.version("cmb-synthesis")
    except metadata.PackageNotFoundError:
        package = None
    commit = None
    git = shutil.which("git")
    if git:
        try:
            commit = subprocess.run([git, "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                                    capture_output=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
            "numpy": numpy.__version__, "cmb_synthesis": package, "commit": commit}


def _parse_arms(arms: Sequence[Sequence[Any]]) -> list[tuple[str, bool]]:
    out = []
    for a in arms:
        td, cda = str(a[0]), a[1]
        if td not in ("real", "synthetic", "real+synthetic"):
            raise ValueError(f"arms: unknown training data {td!r} (real, synthetic, real+synthetic)")
        out.append((td, cda.strip().lower() == "true" if isinstance(cda, str) else bool(cda)))
    return out


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
    k_values: Sequence[int | str | None] = DEFAULT_K_VALUES,
    n_real_pathological: int | None = None,
    synthetic_per_real: float = 1.0,
    repeats: int = 3,
    seed: int = 0,
    n_bootstrap: int = 1000,
    arms: Sequence[Sequence[Any]] = ARMS,
    in_process: bool = False,
    preset: str = "cpu",
    quick: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    """Run (or resume) the learning-curve study; returns the content of ``results.json``.

    Args:
        output_dir: study folder (``stages/``, ``cache/``, ``results.json``, ``results.md``, ``table1.md``,
            ``learning_curve.png``, ``froc.png``).
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
            budgets), given to training and to the runs of the trained model alike; the same for every K and arm.
        synthesis_ckpt_dir: a folder with trained ``G_HP.pt`` (+ ``lesion_bank.npz``) used for every K instead of
            training the synthesis model on each K's scans. This BREAKS the strict low-data protocol (the
            synthetic arms then carry lesions of scans the detectors never saw); ``results.json`` records
            ``protocol.strict = false``.
        k_values: the learning curve's numbers of real pathological training scans; ``None`` (or ``"all"``)
            = every one. Subsets are nested across K for a seed.
        n_real_pathological: a single K (the older option; the same as ``k_values=[K]``), ``None``: use ``k_values``.
        synthetic_per_real: synthetic scans per real pathological scan (1.0 = the paper's 1:1).
        repeats, seed: repeats use seeds ``seed, seed + 1, ...`` for the data subsets, training and sampling.
        n_bootstrap: bootstrap resamples for every CI (percentile intervals; per-seed CIs use the seed, the
            pooled ones ``seed``).
        arms: ``(training_data, cda)`` pairs; default the paper's six.
        in_process: run bundles in this process (faster start, used by the tests) instead of subprocesses.
        preset, quick: recorded in ``results.json`` (the budgets they select are set by ``study.yaml``).
        workers: (K, seed) runs trained side by side (threads launching subprocesses, each with
            ``OMP_NUM_THREADS`` = cores / workers); the results do not depend on it. 1: one at a time.

    Stages run on demand (:class:`~cmb_synthesis.study.stages.StageRunner`): an evaluation found finished
    needs neither its detector's nor the synthesis model's weights, so the study's small files (``stage.json``,
    ``metrics.json``, ``candidates.csv``, datalists) without any weights resume it, e.g. a committed
    ``--output_dir`` under ``docs/results/study/``. Stage keys hold what a stage computes from (parameters, the
    bytes of the config files and of this package's study code), not paths: another checkout of the same commit
    finds every finished stage, while a commit that edits a bundle's training config or the study code runs
    them again. The datalists the stages wrote name the cohort's scans by absolute path, so the cohort must
    lie where it was (it is deterministic: regenerate it there).

    Raises:
        ValueError: K values out of range for the cohort, unknown arms, fewer than one repeat, ``workers > 1``
            with ``in_process``.
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
    arms = _parse_arms(arms)
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    datalist = Path(datalist).resolve()
    all_ids = pathological_ids(datalist)
    if not all_ids:
        raise ValueError(f"{datalist}: the training split has no pathological scans")
    ks = resolve_k_values([n_real_pathological] if n_real_pathological is not None else list(k_values),
                          len(all_ids), datalist)
    seeds = [int(seed) + r for r in range(int(repeats))]
    strict = not synthesis_ckpt_dir
    needs_synthesis = any(td != "real" for td, _ in arms)
    # the code that decides what a stage computes enters every stage key (the protocol's subsets, the stage
    # machinery and this runner's stage functions); report.py only renders results, so editing it redoes nothing
    here = Path(__file__).resolve().parent
    code = [here / "protocol.py", here / "stages.py", here / "runner.py"]
    cache_dir = out / "cache" / "candidates"
    workers = max(1, int(workers))
    if workers > 1 and in_process:
        raise ValueError("workers > 1 runs stages side by side in subprocesses: it needs in_process = false")
    # runs side by side share the cores: one OMP thread each per available core share (never oversubscribed)
    threads = max(1, usable_cpus() // workers) if workers > 1 else None
    launch = _launcher(in_process, threads)

    # 1. every (seed, K) run's stages, keyed by their inputs before anything runs; the datalists first (cheap,
    #    and the K = all one is shared by every seed)
    blocks: list[dict[str, Any]] = []
    for rseed in seeds:
        subsets = nested_subsets(all_ids, ks, rseed)
        for k in ks:
            keep = subsets[k_label(k)]

            def make_subset(folder: Path, keep=keep) -> dict[str, Any]:
                return subset_datalist(datalist, folder / "datalist.json", keep_ids=keep)

            # keyed by the scans kept: the K = all datalist is shared by every seed
            st_data = Stage("datalist", {"pathological_ids": keep}, make_subset, files=[datalist],
                            outputs=["datalist.json"])
            blocks.append({"seed": rseed, "k": k, "st_data": st_data})
    runner = StageRunner(out, total=None, parallel=workers)
    for b in blocks:
        b["counts"] = runner(b["st_data"])
        b["sub_list"] = runner.folder(b["st_data"]) / "datalist.json"

    for b in blocks:
        rseed, st_data, sub_list = b["seed"], b["st_data"], b["sub_list"]
        synthesis: dict[str, Any] = {"strict": strict}
        st_synth = None
        if needs_synthesis:
            if not strict:
                syn_models = Path(synthesis_ckpt_dir).resolve()
                syn_key_stages: list[Stage] = [st_data]
                syn_files: list[Any] = [syn_models]
                synthesis.update(models=str(syn_models), pathological_ids=None,
                                 note="synthesis_ckpt_dir reused for every K: not the strict protocol")
            else:
                def train_synthesis(folder: Path, rseed=rseed, sub_list=sub_list) -> dict[str, Any]:
                    # the datalist this run trains on, kept in the stage folder with the ids it holds
                    own = folder / "datalist.json"
                    shutil.copyfile(sub_list, own)
                    launch(syn_train, "training", {
                        **syn_over, "bundle_root": str(syn_b), "datalist": str(own),
                        "ckpt_dir": str(folder / "models"), "log_dir": str(folder / "runs"), "seed": rseed,
                        **_resume_override(folder / "models")}, folder / "log.txt")
                    ids = training_ids(own)
                    return {"models": str(folder / "models"), "datalist": str(own),
                            "pathological_ids": ids["pathological"], "healthy_ids": ids["healthy"]}

                st_syn = Stage("synthesis-train", {"seed": rseed, "overrides": syn_over}, train_synthesis,
                               depends=[st_data], files=[*syn_train, *code],
                               outputs=["datalist.json", "models/G_HP.pt", "models/lesion_bank.npz"], resumable=True)
                syn_models = runner.folder(st_syn) / "models"
                syn_key_stages, syn_files = [st_syn], []
                ids = training_ids(sub_list)   # what the stage trains on: a copy of this datalist
                synthesis.update(models=str(syn_models), stage=runner.folder(st_syn).name,
                                 pathological_ids=ids["pathological"], healthy_ids=ids["healthy"])
            n_needed = max(1, int(round(synthetic_per_real * b["counts"]["n_real_pathological"])))
            st_synth = _synthesise_stage(launch, syn_inf, syn_b, syn_over, sub_list, syn_models, rseed, n_needed,
                                         depends=[st_data, *syn_key_stages], files=[*syn_inf, *syn_files, *code])
        b["synthesis"], b["st_synth"] = synthesis, st_synth
        b["evals"] = {arm_name(td, cda): _detector_stages(
            runner, launch, det_train, det_eval, det_b, det_over, sub_list, st_synth, cache_dir, n_bootstrap, td,
            cda, rseed, depends=[st_data] + ([st_synth] if td != "real" else []), code=code) for td, cda in arms}

    # 2. ask for every evaluation; a finished one needs nothing upstream (its detector, the synthesis model), so
    #    a copy of the finished stages without their weights resumes the study
    visits, to_run = runner.expect([ev for b in blocks for ev in b["evals"].values()])
    print(f"study: {len(blocks)} runs (K x seed), {to_run} of {visits} stages to run"
          + (f", {workers} side by side with OMP_NUM_THREADS={threads}" if workers > 1 else ""), flush=True)

    def finish(b: dict[str, Any]) -> None:
        try:
            for ev in b["evals"].values():
                runner(ev)
        except Exception as e:  # said at once: with workers > 1 the other runs go on until the pool drains
            print(f"study: the run K = {k_label(b['k'])}, seed {b['seed']} failed: {e}", flush=True)
            raise

    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for f in [pool.submit(finish, b) for b in blocks]:
                f.result()
    else:
        for b in blocks:
            finish(b)

    runs: list[dict[str, Any]] = []
    scan_res: dict[tuple[str, str, int], list[ScanResult]] = {}   # (K, arm, seed) -> test results
    froc_metrics: dict[str, Any] = {}
    for b in blocks:
        rseed, k, kl, counts = b["seed"], b["k"], k_label(b["k"]), b["counts"]
        arm_metrics: dict[str, Any] = {}
        for name, ev in b["evals"].items():
            folder = runner.folder(ev)
            arm_metrics[name] = json.loads((folder / "metrics.json").read_text())
            scan_res[(kl, name, rseed)] = scan_results(folder / "candidates.csv", b["sub_list"], "test")
        if k is None and rseed == seeds[0]:
            froc_metrics = arm_metrics
        runs.append({
            "k": kl, "seed": rseed, "counts": {c: counts[c] for c in ("n_real_pathological", "n_healthy",
                                                                       "n_validation", "n_test")},
            "pathological_ids": counts["pathological_ids"], "healthy_ids": counts["healthy_ids"],
            "synthesis": b["synthesis"],
            "n_synthetic": (b["st_synth"].params["n_needed"] if b["st_synth"] is not None else 0),
            "arms": {n: _summary(m) for n, m in arm_metrics.items()},
            "stages": {"datalist": runner.folder(b["st_data"]).name,
                       **({"synthesise": runner.folder(b["st_synth"]).name} if b["st_synth"] is not None else {}),
                       **{f"evaluate-{n}": runner.folder(ev).name for n, ev in b["evals"].items()}},
        })

    names = [arm_name(td, c) for td, c in arms]
    learning_curve: dict[str, Any] = {}
    differences: dict[str, Any] = {}
    for k in ks:
        kl = k_label(k)
        learning_curve[kl] = {n: pooled_bootstrap([scan_res[(kl, n, s)] for s in seeds], fp_rate=10,
                                                  n_bootstrap=n_bootstrap, seed=int(seed)) for n in names}
        differences[kl] = {}
        for cda in (False, True):
            a, b = arm_name("real+synthetic", cda), arm_name("real", cda)
            if a in names and b in names:
                differences[kl][f"{a} minus {b}"] = pooled_paired_bootstrap_difference(
                    [scan_res[(kl, a, s)] for s in seeds], [scan_res[(kl, b, s)] for s in seeds], fp_rate=10,
                    n_bootstrap=n_bootstrap, seed=int(seed))

    results: dict[str, Any] = {
        "datalist": str(datalist),
        "synthetic_per_real": synthetic_per_real,
        "n_bootstrap": n_bootstrap,
        "protocol": {
            "k_values": [k_label(k) for k in ks], "n_pathological_available": len(all_ids),
            "pathological_ids_available": all_ids, "seeds": seeds, "arms": names,
            "strict": strict, "synthesis_ckpt_dir": None if strict else str(Path(synthesis_ckpt_dir).resolve()),
            "subsets": {k_label(k): {str(r["seed"]): r["pathological_ids"] for r in runs if r["k"] == k_label(k)}
                        for k in ks},
            "synthesis_training_ids": {k_label(k): {str(r["seed"]): r["synthesis"].get("pathological_ids")
                                                    for r in runs if r["k"] == k_label(k)} for k in ks},
            "nested": "for each seed, the first K scans of one seeded permutation of the pathological training scans",
            "preset": preset, "quick": bool(quick),
            "budgets": {"synthesis_overrides": syn_over, "detection_overrides": det_over,
                        "synthesis_train_configs": [str(c) for c in synthesis_train_configs],
                        "detection_train_configs": [str(c) for c in detection_train_configs]},
            "versions": _versions(),
        },
        "runs": runs,
        "learning_curve": learning_curve,
        "differences": differences,
        "paper": PAPER_TABLE1,
    }
    write_json(results, out / "results.json")
    with atomic_output(out / "results.md") as tmp:
        tmp.write_text(results_markdown(results))
    written = [out / "results.json", out / "results.md"]
    if "all" in learning_curve:
        with atomic_output(out / "table1.md") as tmp:
            tmp.write_text(table1_markdown(results, "all"))
        written.append(out / "table1.md")
    written.append(plot_learning_curve(results, out / "learning_curve.png"))
    if froc_metrics:  # Figure 3 for K = all, first seed
        panels = [{n: froc_metrics[n] for n in names if n in froc_metrics and n.endswith("+cDA") is cda}
                  for cda in (False, True)]
        panels = [p for p in panels if p]
        written.append(plot_froc_panels(panels, out / "froc.png", title=[
            "(a) without cDA", "(b) with cDA"][: len(panels)] if len(panels) == 2 else None))
    print("study finished: " + ", ".join(str(p) for p in written), flush=True)
    return results


def _synthesise_stage(launch: "Launcher", syn_inf: Sequence[str], syn_b: Path, syn_over: Mapping[str, Any],
                      sub_list: Path, syn_models: Path, rseed: int, n_needed: int, depends: Sequence[Stage],
                      files: Sequence[str | os.PathLike]) -> Stage:
    """The stage painting ``n_needed`` synthetic scans on the healthy training scans of ``sub_list`` (rounds of
    synthesis inference with fresh masks until there are enough), with their ``datalist.json``."""

    def synthesise(folder: Path) -> dict[str, Any]:
        healthy = [it for it in json.loads(sub_list.read_text())["training"] if it.get("group") != "pathological"]
        src = folder / "healthy_datalist.json"
        write_json({"training": healthy}, src)
        items = []
        for q in range(math.ceil(n_needed / len(healthy))):
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
            for key in ("image", "label"):
                if not Path(it[key]).is_file():
                    raise FileNotFoundError(f"synthesis did not write {it[key]}")
        write_json({"name": "synthetic pathological scans", "training": items}, folder / "datalist.json")
        return {"synthetic_dir": str(folder), "n_synthetic": len(items)}

    def outputs(folder: Path) -> list[str]:
        items = json.loads((folder / "datalist.json").read_text())["training"]
        return ["datalist.json"] + [str(Path(it[key]).relative_to(folder)) for it in items for key in ("image", "label")]

    return Stage("synthesise", {"seed": rseed, "n_needed": n_needed, "overrides": dict(syn_over)}, synthesise,
                 depends=depends, files=files, outputs=outputs)


def _detector_stages(runner: StageRunner, launch: "Launcher", det_train: Sequence[str], det_eval: Sequence[str],
                     det_b: Path, det_over: Mapping[str, Any], sub_list: Path, st_synth: Stage | None,
                     cache_dir: Path, n_bootstrap: int, td: str, cda: bool, rseed: int, depends: Sequence[Stage],
                     code: Sequence[Path]) -> Stage:
    """One arm's two stages, training its detector and evaluating it on the test split; returns the evaluation
    stage (which depends on the training stage: asking for it trains the detector when needed)."""
    name = arm_name(td, cda)

    def train_detector(folder: Path) -> dict[str, Any]:
        synthetic_dir = str(runner.folder(st_synth)) if td != "real" and st_synth is not None else None
        launch(det_train, "training", {
            **det_over, "bundle_root": str(det_b), "datalist": str(sub_list), "training_data": td, "cda": cda,
            "synthetic_dir": synthetic_dir, "ckpt_dir": str(folder / "models"), "log_dir": str(folder / "runs"),
            "cache_dir": str(cache_dir), "seed": rseed, **_resume_override(folder / "models")}, folder / "log.txt")
        return {"model": str(folder / "models" / "model.pt")}

    st_tr = Stage(f"detector-{name}", {"training_data": td, "cda": cda, "seed": rseed, "overrides": dict(det_over)},
                  train_detector, depends=depends, files=[*det_train, *code], outputs=["models/model.pt"],
                  resumable=True)

    def evaluate_detector(folder: Path) -> dict[str, Any]:
        launch(det_eval, "evaluating", {
            **det_over, "bundle_root": str(det_b), "datalist": str(sub_list),
            "model_path": str(runner.folder(st_tr) / "models" / "model.pt"),
            "output_dir": str(folder), "cache_dir": str(cache_dir), "n_bootstrap": n_bootstrap,
            "seed": rseed, "training_data": td, "cda": cda}, folder / "log.txt")
        return {"metrics": str(folder / "metrics.json"), "candidates": str(folder / "candidates.csv")}

    return Stage(f"evaluate-{name}", {"seed": rseed, "n_bootstrap": n_bootstrap, "overrides": dict(det_over)},
                 evaluate_detector, depends=[st_tr], files=[*det_eval, *code], outputs=["metrics.json", "candidates.csv"])


Launcher = Callable[[Sequence[str], str, Mapping[str, Any], Path], None]


def _resume_override(ckpt_dir: Path) -> dict[str, Any]:
    """``{"resume": True}`` when an interrupted training stage left a complete interval checkpoint in ``ckpt_dir``
    (the bundles then continue from the newest one, :func:`~cmb_synthesis.training.resume.latest_checkpoint`),
    else nothing: the run starts from scratch."""
    return {"resume": True} if latest_checkpoint(ckpt_dir) else {}


def _launcher(in_process: bool, threads: int | None = None) -> Launcher:
    """``launch(config_files, run_id, overrides, log_file)``: a bundle run in a subprocess (with
    ``OMP_NUM_THREADS=threads`` when given) or in this process."""
    if not in_process:
        return functools.partial(run_bundle, threads=threads)

    def launch(config_files: Sequence[str], run_id: str, overrides: Mapping[str, Any], log_file: Path) -> None:
        with open(log_file, "a") as log:  # appended: a resumed stage keeps the interrupted attempt's lines
            log.write(f"in-process: {run_id} {list(config_files)} {json.dumps(overrides, default=str)}\n")
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

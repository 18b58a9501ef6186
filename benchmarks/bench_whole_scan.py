"""Benchmark: whole-scan detection of a 512 x 512 x 128 clinical-grid SWI with the detection bundle's inference.

What is timed is the user's command, ``python -m monai.bundle run inference`` of ``bundles/cmb_detection``
(train.yaml + inference.yaml, the CPU preset's classifier), on a folder of scans WITHOUT brain masks, so every
stage runs: load (NIfTI), reorientation and resampling to the training spacing (0.98 x 0.98 x 1 mm), brain mask
by MNI152 registration, percentile scaling, FRST candidates, classifier, and writing every output in the input
grid (probability map, detections NIfTI and CSV, candidates CSV, QC picture).

The input: a phantom test scan resampled (once, untimed) to 512 x 512 x 128 voxels of 0.45 x 0.45 x 1.5 mm
(230 x 230 x 192 mm), stored LPS, written as ``scan<i>_swi.nii.gz`` copies. The classifier has the default
architecture with seeded random weights and a fixed threshold (``--threshold 0.5``): the time of every stage
does not depend on the weights (candidates are capped at ``frst#max_candidates``).

Reported (JSON): per-scan processing time (``seconds`` of each scan in ``inference_summary.json``; the first
scan of a process also pays the one-time imports and the template load), the whole command's wall time, and
the peak resident memory of the process (``ru_maxrss`` of the child). Run by hand:

    OMP_NUM_THREADS=2 python benchmarks/bench_whole_scan.py --datalist bundles/cmb_synthesis/data/phantom/datalist.json \
        --n_scans 3 --output docs/results/performance/bench_whole_scan.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (512, 512, 128)
SPACING = (0.45, 0.45, 1.5)


def clinical_scan(src: str, out: Path) -> None:
    """``src`` resampled to SHAPE x SPACING, centred on the source's field of view, stored LPS."""
    from nibabel.processing import resample_from_to

    img = nib.load(src)
    centre = nib.affines.apply_affine(img.affine, (np.array(img.shape[:3]) - 1) / 2.0)
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])  # LPS voxel axes
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(SHAPE) - 1) / 2.0)
    res = resample_from_to(img, (SHAPE, affine), order=1, mode="constant", cval=0.0)
    nib.save(nib.Nifti1Image(np.asarray(res.dataobj, dtype=np.float32), affine), str(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datalist", required=True, help="phantom datalist.json (its first test scan is used)")
    ap.add_argument("--n_scans", type=int, default=3, help="copies processed in one command")
    ap.add_argument("--output", default=None, help="JSON file for the results")
    args = ap.parse_args()

    import torch

    sys.path.insert(0, str(ROOT))
    from monai.data import load_decathlon_datalist

    from cmb_synthesis.detection.classifier import build_classifier

    item = load_decathlon_datalist(args.datalist, True, "test")[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, out, root = tmp / "scans", tmp / "out", tmp / "bundle"
        data.mkdir()
        (root / "models").mkdir(parents=True)
        clinical_scan(item["image"], data / "scan0_swi.nii.gz")
        for i in range(1, args.n_scans):
            (data / f"scan{i}_swi.nii.gz").write_bytes((data / "scan0_swi.nii.gz").read_bytes())
        torch.manual_seed(0)
        net = build_classifier("classifier", patch_size=(32, 32, 16), channels=(16, 32, 64), strides=(2, 2, 2),
                               num_res_units=2, dropout=0.1)
        torch.save(net.state_dict(), root / "models" / "model.pt")
        cfg = ROOT / "bundles" / "cmb_detection" / "configs"
        cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
               f"['{cfg / 'train.yaml'}','{cfg / 'inference.yaml'}']", "--bundle_root", str(root),
               "--dataset_dir", str(data), "--output_dir", str(out), "--threshold", "0.5", "--device", "cpu"]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "CMB_PROGRESS": "log"}
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace")
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"inference failed:\n{proc.stderr[-4000:]}")
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
        summary = json.loads((out / "inference_summary.json").read_text())
        per_scan = [{"id": w["id"], "seconds": w.get("seconds"), "n_detections": w.get("n_detections", w.get("n"))}
                    for w in summary["written"]]
    result = {
        "benchmark": "whole-scan detection inference (bundles/cmb_detection inference, CPU preset)",
        "input": {"shape": list(SHAPE), "spacing_mm": list(SPACING), "orientation": "LPS", "brain_mask": "none (MNI152 registration)",
                  "source": Path(item["image"]).name},
        "n_scans": args.n_scans,
        "per_scan": per_scan,
        "steady_state_seconds": [p["seconds"] for p in per_scan[1:]],
        "command_wall_seconds": round(wall, 2),
        "peak_rss_mib": round(peak_mib, 1),
        "machine": {"cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_before": [round(x, 2) for x in load0],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "command": " ".join(sys.argv),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()

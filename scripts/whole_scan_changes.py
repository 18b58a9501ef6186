"""How much the trained generators change a whole validation scan where they should change nothing.

For each ``--run LABEL=MODELS_DIR`` (a folder with ``G_HP.pt``, ``G_PH.pt`` and ``lesion_bank.npz``), on the first
healthy and the first pathological scan of the datalist's ``--split`` (the montage's scans), the raw network output
of :func:`cmb_synthesis.synthesis.inference.synthesize_volume` (sliding windows over the whole volume, before the
inference path discards changes outside the brain mask dilated by 2 voxels):

- ``brain_away_from_mask_mean_abs``: mean ``|G(x) - x|`` over brain voxels more than 2 voxels from the mask (the
  evaluator's identity error, here on a whole scan instead of 48 x 48 x 24 patches);
- ``outside_brain_mean`` / ``outside_brain_mean_abs``: the mean signed / absolute change more than 2 voxels outside
  the brain mask (background and skull; no loss term nor metric looks there).

``G_HP`` paints ``--n_lesions`` sampled lesions on the healthy scan (seed 0); ``G_PH`` removes the pathological
scan's own CMBs. Overrides (``--override LABEL:key=value``, YAML values) rebuild one run's networks as it was
trained when its settings differ from ``train.yaml``'s.

    python scripts/whole_scan_changes.py --run preset=bundles/cmb_synthesis/models --output changes.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai.bundle import ConfigParser  # noqa: E402

from cmb_synthesis.data.io import write_json  # noqa: E402
from cmb_synthesis.synthesis.inference import first_scans, load_scan, synthesize_volume  # noqa: E402
from cmb_synthesis.training.weights import load_network_weights  # noqa: E402
from transforms.lesion_mask import LesionBank  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cmb_synthesis"


def changes(image: np.ndarray, output: np.ndarray, mask: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    """The three summaries of ``output - image`` (3-D arrays; ``mask``/``brain`` boolean) described above."""
    d = output - image
    far = brain & ~ndi.binary_dilation(mask, iterations=2)
    outside = ~ndi.binary_dilation(brain, iterations=2)
    return {
        "brain_away_from_mask_mean_abs": round(float(np.abs(d[far]).mean()), 4),
        "outside_brain_mean": round(float(d[outside].mean()), 4),
        "outside_brain_mean_abs": round(float(np.abs(d[outside]).mean()), 4),
    }


def measure(models_dir: Path, datalist: Path, split: str, n_lesions: int, overrides: dict) -> dict:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    parser["bundle_root"] = str(BUNDLE)
    for k, v in overrides.items():
        parser[k] = v
    G_HP = load_network_weights(parser.get_parsed_content("G_HP"), models_dir / "G_HP.pt").eval()
    G_PH = load_network_weights(parser.get_parsed_content("G_PH"), models_dir / "G_PH.pt").eval()
    bank = LesionBank.load(models_dir / "lesion_bank.npz")
    healthy, patho = first_scans(datalist, split)
    out = {"healthy_scan": healthy.id, "pathological_scan": patho.id}
    with torch.no_grad():
        h = load_scan(healthy, "pathological", bank, n_lesions, 0)
        syn = synthesize_volume(G_HP, h["image"], h["label"], code_seed=0)[0].numpy()
        p = load_scan(patho, "pseudo_healthy")
        ph = synthesize_volume(G_PH, p["image"], p["label"])[0].numpy()
    for key, scan, o in (("G_HP", h, syn), ("G_PH", p, ph)):
        x, y = np.asarray(scan["image"])[0], np.asarray(scan["label"])[0] > 0
        # load_scan estimates a brain mask when the scan has none; None only if that was switched off
        brain = np.asarray(scan["brainmask"])[0] > 0 if scan.get("brainmask") is not None else x > 0.05
        out[key] = changes(x, o, y, brain)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=MODELS_DIR")
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--datalist", type=Path, default=BUNDLE / "data" / "phantom" / "datalist.json")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--n_lesions", type=int, default=10)
    ap.add_argument("--override", action="append", default=[], metavar="LABEL:key=value",
                    help="a config override for one run, e.g. 0.10.0:critic_centre=false")
    a = ap.parse_args(argv)
    overrides: dict[str, dict] = {}
    for o in a.override:
        label, _, kv = o.partition(":")
        k, sep, v = kv.partition("=")
        if not sep:
            ap.error(f"--override expects LABEL:key=value, got {o!r}")
        overrides.setdefault(label, {})[k] = yaml.safe_load(v)
    result = {"split": a.split, "n_lesions": a.n_lesions, "runs": {}}
    for r in a.run:
        label, sep, path = r.partition("=")
        if not sep or not (Path(path) / "G_HP.pt").is_file():
            ap.error(f"--run expects LABEL=MODELS_DIR with G_HP.pt, G_PH.pt and lesion_bank.npz inside, got {r!r}")
        result["runs"][label] = measure(Path(path), a.datalist, a.split, a.n_lesions, overrides.get(label, {}))
        print(label, json.dumps(result["runs"][label]), flush=True)
    write_json(result, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

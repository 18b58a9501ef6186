"""How far can G_HP's head alone paint real-looking CMB profiles? A least-squares check of the head's mask features.

``G_HP`` paints mostly through its 1x1 head, whose mask features (``CMBGenerator.head_features``: the smoothed
mask, the blurred masks, optionally the binary mask and size products) make a painted lesion's radial profile
linear in the head's weights. This script asks, before any training, whether some weights fit the real CMBs:

1. every real CMB of the training split (whole preprocessed volumes, a (2R+1)^3 crop around its centre of mass)
   is measured as the evaluator measures it (``radial_profiles``: intensity at 0..4 voxels from the centre,
   relative to the tissue 5-7 voxels out);
2. each mask feature ``f`` of the generator built from ``configs/train.yaml`` (with ``--override``s) is
   measured the same way, linearised: ``(1 - profile(1 - 0.5 f)) / 0.5`` (on a uniform tissue the ``f * image``
   features are the same, so only the features alone are used; contrast codes are left at the median rank);
3. the weights ``c`` minimising ``sum (1 - real profile - sum_k c_k F_k)^2`` over the training CMBs are fitted,
   and the fitted profiles are compared with the real ones per size bin and on the validation split's CMBs
   (the realism split the Done-when of issue 11 scores).

The fit is a best case for the head (no other loss, no training noise); a feature set it cannot fit, the
trained generator does not fit either (the preset 0.9.0 fit misses the validation mean profile by 0.043 at 1 voxel,
trained runs by 0.05-0.07).

    python scripts/head_profile_fit.py --output bundles/cmb_synthesis/ablation/head_profile_fit.json \\
        --variant preset_0_9:g_head_sharp=false --variant sharp:g_head_sharp=true \\
        --variant smooth04:g_head_sharp=false,g_head_smooth=0.4 ...

A variant's overrides apply to the current ``train.yaml``; name every setting a comparison depends on (the preset's
defaults change between bundle versions: 0.10.0 turned ``g_head_sharp`` on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai.bundle import ConfigParser  # noqa: E402

from cmb_synthesis.data.io import write_json  # noqa: E402
from cmb_synthesis.synthesis.losses import radial_profiles  # noqa: E402
from cmb_synthesis.synthesis.realism import pathological_volumes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE_EDGES = (9, 19, 40)  # voxels: the size bins reported (< 9, 9-18, 19-39, 40+)


def lesion_crops(datalist: str, split: str, reach: int = 10) -> tuple[torch.Tensor, ...]:
    """(N, 1, 2r+1, 2r+1, 2r+1) image, lesion-mask and brain-mask crops centred on every real CMB of ``split``
    (lesions within ``reach`` voxels of the volume border are skipped)."""
    out: tuple[list, list, list] = ([], [], [])
    for d in pathological_volumes(datalist, split):
        im, lab, bm = (np.asarray(d[k])[0] for k in ("image", "label", "brainmask"))
        cc, n = ndi.label(lab > 0, structure=np.ones((3, 3, 3)))
        for c in ndi.center_of_mass(lab > 0, cc, range(1, n + 1)):
            c = np.round(c).astype(int)
            sl = tuple(slice(ci - reach, ci + reach + 1) for ci in c)
            if all(s.start >= 0 and s.stop <= sh for s, sh in zip(sl, im.shape)):
                for lst, a in zip(out, (im, lab > 0, bm > 0)):
                    lst.append(a[sl])
    if not out[0]:
        raise ValueError(f"{datalist}: no real CMB in split {split!r} away from the volume border")
    return tuple(torch.as_tensor(np.stack(a)[:, None], dtype=torch.float32) for a in out)


def feature_profiles(G: torch.nn.Module, mask: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    """(N, 5, K) linearised profiles of the head's K mask features (each alone, not times the image)."""
    with torch.no_grad():
        feats = G.head_features(torch.ones_like(mask), mask)[0::2]  # (f, f * image) pairs: f alone
        cols = []
        for f in feats:
            f = f / G.head_gain
            p, _ = radial_profiles(1.0 - 0.5 * f, mask, brain)
            cols.append((1.0 - p) / 0.5)
    return torch.stack(cols, -1).double()


def _summary(real: np.ndarray, fitted: np.ndarray) -> dict:
    """Mean real and fitted profiles of a set of lesions and the largest difference between them (the evaluator's
    profile error)."""
    real_mean, fit_mean = real.mean(0), fitted.mean(0)
    return {"n": len(real), "real": real_mean.round(4).tolist(), "fit": fit_mean.round(4).tolist(),
            "profile_error": float(np.abs(fit_mean - real_mean).max())}


def fit(G: torch.nn.Module, train: tuple, val: tuple) -> dict:
    """Least-squares head weights on the ``train`` crops (image, mask, brain mask), scored on both sets."""
    real_tr, _, size_tr = radial_profiles(*train, return_sizes=True)
    real_va, _ = radial_profiles(*val)
    F_tr, F_va = feature_profiles(G, train[1], train[2]), feature_profiles(G, val[1], val[2])
    if len(F_tr) != len(real_tr) or len(F_va) != len(real_va):
        raise RuntimeError("a lesion was measured on the image but not on its features (too little tissue)")
    y = (1.0 - real_tr.double()).reshape(-1).numpy()
    c, *_ = np.linalg.lstsq(F_tr.reshape(-1, F_tr.shape[-1]).numpy(), y, rcond=None)
    fit_tr, fit_va = 1.0 - F_tr.numpy() @ c, 1.0 - F_va.numpy() @ c
    real_tr, real_va = real_tr.double().numpy(), real_va.double().numpy()
    bins = np.digitize(size_tr.numpy(), SIZE_EDGES)
    per_bin = [
        {"bin": b, "n": int((bins == b).sum()), "real": real_tr[bins == b].mean(0).round(4).tolist(),
         "fit": fit_tr[bins == b].mean(0).round(4).tolist()}
        for b in range(len(SIZE_EDGES) + 1) if (bins == b).any()
    ]
    return {
        "n_features": int(len(c)), "weights": np.round(c, 4).tolist(),
        "training": _summary(real_tr, fit_tr),
        "validation": _summary(real_va, fit_va),
        "per_size_bin_training": per_bin,
    }


def generator(overrides: dict) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles/cmb_synthesis/configs/train.yaml"))
    parser["device"] = "$torch.device('cpu')"
    for k, v in overrides.items():
        parser[k] = v
    return parser.get_parsed_content("G_HP")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datalist", default=str(ROOT / "bundles/cmb_synthesis/data/phantom/datalist.json"))
    ap.add_argument("--variant", action="append", default=None,
                    help="NAME or NAME:key=value,key=value (train.yaml overrides, values parsed as YAML); repeatable")
    ap.add_argument("--output", default=None, help="a JSON file for the results")
    args = ap.parse_args(argv)
    datalist = str(args.datalist)
    if not Path(datalist).is_file():
        from cmb_synthesis.phantom import ensure_cohort

        datalist = str(ensure_cohort(str(Path(datalist).parent)))
    train, val = lesion_crops(datalist, "training"), lesion_crops(datalist, "validation")
    results = {"datalist": Path(datalist).name, "size_edges": list(SIZE_EDGES), "variants": {}}
    for spec in args.variant or ["preset"]:
        name, _, rest = spec.partition(":")
        overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in rest.split(",") if kv)}
        r = fit(generator(overrides), train, val)
        r["overrides"] = overrides
        results["variants"][name] = r
        v = r["validation"]
        print(f"{name:12s} K={r['n_features']:2d}  validation real {v['real']}  fit {v['fit']}  "
              f"error {v['profile_error']:.3f}  (training {r['training']['profile_error']:.3f})")
    if args.output:
        write_json(results, args.output)
    return results


if __name__ == "__main__":
    main()

"""Control for the realism two-sample test: real CMBs of one split against real CMBs of another.

The classifier two-sample AUC (:func:`cmb_synthesis.synthesis.realism.two_sample_auc`, 10 CV repetitions) on the
normalised 7^3 lesion patches of every real CMB of two splits (:func:`~cmb_synthesis.synthesis.realism.split_lesions`):
about 0.5 when the splits' lesions are alike, so a high AUC of painted against real lesions is not a split effect.
Also the mean radial profile and the median lesion size (voxels) per split.

    python scripts/realism_control.py [--datalist bundles/cmb_synthesis/data/phantom/datalist.json] --output FILE.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from cmb_synthesis.data.io import write_json
from cmb_synthesis.synthesis.realism import split_lesions, two_sample_auc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datalist", default="bundles/cmb_synthesis/data/phantom/datalist.json")
    ap.add_argument("--splits", nargs="+", default=["training", "validation", "test"])
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args()
    sets = {s: split_lesions(args.datalist, s) for s in args.splits}
    out = {"datalist": str(args.datalist), "n_lesions": {s: int(len(v[1])) for s, v in sets.items()},
           "auc": {f"{a} vs {b}": float(two_sample_auc(sets[a][1], sets[b][1], n_repeats=10))
                   for a, b in itertools.combinations(args.splits, 2)},
           "mean_profile": {s: np.round(v[0].mean(0), 4).tolist() for s, v in sets.items()},
           "median_size_voxels": {s: float(np.median(v[2])) for s, v in sets.items()}}
    write_json(out, args.output)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

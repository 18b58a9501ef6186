"""Command line: ``python -m cmb_synthesis.evaluation --candidates candidates.csv --datalist datalist.json
--split test --output_dir OUT [--n_bootstrap 1000] [--seed 0]``: evaluate a candidates CSV against a datalist
split and write the FROC report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cmb_synthesis.evaluation.report import evaluate_csv


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: evaluate a candidates CSV against a datalist split and write the FROC report."""
    p = argparse.ArgumentParser(prog="python -m cmb_synthesis.evaluation", description=main.__doc__)
    p.add_argument("--candidates", required=True, help="candidates.csv (image,i,j,k,x,y,z,probability)")
    p.add_argument("--datalist", required=True, help="datalist.json (MONAI decathlon format)")
    p.add_argument("--split", default="test")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--n_bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        m = evaluate_csv(args.candidates, args.datalist, args.split, args.output_dir, args.n_bootstrap, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ci = m["sensitivity_at_fp_ci95"].get("10", [None, None])
    s10 = m["sensitivity_at_fp"].get("10")
    print(f"{m['n_scans']} scans, {m['n_lesions']} lesions; sensitivity at 10 FP/scan {s10:.3f} "
          f"(95% CI {ci[0]}, {ci[1]}); CPM {m['cpm']:.3f}; report in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

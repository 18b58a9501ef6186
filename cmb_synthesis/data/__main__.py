"""Command line: bring an external scan to the model's frame, and results back to the scan's
(``python -m cmb_synthesis.data to-canonical ...`` / ``... back ...``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from cmb_synthesis.data.io import check_not_input, save_nifti
from cmb_synthesis.data.scans import to_canonical, write_like


def main(argv: list[str] | None = None) -> int:
    """Command line: bring an external scan to the model's frame, and results back to the scan's.

    ``python -m cmb_synthesis.data to-canonical INPUT OUT.nii.gz [--spacing 0.98 0.98 1.0] [--order 1]``
        INPUT (NIfTI file or DICOM series folder) as a NIfTI in closest-canonical RAS orientation, resampled
        to ``--spacing`` when given (e.g. thick-slice SWI to the paper's 0.98 x 0.98 x 1 mm).
    ``python -m cmb_synthesis.data back RESULT.nii.gz REFERENCE OUT.nii.gz [--spacing ...] [--order 0]``
        a result computed on ``to-canonical``'s output (same ``--spacing``) written in REFERENCE's voxel grid,
        affine and header.

    Outputs are written atomically; existing outputs are kept unless ``--overwrite``; inputs are never
    overwritten. Returns the exit status (1 with a message naming the file on bad input).
    """
    parser = argparse.ArgumentParser(prog="python -m cmb_synthesis.data", description=main.__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-canonical", help="NIfTI/DICOM -> canonical RAS NIfTI (optionally resampled)")
    to.add_argument("input")
    to.add_argument("output")
    back = sub.add_parser("back", help="canonical-grid result -> the reference scan's grid and header")
    back.add_argument("result")
    back.add_argument("reference")
    back.add_argument("output")
    for p in (to, back):
        p.add_argument("--spacing", type=float, nargs=3, default=None, help="voxel size in mm of the canonical grid")
        p.add_argument("--order", type=int, default=None, help="interpolation order (default: 1 images, 0 labels)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-canonical":
            out = Path(args.output)
            check_not_input(out, [args.input])
            if out.exists() and not args.overwrite:
                raise FileExistsError(f"{out}: output exists (use --overwrite to replace it)")
            can = to_canonical(args.input, spacing=args.spacing, order=1 if args.order is None else args.order, dtype=None)
            data = can.array
            save_nifti(data, can.affine, out, overwrite=True)
            print(f"wrote {out}: shape {data.shape}, spacing {tuple(round(s, 4) for s in can.spacing)} mm, RAS")
        else:
            ref = to_canonical(args.reference, spacing=args.spacing, dtype=None)
            res = nib.load(str(args.result))
            if not np.allclose(res.affine, ref.affine, atol=1e-3):
                raise ValueError(
                    f"{args.result}: not on the canonical grid of {args.reference} (affine differs; same --spacing?)"
                )
            out = write_like(np.asanyarray(res.dataobj), ref, args.output, order=args.order, overwrite=args.overwrite,
                             inputs=(args.result,))
            print(f"wrote {out}: in the space of {args.reference}")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m cmb_synthesis.phantom --output DIR [--preset default|paper|benchmark] [--seed S] [--overwrite]``.

``--option KEY=VALUE`` (repeatable) overrides a phantom option for every subject (``subject.DEFAULT_OPTIONS`` /
``REALISM_OPTIONS``; VALUE is read as JSON, else as a string), e.g. ``--option faint_fraction=0.35`` or
``--option 'snr=[15, 22]'`` when calibrating the ``benchmark`` preset (``docs/phantom.md``).
``--site-option SITE:KEY=VALUE`` (repeatable, realism presets) overrides an option of one simulated site only,
e.g. ``--site-option 'B:snr=[18, 26]'`` (``benchmark.SITES``).

Exit codes: 0 success, 2 bad input (message on stderr naming the problem and the path; nothing written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from cmb_synthesis.phantom.cohort import PRESETS, SPLIT_KEYS, generate_cohort
from cmb_synthesis.phantom.subject import DEFAULT_OPTIONS, REALISM_OPTIONS


def _options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings -> options (VALUE as JSON, else a string); unknown keys refused."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in {**DEFAULT_OPTIONS, **REALISM_OPTIONS}:
            raise ValueError(f"--option {pair!r}: expected KEY=VALUE with KEY one of "
                             f"{sorted({**DEFAULT_OPTIONS, **REALISM_OPTIONS})}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _site_options(pairs: list[str]) -> dict[str, dict]:
    """``SITE:KEY=VALUE`` strings -> {site: options} (VALUE as JSON, else a string); unknown keys refused."""
    out: dict[str, dict] = {}
    for pair in pairs:
        site, sep, rest = pair.partition(":")
        if not sep or not site:
            raise ValueError(f"--site-option {pair!r}: expected SITE:KEY=VALUE, e.g. 'B:snr=[18, 26]'")
        out.setdefault(site, {}).update(_options([rest]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cmb_synthesis.phantom", description="Generate the SWI phantom cohort.")
    p.add_argument("--output", required=True, help="cohort folder to create (must not exist or be empty)")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="phantom option for every subject (JSON value), repeatable")
    p.add_argument("--site-option", action="append", default=[], metavar="SITE:KEY=VALUE",
                   help="phantom option for the subjects of one site of a realism preset (JSON value), repeatable")
    p.add_argument("--min-mean-lesions", type=float, default=None, metavar="N",
                   help="realism presets: floor of planned CMBs per pathological scan in every split")
    for key in SPLIT_KEYS:
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=int, default=None,
                       help=f"override the preset's {key[2:].replace('_', ' ')} count")
    args = p.parse_args(argv)
    counts = {k: getattr(args, k) for k in SPLIT_KEYS}
    # progress of the subjects: a bar on a terminal, else "phantom subjects: i/N (elapsed, remaining)" lines
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.time()
    try:
        path = generate_cohort(args.output, preset=args.preset, seed=args.seed, overwrite=args.overwrite,
                               workers=args.workers, options=_options(args.option),
                               site_overrides=_site_options(args.site_option),
                               min_mean_lesions=args.min_mean_lesions, **counts)
    except (ValueError, FileExistsError, FileNotFoundError, PermissionError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

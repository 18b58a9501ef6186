"""Phantom generation speed and memory: seconds and peak RSS per subject on one core.

    OMP_NUM_THREADS=1 python benchmarks/bench_phantom.py [--subjects 4] [--preset default|benchmark] [--out R.json]

Target: at most 3 s and 2 GiB per subject on one core. The MNI152 template loading (once per
process) is timed separately. ``--preset benchmark`` simulates with the benchmark preset's options, the
subjects alternating between its sites, pathological ones with ``MIN_MEAN_LESIONS`` planned CMBs (the preset's per-scan floor).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--preset", default="default", choices=("default", "benchmark"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from cmb_synthesis.phantom.anatomy import mni_templates
    from cmb_synthesis.phantom.benchmark import BENCHMARK_OPTIONS, MIN_MEAN_LESIONS, SITES, site_options
    from cmb_synthesis.phantom.subject import simulate_subject

    def options(n: int) -> dict:
        if args.preset == "default":
            return {}
        return {**BENCHMARK_OPTIONS, **site_options(sorted(SITES)[(n // 2) % len(SITES)]), "n_lesions": int(round(MIN_MEAN_LESIONS))}

    t0 = time.perf_counter()
    mni_templates()
    load_s = time.perf_counter() - t0
    times, cpu = [], []
    for n in range(args.subjects):
        t, c = time.perf_counter(), time.process_time()
        simulate_subject(1000 + n, pathological=bool(n % 2 == 0), **options(n))
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    res = {"preset": args.preset, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
                      f"{os.environ['OMP_NUM_THREADS']}", "template_load_s": round(load_s, 2),
           "per_subject_s": [round(t, 2) for t in times], "mean_s": round(sum(times) / len(times), 2),
           "cpu_s_per_subject": [round(t, 2) for t in cpu], "mean_cpu_s": round(sum(cpu) / len(cpu), 2),
           "load_average_1min": round(os.getloadavg()[0], 1), "peak_rss_gib": round(peak_gib, 2)}
    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()

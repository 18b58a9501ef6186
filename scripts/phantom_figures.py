"""Phantom montage and measured contrast table for docs/phantom.md.

    python scripts/phantom_figures.py --cohort DIR [--out docs/img]

Writes ``phantom_montage.png`` (axial slices of a pathological subject; close-ups of CMBs beside vein
cross-sections, ground truth outlined) and ``phantom_contrast.json`` / prints a Markdown table of mean
intensities (relative to white matter) measured over every subject of the cohort.

For a ``benchmark`` cohort (items with a ``mimic_map``) it writes instead ``phantom_benchmark_montage.png``
(one panel per realism element: small CMBs and blooming, a faint CMB, vessels in cross-section and at a
bifurcation, basal-ganglia mineralisation, choroid-plexus and pineal calcifications, flow voids, an air-bone
artefact, the two sites) and ``phantom_benchmark_stats.json`` (counts per split, lesion sizes and contrast,
mimics per type, measured SNR per site), printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from cmb_synthesis.data.io import atomic_output, write_json  # noqa: E402


def _load(folder: Path, name: str) -> np.ndarray:
    return np.asarray(nib.load(str(folder / name)).dataobj)


def contrast_table(datalist: Path) -> dict:
    data = json.loads(datalist.read_text())
    rows: dict[str, list[float]] = {k: [] for k in ("CSF", "GM", "WM", "deep GM (iron)", "veins (in WM)",
                                                    "CMB (label voxels)", "CMB core (darkest 50 %)")}
    for it in [i for s in ("training", "validation", "test") for i in data[s]]:
        f = datalist.parent
        swi = _load(f, it["image"]).astype(np.float64)
        tissue = _load(f, it["tissue"])
        veins = _load(f, it["veins"]) > 0
        lab = _load(f, it["label"])
        wm = swi[(tissue == 3) & ~veins].mean()
        rows["CSF"].append(swi[tissue == 1].mean() / wm)
        rows["GM"].append(swi[(tissue == 2) & ~veins].mean() / wm)
        rows["WM"].append(1.0)
        rows["deep GM (iron)"].append(swi[tissue == 4].mean() / wm)
        rows["veins (in WM)"].append(swi[veins & (tissue == 3)].mean() / wm)
        if lab.any():
            v = swi[lab > 0]
            rows["CMB (label voxels)"].append(v.mean() / wm)
            rows["CMB core (darkest 50 %)"].append(np.sort(v)[: max(1, len(v) // 2)].mean() / wm)
    return {k: {"mean": float(np.mean(v)), "sd": float(np.std(v)), "n_subjects": len(v)} for k, v in rows.items() if v}


def montage(datalist: Path, out_png: Path) -> None:
    data = json.loads(datalist.read_text())
    f = datalist.parent
    it = max((i for s in ("training", "test") for i in data[s] if i["group"] == "pathological"),
             key=lambda i: i.get("n_lesions", 0))
    swi = _load(f, it["image"]).astype(np.float32)
    lab = _load(f, it["label"])
    veins = _load(f, it["veins"]) > 0
    lo, hi = np.percentile(swi[swi > 0], [0.5, 99.5])
    nz = swi.shape[2]
    slices = [int(nz * q) for q in (0.3, 0.45, 0.6, 0.75)]
    fig, axes = plt.subplots(2, 4, figsize=(16, 8.5))
    for ax, z in zip(axes[0], slices):
        ax.imshow(swi[:, :, z].T, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        if lab[:, :, z].any():
            ax.contour((lab[:, :, z] > 0).T, levels=[0.5], colors="r", linewidths=0.8)
        ax.set_title(f"{it['id']} axial z={z}")
        ax.axis("off")
    # close-ups: CMBs (red outline) and vein cross-sections (cyan) in the same kind of window
    centres = ndimage.center_of_mass(lab > 0, lab, range(1, lab.max() + 1))
    shown = 0
    for c in centres[:2]:
        c = np.rint(c).astype(int)
        ax = axes[1][shown]
        sl = (slice(max(c[0] - 16, 0), c[0] + 16), slice(max(c[1] - 16, 0), c[1] + 16), c[2])
        ax.imshow(swi[sl].T, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
        ax.contour((lab[sl] > 0).T, levels=[0.5], colors="r", linewidths=1)
        ax.contour(veins[sl].T.astype(float), levels=[0.5], colors="c", linewidths=0.6)
        ax.set_title(f"CMB close-up (red), veins cyan, z={c[2]}")
        ax.axis("off")
        shown += 1
    # vein cross-sections: vein voxels far from lesions, seen end-on (small in-slice component)
    cand = np.argwhere(veins & (lab == 0))
    rng = np.random.default_rng(0)
    for idx in rng.permutation(len(cand)):
        if shown == 4:
            break
        c = cand[idx]
        comp, n = ndimage.label(veins[:, :, c[2]])
        size = (comp == comp[c[0], c[1]]).sum()
        if size > 6 or c[0] < 16 or c[1] < 16 or c[0] > swi.shape[0] - 16 or c[1] > swi.shape[1] - 16:
            continue
        ax = axes[1][shown]
        sl = (slice(c[0] - 16, c[0] + 16), slice(c[1] - 16, c[1] + 16), c[2])
        ax.imshow(swi[sl].T, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
        ax.contour(veins[sl].T.astype(float), levels=[0.5], colors="c", linewidths=0.6)
        if lab[sl].any():
            ax.contour((lab[sl] > 0).T, levels=[0.5], colors="r", linewidths=1)
        ax.set_title(f"vein seen end-on (cyan), z={c[2]}")
        ax.axis("off")
        shown += 1
    fig.suptitle("SWI phantom: axial slices (top), CMB and vein close-ups, 32 x 32 voxels (bottom)")
    fig.tight_layout()
    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cohort", required=True, help="cohort folder (with datalist.json)")
    p.add_argument("--out", default="docs/img")
    args = p.parse_args()
    datalist = Path(args.cohort) / "datalist.json"
    out = Path(args.out)
    if "mimic_map" in json.loads(datalist.read_text())["test"][0]:
        from phantom_benchmark_figures import benchmark_montage, benchmark_stats, print_stats

        benchmark_montage(datalist, out / "phantom_benchmark_montage.png")
        stats = benchmark_stats(datalist)
        write_json(stats, out / "phantom_benchmark_stats.json")
        print_stats(stats)
        return
    montage(datalist, out / "phantom_montage.png")
    table = contrast_table(datalist)
    write_json(table, out / "phantom_contrast.json")
    print("| Structure | Mean intensity / WM | SD over subjects | Subjects |")
    print("|---|---|---|---|")
    for k, v in table.items():
        print(f"| {k} | {v['mean']:.2f} | {v['sd']:.2f} | {v['n_subjects']} |")


if __name__ == "__main__":
    main()

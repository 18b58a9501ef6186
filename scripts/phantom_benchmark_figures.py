"""Montage and statistics of a ``benchmark`` phantom cohort (called by ``scripts/phantom_figures.py``).

    python scripts/phantom_figures.py --cohort /tmp/bench_cohort --out docs/img

Panels are 40 x 40 voxel axial close-ups (unless stated) found automatically in the cohort from the lesion and
mimic tables; CMB labels are outlined in red, the shown mimic in its type colour. Intensities are windowed per
subject at the [0.5, 99.5] brain percentiles.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from cmb_synthesis.data.io import atomic_output  # noqa: E402
from cmb_synthesis.phantom.mimics import MIMIC_CODES, MIMIC_TYPES  # noqa: E402

COLOURS = {"cross_section_vessel": "cyan", "vessel_bifurcation": "deepskyblue",
           "basal_ganglia_mineralisation": "yellow", "choroid_plexus_calcification": "magenta",
           "pineal_calcification": "orange", "flow_void": "lime", "air_bone_artefact": "white"}
SPLITS = ("training", "validation", "test")


class Subject:
    """Lazily loaded volumes and tables of one datalist item."""

    def __init__(self, folder: Path, item: dict[str, Any]):
        self.folder, self.item, self._cache = folder, item, {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = np.asarray(nib.load(str(self.folder / self.item[key])).dataobj)
        return self._cache[key]

    def rows(self, key: str) -> list[dict[str, str]]:
        with open(self.folder / self.item[key], newline="") as f:
            return list(csv.DictReader(f))

    def window(self) -> tuple[float, float]:
        return tuple(np.percentile(self["image"][self["brainmask"] > 0], [0.5, 99.5]))


def _subjects(datalist: Path) -> list[Subject]:
    data = json.loads(datalist.read_text())
    return [Subject(datalist.parent, it) for s in SPLITS for it in data[s]]


def _box(centre, half: int, shape) -> tuple[slice, slice]:
    return tuple(slice(int(np.clip(c - half, 0, n - 2 * half)), int(np.clip(c - half, 0, n - 2 * half)) + 2 * half)
                 for c, n in zip(centre[:2], shape[:2]))


def _panel(ax, sub: Subject, centre, title: str, mimic: str | None = None, half: int = 20, minip: int = 0) -> None:
    """Axial close-up at voxel ``centre``; ``minip`` > 0: minimum-intensity projection over +-minip slices."""
    swi, lab, code = sub["image"], sub["label"], sub["mimic_map"]
    bx, by = _box(centre, half, swi.shape)
    k = int(centre[2])
    zs = slice(max(k - minip, 0), k + minip + 1)
    img = swi[bx, by, zs].min(axis=2) if minip else swi[bx, by, k]
    lo, hi = sub.window()
    ax.imshow(img.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
    if lab[bx, by, k].any():
        ax.contour((lab[bx, by, k] > 0).T, levels=[0.5], colors="r", linewidths=0.9)
    if mimic is not None:
        m = (code[bx, by, zs] == MIMIC_CODES[mimic]).any(axis=2)
        if m.any():
            ax.contour(m.T.astype(float), levels=[0.5], colors=COLOURS[mimic], linewidths=0.7)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _lesion_contrast(sub: Subject) -> list[tuple[float, dict[str, str]]]:
    """(intensity ratio, row) per lesion: mean label intensity / mean of a 2-4 voxel ring around it without
    veins, labels or mimics (1 = invisible)."""
    swi, lab = sub["image"].astype(np.float64), sub["label"]
    clean = (sub["veins"] == 0) & (lab == 0) & (sub["mimic_map"] == 0)
    out = []
    for r in sub.rows("lesions"):
        c = np.array([int(r["i"]), int(r["j"]), int(r["k"])])
        lo, hi = np.maximum(c - 8, 0), np.minimum(c + 9, swi.shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        m = lab[sl] == int(r["label"])
        ring = ndimage.binary_dilation(m, iterations=4) & ~ndimage.binary_dilation(m, iterations=2) & clean[sl]
        if m.any() and ring.any():
            out.append((float(swi[sl][m].mean() / swi[sl][ring].mean()), r))
    return out


def _first_row(subjects: list[Subject], kind: str, pick=None, in_wm: bool = False):
    """The first subject with a mimic of ``kind`` and its centre (``pick`` chooses among the subject's rows;
    ``in_wm``: only mimics centred in white matter)."""
    for sub in subjects:
        rows = [r for r in sub.rows("mimics") if r["type"] == kind]
        if in_wm:
            rows = [r for r in rows if sub["tissue"][int(r["i"]), int(r["j"]), int(r["k"])] == 3]
        if rows:
            r = pick(rows) if pick else rows[0]
            return sub, (int(r["i"]), int(r["j"]), int(r["k"]))
    return None, None


def benchmark_montage(datalist: Path, out_png: Path) -> None:
    """One panel per realism element of the benchmark preset (see the module docstring)."""
    subjects = _subjects(datalist)
    path = [s for s in subjects if s.item["group"] == "pathological"][:12]
    contrasts = [(c, r, s) for s in path for c, r in _lesion_contrast(s)]
    small = [t for t in contrasts if 2.0 <= float(t[1]["diameter_mm"]) <= 3.0]
    fig, axes = plt.subplots(3, 5, figsize=(17, 10.8))
    ax = iter(axes.flat)
    for c, r, s in sorted(small, key=lambda t: t[0])[:2]:
        _panel(next(ax), s, (int(r["i"]), int(r["j"]), int(r["k"])), f"small CMB {float(r['diameter_mm']):.1f} mm, "
               f"intensity ratio {c:.2f}")
    mid = [t for t in contrasts if 3.5 <= float(t[1]["diameter_mm"]) <= 5.0]
    if mid:
        c, r, s = min(mid, key=lambda t: t[0])
        _panel(next(ax), s, (int(r["i"]), int(r["j"]), int(r["k"])),
               f"blooming beyond the label, {float(r['diameter_mm']):.1f} mm")
    c, r, s = max(contrasts, key=lambda t: t[0])
    _panel(next(ax), s, (int(r["i"]), int(r["j"]), int(r["k"])),
           f"faint CMB {float(r['diameter_mm']):.1f} mm, intensity ratio {c:.2f}")
    titles = {"cross_section_vessel": "vessel in cross-section", "vessel_bifurcation": "vein bifurcation (minIP 7)",
              "basal_ganglia_mineralisation": "basal-ganglia mineralisation",
              "choroid_plexus_calcification": "choroid-plexus calcification",
              "pineal_calcification": "pineal calcification",
              "flow_void": "flow voids (ICA, basilar)", "air_bone_artefact": "air-bone artefact (64 x 64)"}
    for kind in MIMIC_TYPES:
        if kind in ("flow_void", "air_bone_artefact"):       # the lowest: ICA / basilar, the frontal base
            pick = lambda rows: min(rows, key=lambda r: int(r["k"]))  # noqa: E731
        else:                                                # the largest
            pick = lambda rows: max(rows, key=lambda r: float(r["size_mm"]))  # noqa: E731
        sub, centre = _first_row(subjects, kind, pick, in_wm=kind in ("vessel_bifurcation", "cross_section_vessel"))
        if sub is None:
            continue
        _panel(next(ax), sub, centre, titles[kind], kind, half=32 if kind == "air_bone_artefact" else 20,
               minip=3 if kind == "vessel_bifurcation" else 0)
    # the two sites: coronal close-ups of the same region (through-plane blur and noise differ)
    for site in ("A", "B"):
        sub = next((s for s in subjects if s.item.get("site") == site), None)
        if sub is None:
            continue
        a = next(ax)
        swi = sub["image"]
        j = swi.shape[1] // 2
        lo, hi = sub.window()
        a.imshow(swi[40:120, j, 30:110].T, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest",
                 aspect=1.0)
        a.set_title(f"site {site}: coronal, {sub.item['id']}", fontsize=9)
        a.axis("off")
    for a in ax:
        a.axis("off")
    fig.suptitle("benchmark phantom: CMBs (red) and mimics (outlined by type), axial 40 x 40 voxel close-ups; "
                 "intensity ratio = label mean / surrounding tissue")
    fig.tight_layout()
    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def _site_snr(sub: Subject) -> float:
    """SNR (WM level 400 / noise SD) from the Rayleigh background far (> 11 mm) from the brain."""
    far = ndimage.distance_transform_edt(sub["brainmask"] == 0, sampling=sub_spacing(sub)) > 11
    return float(400.0 / (sub["image"][far].mean() / np.sqrt(np.pi / 2)))


def sub_spacing(sub: Subject) -> tuple[float, ...]:
    return tuple(float(z) for z in nib.load(str(sub.folder / sub.item["image"])).header.get_zooms()[:3])


def benchmark_stats(datalist: Path) -> dict[str, Any]:
    """Counts per split, lesion sizes and contrast, mimics per type, measured SNR per site."""
    data = json.loads(datalist.read_text())
    folder = datalist.parent
    out: dict[str, Any] = {"splits": {}, "sites": {}}
    diam, contrast = [], []
    for split in SPLITS:
        items = data[split]
        out["splits"][split] = {
            "pathological": sum(i["group"] == "pathological" for i in items),
            "healthy": sum(i["group"] == "healthy" for i in items),
            "cmbs": sum(i["n_lesions"] for i in items),
            "sites": {s: sum(i["site"] == s for i in items) for s in sorted({i["site"] for i in items})},
            "mimics": {t: sum(i["mimic_counts"][t] for i in items) for t in MIMIC_TYPES},
        }
        for it in items:
            sub = Subject(folder, it)
            if it["n_lesions"]:
                diam += [float(r["diameter_mm"]) for r in sub.rows("lesions")]
                contrast += [c for c, _ in _lesion_contrast(sub)]
            if it["group"] == "healthy" or len(out["sites"].get(it["site"], [])) < 4:
                out["sites"].setdefault(it["site"], []).append(_site_snr(sub))
    d, c = np.array(diam), np.array(contrast)
    out["lesions"] = {"n": len(d), "diameter_median_mm": float(np.median(d)),
                      "fraction_2_3_mm": float(((d >= 2) & (d <= 3)).mean()),
                      "fraction_under_2_mm": float((d < 2).mean()),
                      "fraction_under_5_mm": float((d < 5).mean()),
                      "contrast_median": float(np.median(c)), "contrast_p10_p90": [float(np.percentile(c, 10)),
                                                                                  float(np.percentile(c, 90))],
                      "fraction_intensity_ratio_over_0.8": float((c > 0.8).mean())}
    cohort = json.loads((folder / "cohort.json").read_text())
    out["sites"] = {s: {"measured_snr_mean": float(np.mean(v)), "n_subjects_measured": len(v), **cohort["sites"][s]}
                    for s, v in sorted(out["sites"].items())}
    return out


def print_stats(stats: dict[str, Any]) -> None:
    print("| Split | pathological | healthy | CMBs | sites | " + " | ".join(MIMIC_TYPES) + " |")
    print("|---" * (5 + len(MIMIC_TYPES)) + "|")
    for split, s in stats["splits"].items():
        print(f"| {split} | {s['pathological']} | {s['healthy']} | {s['cmbs']} | "
              f"{', '.join(f'{k} {v}' for k, v in s['sites'].items())} | "
              + " | ".join(str(s["mimics"][t]) for t in MIMIC_TYPES) + " |")
    print(json.dumps({"lesions": stats["lesions"], "sites": stats["sites"]}, indent=1))

"""Figures for docs/transforms.md: a cDA-augmented phantom image + lesion mask, and a sampled lesion mask.

Usage (from the repo root)::

    python scripts/transform_figures.py                       # generates a small phantom cohort in a temp dir
    python scripts/transform_figures.py --datalist bundles/cmb_synthesis/data/phantom/datalist.json

Writes ``docs/img/transforms_augmented.png`` and ``docs/img/transforms_sampled_mask.png`` (atomically), and
prints the preprocessing / augmentation / mask-sampling times for one full-size volume.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from monai.data import load_decathlon_datalist  # noqa: E402

from cmb_synthesis.data.io import atomic_output  # noqa: E402
from transforms.augment import classical_augmentation  # noqa: E402
from cmb_synthesis.synthesis.data import lesion_bank  # noqa: E402
from transforms.lesion_mask import RandLesionMaskd  # noqa: E402
from transforms.pipelines import preprocessing  # noqa: E402


def _overlay(ax, img, lab, title):
    ax.imshow(img.T, cmap="gray", origin="lower", vmin=0, vmax=1)
    m = np.ma.masked_where(lab.T == 0, lab.T > 0)
    ax.imshow(m, cmap="autumn", origin="lower", alpha=0.9, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def _best_slice(lab):
    return int(np.argmax((lab > 0).sum(axis=(0, 1))))


def _save(fig, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    print(f"wrote {path}")


def main(datalist: str | None = None, out_dir: str = str(ROOT / "docs" / "img"), seed: int = 0) -> None:
    tmpdir = None
    if datalist is None:
        from cmb_synthesis.phantom import generate_cohort

        tmpdir = tempfile.TemporaryDirectory()
        datalist = str(
            generate_cohort(
                Path(tmpdir.name) / "phantom", seed=seed, n_train_pathological=4, n_train_healthy=1,
                n_val_pathological=0, n_val_healthy=0, n_test_pathological=0, n_test_healthy=0,
            )
        )  # fmt: skip
    out = Path(out_dir)
    items = load_decathlon_datalist(datalist, True, "training")
    patho = next(i for i in items if i["group"] == "pathological")
    healthy = next(i for i in items if i["group"] == "healthy")
    keys = ("image", "brainmask", "label", "tissue")

    t0 = time.perf_counter()
    pre = preprocessing(extra_keys=("tissue",))
    d = pre({k: patho[k] for k in keys})
    t_pre = time.perf_counter() - t0

    # 1) cDA on a pathological phantom: same geometry on image and lesion mask
    aug = classical_augmentation(("image",), ("label", "brainmask"), prob=1.0)
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    z = _best_slice(d["label"][0].numpy())
    _overlay(axes[0], d["image"][0, :, :, z].numpy(), d["label"][0, :, :, z].numpy(), f"input, z={z}")
    times = []
    for n, ax in enumerate(axes[1:]):
        aug.set_random_state(seed + n)
        t0 = time.perf_counter()
        a = aug(dict(d))
        times.append(time.perf_counter() - t0)
        lab = a["label"][0].numpy()
        za = _best_slice(lab)
        _overlay(ax, a["image"][0, :, :, za].numpy(), lab[:, :, za], f"cDA draw {n + 1}, z={za}")
    fig.suptitle("Classical augmentation (flip, rotation, shear, scale, intensity); lesion mask in red", fontsize=9)
    _save(fig, out / "transforms_augmented.png")

    # 2) sampled lesion mask on a healthy phantom (bank from the pathological training scans)
    t0 = time.perf_counter()
    bank = lesion_bank(datalist, split="training")
    t_bank = time.perf_counter() - t0
    h = preprocessing(label_keys=(), extra_keys=("tissue",))({k: healthy[k] for k in ("image", "brainmask", "tissue")})
    sampler = RandLesionMaskd(bank=bank, n_lesions=None).set_random_state(seed)
    t0 = time.perf_counter()
    s = sampler(h)
    t_mask = time.perf_counter() - t0
    lab = s["label"][0].numpy()
    img = h["image"][0].numpy()
    # three slices through different lesions, spread over z
    zc = sorted({int(np.argwhere(lab == i)[:, 2].mean().round()) for i in range(1, int(lab.max()) + 1)})
    zs = [zc[int(q * (len(zc) - 1))] for q in (0.2, 0.5, 0.8)] if zc else [lab.shape[2] // 2] * 3
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for ax, zz in zip(axes, zs):
        _overlay(ax, img[:, :, zz], lab[:, :, zz], f"healthy + sampled mask, z={zz}")
    mip = (lab > 0).max(axis=2)
    axes[3].imshow(img.mean(axis=2).T, cmap="gray", origin="lower")
    axes[3].imshow(np.ma.masked_where(~mip.T, mip.T), cmap="autumn", origin="lower", interpolation="nearest")
    axes[3].set_title(f"all {int(lab.max())} lesions (projection)", fontsize=8)
    axes[3].axis("off")
    fig.suptitle(f"RandLesionMaskd: {bank}", fontsize=8)
    _save(fig, out / "transforms_sampled_mask.png")

    shape = tuple(d["image"].shape[1:])
    print(f"volume {shape}: preprocessing {t_pre:.2f} s, cDA {np.mean(times):.2f} s/draw, "
          f"lesion_bank {t_bank:.2f} s, RandLesionMaskd {t_mask:.2f} s ({int(lab.max())} lesions)")  # fmt: skip
    if tmpdir is not None:
        tmpdir.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datalist", default=None, help="phantom datalist.json (default: generate a small cohort)")
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "img"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    main(a.datalist, a.out_dir, a.seed)

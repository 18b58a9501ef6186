"""Montage of trained synthesis: healthy | sampled mask | synthetic (G_HP), pathological | its mask |
pseudo-healthy (G_PH), each with a close-up around a lesion, on the axial slice holding the most mask voxels;
bottom row: real and synthetic CMBs side by side at the same zoom and grey levels.

    python scripts/synthesis_montage.py [--bundle_dir bundles/cmb_synthesis] [--datalist DATALIST]
        [--split validation] [--seed 0] [--output bundles/cmb_synthesis/docs/synthesis_montage.png]
        [--config bundles/cmb_synthesis/configs/paper.yaml] [--models_dir DIR] [--override key=value ...]

Uses the trained ``models/G_HP.pt``, ``models/G_PH.pt`` and ``models/lesion_bank.npz`` and the generator
definition ``G_def`` of ``configs/train.yaml`` (merged with the ``--config`` overlays, e.g. ``paper.yaml`` for
networks trained with the paper preset) and the `--override` values a run was trained with (its ablation
``overrides.json``), e.g. ``--override g_head_smooth=0.7``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches as mpatches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

from cmb_synthesis.data.io import atomic_output  # noqa: E402
from cmb_synthesis.synthesis.inference import first_scans, load_scan, synthesize_volume  # noqa: E402
from cmb_synthesis.training.weights import load_network_weights  # noqa: E402


def _slice_and_box(label: np.ndarray, half: int = 16):
    counts = (label > 0).sum(axis=(0, 1))
    z = int(np.argmax(counts))
    xs, ys = np.nonzero(label[:, :, z] > 0)
    cx, cy = int(np.median(xs)), int(np.median(ys))
    x0 = int(np.clip(cx - half, 0, label.shape[0] - 2 * half))
    y0 = int(np.clip(cy - half, 0, label.shape[1] - 2 * half))
    return z, (x0, y0, 2 * half)


def _lesion_crops(image: np.ndarray, label: np.ndarray, n: int = 3, half: int = 8) -> list[np.ndarray]:
    """Axial 2*half x 2*half crops through the centres of the ``n`` largest lesions (away from the borders)."""
    from scipy import ndimage

    lab, k = ndimage.label(label > 0)
    sizes = ndimage.sum(np.ones_like(lab), lab, range(1, k + 1))
    out = []
    for i in np.argsort(sizes)[::-1]:
        c = np.rint(ndimage.center_of_mass(lab == i + 1)).astype(int)
        if (c[:2] - half < 0).any() or (c[:2] + half > np.array(image.shape[:2])).any():
            continue
        out.append(image[c[0] - half : c[0] + half, c[1] - half : c[1] + half, c[2]])
        if len(out) == n:
            break
    return out


def _show(ax, img, title, box=None, mask=None, close=False):
    x0, y0, w = box
    view = img[x0 : x0 + w, y0 : y0 + w] if close else img
    ax.imshow(view.T, cmap="gray", origin="lower", vmin=0, vmax=1, interpolation="nearest")
    if mask is not None:
        m = mask[x0 : x0 + w, y0 : y0 + w] if close else mask
        ax.contour((m > 0).T.astype(float), levels=[0.5], colors="red", linewidths=0.8, origin="lower")
    if not close:
        ax.add_patch(mpatches.Rectangle((x0, y0), w, w, fill=False, edgecolor="yellow", linewidth=0.8))
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle_dir", default="bundles/cmb_synthesis")
    ap.add_argument("--datalist", default=None, help="default: <bundle_dir>/data/phantom/datalist.json")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n_lesions", type=int, default=None)
    ap.add_argument("--output", default=None)
    ap.add_argument("--ckpt", default=None, help="a checkpoint_iteration=N.pt to use instead of models/G_HP.pt, G_PH.pt")
    ap.add_argument("--config", action="append", default=[], help="config overlays merged over configs/train.yaml")
    ap.add_argument("--models_dir", default=None, help="folder with G_HP.pt, G_PH.pt, lesion_bank.npz (default <bundle_dir>/models)")
    ap.add_argument("--override", nargs="*", default=[], help="key=value config overrides (YAML values), as the run was trained")
    args = ap.parse_args()
    bundle = Path(args.bundle_dir)
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / "train.yaml"), *args.config])
    for item in args.override:
        key, _, value = item.partition("=")
        parser[key] = yaml.safe_load(value)
    parser["device"] = "$torch.device('cpu')"
    # the networks as the config defines them (G_HP's contrast codes and head smoothing included)
    G_HP, G_PH = parser.get_parsed_content("G_HP"), parser.get_parsed_content("G_PH")
    if args.ckpt:
        G_HP = load_network_weights(G_HP, args.ckpt, key="G_HP")
        G_PH = load_network_weights(G_PH, args.ckpt, key="G_PH")
    else:
        models = Path(args.models_dir or bundle / "models")
        G_HP = load_network_weights(G_HP, models / "G_HP.pt")
        G_PH = load_network_weights(G_PH, models / "G_PH.pt")
    datalist = Path(args.datalist or bundle / "data" / "phantom" / "datalist.json")
    from transforms.lesion_mask import LesionBank

    bank = LesionBank.load(Path(args.models_dir or bundle / "models") / "lesion_bank.npz")
    healthy, patho = first_scans(datalist, args.split)

    with torch.no_grad():
        h = load_scan(healthy, "pathological", bank, args.n_lesions, args.seed)
        syn = synthesize_volume(G_HP, h["image"], h["label"], code_seed=args.seed)[0].numpy()
        p = load_scan(patho, "pseudo_healthy")
        ph = synthesize_volume(G_PH, p["image"], p["label"])[0].numpy()

    fig, axes = plt.subplots(3, 6, figsize=(15, 8.4))
    for row, (scan, out, names) in enumerate(
        [(h, syn, ("healthy x_h", "sampled mask y_p", "synthetic G_HP(x_h, y_p)")),
         (p, ph, ("pathological x_p", "its mask y_p", "pseudo-healthy G_PH(x_p, y_p)"))]
    ):  # fmt: skip
        img, lab = scan["image"][0].numpy(), scan["label"][0].numpy()
        z, box = _slice_and_box(lab)
        a, m, o = img[:, :, z], lab[:, :, z], out[:, :, z]
        _show(axes[row, 0], a, f"{names[0]} (z={z})", box)
        _show(axes[row, 1], a, names[1], box, mask=m)
        _show(axes[row, 2], o, names[2], box)
        _show(axes[row, 3], a, "close-up: input", box, close=True)
        _show(axes[row, 4], a, "close-up: mask", box, mask=m, close=True)
        _show(axes[row, 5], o, "close-up: output", box, close=True)
    # real and synthetic lesions side by side at the same zoom and grey levels: 3 of each, 16 x 16 voxels
    crops = [("real", c) for c in _lesion_crops(p["image"][0].numpy(), p["label"][0].numpy())]
    crops += [("synthetic", c) for c in _lesion_crops(syn, h["label"][0].numpy())]
    for ax, (kind, crop) in zip(axes[2], crops):
        ax.imshow(crop.T, cmap="gray", origin="lower", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{kind} CMB (16 x 16 voxels)", fontsize=8)
        ax.axis("off")
    for ax in axes[2][len(crops):]:
        ax.axis("off")
    src = Path(args.ckpt).name if args.ckpt else f"{args.models_dir or 'models'}/G_HP.pt, G_PH.pt"
    fig.suptitle(
        f"cmb_synthesis ({src}): {healthy.id} (top), {patho.id} (bottom); red = mask, yellow = close-up", fontsize=9
    )
    fig.tight_layout()
    out_path = Path(args.output or bundle / "docs" / "synthesis_montage.png")
    with atomic_output(out_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    print(out_path)


if __name__ == "__main__":
    main()

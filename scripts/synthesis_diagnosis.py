"""Where do painted lesions lose their dark centre? Radial profiles of every image the two cycles make.

For a trained synthesis run (``--models_dir`` holding ``G_HP.pt`` and ``G_PH.pt``; the evaluated weights, i.e. the
EMA ones when the preset keeps them), on the bundle's fixed validation patches (``validate#items`` of
``configs/train.yaml``, the same patches the evaluator measures), the mean radial profile (intensity relative to
the surrounding tissue at 0..4 voxels from each lesion centre, :mod:`cmb_synthesis.synthesis.realism`) of:

- ``real``: real CMBs ``x_p`` under their masks;
- ``synthetic``: ``G_HP(x_h, y_hp)``, lesions painted on healthy patches (the realism metrics' synthetic set);
- ``healthy_input``: ``x_h`` under the sampled masks (before painting; ~1 everywhere);
- ``pseudo_healthy``: ``G_PH(x_p, y_p)`` (1 = the lesion removed);
- ``php_reconstruction``: ``G_HP(G_PH(x_p, y_p), y_p)`` (the PHP cycle, which should give back ``real``);
- ``identity_on_real``: ``G_HP(x_p, y_p)`` (a real CMB under its own mask: should stay ``real``);
- ``identity_on_healthy``: ``G_PH(x_h, y_hp)`` (healthy tissue under a mask: should stay ~1).

    python scripts/synthesis_diagnosis.py --models_dir bundles/cmb_synthesis/ablation/lesion_critic/seed0/models \\
        --output bundles/cmb_synthesis/ablation/lesion_critic/seed0/diagnosis.json [--override lambda_x=1 ...]

Overrides (``key=value``, values parsed as YAML) rebuild the networks as the run trained them when its network
settings differ from ``train.yaml``'s.

``--forces N`` adds the tug of war on the painter: over N training batches (``train#dataloader``), the gradient of
each weighted generator term on ``G_HP``'s parameters (with the run's trained critics), projected on the
direction of the lesion profile term's gradient (``PM_lesion``; a run without it is refused). Positive: the term
pulls the same way as the profile matching; negative: against it (the batch means of the projection and of the
gradient norm, in ``forces``).

``--ranks`` (a contrast-code run, :mod:`cmb_synthesis.synthesis.codes`) adds, per darkness rank 0 / 0.25 / 0.5 /
0.75 / 1 and size bin, the mean centre intensity of the validation lesions painted at that rank and the real
training CMBs' centre at that rank (in ``ranks``).

``--edges`` adds what tells a painted lesion from a real one (in ``edges``): per-lesion features of the classifier's
7^3 patches (centre intensity; edge roughness, the std of the 3-D Laplacian 2-3 voxels from the centre; the spread
within the shells at 1 and 2 voxels) for the real reference lesions, the painted ones and the healthy input under
the same masks, each feature's own two-sample AUC and the full-patch AUC (10 CV repetitions); where in the patch
they differ (the standardised mean difference per voxel on the central planes) and the mean along the x, y and z
lines through the centre.

``--subvoxel`` samples every classifier patch (trilinear) on the 7^3 grid centred at the lesion's exact centre of
mass instead of its rounded centre, for every measurement of the run (a check of patch alignment).

``--offsets`` adds where the generators change the tissue away from the lesions (the mean signed and absolute
change per band of distance from the mask: the same shift in every band is a global brightness offset) and each
domain's crop brightness over 40 training batches (``x_h``, ``x_p``, ``x_p2``; in ``offsets``).

``--centring`` adds where ``G_HP`` paints a ball on a featureless noisy patch (the darkness centroid's offset,
both parities of the centre): the network's own geometry, apart from the content of real patches.

``--composition`` adds how much of the centre ratio is lesion-size composition (in ``composition``): the painted
validation lesions (``G_HP`` on the evaluator's validation patches) and the evaluator's real reference lesions
(every CMB of the ``realism_split`` scans) are split into the training split's quantile size bins
(:func:`cmb_synthesis.synthesis.realism.size_binned_profiles`, ``--size_bins`` bins; default the run's
``profile_size_bins``, at least 2); per bin the
mean centre intensity of each set and of the training lesions; the centre ratio as the evaluator computes it
(``raw``), with the painted bins re-weighted to the real lesions' size composition (``size_matched``), and the two
that a generator painting every size exactly like the training lesions would score (``training_match_raw``,
``training_match_size_matched``); and the whole radial profile per bin of both sets (``profile_*_by_bin``).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai.bundle import ConfigParser  # noqa: E402

from cmb_synthesis.data.io import write_json  # noqa: E402
import cmb_synthesis.synthesis.realism as R  # noqa: E402
from cmb_synthesis.synthesis.realism import batch_measurements  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _run_config(models_dir: Path, overrides: dict | None = None) -> ConfigParser:
    """``configs/train.yaml`` as the run in ``models_dir`` was trained (``overrides``: the run's own values)."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles/cmb_synthesis/configs/train.yaml"))
    parser["ckpt_dir"] = str(models_dir)
    for k, v in (overrides or {}).items():
        parser[k] = v
    return parser


def _code_masks(parser: ConfigParser, G_HP: torch.nn.Module):
    """How the run gives G_HP its masks: contrast codes as the trainer / evaluator make them (a random rank per
    painted lesion, seeded by the item's index; the measured rank of real lesions), or the masks as they are."""
    code = parser.get_parsed_content("lesion_code") if getattr(G_HP, "mask_code", False) else None

    def paint(i: int, y: torch.Tensor) -> torch.Tensor:
        return y if code is None else code.random(y.long(), torch.Generator().manual_seed(int(i)))

    def real(x: torch.Tensor, y: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return y if code is None else code.measure(x, y, b)

    return paint, real


def _trained(parser: ConfigParser, models_dir: Path, *names: str) -> list[torch.nn.Module]:
    """The run's networks ``names`` (e.g. ``"G_HP"``), built from ``parser`` and loaded from ``models_dir/<name>.pt``,
    in eval mode."""
    missing = [f"{n}.pt" for n in names if not (models_dir / f"{n}.pt").is_file()]
    if missing:
        raise FileNotFoundError(f"{models_dir}: no {', '.join(missing)} (a finished synthesis run writes them)")
    nets = []
    for name in names:
        net = parser.get_parsed_content(name)
        net.load_state_dict(torch.load(models_dir / f"{name}.pt", map_location="cpu"))
        nets.append(net.eval())
    return nets


def diagnose(models_dir: Path, overrides: dict | None = None) -> dict:
    parser = _run_config(models_dir, overrides)
    G_HP, G_PH = _trained(parser, models_dir, "G_HP", "G_PH")
    profiles: dict[str, list[np.ndarray]] = {k: [] for k in (
        "real", "synthetic", "healthy_input", "pseudo_healthy", "php_reconstruction", "identity_on_real",
        "identity_on_healthy")}
    paint, real = _code_masks(parser, G_HP)
    with torch.no_grad():
        for i, it in enumerate(parser.get_parsed_content("validate#items")):
            x_h, y_hp, b_h = (torch.as_tensor(it[k])[None].float() for k in ("x_h", "y_hp", "brainmask_h"))
            x_p, y_p, b_p = (torch.as_tensor(it[k])[None].float() for k in ("x_p", "y_p", "brainmask_p"))
            c_hp, c_p = paint(i, y_hp), real(x_p, y_p, b_p)
            fake_h = G_PH(x_p, y_p)
            for key, img, y, b in (
                ("real", x_p, y_p, b_p), ("synthetic", G_HP(x_h, c_hp), y_hp, b_h),
                ("healthy_input", x_h, y_hp, b_h), ("pseudo_healthy", fake_h, y_p, b_p),
                ("php_reconstruction", G_HP(fake_h, c_p), y_p, b_p), ("identity_on_real", G_HP(x_p, c_p), y_p, b_p),
                ("identity_on_healthy", G_PH(x_h, y_hp), y_hp, b_h),
            ):
                profiles[key].append(batch_measurements(img, y, b)[0])
    # the JSON is a committed artefact: a run inside the repository by its relative path, any other by its last
    # components only (no machine's absolute path)
    shown = (models_dir.relative_to(ROOT) if models_dir.is_relative_to(ROOT)
             else Path("<outside the repository>", *models_dir.parts[-4:]))
    out = {"models_dir": str(shown), "overrides": overrides or {}, "radii": [0, 1, 2, 3, 4]}
    for key, parts in profiles.items():
        p = np.concatenate(parts) if parts else np.zeros((0, 5))
        out[key] = {"n_lesions": int(len(p)), "profile": [round(float(v), 4) for v in np.nanmean(p, 0)]}
    return out


def forces(models_dir: Path, n_batches: int, overrides: dict | None = None, reference: str = "PM_lesion") -> dict:
    """Each weighted generator term's gradient on G_HP's parameters projected on the ``reference`` term's
    direction, averaged over ``n_batches`` training batches: ``{term: {"projection": .., "norm": ..}}``."""
    parser = _run_config(models_dir, overrides)
    objective = parser.get_parsed_content("train#trainer").generator_objective
    for name in ("G_HP", "G_PH", "D_P", "D_H", "D_P_lesion", "D_H_lesion"):
        if (models_dir / f"{name}.pt").is_file() and parser.get(name) is not None:
            net = parser.get_parsed_content(name)
            net.load_state_dict(torch.load(models_dir / f"{name}.pt", map_location="cpu"))
            net.eval()
    terms = {t.name: t for t in objective.terms}
    if reference not in terms:
        raise ValueError(f"{models_dir}: the run's generator terms {sorted(terms)} have no {reference!r}")
    G_HP, G_PH = objective.G_HP, objective.G_PH
    params = list(G_HP.parameters())
    sums: dict[str, np.ndarray] = {}
    for i, b in enumerate(parser.get_parsed_content("train#dataloader")):
        if i >= n_batches:
            break
        b = {k: v.float() for k, v in b.items()}
        if getattr(parser.get_parsed_content("train#trainer"), "lesion_code", None) is not None:  # as the trainer does
            code = parser.get_parsed_content("train#trainer").lesion_code
            b["y_hp"], b["y_p"] = code.random(b["y_hp"].long()), code.measure(b["x_p"], b["y_p"], b["brainmask_p"])
        cycle = {k: b[k] for k in ("x_h", "y_hp", "x_p", "y_p", "brainmask_h", "brainmask_p")}
        cycle.update(D_P=objective.D_P, D_H=objective.D_H, G_HP=G_HP, G_PH=G_PH)
        # the two cycles as GeneratorObjective.forward makes them
        cycle["fake_p"] = G_HP(b["x_h"], b["y_hp"])
        cycle["rec_h"] = G_PH(cycle["fake_p"], b["y_hp"])
        cycle["id_h"] = G_PH(b["x_h"], torch.zeros_like(b["y_hp"]))
        cycle["fake_h"] = G_PH(b["x_p"], b["y_p"])
        cycle["rec_p"] = G_HP(cycle["fake_h"], b["y_p"])
        cycle["id_p"] = G_HP(b["x_p"], b["y_p"])
        grads = {}
        for name, t in terms.items():
            value = t.weight * t(cycle)
            if not value.requires_grad:
                grads[name] = torch.zeros(sum(q.numel() for q in params))
                continue
            gs = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            grads[name] = torch.cat([(g if g is not None else torch.zeros_like(q)).flatten() for g, q in zip(gs, params)])
        ref = grads[reference]
        unit = ref / ref.norm().clamp(min=1e-12)
        for name, g in grads.items():
            sums[name] = sums.get(name, np.zeros(2)) + np.array([float(g @ unit), float(g.norm())])
    n = max(1, min(n_batches, i + 1))
    return {name: {"projection": round(v[0] / n, 4), "norm": round(v[1] / n, 4)} for name, v in sums.items()}


def composition(models_dir: Path, overrides: dict | None = None, size_bins: int | None = None) -> dict:
    """The centre ratio split into generator and size-composition parts (see the module docstring)."""
    from cmb_synthesis.synthesis.realism import lesion_measurements, size_binned_profiles, split_lesions

    parser = _run_config(models_dir, overrides)
    (G_HP,) = _trained(parser, models_dir, "G_HP")
    paint, _ = _code_masks(parser, G_HP)
    datalist = parser.get_parsed_content("datalist")
    n_bins = max(2, int(size_bins or parser.get_parsed_content("profile_size_bins")))
    train = size_binned_profiles(datalist, "training", n_bins)
    # the evaluator's real reference (RealismMetric: every CMB of the realism split's scans), with sizes
    split = str(parser.get_parsed_content("realism_split"))
    real_profiles, _, rs = split_lesions(datalist, split)
    rc = real_profiles[:, 0]
    syn_profiles, syn_sizes = [], []
    with torch.no_grad():
        for i, it in enumerate(parser.get_parsed_content("validate#items")):
            x_h, y_hp, b_h = (torch.as_tensor(it[k])[None].float() for k in ("x_h", "y_hp", "brainmask_h"))
            prof, _, sizes = lesion_measurements(G_HP(x_h, paint(i, y_hp))[0], y_hp[0], b_h[0], return_sizes=True)
            syn_profiles.append(prof)
            syn_sizes.append(sizes)
    sp, ss = np.concatenate(syn_profiles), np.concatenate(syn_sizes)
    sc = sp[:, 0]
    if not len(rc) or not len(sc):
        raise ValueError(f"{models_dir}: no measurable real or painted validation lesion")
    edges, n = train["edges"], len(train["edges"]) + 1
    rb, sb = np.searchsorted(edges, rs, side="right"), np.searchsorted(edges, ss, side="right")
    real_w = np.bincount(rb, minlength=n) / len(rb)
    syn_w = np.bincount(sb, minlength=n) / len(sb)
    syn_bin = np.array([sc[sb == k].mean() if (sb == k).any() else np.nan for k in range(n)])
    real_bin = np.array([rc[rb == k].mean() if (rb == k).any() else np.nan for k in range(n)])
    ref = rc.mean()
    # bins without a painted lesion fall back to the painted mean (noted by count 0)
    syn_filled = np.where(np.isnan(syn_bin), sc.mean(), syn_bin)
    r = lambda v: round(float(v), 4)  # noqa: E731
    pct = lambda a: [r(v) for v in np.percentile(a, [10, 25, 50, 75, 90])]  # noqa: E731
    return {
        "edges": [r(e) for e in edges],
        "count_synthetic": np.bincount(sb, minlength=n).tolist(), "count_real": np.bincount(rb, minlength=n).tolist(),
        "size_percentiles_10_25_50_75_90": {"synthetic": pct(ss), "real": pct(rs), "training": pct(train["sizes"])},
        "centre_synthetic": [r(v) for v in syn_bin], "centre_real": [r(v) for v in real_bin],
        "centre_training": [r(v) for v in train["profiles"][:, 0]],
        # the whole radial profile (d = 0..4) per size bin: where painting departs from real lesions of its size
        "profile_synthetic_by_bin": [[r(v) for v in sp[sb == k].mean(0)] if (sb == k).any() else None for k in range(n)],
        "profile_real_by_bin": [[r(v) for v in real_profiles[rb == k].mean(0)] if (rb == k).any() else None
                                for k in range(n)],
        "realism_split": split,
        "centre_ratio_raw": r(sc.mean() / ref), "centre_ratio_size_matched": r((real_w * syn_filled).sum() / ref),
        "training_match_raw": r((syn_w * train["profiles"][:, 0]).sum() / ref),
        "training_match_size_matched": r((real_w * train["profiles"][:, 0]).sum() / ref),
        "n_real": int(len(rc)), "n_synthetic": int(len(sc)), "real_reference_centre": r(ref),
    }


def ranks(models_dir: Path, overrides: dict | None = None, levels: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> dict:
    """Does a contrast-code G_HP paint the rank it is asked for? The evaluator's validation patches painted with
    every lesion at each rank of ``levels``; per rank and size bin (the code's bins) the mean painted centre
    intensity, beside the real training CMBs' centre at that rank (the profile term's target)."""
    from cmb_synthesis.synthesis.codes import random_codes
    from cmb_synthesis.synthesis.realism import lesion_measurements

    parser = _run_config(models_dir, overrides)
    (G_HP,) = _trained(parser, models_dir, "G_HP")
    if not getattr(G_HP, "mask_code", False):
        raise ValueError(f"{models_dir}: the run's G_HP has no contrast codes (contrast_code false)")
    code = parser.get_parsed_content("lesion_code")
    edges, n = code.edges.numpy(), len(code.edges) + 1
    items = parser.get_parsed_content("validate#items")
    r = lambda v: None if v is None or not np.isfinite(v) else round(float(v), 4)  # noqa: E731
    out = {"edges": [r(e) for e in edges], "ranks": list(levels), "painted": [], "target": [], "count": None}
    with torch.no_grad():
        for q in levels:
            centres, sizes = [], []
            for it in items:
                x_h, y_hp, b_h = (torch.as_tensor(it[k])[None].float() for k in ("x_h", "y_hp", "brainmask_h"))
                prof, _, sz = lesion_measurements(G_HP(x_h, random_codes(y_hp.long(), ranks=q))[0], y_hp[0], b_h[0],
                                                  return_sizes=True)
                centres.append(prof[:, 0])
                sizes.append(sz)
            c, b = np.concatenate(centres), np.searchsorted(edges, np.concatenate(sizes), side="right")
            out["painted"].append([r(c[b == k].mean()) if (b == k).any() else None for k in range(n)])
            out["count"] = np.bincount(b, minlength=n).tolist()
            target = code.target(torch.full((n,), float(q)), torch.tensor([0.0, *edges]))[:, 0]
            out["target"].append([r(v) for v in target.tolist()])
    return out


def patch_features(patches: np.ndarray) -> dict[str, np.ndarray]:
    """Per-lesion features of the classifier's (L, 7^3) normalised patches: the centre intensity, the edge
    roughness (std of the 3-D Laplacian over the voxels 2-3 from the centre: a step at the label's edge makes it
    large, a graded blooming edge small) and the spread of intensities within the shells at 1 and 2 voxels."""
    from scipy import ndimage

    n = round(patches.shape[1] ** (1 / 3))
    p = patches.reshape(-1, n, n, n).astype(np.float64)
    g = np.arange(n) - n // 2
    d = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    lap = np.stack([ndimage.laplace(q) for q in p]) if len(p) else p
    return {
        "centre": p[:, n // 2, n // 2, n // 2],
        "edge_roughness": lap[:, (d >= 2) & (d <= 3)].std(1),
        "shell1_spread": p[:, np.abs(d - 1) < 0.5].std(1),
        "shell2_spread": p[:, np.abs(d - 2) < 0.5].std(1),
    }


def edges(models_dir: Path, overrides: dict | None = None, n_repeats: int = 10) -> dict:
    """What tells the painted lesions from the real ones: per feature of :func:`patch_features`, the mean and sd
    over the evaluator's real reference lesions, the painted ones and the healthy input under the same masks, and
    the classifier two-sample AUC of that feature alone (real vs painted; ``n_repeats`` CV repetitions); and the
    evaluator's full-patch AUC (the same repetitions)."""
    from cmb_synthesis.synthesis.realism import batch_measurements, two_sample_auc

    parser = _run_config(models_dir, overrides)
    (G_HP,) = _trained(parser, models_dir, "G_HP")
    paint, _ = _code_masks(parser, G_HP)
    painted, healthy = [], []
    with torch.no_grad():
        for i, it in enumerate(parser.get_parsed_content("validate#items")):
            x_h, y_hp, b_h = (torch.as_tensor(it[k])[None].float() for k in ("x_h", "y_hp", "brainmask_h"))
            painted.append(batch_measurements(G_HP(x_h, paint(i, y_hp)), y_hp, b_h)[1])
            healthy.append(batch_measurements(x_h, y_hp, b_h)[1])
    real = parser.get_parsed_content("validate#realism_reference")[1]
    sets = {"real": real, "synthetic": np.concatenate(painted), "healthy_input": np.concatenate(healthy)}
    feats = {k: patch_features(v) for k, v in sets.items()}
    r = lambda v: round(float(v), 4)  # noqa: E731
    out = {"n": {k: int(len(v)) for k, v in sets.items()},
           "full_patch_auc": r(two_sample_auc(sets["real"], sets["synthetic"], n_repeats=n_repeats)), "features": {}}
    # where in the 7^3 patch they differ: the standardised mean difference (painted - real) / pooled sd per voxel,
    # on the three central planes, and each set's mean along the x, y and z lines through the centre (anisotropy)
    n = round(real.shape[1] ** (1 / 3))
    cube = {k: v.reshape(-1, n, n, n).astype(np.float64) for k, v in sets.items()}
    sd = np.sqrt(0.5 * (cube["real"].var(0) + cube["synthetic"].var(0))) + 1e-6
    smd = (cube["synthetic"].mean(0) - cube["real"].mean(0)) / sd
    c = n // 2
    out["standardised_difference"] = {
        "max_abs": r(np.abs(smd).max()), "argmax_offset_from_centre": [int(i) - c for i in np.unravel_index(np.abs(smd).argmax(), smd.shape)],
        "plane_xy": np.round(smd[:, :, c], 2).tolist(), "plane_xz": np.round(smd[:, c, :], 2).tolist(),
        "plane_yz": np.round(smd[c, :, :], 2).tolist()}
    out["axis_profiles"] = {k: {"x": np.round(v.mean(0)[:, c, c], 3).tolist(), "y": np.round(v.mean(0)[c, :, c], 3).tolist(),
                                "z": np.round(v.mean(0)[c, c, :], 3).tolist()} for k, v in cube.items()}
    # the darkness-weighted centroid of the inner 5^3 (weights 1 - intensity, clipped at 0) relative to the label's
    # centre voxel, in voxels: a painter that paints off the mask's centre shows a mean offset
    g = np.arange(n) - c
    inner = (np.abs(g)[:, None, None] <= 2) & (np.abs(g)[None, :, None] <= 2) & (np.abs(g)[None, None, :] <= 2)
    out["darkness_centroid_offset"] = {}
    for k, v in cube.items():
        w = np.clip(1.0 - v, 0.0, None) * inner
        tot = w.sum((1, 2, 3)) + 1e-9
        off = np.stack([(w * g[:, None, None]).sum((1, 2, 3)), (w * g[None, :, None]).sum((1, 2, 3)),
                        (w * g[None, None, :]).sum((1, 2, 3))], 1) / tot[:, None]
        out["darkness_centroid_offset"][k] = {"mean": np.round(off.mean(0), 3).tolist(),
                                             "sem": np.round(off.std(0) / np.sqrt(max(len(off), 1)), 3).tolist()}
    for name in feats["real"]:
        out["features"][name] = {
            **{k: {"mean": r(f[name].mean()), "sd": r(f[name].std())} for k, f in feats.items()},
            "auc_real_vs_synthetic": r(two_sample_auc(feats["real"][name][:, None], feats["synthetic"][name][:, None],
                                                      n_repeats=n_repeats)),
        }
    return out


def centring(models_dir: Path, overrides: dict | None = None, seed: int = 0) -> dict:
    """Where ``G_HP`` paints on a featureless patch: a ball of radius 1.6 voxels at centres of both parities in a
    noisy uniform 32 x 32 x 16 patch (0.6 +- 0.02); the darkness-weighted centroid (weights input - output,
    clipped at 0) of the 7^3 around the ball, relative to its centre, in voxels. Near 0 in every axis: the
    network's geometry is centred, and an offset on real patches comes from their content."""
    parser = _run_config(models_dir, overrides)
    (G_HP,) = _trained(parser, models_dir, "G_HP")
    shape = (32, 32, 16)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    rng = np.random.default_rng(seed)
    out = []
    for cz in (6, 7, 8, 9):
        for cxy in (15, 16):
            c = np.array([cxy, cxy, cz], float)
            ball = ((grid - c) ** 2).sum(-1) <= 1.6 ** 2
            img = 0.6 + 0.02 * rng.standard_normal(shape)
            with torch.no_grad():
                y = G_HP(torch.tensor(img, dtype=torch.float32)[None, None],
                         torch.tensor(ball, dtype=torch.float32)[None, None])[0, 0].numpy()
            sl = tuple(slice(int(v) - 3, int(v) + 4) for v in c)
            w = np.clip(img - y, 0, None)[sl]
            off = (w[..., None] * (grid[sl] - c)).sum((0, 1, 2)) / max(w.sum(), 1e-9)
            out.append({"centre": c.astype(int).tolist(), "offset": [round(float(v), 3) for v in off]})
    return {"balls": out, "mean_offset": np.round(np.mean([b["offset"] for b in out], 0), 3).tolist()}


def offsets(models_dir: Path, overrides: dict | None = None, n_batches: int = 40,
            bands: tuple[tuple[int, int], ...] = ((3, 4), (5, 6), (7, 9), (10, 1000)), seed: int = 0) -> dict:
    """Where the generators change the tissue away from the lesions, and how bright each domain's crops are.

    ``change``: on the evaluator's validation patches, the mean signed and absolute change ``G_HP(x_h, y) - x_h``
    and ``G_PH(x_p, y_p) - x_p`` over brain voxels at each band of (Euclidean) distance from the mask (voxels); a
    change of the same sign and size in every band is a global brightness shift (what the identity error
    measures beyond 2 voxels). ``crops``: over ``n_batches`` training batches (``train#dataloader``), each
    domain's crop mean, its fraction of background (< 0.05) and its median tissue intensity (> 0.05, more than 3
    voxels from the mask), averaged over crops: ``x_h`` healthy, ``x_p`` pathological, ``x_p2`` the critic's real
    pathological sample. A difference between ``x_h`` and ``x_p2`` is one a whole-patch critic can score. The
    batches are drawn with ``set_determinism(seed)`` (MONAI's DataLoader seeds the dataset from torch's generator),
    so a rerun draws the same crops."""
    from monai.utils import set_determinism
    from scipy import ndimage as ndi

    parser = _run_config(models_dir, overrides)
    G_HP, G_PH = _trained(parser, models_dir, "G_HP", "G_PH")
    paint, _ = _code_masks(parser, G_HP)
    sums = {g: {b: [0.0, 0.0, 0] for b in bands} for g in ("G_HP", "G_PH")}
    with torch.no_grad():
        for i, it in enumerate(parser.get_parsed_content("validate#items")):
            x_h, y_hp, b_h = (torch.as_tensor(it[k])[None].float() for k in ("x_h", "y_hp", "brainmask_h"))
            x_p, y_p, b_p = (torch.as_tensor(it[k])[None].float() for k in ("x_p", "y_p", "brainmask_p"))
            for g, change, y, b in (("G_HP", G_HP(x_h, paint(i, y_hp)) - x_h, y_hp, b_h),
                                    ("G_PH", G_PH(x_p, y_p) - x_p, y_p, b_p)):
                d, dist = change[0, 0].numpy(), ndi.distance_transform_edt(y[0, 0].numpy() <= 0)
                for lo, hi in bands:
                    sel = (b[0, 0].numpy() > 0) & (dist >= lo) & (dist <= hi)
                    acc = sums[g][(lo, hi)]
                    acc[0] += float(d[sel].sum()); acc[1] += float(np.abs(d[sel]).sum()); acc[2] += int(sel.sum())
    change = {g: [{"distance": [lo, hi], "n_voxels": n, "mean_change": round(sd / max(n, 1), 5),
                   "mean_abs_change": round(sa / max(n, 1), 5)} for (lo, hi), (sd, sa, n) in v.items()]
              for g, v in sums.items()}
    stats: dict[str, dict[str, list[float]]] = {k: {"mean": [], "background": [], "tissue_median": []}
                                                 for k in ("x_h", "x_p", "x_p2")}
    set_determinism(seed)
    for i, batch in enumerate(parser.get_parsed_content("train#dataloader")):
        if i >= n_batches:
            break
        for k, y in (("x_h", "y_hp"), ("x_p", "y_p"), ("x_p2", "y_p2")):
            x, m = batch[k].numpy(), batch[y].numpy() > 0
            for j in range(x.shape[0]):
                tissue = (x[j, 0] > 0.05) & ~ndi.binary_dilation(m[j, 0], iterations=3)
                stats[k]["mean"].append(float(x[j].mean()))
                stats[k]["background"].append(float((x[j] < 0.05).mean()))
                stats[k]["tissue_median"].append(float(np.median(x[j, 0][tissue])))
    set_determinism(None)
    crops = {k: {f: round(float(np.mean(v)), 4) for f, v in s.items()} | {"n": len(s["mean"])} for k, s in stats.items()}
    return {"change": change, "crops": crops, "seed": seed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models_dir", type=Path, required=True)
    ap.add_argument("--output", type=Path, default=None, help="JSON file (default: <models_dir>/../diagnosis.json)")
    ap.add_argument("--override", nargs="*", default=[], help="key=value config overrides (YAML values)")
    ap.add_argument("--forces", type=int, default=0, metavar="N", help="also the terms' pull on G_HP over N training batches")
    ap.add_argument("--composition", action="store_true", help="also the centre ratio split into generator and size composition")
    ap.add_argument("--size_bins", type=int, default=None, help="size bins of --composition (default: the run's profile_size_bins, >= 2)")
    ap.add_argument("--ranks", action="store_true", help="also the painted centre per contrast rank and size bin (a contrast-code run)")
    ap.add_argument("--subvoxel", action="store_true", help="classifier patches sampled at each lesion's exact centre of mass (all measurements of this run)")
    ap.add_argument("--centring", action="store_true", help="also where G_HP paints a ball on a featureless patch (offset, voxels)")
    ap.add_argument("--edges", action="store_true", help="also per-lesion features (edge roughness, ...) of real vs painted lesions, with their AUCs")
    ap.add_argument("--offsets", action="store_true", help="also the generators' change by distance from the mask and the domains' crop brightness")
    a = ap.parse_args(argv)
    if a.subvoxel:  # every measurement of this run, the evaluator's real reference included
        R.lesion_measurements = functools.partial(R.lesion_measurements, subvoxel=True)
    overrides = {}
    for kv in a.override:
        k, sep, v = kv.partition("=")
        if not sep:
            ap.error(f"--override expects key=value, got {kv!r}")
        overrides[k] = yaml.safe_load(v)
    out = diagnose(a.models_dir.resolve(), overrides)
    if a.forces > 0:
        out["forces"] = forces(a.models_dir.resolve(), a.forces, overrides)
    if a.composition:
        out["composition"] = composition(a.models_dir.resolve(), overrides, a.size_bins)
    if a.ranks:
        out["ranks"] = ranks(a.models_dir.resolve(), overrides)
    if a.edges:
        out["edges"] = edges(a.models_dir.resolve(), overrides)
    if a.centring:
        out["centring"] = centring(a.models_dir.resolve(), overrides)
        print(f"centring on a featureless patch: mean darkness offset (x y z) {out['centring']['mean_offset']} voxels")
    if a.offsets:
        out["offsets"] = offsets(a.models_dir.resolve(), overrides)
        for g, rows in out["offsets"]["change"].items():
            print(g, "change by distance from the mask:", ", ".join(
                f"{r['distance'][0]}-{r['distance'][1]}: {r['mean_change']:+.4f} (|.| {r['mean_abs_change']:.4f})" for r in rows))
        for k, c in out["offsets"]["crops"].items():
            print(f"crops {k:5s} mean {c['mean']:.4f}  background {c['background']:.4f}  tissue median {c['tissue_median']:.4f}  (n {c['n']})")
    dest = a.output or a.models_dir.resolve().parent / "diagnosis.json"
    write_json(out, dest)
    for key in (k for k, v in out.items() if isinstance(v, dict) and "profile" in v):
        print(f"{key:20s} n={out[key]['n_lesions']:3d} profile {out[key]['profile']}")
    for name, f in out.get("forces", {}).items():
        print(f"{name:12s} pull along PM_lesion {f['projection']:+10.3f}  gradient norm {f['norm']:9.3f}")
    if "composition" in out:
        c = out["composition"]
        print(f"size bins (training quantiles) {c['edges']}: painted {c['count_synthetic']}, real {c['count_real']}")
        print(f"centre per bin: painted {c['centre_synthetic']}, real {c['centre_real']}, training {c['centre_training']}")
        print(f"centre ratio {c['centre_ratio_raw']} (size-matched {c['centre_ratio_size_matched']}); a generator "
              f"painting like the training lesions: {c['training_match_raw']} (size-matched {c['training_match_size_matched']})")
    if "ranks" in out:
        for q, painted, target in zip(out["ranks"]["ranks"], out["ranks"]["painted"], out["ranks"]["target"]):
            print(f"rank {q:.2f}: painted centre per size bin {painted}, real {target}")
    if "edges" in out:
        e = out["edges"]
        print(f"full-patch AUC {e['full_patch_auc']} (real n={e['n']['real']}, painted n={e['n']['synthetic']})")
        for name, f in e["features"].items():
            print(f"{name:15s} real {f['real']['mean']:.3f}  painted {f['synthetic']['mean']:.3f}  healthy input "
                  f"{f['healthy_input']['mean']:.3f}  AUC alone {f['auc_real_vs_synthetic']:.3f}")
        sm = e["standardised_difference"]
        print(f"standardised difference painted - real: max |d| {sm['max_abs']} at offset {sm['argmax_offset_from_centre']}")
        for k, v in e["darkness_centroid_offset"].items():
            print(f"darkness centroid offset (voxels, x y z) {k:13s} {v['mean']} +- {v['sem']}")
        for k in ("real", "synthetic"):
            print(f"{k:10s} mean along x {e['axis_profiles'][k]['x']}  y {e['axis_profiles'][k]['y']}  z {e['axis_profiles'][k]['z']}")
    print(f"written: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

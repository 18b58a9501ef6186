"""One phantom subject: anatomy + veins + CMBs -> an SWI-like magnitude volume.

Contrast model (relative to white matter = 1): GM 0.86, CSF 1.4 (SWI magnitude is T2*-weighted: fluid
bright), deep grey nuclei darkened by iron (see ``anatomy.DEEP_NUCLEI``), veins 35-60 % darker
(deoxyhaemoglobin), CMB cores 20-40 % of the surrounding tissue with a blooming rim; scalp shell outside the
brain, partial-volume blur, a smooth multiplicative bias field (about +-15 %), Rician noise at SNR 20-35 in
white matter, on a scanner-like scale (white matter ~ 400).

:data:`REALISM_OPTIONS` (all off by default; the ``benchmark`` preset turns them on) add harder lesions
(``lesion_model="benchmark"``), more mimics (vein bifurcations, vessels in cross-section, ``mimics.py``), a
through-plane slice profile (``slice_thickness_mm``) and a ``site`` name. A subject with any of them set also
gets a mimic map (``PhantomSubject.mimics``) and one row per mimic; their random draws come from a separate
stream of the subject's seed, so the main stream (anatomy, veins, lesions, noise) is drawn as without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from cmb_synthesis.phantom.anatomy import sample_anatomy
from cmb_synthesis.phantom.lesions import place_lesions, sample_benchmark_specs, sample_count, sample_lesion_specs
from cmb_synthesis.phantom.mimics import MIMIC_CODES, artefact_field, focal_mimics
from cmb_synthesis.phantom.veins import branch_veins, cross_section_vessels, rasterize_tubes, trace_veins

__all__ = ["PhantomSubject", "simulate_subject", "slice_profile", "TISSUE_CODES", "DEFAULT_OPTIONS",
           "REALISM_OPTIONS"]

TISSUE_CODES = {"background": 0, "csf": 1, "gm": 2, "wm": 3, "deep_gm": 4}

DEFAULT_OPTIONS = dict(
    shape=(160, 146, 112),
    spacing=(0.98, 0.98, 1.0),
    wm_level=400.0,
    gm_rel=0.86,
    csf_rel=1.4,
    snr=(20.0, 35.0),
    bias=0.15,
    n_cortical_veins=160,
    n_medullary_veins=160,
    vein_depth=(0.35, 0.6),
    count_median=5.0,
    max_lesions=30,
    blur_sigma_vox=0.5,
)

# opt-in realism (see the module docstring); these defaults change nothing
REALISM_OPTIONS = dict(
    site=None,                       # site name, recorded in the datalist
    n_lesions=None,                  # planned CMB count (cohort-level plan) instead of a sampled one
    lesion_model="default",          # "benchmark": lesions.sample_benchmark_specs + partial-volume blooming
    faint_fraction=0.25,             # benchmark lesion model: share of faint CMBs (core darkening faint_depth)
    deposit_median_mm=2.0,           # benchmark lesion model: median haemosiderin deposit diameter (before blooming)
    lesion_depth=(0.45, 0.8),        # benchmark lesion model: core darkening of the other CMBs
    faint_depth=(0.25, 0.45),        # benchmark lesion model: core darkening of the faint CMBs
    slice_thickness_mm=None,         # through-plane slice profile (box of this width); None = none
    n_vein_branches=0,
    n_cross_vessels=0,
    mineralisation_rate=0.0,
    pineal_prob=0.0,
    choroid_prob=0.0,
    flow_void_prob=0.0,
    artefact_depth=(0.0, 0.0),       # air-bone susceptibility artefacts, peak darkening range
    artefact_scale=1.0,
)


@dataclass
class PhantomSubject:
    """Arrays on the SWI grid (shape X x Y x Z) and the RAS affine."""

    swi: np.ndarray            # float32, > 0
    brainmask: np.ndarray      # uint8 0/1
    cmb: np.ndarray            # uint16 instance labels (0 = background)
    tissue: np.ndarray         # uint8, TISSUE_CODES
    veins: np.ndarray          # uint8 0/1
    affine: np.ndarray
    lesions: list[dict] = field(default_factory=list)
    pathological: bool = False
    mimics: np.ndarray | None = None    # uint8 mimic map (mimics.MIMIC_CODES), realism options only
    mimic_rows: list[dict] = field(default_factory=list)
    site: str | None = None


def _bias_field(rng: np.random.Generator, shape, amplitude: float) -> np.ndarray:
    coords = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = coords[0][:, None, None], coords[1][None, :, None], coords[2][None, None, :]
    terms = [x, y, z, x * y, x * z, y * z, x * x - 0.33, y * y - 0.33, z * z - 0.33]
    c = rng.normal(0, amplitude / 2.5, len(terms))
    log_b = sum(float(ci) * t for ci, t in zip(c, terms))
    return np.exp(np.clip(log_b, -0.5, 0.5)).astype(np.float32)


def slice_profile(thickness_mm: float, spacing_mm: float) -> np.ndarray:
    """Through-plane kernel of a slice ``thickness_mm`` thick on a grid ``spacing_mm`` apart: a box sampled with
    partial overlap, normalised to sum 1 (``[1]`` for a thickness up to one spacing; 2 mm on 1 mm: 1/4, 1/2, 1/4)."""
    w = float(thickness_mm) / float(spacing_mm)
    n = max(0, int(np.ceil((w - 1.0) / 2.0 - 1e-9)))
    offs = np.arange(-n, n + 1, dtype=np.float64)
    k = np.clip(np.minimum(offs + 0.5, w / 2) - np.maximum(offs - 0.5, -w / 2), 0.0, None)
    return k / k.sum() if k.sum() > 0 else np.ones(1)


def _realism_rng(seed: int | np.random.SeedSequence) -> np.random.Generator:
    """A stream of ``seed`` independent of the main one (same seed, same draws)."""
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))
    return np.random.default_rng(np.random.SeedSequence(ss.entropy, spawn_key=(*ss.spawn_key, 0x6D696D)))


def _vessel_mimics(anat, veins: np.ndarray, code: np.ndarray, cross, points: np.ndarray, radii) -> list[dict]:
    """Mark vessels in cross-section and vein bifurcations (vein voxels within 2.5 mm of a branch point) in the
    mimic map ``code`` (in place); return their rows."""
    from cmb_synthesis.phantom.mimics import _row

    rows: list[dict] = []
    spacing = np.asarray(anat.spacing)
    if cross:
        occ = rasterize_tubes(veins.shape, spacing, cross)
        code[(occ >= 0.3) & (code == 0)] = MIMIC_CODES["cross_section_vessel"]
        rows += [_row("cross_section_vessel", anat, line[len(line) // 2], 2 * r, 0.0) for line, r in cross]
    half = np.ceil(2.5 / spacing).astype(int)
    for p, r in zip(points, radii):
        c = np.rint(p).astype(int)
        lo, hi = np.maximum(c - half, 0), np.minimum(c + half + 1, veins.shape)
        if np.any(hi <= lo):                   # branch point off the grid
            continue
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        g = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
        near = (np.linalg.norm((g - p) * spacing, axis=-1) <= 2.5) & (veins[sl] > 0) & (code[sl] == 0)
        code[sl][near] = MIMIC_CODES["vessel_bifurcation"]
        rows.append(_row("vessel_bifurcation", anat, p, 2 * r, 0.0))
    return rows


def simulate_subject(seed: int | np.random.SeedSequence, pathological: bool, **options) -> PhantomSubject:
    """Simulate one subject deterministically from ``seed`` (an int or a ``numpy.random.SeedSequence``).

    ``options`` override :data:`DEFAULT_OPTIONS` (grid ``shape``/``spacing``, contrast, vein counts, lesion
    count median ...) and :data:`REALISM_OPTIONS`. Healthy subjects (``pathological=False``) have no CMBs.
    Mimics are never labelled: CMBs keep the vein gap from veins and from every mimic in the mimic map.
    """
    unknown = set(options) - set(DEFAULT_OPTIONS) - set(REALISM_OPTIONS)
    if unknown:
        raise ValueError(f"unknown phantom options: {sorted(unknown)}")
    realism = any(k in REALISM_OPTIONS for k in options)
    opt = {**DEFAULT_OPTIONS, **REALISM_OPTIONS, **options}
    if opt["lesion_model"] not in ("default", "benchmark"):
        raise ValueError(f"lesion_model must be 'default' or 'benchmark', got {opt['lesion_model']!r}")
    shape = tuple(int(s) for s in opt["shape"])
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"phantom shape must be 3 sizes >= 16, got {opt['shape']}")
    rng = np.random.default_rng(seed)
    anat = sample_anatomy(rng, shape, tuple(opt["spacing"]))
    brain = anat.brain > 0.5

    tubes = trace_veins(rng, anat, int(opt["n_cortical_veins"]), int(opt["n_medullary_veins"]))
    if realism:
        xrng = _realism_rng(seed)
        branches, branch_points = branch_veins(xrng, anat, tubes, int(opt["n_vein_branches"]))
        cross = cross_section_vessels(xrng, anat, int(opt["n_cross_vessels"]))
        tubes = tubes + branches + cross
    occ = rasterize_tubes(shape, anat.spacing, tubes)
    occ *= ndimage.binary_dilation(brain, iterations=2)          # pial veins may sit just outside the mask
    veins = (occ >= 0.3).astype(np.uint8)          # 26-connected even for the thinnest (r 0.4 mm) veins

    mimics, mimic_rows = None, []
    if realism:
        mfactor, mimics, mimic_rows = focal_mimics(xrng, anat, opt["mineralisation_rate"], opt["pineal_prob"],
                                                   opt["choroid_prob"], opt["flow_void_prob"])
        mimic_rows += _vessel_mimics(anat, veins, mimics, cross, branch_points, [t[1] for t in branches])
        art, art_rows = artefact_field(xrng, anat, tuple(opt["artefact_depth"]), float(opt["artefact_scale"]))
        mimics[(art < 0.9) & brain & (mimics == 0)] = MIMIC_CODES["air_bone_artefact"]
        mimic_rows += art_rows

    labels = np.zeros(shape, dtype=np.uint16)
    factor = np.ones(shape, dtype=np.float32)
    rows: list[dict] = []
    if pathological and not realism:
        n = sample_count(rng, opt["count_median"], maximum=int(opt["max_lesions"]))
        labels, factor, rows = place_lesions(rng, anat, veins, sample_lesion_specs(rng, n))
    elif pathological:
        n = opt["n_lesions"]
        n = sample_count(rng, opt["count_median"], maximum=int(opt["max_lesions"])) if n is None else int(n)
        bench = opt["lesion_model"] == "benchmark"
        specs = (sample_benchmark_specs(rng, n, float(opt["faint_fraction"]), float(opt["deposit_median_mm"]),
                                        tuple(opt["lesion_depth"]), tuple(opt["faint_depth"]))
                 if bench else sample_lesion_specs(rng, n))
        labels, factor, rows = place_lesions(rng, anat, (veins > 0) | (mimics > 0), specs, max_tries=500,
                                             partial_volume=bench)

    # tissue intensities with partial volume
    rel = anat.wm * 1.0 + anat.gm * opt["gm_rel"] + anat.csf * opt["csf_rel"]
    rel = rel * anat.iron
    # scalp / skull outside the brain: dark skull (~1-4 mm), then a brighter scalp shell
    dist_out = ndimage.distance_transform_edt(anat.brain < 0.5, sampling=anat.spacing).astype(np.float32)
    head = np.where((dist_out > 4) & (dist_out < 10), 0.55, 0.0) + np.where((dist_out > 1) & (dist_out <= 4), 0.08, 0.0)
    rel = rel + (1 - anat.brain) * head.astype(np.float32)
    vd = rng.uniform(*opt["vein_depth"], size=1)[0]
    rel = rel * (1.0 - vd * occ)
    rel = rel * factor
    if realism:
        rel = rel * mfactor
    rel = ndimage.gaussian_filter(rel, opt["blur_sigma_vox"])
    if realism:
        if opt["slice_thickness_mm"] is not None:
            kernel = slice_profile(opt["slice_thickness_mm"], anat.spacing[2])
            if len(kernel) > 1:
                rel = ndimage.convolve1d(rel, kernel.astype(rel.dtype), axis=2, mode="nearest")
        rel = rel * art
    rel = rel * _bias_field(rng, shape, opt["bias"])
    signal = rel * opt["wm_level"]
    sigma = opt["wm_level"] / rng.uniform(*opt["snr"])
    n1 = rng.normal(0, sigma, shape).astype(np.float32)
    n2 = rng.normal(0, sigma, shape).astype(np.float32)
    swi = np.sqrt((signal + n1) ** 2 + n2 ** 2).astype(np.float32)

    tissue = np.zeros(shape, dtype=np.uint8)
    probs = np.stack([anat.csf, anat.gm, anat.wm])
    tissue[brain] = (np.argmax(probs[:, brain], axis=0) + 1).astype(np.uint8)
    tissue[brain & (anat.deep > 0.5)] = TISSUE_CODES["deep_gm"]

    for r in rows:
        r["x"], r["y"], r["z"] = (round(float(v), 3) for v in anat.affine[:3, :3] @ [r["i"], r["j"], r["k"]]
                                  + anat.affine[:3, 3])
    return PhantomSubject(swi, brain.astype(np.uint8), labels, tissue, veins, anat.affine, rows, bool(pathological),
                          mimics, mimic_rows, opt["site"])

"""One phantom subject: anatomy + veins + CMBs -> an SWI-like magnitude volume.

Contrast model (relative to white matter = 1): GM 0.86, CSF 1.4 (SWI magnitude is T2*-weighted: fluid
bright), deep grey nuclei darkened by iron (see ``anatomy.DEEP_NUCLEI``), veins 35-60 % darker
(deoxyhaemoglobin), CMB cores 20-40 % of the surrounding tissue with a blooming rim; scalp shell outside the
brain, partial-volume blur, a smooth multiplicative bias field (about +-15 %), Rician noise at SNR 20-35 in
white matter, on a scanner-like scale (white matter ~ 400).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from cmb_synthesis.phantom.anatomy import sample_anatomy
from cmb_synthesis.phantom.lesions import place_lesions, sample_count, sample_lesion_specs
from cmb_synthesis.phantom.veins import rasterize_tubes, trace_veins

__all__ = ["PhantomSubject", "simulate_subject", "TISSUE_CODES", "DEFAULT_OPTIONS"]

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


def _bias_field(rng: np.random.Generator, shape, amplitude: float) -> np.ndarray:
    coords = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = coords[0][:, None, None], coords[1][None, :, None], coords[2][None, None, :]
    terms = [x, y, z, x * y, x * z, y * z, x * x - 0.33, y * y - 0.33, z * z - 0.33]
    c = rng.normal(0, amplitude / 2.5, len(terms))
    log_b = sum(float(ci) * t for ci, t in zip(c, terms))
    return np.exp(np.clip(log_b, -0.5, 0.5)).astype(np.float32)


def simulate_subject(seed: int | np.random.SeedSequence, pathological: bool, **options) -> PhantomSubject:
    """Simulate one subject deterministically from ``seed`` (an int or a ``numpy.random.SeedSequence``).

    ``options`` override :data:`DEFAULT_OPTIONS` (grid ``shape``/``spacing``, contrast, vein counts, lesion
    count median ...). Healthy subjects (``pathological=False``) have no CMBs.
    """
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown phantom options: {sorted(unknown)}")
    opt = {**DEFAULT_OPTIONS, **options}
    shape = tuple(int(s) for s in opt["shape"])
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"phantom shape must be 3 sizes >= 16, got {opt['shape']}")
    rng = np.random.default_rng(seed)
    anat = sample_anatomy(rng, shape, tuple(opt["spacing"]))
    brain = anat.brain > 0.5

    tubes = trace_veins(rng, anat, int(opt["n_cortical_veins"]), int(opt["n_medullary_veins"]))
    occ = rasterize_tubes(shape, anat.spacing, tubes)
    occ *= ndimage.binary_dilation(brain, iterations=2)          # pial veins may sit just outside the mask
    veins = (occ >= 0.3).astype(np.uint8)          # 26-connected even for the thinnest (r 0.4 mm) veins

    labels = np.zeros(shape, dtype=np.uint16)
    factor = np.ones(shape, dtype=np.float32)
    rows: list[dict] = []
    if pathological:
        n = sample_count(rng, opt["count_median"], maximum=int(opt["max_lesions"]))
        labels, factor, rows = place_lesions(rng, anat, veins, sample_lesion_specs(rng, n))

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
    rel = ndimage.gaussian_filter(rel, opt["blur_sigma_vox"])
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
    return PhantomSubject(swi, brain.astype(np.uint8), labels, tissue, veins, anat.affine, rows, bool(pathological))

"""Losses of the mask-guided 3-D CycleGAN (Faryna et al., section 2), each paper symbol defined once here.

Notation: ``x_h`` healthy image, ``y_p`` (semi-random) pathology mask, ``x_p`` pathological image with its
mask ``y_p``, ``x_p2`` an independent pathological image (the critic's real sample), ``y_h`` the empty mask,
``B`` the brain mask. All images are (B, 1, X, Y, Z) float in [0, 1]; masks (B, 1, X, Y, Z), non-zero = lesion.

- ``L_CC`` (cycle consistency, CycleGAN [7]):
  ``L_CC = |G_PH(G_HP(x_h, y_p), y_p) - x_h|_1 + |G_HP(G_PH(x_p, y_p), y_p) - x_p|_1`` (HPH + PHP).
- ``L_ID`` (identity): ``|G_PH(x_h, y_h) - x_h|_1`` (HPH: G_PH leaves a healthy image alone) +
  ``|G_HP(x_p, y_p) - x_p|_1`` (PHP: lesions already there are not painted again).
- ``L_AM`` (abnormality mask, Sun et al. 2020 [8]): ``|(1 - y_p) * (G_PH(x_p, y_p) - x_p)|_1`` averaged over
  brain voxels: no change outside the lesions. Optionally also on ``G_HP(x_h, y_p)`` vs ``x_h`` (``am_in_hph``).
- ``L_GAN`` (Wasserstein, WGAN-GP [14]): critic ``E[D(fake)] - E[D(real)] + lambda_gp * GP``,
  generator ``-E[D(fake)]``; ``gradient_penalty`` ``GP = E[(||grad_x^ D(x^)||_2 - 1)^2]`` with
  ``x^ = eps * real + (1 - eps) * fake``, ``eps ~ U(0, 1)`` per sample.
- Mask-conditioned critics (ours, the CPU preset; the paper's critics see the image only): with
  ``critic_mask`` the critics get ``[image, mask]`` (2 channels): ``D_P([x_p2, y_p2])`` vs ``D_P([x~_p, y_p])``
  and ``D_H([x_h, y_p])`` vs ``D_H([x~_h, y_p])``, and the penalty interpolates both channels. On small crops an
  image-only critic learned the crops' global brightness (healthy vs pathological context differs more than
  the lesions change it) and never the lesions within the CPU budget; given the mask, "dark where the mask
  says" is a linear feature (measured, see the bundle README).
- Lesion-focused critics (ours, off in the paper preset): ``D_P_lesion`` / ``D_H_lesion`` with the same WGAN-GP
  objective on small crops centred on each patch's lesion (:func:`lesion_crops`): real lesions ``x_p2`` at ``y_p2``
  vs painted ones ``x~_p`` at ``y_hp``, healthy tissue ``x_h`` at ``y_hp`` vs pseudo-healthy ``x~_h`` at ``y_p``
  (:class:`LesionCriticObjective`); the generators' part is the term :class:`LesionAdversarialLoss`
  (``GAN_lesion``, weight ``lambda_gan_lesion``). In a whole 32x32x16 patch a 3 mm lesion is about 0.1 % of the
  voxels, so the whole-patch critics' signal about the lesion's appearance is small.
- Lesion profile matching (ours, off in the paper preset): :class:`LesionProfileLoss` (``PM_lesion``, weight
  ``lambda_profile_lesion``) pulls the batch-mean radial profile (:func:`radial_profiles`) of painted lesions
  towards that of the real lesions in the batch, and of pseudo-healthy sites towards healthy tissue.

Default weights and where they come from: ``lambda_cc = 10`` and ``lambda_id = 5`` (= 0.5 * lambda_cc), the
CycleGAN reference implementation [7]; ``lambda_gp = 10`` and ``n_critic = 5``, WGAN-GP [14];
``lambda_am = 10``, set equal to ``lambda_cc`` (the paper gives no value; Sun et al. [8] weight the
abnormality-mask term like the reconstruction term). Adam lr 1e-4, betas (0.5, 0.99), batch 4: the paper.

The generators' objective is a list of weighted terms, each a :class:`GeneratorLoss` module with a ``name`` and
a ``weight``: :class:`CycleConsistencyLoss` (``CC``, 10), :class:`IdentityLoss` (``ID``, 5),
:class:`AbnormalityMaskLoss` (``AM``, 10) and :class:`AdversarialLoss` (``GAN``, 1) (:func:`paper_terms`). A new
loss is a subclass here plus one entry in the bundle's ``generator_terms`` list (``configs/train.yaml``); its
unweighted value is reported under its name in ``engine.state.output``.

:class:`CriticObjective` and :class:`GeneratorObjective` compute a full objective in ONE ``forward`` so that
wrapping them in ``DistributedDataParallel`` synchronises every gradient (including the penalty's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from scipy import ndimage

from cmb_synthesis.synthesis.metrics import dilate

__all__ = [
    "L_CC",
    "L_ID",
    "L_AM",
    "L_GAN",
    "gradient_penalty",
    "critic_input",
    "GeneratorLoss",
    "CycleConsistencyLoss",
    "IdentityLoss",
    "AbnormalityMaskLoss",
    "AdversarialLoss",
    "lesion_l1",
    "LesionCycleLoss",
    "LesionIdentityLoss",
    "lesion_crops",
    "LesionAdversarialLoss",
    "centred_lesions",
    "radial_profiles",
    "LesionProfileLoss",
    "paper_terms",
    "CriticObjective",
    "LesionCriticObjective",
    "GeneratorObjective",
    "CYCLE_IMAGES",
    "RESERVED_NAMES",
]

# images a GeneratorObjective returns (detached) beside the losses
CYCLE_IMAGES = ("fake_p", "rec_h", "fake_h", "rec_p")
# keys of the trainer's output that a generator term may not be named after
RESERVED_NAMES = (
    "G", "D_P", "D_H", "GP", "W_P", "W_H", "GP_P", "GP_H",
    "D_P_lesion", "D_H_lesion", "W_P_lesion", "W_H_lesion", "GP_P_lesion", "GP_H_lesion", *CYCLE_IMAGES,
)  # fmt: skip


def L_CC(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Cycle-consistency term of one cycle: mean L1 ``|reconstruction - original|`` (scalar, >= 0)."""
    return (reconstruction - original).abs().mean()


def L_ID(output: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Identity term: mean L1 between a generator's output on an input it must leave as is, and that input."""
    return (output - original).abs().mean()


def L_AM(
    generated: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, brainmask: torch.Tensor | None = None
) -> torch.Tensor:
    """Abnormality-mask loss ``|(1 - y) * (generated - original)|_1`` averaged over brain voxels.

    Args:
        generated, original: (B, 1, X, Y, Z) images.
        mask: lesion mask ``y`` (B, 1, X, Y, Z); non-zero voxels (instance labels allowed) are lesion: changes
            there are free.
        brainmask: (B, 1, X, Y, Z) non-zero inside the brain; None = every voxel counts.

    Returns:
        scalar: mean absolute change over brain voxels outside the lesions (0 when nothing changed there).
    """
    outside = (mask <= 0).to(generated.dtype)
    if brainmask is not None:
        outside = outside * (brainmask > 0).to(generated.dtype)
    return (outside * (generated - original).abs()).sum() / outside.sum().clamp_min(1.0)


def L_GAN(fake_scores: torch.Tensor, real_scores: torch.Tensor | None = None) -> torch.Tensor:
    """Wasserstein adversarial loss.

    Critic part (``real_scores`` given): ``E[D(fake)] - E[D(real)]`` (minimised by the critic; its negative
    is the Wasserstein estimate). Generator part (``real_scores`` None): ``-E[D(fake)]``.
    """
    if real_scores is None:
        return -fake_scores.mean()
    return fake_scores.mean() - real_scores.mean()


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP penalty ``E[(||grad_x^ D(x^)||_2 - 1)^2]``, ``x^ = eps * real + (1 - eps) * fake``.

    ``D(x)`` of a patch critic is the mean of its score map, as in :func:`L_GAN`.
    ``eps ~ U(0, 1)`` has shape (B, 1, 1, 1, 1) (one per sample). The block runs in float32 with autocast
    disabled, whatever the caller's precision, because the double backward is unstable in bf16/fp16.
    ``create_graph=True`` so the penalty trains the critic. Returns a scalar (multiply by ``lambda_gp``).
    """
    device_type = real.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        real32, fake32 = real.detach().float(), fake.detach().float()
        eps = torch.rand((real32.shape[0],) + (1,) * (real32.ndim - 1), device=real32.device, dtype=torch.float32)
        x_hat = (eps * real32 + (1.0 - eps) * fake32).requires_grad_(True)
        scores = critic(x_hat).float()
        # the critic's value per sample is the mean of its patch map (as in L_GAN): the penalty constrains that
        # function, not the sum over patches (which would shrink every patch's slope by the patch count)
        per_sample = scores.flatten(1).mean(1) if scores.ndim > 1 else scores
        (grad,) = torch.autograd.grad(per_sample.sum(), x_hat, create_graph=True)
        norm = grad.flatten(1).norm(2, dim=1)
        return ((norm - 1.0) ** 2).mean()


def critic_input(image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A critic's input: ``image`` (B, 1, X, Y, Z), or ``[image, mask > 0]`` (B, 2, X, Y, Z) for a mask-conditioned
    critic (``mask`` instance labels or binary, same shape)."""
    if mask is None:
        return image
    return torch.cat([image, (mask > 0).to(image.dtype)], dim=1)


class GeneratorLoss(nn.Module):
    """One weighted term of the generators' objective (see :class:`GeneratorObjective`).

    Args:
        weight: factor of the term in the total ``G`` (its unweighted value is what gets reported).
        name: key of the term's value in the objective's output and in ``engine.state.output``.

    Subclasses implement ``forward(cycle)`` returning a scalar tensor, ``cycle`` being the dict of one iteration's
    tensors built by :class:`GeneratorObjective`: the batch ``x_h``, ``y_hp``, ``x_p``, ``y_p`` (B, 1, X, Y, Z),
    ``brainmask_h``, ``brainmask_p`` (or None); the HPH cycle ``fake_p = G_HP(x_h, y_hp)``,
    ``rec_h = G_PH(fake_p, y_hp)``, ``id_h = G_PH(x_h, 0)``; the PHP cycle ``fake_h = G_PH(x_p, y_p)``,
    ``rec_p = G_HP(fake_h, y_p)``, ``id_p = G_HP(x_p, y_p)``; the critics ``D_P``, ``D_H`` (frozen by the
    trainer during the generator step) and the generators ``G_HP``, ``G_PH`` (for terms that need extra passes).
    """

    def __init__(self, weight: float, name: str) -> None:
        super().__init__()
        if not name:
            raise ValueError(f"{type(self).__name__}: a generator loss term needs a non-empty name")
        self.weight, self.name = float(weight), str(name)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight:g}"


class CycleConsistencyLoss(GeneratorLoss):
    """``L_CC`` of both cycles: ``|rec_h - x_h|_1 + |rec_p - x_p|_1`` (default weight ``lambda_cc = 10``)."""

    def __init__(self, weight: float = 10.0, name: str = "CC") -> None:
        super().__init__(weight, name)

    def forward(self, cycle: Mapping[str, Any]) -> torch.Tensor:
        return L_CC(cycle["rec_h"], cycle["x_h"]) + L_CC(cycle["rec_p"], cycle["x_p"])


class IdentityLoss(GeneratorLoss):
    """``L_ID`` of both generators: ``|G_PH(x_h, 0) - x_h|_1 + |G_HP(x_p, y_p) - x_p|_1`` (default weight 5)."""

    def __init__(self, weight: float = 5.0, name: str = "ID") -> None:
        super().__init__(weight, name)

    def forward(self, cycle: Mapping[str, Any]) -> torch.Tensor:
        return L_ID(cycle["id_h"], cycle["x_h"]) + L_ID(cycle["id_p"], cycle["x_p"])


class AbnormalityMaskLoss(GeneratorLoss):
    """``L_AM`` on ``G_PH(x_p, y_p)`` vs ``x_p`` (no change outside the lesions, brain voxels only); with
    ``in_hph`` also on ``G_HP(x_h, y_hp)`` vs ``x_h`` (default weight ``lambda_am = 10``)."""

    def __init__(self, weight: float = 10.0, in_hph: bool = False, name: str = "AM") -> None:
        super().__init__(weight, name)
        self.in_hph = bool(in_hph)

    def forward(self, cycle: Mapping[str, Any]) -> torch.Tensor:
        am = L_AM(cycle["fake_h"], cycle["x_p"], cycle["y_p"], cycle.get("brainmask_p"))
        if self.in_hph:
            am = am + L_AM(cycle["fake_p"], cycle["x_h"], cycle["y_hp"], cycle.get("brainmask_h"))
        return am

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, in_hph={self.in_hph}"


class AdversarialLoss(GeneratorLoss):
    """Generator part of ``L_GAN`` for both fakes: ``-E[D_P(x~_p)] - E[D_H(x~_h)]`` (default weight 1).

    ``critic_mask``: mask-conditioned critics judge each fake with the mask it was made for,
    ``D_P([x~_p, y_hp])`` and ``D_H([x~_h, y_p])``; must match the critics' :class:`CriticObjective`.
    """

    def __init__(self, weight: float = 1.0, critic_mask: bool = False, name: str = "GAN") -> None:
        super().__init__(weight, name)
        self.critic_mask = bool(critic_mask)

    def forward(self, cycle: Mapping[str, Any]) -> torch.Tensor:
        m_p, m_h = (cycle["y_hp"], cycle["y_p"]) if self.critic_mask else (None, None)
        fake_p, fake_h = critic_input(cycle["fake_p"], m_p), critic_input(cycle["fake_h"], m_h)
        return L_GAN(cycle["D_P"](fake_p)) + L_GAN(cycle["D_H"](fake_h))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, critic_mask={self.critic_mask}"


def lesion_l1(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, dilation: int,
              brainmask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean ``|output - target|`` over the voxels within ``dilation`` voxels of ``mask`` (brain voxels only when
    ``brainmask`` is given): the L1 of the lesion-focused terms. (B, 1, X, Y, Z) tensors; 0 without lesions."""
    region = dilate(mask, int(dilation)).to(output.dtype)
    if brainmask is not None:
        region = region * (brainmask > 0).to(output.dtype)
    return (region * (output - target).abs()).sum() / region.sum().clamp_min(1.0)


class _LesionL1Loss(GeneratorLoss):
    """A generator term made of :func:`lesion_l1` averages over the mask dilated by ``dilation`` voxels."""

    def __init__(self, weight: float, dilation: int, name: str) -> None:
        super().__init__(weight, name)
        self.dilation = int(dilation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dilation={self.dilation}"


class LesionCycleLoss(_LesionL1Loss):
    """Cycle consistency where the lesions are (ours, beyond the paper): each cycle teaches the generator that
    closes it, averaged over the voxels within ``dilation`` voxels of the mask (brain only, :func:`lesion_l1`):

    - PHP: ``|G_HP(sg(x~_h), y_p) - x_p|_1`` over ``dil(y_p)``: the one place where ``G_HP`` sees what a REAL lesion
      looks like (dark core, blooming rim). ``L_CC`` averages over the whole patch, where a 3 mm lesion is
      about 0.1 % of the voxels, so this signal is otherwise drowned.
    - HPH: ``|G_PH(sg(x~_p), y_hp) - x_h|_1`` over ``dil(y_hp)``: ``G_PH`` learns to remove painted lesions.

    ``sg`` stops the gradient into the generator that made the input, so neither generator can hide the lesion
    in its output to make the other's reconstruction easy (the removal must stay a removal). Two extra generator
    passes per step. ``dilation`` (voxels) covers the blooming rim beyond the label. Default weight 10 (as L_CC).
    """

    def __init__(self, weight: float = 10.0, dilation: int = 2, name: str = "CC_lesion") -> None:
        super().__init__(weight, dilation, name)

    def forward(self, cycle: Mapping[str, Any]) -> torch.Tensor:
        total = cycle["x_p"].new_zeros(())
        for gen, fake, mask, target, bm in (
            ("G_HP", "fake_h", "y_p", "x_p", "brainmask_p"),
            ("G_PH", "fake_p", "y_hp", "x_h", "brainmask_h"),
        ):
            rec = cycle[gen](cycle[fake].detach(), cycle[mask])
            total = total + lesion_l1(rec, cycle[target], cycle[mask], self.dilation, cycle.get(bm))
        return total


class LesionIdentityLoss(_LesionL1Loss):
    """Identity where the lesions are (ours, beyond the paper), averaged over ``dil(mask)`` (:func:`lesion_l1`):

    - ``|G_HP(x_p, y_p) - x_p|_1`` over ``dil(y_p)``: a real CMB under its own mask stays as it is;
    - ``|G_PH(x_h, y_hp) - x_h|_1`` over ``dil(y_hp)``: healthy tissue under a sampled mask stays healthy.

    Why: the two lesion cycles alone are satisfied by a pair of opposite intensity OFFSETS (``G_HP`` darkens by
    ``a``, ``G_PH`` lightens by ``a``) for any ``a``; measured on the lesion-critic preset (seed 0, validation):
    ``G_PH`` left real CMBs at 0.77 of the tissue at their centre, ``G_HP`` darkened by the same ~0.6 (painting
    0.42 where real CMBs are 0.16-0.21) and turned real CMBs black (``G_HP(x_p, y_p)`` centre 0.0). Mapping a
    lesion to itself rules the offsets out: ``G_HP`` must map light and dark tissue alike to a CMB's intensity
    (paint to a level, not by an amount) and ``G_PH`` both to the tissue's. The paper's ``L_ID`` is a mean over the
    whole patch (``G_PH`` with an empty mask), where a lesion is ~0.1 % of the voxels. One extra ``G_PH`` pass.
    Measured (weight 10, seed 0, CPU preset, 800 iterations): no effect on the realism metrics, and the offsets
    stayed (``G_HP(x_p, y_p)`` centre 0.0, ``G_PH(x_h, y_hp)`` centre 1.52), so it is off by default
    (``lambda_id_lesion: 0``); a longer schedule may differ.
    """

    def __init__(self, weight: float = 5.0, dilation: int = 2, name: str = "ID_lesion") -> None:
        super().__init__(weight, dilation, name)

    def forward(self, cycle: Mapping[str, Any]) -> torch.Tensor:
        id_h = cycle["G_PH"](cycle["x_h"], cycle["y_hp"])
        return (lesion_l1(cycle["id_p"], cycle["x_p"], cycle["y_p"], self.dilation, cycle.get("brainmask_p"))
                + lesion_l1(id_h, cycle["x_h"], cycle["y_hp"], self.dilation, cycle.get("brainmask_h")))


def centred_lesions(mask: torch.Tensor, size: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
    """The lesion each training patch is centred on, per sample: ``(b, centre)`` for the samples with a lesion.

    The lesion is the one with the mask voxel nearest the patch centre (training patches are centred on a lesion
    voxel, :mod:`cmb_synthesis.synthesis.data`; shifted inwards at the volume border); its centre is the rounded
    centre of mass of the mask voxels within a ``size`` window around that voxel (shifted inwards to stay inside
    the patch). ``mask`` (B, 1, X, Y, Z), non-zero = lesion; ``centre`` a (3,) long tensor of voxel indices.
    """
    binary = mask[:, 0] > 0
    spatial = tuple(binary.shape[1:])
    size = tuple(min(int(k), s) for k, s in zip(size, spatial))
    half = torch.tensor([k // 2 for k in size], device=mask.device)
    upper = torch.tensor([s - k for s, k in zip(spatial, size)], device=mask.device)
    centre = torch.tensor([(s - 1) / 2 for s in spatial], device=mask.device)
    found = []
    for b in range(binary.shape[0]):
        nz = binary[b].nonzero()
        if not len(nz):
            continue
        seed = nz[((nz.float() - centre) ** 2).sum(1).argmin()]
        lo = torch.minimum((seed - half).clamp(min=0), upper)
        win = binary[b, lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]].nonzero()
        found.append((b, (win.float().mean(0) + lo.float()).round().long()))
    return found


def lesion_crops(
    image: torch.Tensor, mask: torch.Tensor, size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crops of ``size`` voxels centred on one lesion of each sample (the lesion-focused critics' input).

    The training patches are centred on a lesion voxel (:mod:`cmb_synthesis.synthesis.data`; shifted inwards at
    the volume border), so each sample's lesion is the one with the mask voxel nearest the patch centre; the crop
    is centred on that lesion's centre of mass, the centre of mass of the mask voxels within a ``size`` window
    around that nearest voxel (rounded; the window is shifted inwards to stay inside the patch). Samples without
    any mask voxel (a pathological patch cropped at random) are left out. Slicing keeps the gradient.

    Args:
        image: (B, C, X, Y, Z) images.
        mask: (B, 1, X, Y, Z) lesion masks (non-zero = lesion; instance labels allowed).
        size: crop size (3 ints, voxels), at most the patch size on each axis.

    Returns:
        ``(crops, mask_crops, index)``: (N, C, *size) image crops, (N, 1, *size) binary mask crops and the (N,)
        long tensor of the samples they come from (N = samples with a lesion, possibly 0).

    Raises:
        ValueError: ``size`` is not 3 positive ints, exceeds the patch, or the shapes disagree.
    """
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"lesion crop size must be 3 positive ints, got {size}")
    if image.ndim != 5 or mask.ndim != 5 or image.shape[0] != mask.shape[0] or image.shape[2:] != mask.shape[2:]:
        raise ValueError(f"lesion_crops needs (B, C, X, Y, Z) image and mask of equal size, got {tuple(image.shape)}, {tuple(mask.shape)}")
    spatial = tuple(image.shape[2:])
    if any(k > s for k, s in zip(size, spatial)):
        raise ValueError(f"lesion crop size {size} exceeds the patch size {spatial}")
    binary = mask[:, 0] > 0
    half = torch.tensor([k // 2 for k in size], device=mask.device)
    upper = torch.tensor([s - k for s, k in zip(spatial, size)], device=mask.device)
    crops, masks, index = [], [], []
    for b, com in centred_lesions(mask, size):
        start = torch.minimum((com - half).clamp(min=0), upper).tolist()
        sl = (b, slice(None), *(slice(s0, s0 + k) for s0, k in zip(start, size)))
        crops.append(image[sl])
        masks.append(binary[b : b + 1, start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]])
        index.append(b)
    if not crops:
        empty = image.new_zeros((0, image.shape[1], *size))
        return empty, image.new_zeros((0, 1, *size)), torch.zeros(0, dtype=torch.long, device=image.device)
    return (
        torch.stack(crops),
        torch.stack(masks).to(image.dtype),
        torch.tensor(index, dtype=torch.long, device=image.device),
    )


class LesionAdversarialLoss(GeneratorLoss):
    """Generator part of the lesion-focused WGAN terms (ours, beyond the paper; default weight
    ``lambda_gan_lesion``): ``-E[D_P_lesion(crop(x~_p, y_hp))] - E[D_H_lesion(crop(x~_h, y_p))]``.

    The whole-patch critics see 32x32x16 (CPU preset) or larger patches in which a 3 mm lesion is about 0.1 % of
    the voxels; these critics see only a small crop (:func:`lesion_crops`, ``crop_size`` voxels) centred on the
    lesion each training patch is centred on, so their adversarial signal is about the lesion's appearance.
    Must match the critics' :class:`LesionCriticObjective` (same ``crop_size`` and ``critic_mask``).

    Args:
        D_P_lesion: critic of real lesion crops vs ``G_HP``'s painted lesions.
        D_H_lesion: critic of healthy tissue crops at lesion sites vs ``G_PH``'s pseudo-healthy crops at real
            lesion sites; None: the ``P`` side only.
        crop_size: crop size (voxels), e.g. (16, 16, 8).
        critic_mask: the critics see ``[crop, mask crop]`` (2 channels).
    """

    def __init__(
        self,
        D_P_lesion: nn.Module,
        D_H_lesion: nn.Module | None = None,
        crop_size: Sequence[int] = (16, 16, 8),
        weight: float = 1.0,
        critic_mask: bool = True,
        name: str = "GAN_lesion",
    ) -> None:
        super().__init__(weight, name)
        self.D_P_lesion, self.D_H_lesion = D_P_lesion, D_H_lesion
        self.crop_size, self.critic_mask = tuple(int(s) for s in crop_size), bool(critic_mask)

    def _side(self, critic: nn.Module, fake: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        crops, mcrops, _ = lesion_crops(fake, mask, self.crop_size)
        if not len(crops):  # keeps every critic parameter in the graph (DDP), contributes 0
            return sum(p.sum() for p in critic.parameters()) * 0.0
        return L_GAN(critic(critic_input(crops, mcrops if self.critic_mask else None)))

    def forward(self, cycle: Mapping[str, Any]) -> torch.Tensor:
        total = self._side(self.D_P_lesion, cycle["fake_p"], cycle["y_hp"])
        if self.D_H_lesion is not None:
            total = total + self._side(self.D_H_lesion, cycle["fake_h"], cycle["y_p"])
        return total

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, crop_size={self.crop_size}, critic_mask={self.critic_mask}"


def radial_profiles(
    image: torch.Tensor,
    mask: torch.Tensor,
    brainmask: torch.Tensor | None = None,
    max_radius: int = 4,
    ring: Sequence[float] = (5.0, 7.0),
    return_sizes: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Differentiable radial profile of each patch's centred lesion, as the evaluator measures it.

    The torch twin of :func:`cmb_synthesis.synthesis.realism.lesion_measurements` for one lesion per sample (the
    one :func:`centred_lesions` finds): the mean intensity of the voxels whose distance from the lesion centre
    rounds to ``d = 0..max_radius``, divided by the mean of the surrounding tissue (brain voxels ``ring[0]`` to
    ``ring[1]`` voxels from the centre, not within 1 voxel of any lesion). Shells are cut at the patch border.

    Args:
        image: (B, 1, X, Y, Z) intensities in [0, 1] (the gradient flows through every shell voxel).
        mask: (B, 1, X, Y, Z) lesion masks (non-zero = lesion).
        brainmask: (B, 1, X, Y, Z) non-zero inside the brain, or None (every voxel).
        max_radius: the last profile distance (voxels); ring: the tissue reference's radii (voxels).
        return_sizes: also return each lesion's size.

    Returns:
        ``(profiles, index)``: (N, max_radius + 1) relative intensities (1 = the tissue) and the (N,) long tensor
        of their samples, for the N samples with a lesion and at least 10 reference tissue voxels; with
        ``return_sizes`` also ``sizes`` (N,) long, voxels of the lesion's 26-connected component (counted within
        ``ring[1]`` voxels of its centre), as ``lesion_measurements(..., return_sizes=True)`` counts them.
    """
    if image.shape != mask.shape or image.ndim != 5 or image.shape[1] != 1:
        raise ValueError(f"radial_profiles needs (B, 1, X, Y, Z) image and mask of one shape, got {tuple(image.shape)}, {tuple(mask.shape)}")
    spatial = image.shape[2:]
    grid = torch.stack(torch.meshgrid(*(torch.arange(s, device=image.device) for s in spatial), indexing="ij"), -1).float()
    near = dilate(mask, 1)[:, 0]
    brain = torch.ones_like(near) if brainmask is None else (brainmask[:, 0] > 0)
    reach = int(max_radius) + 1
    profiles, index, sizes = [], [], []
    for b, c in centred_lesions(mask, (2 * reach + 1,) * 3):
        dist = (grid - c.float()).norm(dim=-1)
        tissue = (dist >= float(ring[0])) & (dist <= float(ring[1])) & brain[b] & ~near[b]
        if int(tissue.sum()) < 10:
            continue
        img = image[b, 0]
        ref = img[tissue].mean()
        if float(ref.detach()) <= 1e-6:
            continue
        shells = [img[(dist - d).abs() < 0.5].mean() for d in range(int(max_radius) + 1)]
        profiles.append(torch.stack(shells) / ref)
        index.append(b)
        if return_sizes:
            sizes.append(_component_size(mask[b, 0] > 0, c, int(round(float(ring[1])))))
    if not profiles:
        out = (image.new_zeros((0, int(max_radius) + 1)), torch.zeros(0, dtype=torch.long, device=image.device))
    else:
        out = (torch.stack(profiles), torch.tensor(index, dtype=torch.long, device=image.device))
    return out + (torch.tensor(sizes, dtype=torch.long, device=image.device),) if return_sizes else out


def _component_size(binary: torch.Tensor, centre: torch.Tensor, reach: int) -> int:
    """Voxels of the 26-connected component of ``binary`` (X, Y, Z) at ``centre`` (or, when the centre of mass of a
    non-convex lesion falls outside it, at the mask voxel nearest the centre), counted within ``reach`` voxels."""
    lo = (centre - reach).clamp(min=0)
    win = binary[lo[0] : centre[0] + reach + 1, lo[1] : centre[1] + reach + 1, lo[2] : centre[2] + reach + 1]
    labels, n = ndimage.label(win.detach().cpu().numpy(), structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return 0
    c = tuple(int(v) for v in (centre - lo).tolist())
    label = int(labels[c])
    if label == 0:
        nz = np.argwhere(labels > 0)
        label = int(labels[tuple(nz[((nz - np.array(c)) ** 2).sum(1).argmin()])])
    return int((labels == label).sum())


class LesionProfileLoss(GeneratorLoss):
    """Lesion radial-profile matching (ours, beyond the paper; "feature matching", Salimans et al. 2016): the
    batch-mean :func:`radial_profiles` of the fakes pulled towards that of the real images of the same batch (the
    real side detached), ``sum_d |mean_i p_d(fake_i) - mean_j p_d(real_j)|`` over ``d = 0..max_radius``:

    - P side: painted lesions ``x~_p = G_HP(x_h, y_hp)`` at ``y_hp`` vs real lesions ``x_p`` at ``y_p``;
    - H side: pseudo-healthy sites ``x~_h = G_PH(x_p, y_p)`` at ``y_p`` vs healthy tissue ``x_h`` at ``y_hp``.

    Why: the lesion cycles are closed by any pair of opposite intensity offsets, and the critics, the only terms
    that say how dark a CMB is, oscillate; on the CPU preset painted lesions stayed at 0.3-0.4 of the tissue at
    their centre where real ones are ~0.16 (``scripts/synthesis_diagnosis.py``). This term pins the level, the
    dark centre and the blooming rim. It matches batch means, not lesion by lesion, so a spread of contrasts stays
    possible. Samples without a lesion (random pathological crops) drop out; a side with no profile on either
    part contributes 0. Under DDP each rank matches its own batch's means (per-rank statistics, like
    unsynchronised BatchNorm), so the averaged gradient is not that of the global batch's means.

    **Size-conditioned target** (``reference``, ours): a CMB's contrast depends on its size (partial volume makes a
    1-voxel CMB light at its centre, blooming makes a large one dark 2 voxels out). A batch mean lets the
    generator paint every lesion at the average contrast: on the CPU preset the large painted CMBs stayed at 0.25
    of the tissue at their centre where real large ones are at 0.17, the small ones too dark. With ``reference``
    (:func:`cmb_synthesis.synthesis.realism.size_binned_profiles` of the training split: the real lesions' mean
    profile per size bin) the P side becomes ``sum_b (n_b / N) sum_d |mean_{i in b} p_d(fake_i) - ref_{b,d}|``
    over the size bins ``b`` of the painted lesions in the batch (``n_b`` of ``N``): each painted lesion is pulled
    towards the real lesions of its own size (the mask ``G_HP`` is given says how large). The target is a fixed
    population mean, not the batch's few real lesions (less noise; deterministic, so a resumed run is
    unchanged). The H side is unchanged.

    **Per-lesion target at a contrast rank** (``code``, ours; :mod:`cmb_synthesis.synthesis.codes`): with contrast
    codes ``G_HP`` is told how dark each lesion should be (a darkness rank ``q`` among the real lesions of its
    size); the P side becomes ``mean_i sum_d |p_d(fake_i) - ref_d(bin_i, q_i)|`` over the painted lesions, with
    ``ref(bin, q)`` the real profile of that size bin at rank ``q`` (:meth:`ContrastCode.target`). Painting every
    rank equally often, the painted lesions then have the real lesions' spread of contrast, not only their mean.

    Args:
        weight: ``lambda_profile_lesion``.
        max_radius, ring: as :func:`radial_profiles` (the evaluator's realism profile: 4 and (5, 7) voxels).
        reference: None (batch target) or a mapping with ``edges`` (n - 1,) inner size-bin edges (voxels) and
            ``profiles`` (n, max_radius + 1) real mean profiles per bin.
        code: a :class:`~cmb_synthesis.synthesis.codes.ContrastCode` (the per-lesion target at each lesion's rank,
            read from the code map ``y_hp``; replaces ``reference``), or None.
    """

    def __init__(
        self,
        weight: float = 10.0,
        max_radius: int = 4,
        ring: Sequence[float] = (5.0, 7.0),
        reference: Mapping[str, Any] | None = None,
        code: Any = None,
        name: str = "PM_lesion",
    ) -> None:
        super().__init__(weight, name)
        self.max_radius, self.ring = int(max_radius), tuple(float(r) for r in ring)
        if self.max_radius < 0 or len(self.ring) != 2 or not self.max_radius < self.ring[0] < self.ring[1]:
            raise ValueError(f"LesionProfileLoss needs 0 <= max_radius < ring[0] < ring[1], got {max_radius}, {ring}")
        self.edges = self.reference = None
        if reference is not None:
            edges = torch.as_tensor(np.asarray(reference["edges"], np.float64), dtype=torch.float32).reshape(-1)
            ref = torch.as_tensor(np.asarray(reference["profiles"], np.float64), dtype=torch.float32)
            if ref.ndim != 2 or ref.shape != (len(edges) + 1, self.max_radius + 1) or not torch.isfinite(ref).all():
                raise ValueError(
                    f"LesionProfileLoss reference: profiles must be finite, (len(edges) + 1, max_radius + 1) = "
                    f"({len(edges) + 1}, {self.max_radius + 1}), got {tuple(ref.shape)}"
                )
            if len(edges) > 1 and not bool((edges[1:] > edges[:-1]).all()):
                raise ValueError(f"LesionProfileLoss reference: edges must increase, got {edges.tolist()}")
            self.edges, self.reference = edges, ref
        self.code = code
        if code is not None and (code.max_radius != self.max_radius or tuple(code.ring) != self.ring):
            raise ValueError(f"LesionProfileLoss: the contrast code measures with max_radius {code.max_radius}, ring "
                             f"{code.ring}, the loss with {self.max_radius}, {self.ring}")

    def _side(self, fake, fake_mask, fake_bm, real, real_mask, real_bm) -> torch.Tensor:
        p_fake, _ = radial_profiles(fake, fake_mask, fake_bm, self.max_radius, self.ring)
        with torch.no_grad():
            p_real, _ = radial_profiles(real, real_mask, real_bm, self.max_radius, self.ring)
        if not len(p_fake) or not len(p_real):
            return fake.sum() * 0.0
        return (p_fake.mean(0) - p_real.mean(0)).abs().sum()

    def _reference_side(self, fake, fake_mask, fake_bm) -> torch.Tensor:
        p_fake, _, sizes = radial_profiles(fake, fake_mask, fake_bm, self.max_radius, self.ring, return_sizes=True)
        if not len(p_fake):
            return fake.sum() * 0.0
        bins = torch.searchsorted(self.edges.to(fake.device), sizes.to(torch.float32), right=True)
        ref = self.reference.to(device=fake.device, dtype=p_fake.dtype)
        total = fake.sum() * 0.0
        for b in bins.unique():
            sel = bins == b
            total = total + sel.float().mean() * (p_fake[sel].mean(0) - ref[b]).abs().sum()
        return total

    def _code_side(self, fake, fake_mask, fake_bm) -> torch.Tensor:
        from cmb_synthesis.synthesis.codes import rank_at

        p_fake, index, sizes = radial_profiles(fake, fake_mask, fake_bm, self.max_radius, self.ring, return_sizes=True)
        if not len(p_fake):
            return fake.sum() * 0.0
        centres = dict(centred_lesions(fake_mask, (2 * self.max_radius + 3,) * 3))
        q = torch.stack([rank_at(fake_mask[int(b), 0], centres[int(b)]) for b in index])
        target = self.code.target(q, sizes).to(device=fake.device, dtype=p_fake.dtype)
        return (p_fake - target).abs().sum(1).mean()

    def forward(self, cycle: Mapping[str, Any]) -> torch.Tensor:
        bm_h, bm_p = cycle.get("brainmask_h"), cycle.get("brainmask_p")
        if self.code is not None:
            p_side = self._code_side(cycle["fake_p"], cycle["y_hp"], bm_h)
        elif self.reference is None:
            p_side = self._side(cycle["fake_p"], cycle["y_hp"], bm_h, cycle["x_p"], cycle["y_p"], bm_p)
        else:
            p_side = self._reference_side(cycle["fake_p"], cycle["y_hp"], bm_h)
        return p_side + self._side(cycle["fake_h"], cycle["y_p"], bm_p, cycle["x_h"], cycle["y_hp"], bm_h)

    def extra_repr(self) -> str:
        bins = "batch" if self.reference is None else f"{len(self.reference)} size bins, edges {self.edges.tolist()}"
        bins = bins if self.code is None else f"per lesion at its contrast rank, {self.code!r}"
        return f"{super().extra_repr()}, max_radius={self.max_radius}, ring={self.ring}, target={bins}"


def paper_terms(critic_mask: bool = False, am_in_hph: bool = False) -> list[GeneratorLoss]:
    """The default terms with their default weights: ``CC`` 10, ``ID`` 5, ``AM`` 10, ``GAN`` 1 (what
    ``configs/train.yaml`` lists as ``generator_terms``)."""
    return [
        CycleConsistencyLoss(),
        IdentityLoss(),
        AbnormalityMaskLoss(in_hph=am_in_hph),
        AdversarialLoss(critic_mask=critic_mask),
    ]


class CriticObjective(nn.Module):
    """One critic's full WGAN-GP objective in a single ``forward`` (DDP-friendly).

    Args:
        critic: ``D_P`` or ``D_H`` (1 input channel, or 2 with ``critic_mask``).
        lambda_gp: weight of the gradient penalty (WGAN-GP: 10).
        critic_mask: a mask-conditioned critic: it sees :func:`critic_input` pairs ``[image, mask]``.

    ``forward(real, fake, real_mask=None, fake_mask=None)`` with (B, 1, X, Y, Z) tensors (``fake`` is detached
    here; the masks are used only with ``critic_mask`` and are then required) returns a dict:
    ``loss = L_GAN(D(fake), D(real)) + lambda_gp * GP`` (minimise), and the named terms (detached scalars)
    ``W = E[D(real)] - E[D(fake)]`` (the Wasserstein estimate) and ``GP`` (the unweighted penalty).
    """

    def __init__(self, critic: nn.Module, lambda_gp: float = 10.0, critic_mask: bool = False) -> None:
        super().__init__()
        self.critic = critic
        self.lambda_gp, self.critic_mask = float(lambda_gp), bool(critic_mask)

    def forward(
        self,
        real: torch.Tensor,
        fake: torch.Tensor,
        real_mask: torch.Tensor | None = None,
        fake_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        fake = fake.detach()
        if self.critic_mask:
            if real_mask is None or fake_mask is None:
                raise ValueError(
                    "a mask-conditioned critic (critic_mask) needs both real_mask and fake_mask; for D_P the real "
                    "sample's mask is the synthesis batch key 'y_p2'"
                )
            real, fake = critic_input(real, real_mask), critic_input(fake, fake_mask)
        return self.wgan_gp(real, fake)

    def wgan_gp(self, real: torch.Tensor, fake: torch.Tensor,
                penalty_pairs: int | None = None) -> dict[str, torch.Tensor]:
        """``L_GAN(D(fake), D(real)) + lambda_gp * GP`` on critic inputs, with the named terms ``W`` and ``GP``;
        the penalty interpolates the pairs ``real[i], fake[i]``: all of them, or the first ``penalty_pairs``."""
        adv = L_GAN(self.critic(fake), self.critic(real))
        if penalty_pairs is not None:
            real, fake = real[:penalty_pairs], fake[:penalty_pairs]
        gp = gradient_penalty(self.critic, real, fake)
        return {"loss": adv + self.lambda_gp * gp, "W": -adv.detach(), "GP": gp.detach()}


class LesionCriticObjective(CriticObjective):
    """A lesion-focused critic's WGAN-GP objective (ours): :class:`CriticObjective` on :func:`lesion_crops`
    (``crop_size`` voxels centred on each sample's lesion) of the real and the fake batch.

    ``forward(real, fake, real_mask, fake_mask)`` as :class:`CriticObjective` (both masks required: they locate
    the lesions; with ``critic_mask`` the mask crops are also the critic's second channel). ``D_P_lesion``: real
    ``x_p2`` at ``y_p2`` vs ``x~_p`` at ``y_hp``; ``D_H_lesion``: healthy ``x_h`` at ``y_hp`` vs ``x~_h`` at
    ``y_p``. Samples without a lesion drop out; the penalty interpolates the first ``min(N_real, N_fake)`` pairs.
    When either side has no lesion crop, ``loss`` is 0 (kept in the graph of the critic's parameters) and
    ``W``/``GP`` are 0.
    """

    def __init__(
        self, critic: nn.Module, crop_size: Sequence[int] = (16, 16, 8), lambda_gp: float = 10.0, critic_mask: bool = True
    ) -> None:
        super().__init__(critic, lambda_gp=lambda_gp, critic_mask=critic_mask)
        self.crop_size = tuple(int(s) for s in crop_size)

    def forward(
        self,
        real: torch.Tensor,
        fake: torch.Tensor,
        real_mask: torch.Tensor | None = None,
        fake_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if real_mask is None or fake_mask is None:
            raise ValueError("a lesion-focused critic needs real_mask and fake_mask (they locate the lesions)")
        real_c, real_m, _ = lesion_crops(real, real_mask, self.crop_size)
        fake_c, fake_m, _ = lesion_crops(fake.detach(), fake_mask, self.crop_size)
        if not len(real_c) or not len(fake_c):
            zero = sum(p.sum() for p in self.critic.parameters()) * 0.0
            return {"loss": zero, "W": zero.detach(), "GP": zero.detach()}
        if self.critic_mask:
            real_c, fake_c = critic_input(real_c, real_m), critic_input(fake_c, fake_m)
        return self.wgan_gp(real_c, fake_c, penalty_pairs=min(len(real_c), len(fake_c)))


class GeneratorObjective(nn.Module):
    """Both cycles' generator objective in a single ``forward`` (DDP-friendly): the sum of weighted terms.

    Args:
        G_HP, G_PH: the generators; D_P, D_H: the critics (read by adversarial terms, not updated here: the
            caller steps only the generators' optimiser).
        terms: :class:`GeneratorLoss` modules (each with a unique ``name`` not in :data:`RESERVED_NAMES` and a
            ``weight``), e.g. :func:`paper_terms`.

    ``forward(x_h, y_hp, x_p, y_p, brainmask_h=None, brainmask_p=None)`` with (B, 1, X, Y, Z) tensors (masks
    binary or instance labels) runs the HPH and PHP cycles once, hands their tensors to every term (the
    ``cycle`` dict described in :class:`GeneratorLoss`) and returns a dict with the total
    ``G = sum(weight * term)`` (to minimise), every term's unweighted value under its name (detached scalar),
    and the images :data:`CYCLE_IMAGES` ``fake_p`` (x~_p), ``rec_h`` (HPH reconstruction), ``fake_h`` (x~_h),
    ``rec_p`` (PHP reconstruction), detached.

    Raises:
        ValueError: no terms, a term without ``name``/``weight``, or duplicate or reserved names.
    """

    def __init__(
        self, G_HP: nn.Module, G_PH: nn.Module, D_P: nn.Module, D_H: nn.Module, terms: Sequence[nn.Module]
    ) -> None:
        super().__init__()
        self.G_HP, self.G_PH, self.D_P, self.D_H = G_HP, G_PH, D_P, D_H
        terms = [t for t in terms if t is not None]  # a config entry switched off with `_disabled_` is None
        if not terms:
            raise ValueError("GeneratorObjective needs at least one loss term")
        for t in terms:
            if not isinstance(t, nn.Module) or not hasattr(t, "name") or not hasattr(t, "weight"):
                raise ValueError(f"a generator loss term must be an nn.Module with a name and a weight, got {t!r}")
        names = [t.name for t in terms]
        dup = sorted({n for n in names if names.count(n) > 1})
        bad = sorted(set(names) & set(RESERVED_NAMES))
        if dup or bad:
            raise ValueError(f"generator loss term names must be unique and not in {RESERVED_NAMES}: {dup + bad}")
        self.terms = nn.ModuleList(terms)

    def forward(
        self,
        x_h: torch.Tensor,
        y_hp: torch.Tensor,
        x_p: torch.Tensor,
        y_p: torch.Tensor,
        brainmask_h: torch.Tensor | None = None,
        brainmask_p: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        cycle: dict[str, Any] = dict(
            x_h=x_h, y_hp=y_hp, x_p=x_p, y_p=y_p, brainmask_h=brainmask_h, brainmask_p=brainmask_p,
            D_P=self.D_P, D_H=self.D_H, G_HP=self.G_HP, G_PH=self.G_PH,
        )  # fmt: skip
        # HPH cycle
        cycle["fake_p"] = self.G_HP(x_h, y_hp)
        cycle["rec_h"] = self.G_PH(cycle["fake_p"], y_hp)
        cycle["id_h"] = self.G_PH(x_h, torch.zeros_like(y_hp))
        # PHP cycle
        cycle["fake_h"] = self.G_PH(x_p, y_p)
        cycle["rec_p"] = self.G_HP(cycle["fake_h"], y_p)
        cycle["id_p"] = self.G_HP(x_p, y_p)

        values = {t.name: t(cycle) for t in self.terms}
        total = sum(t.weight * values[t.name] for t in self.terms)
        out: dict[str, torch.Tensor] = {"G": total}
        out.update({name: v.detach() for name, v in values.items()})
        out.update({k: cycle[k].detach() for k in CYCLE_IMAGES})
        return out

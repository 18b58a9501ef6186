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

import torch
import torch.nn as nn

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
    "LesionCycleLoss",
    "paper_terms",
    "CriticObjective",
    "GeneratorObjective",
    "CYCLE_IMAGES",
    "RESERVED_NAMES",
]

# images a GeneratorObjective returns (detached) beside the losses
CYCLE_IMAGES = ("fake_p", "rec_h", "fake_h", "rec_p")
# keys of the trainer's output that a generator term may not be named after
RESERVED_NAMES = ("G", "D_P", "D_H", "GP", "W_P", "W_H", "GP_P", "GP_H", *CYCLE_IMAGES)


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


class LesionCycleLoss(GeneratorLoss):
    """Cycle consistency where the lesions are (ours, beyond the paper): each cycle teaches the generator that
    closes it, averaged over the voxels within ``dilation`` voxels of the mask (brain only):

    - PHP: ``|G_HP(sg(x~_h), y_p) - x_p|_1`` over ``dil(y_p)``: the one place where ``G_HP`` sees what a REAL lesion
      looks like (dark core, blooming rim). ``L_CC`` averages over the whole patch, where a 3 mm lesion is
      about 0.1 % of the voxels, so this signal is otherwise drowned.
    - HPH: ``|G_PH(sg(x~_p), y_hp) - x_h|_1`` over ``dil(y_hp)``: ``G_PH`` learns to remove painted lesions.

    ``sg`` stops the gradient into the generator that made the input, so neither generator can hide the lesion
    in its output to make the other's reconstruction easy (the removal must stay a removal). Two extra generator
    passes per step. ``dilation`` (voxels) covers the blooming rim beyond the label. Default weight 10 (as L_CC).
    """

    def __init__(self, weight: float = 10.0, dilation: int = 2, name: str = "CC_lesion") -> None:
        super().__init__(weight, name)
        self.dilation = int(dilation)

    def _region(self, mask: torch.Tensor, brainmask: torch.Tensor | None) -> torch.Tensor:
        m = dilate(mask, self.dilation).float()
        if brainmask is not None:
            m = m * (brainmask > 0).float()
        return m

    def forward(self, cycle: Mapping[str, Any]) -> torch.Tensor:
        total = cycle["x_p"].new_zeros(())
        for gen, fake, mask, target, bm in (
            ("G_HP", "fake_h", "y_p", "x_p", "brainmask_p"),
            ("G_PH", "fake_p", "y_hp", "x_h", "brainmask_h"),
        ):
            region = self._region(cycle[mask], cycle.get(bm))
            rec = cycle[gen](cycle[fake].detach(), cycle[mask])
            total = total + (region * (rec - cycle[target]).abs()).sum() / region.sum().clamp_min(1.0)
        return total

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dilation={self.dilation}"


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
        adv = L_GAN(self.critic(fake), self.critic(real))
        gp = gradient_penalty(self.critic, real, fake)
        return {"loss": adv + self.lambda_gp * gp, "W": -adv.detach(), "GP": gp.detach()}


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

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

:class:`CriticObjective` and :class:`GeneratorObjective` compute a full objective in ONE ``forward`` so that
wrapping them in ``DistributedDataParallel`` synchronises every gradient (including the penalty's).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = [
    "L_CC",
    "L_ID",
    "L_AM",
    "L_GAN",
    "gradient_penalty",
    "critic_input",
    "CriticObjective",
    "GeneratorObjective",
]


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


class CriticObjective(nn.Module):
    """One critic's full WGAN-GP objective in a single ``forward`` (DDP-friendly).

    ``forward(real, fake, real_mask=None, fake_mask=None)`` with (B, 1, X, Y, Z) tensors (``fake`` is detached
    here; with masks the critic sees :func:`critic_input` pairs) returns a dict:
    ``loss = L_GAN(D(fake), D(real)) + lambda_gp * GP`` (minimise), ``wasserstein = E[D(real)] - E[D(fake)]``
    and ``gp`` (the unweighted penalty).
    """

    def __init__(self, critic: nn.Module, lambda_gp: float = 10.0) -> None:
        super().__init__()
        self.critic = critic
        self.lambda_gp = float(lambda_gp)

    def forward(
        self,
        real: torch.Tensor,
        fake: torch.Tensor,
        real_mask: torch.Tensor | None = None,
        fake_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if (real_mask is None) != (fake_mask is None):
            raise ValueError("give both real_mask and fake_mask (a mask-conditioned critic) or neither")
        real, fake = critic_input(real, real_mask), critic_input(fake.detach(), fake_mask)
        adv = L_GAN(self.critic(fake), self.critic(real))
        gp = gradient_penalty(self.critic, real, fake)
        return {"loss": adv + self.lambda_gp * gp, "wasserstein": -adv.detach(), "gp": gp.detach()}


class GeneratorObjective(nn.Module):
    """Both cycles' generator objective in a single ``forward`` (DDP-friendly).

    ``forward(x_h, y_hp, x_p, y_p, brainmask_h=None, brainmask_p=None)`` with (B, 1, X, Y, Z) tensors, masks
    binary or instance labels. Returns a dict with the total ``G`` (to minimise), the weighted-sum parts
    ``CC``, ``ID``, ``AM``, ``GAN`` (unweighted values, detached) and the images ``fake_p`` (x~_p),
    ``rec_h`` (HPH reconstruction), ``fake_h`` (x~_h), ``rec_p`` (PHP reconstruction), detached.

    ``G = lambda_cc * L_CC + lambda_id * L_ID + lambda_am * L_AM + L_GAN(D_P(x~_p)) + L_GAN(D_H(x~_h))``
    (``critic_mask``: ``D_P([x~_p, y_p])``, ``D_H([x~_h, y_p])``).
    The critics' parameters are not updated here (the caller steps only the generators' optimiser).
    """

    def __init__(
        self,
        G_HP: nn.Module,
        G_PH: nn.Module,
        D_P: nn.Module,
        D_H: nn.Module,
        lambda_cc: float = 10.0,
        lambda_id: float = 5.0,
        lambda_am: float = 10.0,
        lambda_gan: float = 1.0,
        am_in_hph: bool = False,
        critic_mask: bool = False,
    ) -> None:
        super().__init__()
        self.G_HP, self.G_PH, self.D_P, self.D_H = G_HP, G_PH, D_P, D_H
        self.critic_mask = bool(critic_mask)
        self.lambda_cc, self.lambda_id, self.lambda_am = float(lambda_cc), float(lambda_id), float(lambda_am)
        self.lambda_gan, self.am_in_hph = float(lambda_gan), bool(am_in_hph)

    def forward(
        self,
        x_h: torch.Tensor,
        y_hp: torch.Tensor,
        x_p: torch.Tensor,
        y_p: torch.Tensor,
        brainmask_h: torch.Tensor | None = None,
        brainmask_p: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        y_h = torch.zeros_like(y_hp)
        # HPH cycle
        fake_p = self.G_HP(x_h, y_hp)
        rec_h = self.G_PH(fake_p, y_hp)
        id_h = self.G_PH(x_h, y_h)
        # PHP cycle
        fake_h = self.G_PH(x_p, y_p)
        rec_p = self.G_HP(fake_h, y_p)
        id_p = self.G_HP(x_p, y_p)

        cc = L_CC(rec_h, x_h) + L_CC(rec_p, x_p)
        ident = L_ID(id_h, x_h) + L_ID(id_p, x_p)
        am = L_AM(fake_h, x_p, y_p, brainmask_p)
        if self.am_in_hph:
            am = am + L_AM(fake_p, x_h, y_hp, brainmask_h)
        # mask-conditioned critics judge each fake with the mask it was made for
        m_p, m_h = (y_hp, y_p) if self.critic_mask else (None, None)
        gan = L_GAN(self.D_P(critic_input(fake_p, m_p))) + L_GAN(self.D_H(critic_input(fake_h, m_h)))
        total = self.lambda_cc * cc + self.lambda_id * ident + self.lambda_am * am + self.lambda_gan * gan
        return {
            "G": total,
            "CC": cc.detach(),
            "ID": ident.detach(),
            "AM": am.detach(),
            "GAN": gan.detach(),
            "fake_p": fake_p.detach(),
            "rec_h": rec_h.detach(),
            "fake_h": fake_h.detach(),
            "rec_p": rec_p.detach(),
        }

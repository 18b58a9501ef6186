"""Networks of the mask-guided 3-D CycleGAN (Faryna et al., section 2): generators and critics.

Paper symbols (the objects are created by the bundle config under these names):

- ``G_HP(x_h, y_p) -> x~_p``: :class:`CMBGenerator`, paints CMBs on a healthy image where the mask says.
- ``G_PH(x_p, y_p) -> x~_h``: :class:`CMBGenerator`, removes CMBs under the mask (pseudo-healthy).
- ``D_P`` / ``D_H``: :class:`CMBCritic`, Wasserstein critics of the pathological / healthy domain.

The generator follows Xia et al. 2020 (the paper's reference [15]) with every layer 3-D: a convolutional stem,
two stride-2 downsamplings, residual blocks at 1/4 resolution, two transposed-convolution upsamplings with
skip connections (concatenation) from the encoder (trilinear upsampling + convolution), and a 1-channel head. Inputs of any size are padded inside
to a multiple of 4 and the output is cropped back, so the paper's 160 x 146 x 32 patches work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import PatchDiscriminator

__all__ = ["CMBGenerator", "CMBCritic", "ResidualBlock3d", "cube_max"]


def _norm(kind: str | None, channels: int) -> nn.Module:
    if kind is None or str(kind).lower() in ("none", ""):
        return nn.Identity()
    kind = str(kind).lower()
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown generator norm {kind!r} (use 'instance', 'group' or None)")


def _conv_block(cin: int, cout: int, kernel: int, stride: int, norm: str | None) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2, padding_mode="replicate"),
        _norm(norm, cout),
        nn.LeakyReLU(0.2, inplace=True),
    )



def cube_max(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Maximum over the (2 radius + 1)^3 cube around each voxel of a (B, C, X, Y, Z) tensor (borders: the voxels
    inside). Equal to ``F.max_pool3d(x, 2 radius + 1, stride=1, padding=radius)``, as three 1-D passes: 3 (2 r + 1)
    comparisons per voxel instead of (2 r + 1)^3 (5x faster for r = 3)."""
    k = 2 * int(radius) + 1
    for axis in range(3):
        size, pad = [1, 1, 1], [0, 0, 0]
        size[axis], pad[axis] = k, int(radius)
        x = F.max_pool3d(x, kernel_size=tuple(size), stride=1, padding=tuple(pad))
    return x

class ResidualBlock3d(nn.Module):
    """Two 3x3x3 convolutions with a identity shortcut: ``x + conv(act(norm(conv(x))))`` (shape preserved)."""

    def __init__(self, channels: int, norm: str | None = "instance") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(channels, channels, 3, padding=1, padding_mode="replicate"),
            _norm(norm, channels),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(channels, channels, 3, padding=1, padding_mode="replicate"),
            _norm(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CMBGenerator(nn.Module):
    """Mask-guided 3-D generator used for both ``G_HP`` and ``G_PH``.

    Args:
        in_channels: image + mask channels (2 in the paper's setting).
        out_channels: 1 (the synthetic image).
        channels: width of the stem; the two downsampling stages use ``2 * channels`` and ``4 * channels``.
        n_res_blocks: residual blocks at 1/4 resolution (Xia et al. use 6-9; the CPU preset uses 2).
        stem_kernel: kernel of the stem convolution (7 as in Xia et al. / CycleGAN, 3 for cheap CPU runs).
        norm: ``"instance"`` (default, as Xia et al.), ``"group"`` or ``None``. Instance statistics depend on the
            field of view: train and infer at the same patch size (the paper preset), or use ``None`` when
            training on small crops and inferring on whole axial planes (the CPU preset).
        output: ``"residual"`` (default): ``clamp(x + h, 0, 1)`` (straight-through gradient of the clamp; no tanh:
            a saturated tanh froze a collapsed generator for good in a CPU-preset run at lr 5e-4);
            the head starts at zero so an untrained
            generator is the identity and learning concentrates on the change (what CMB painting and removal
            are). ``"sigmoid"``: ``sigmoid(h)``, a free image as in Xia et al. Both give values in [0, 1].
        mask_to_head: also give ``head_gain * mask`` and ``head_gain * mask * image`` to the 1x1 output head (a
            direct path from "where" to "how much"; ours, not in Xia et al.).
        mask_blur: sigmas (voxels) of Gaussian-blurred masks given to the head the same way (ours; empty: none):
            a dark centre and a blooming rim beyond the label are then linear in the head's weights.
        mask_code: the mask channel carries contrast codes (ours, :mod:`cmb_synthesis.synthesis.codes`): a
            floating-point mask holds ``0.5 + q`` on lesion voxels (``q`` in [0, 1] the darkness rank to paint,
            1.0 = the median, so a 0/1 float mask asks for the median) and 0 elsewhere; integer and bool masks
            (instance labels) are binarised, i.e. the median. The network itself sees the binary mask as without
            codes, and the head also gets ``head_gain * (code - 1)`` on the lesion voxels and, separately, on the
            one-voxel shell around each lesion (the nearest lesion's code): the painted intensity and its immediate
            rim move linearly with the rank around what the median paints, nothing farther out depends on the rank
            (blurred code maps, tried first, let the rank change the tissue beyond the lesion: identity error
            0.016-0.025), and an untrained code weight leaves the generator as it is without codes. False: every
            mask is binarised.
        head_smooth: sigma (voxels) of a Gaussian applied to the head's mask features that are otherwise sharp (the
            mask, mask * image and, with ``mask_code``, the code and rim maps; ours, 0: none). Real CMBs fade
            from a dark centre to a lighter edge inside their label (a blooming profile sampled on voxels), which
            a blur of the label at ~0.7 voxel fits far better than the binary label (least squares on the
            training CMBs: R^2 0.85 against 0.66); with the sharp features a trained head paints flat plateaus
            with a step at the label's edge. Truncated at ``round(3 sigma)`` voxels: nothing farther changes.
        smooth_peak: divide the blurred features by the blurred mask's local peak (the maximum within 3 voxels),
            so every lesion's smoothed mask reaches 1 at its centre whatever its size (ours; needs
            ``head_smooth``). A CMB's centre is dark whatever its size, but a blurred label peaks higher on a large
            lesion than on a small one, so one head weight painted the large ones too dark (validation lesions of
            37+ voxels: centre 0.05 of the tissue against 0.18 for real ones).
        size_scale: > 0 also gives the head every mask feature (the mask or its smoothed form and the blurred masks,
            each alone and times the image) multiplied by the size of the lesion it belongs to, divided by
            ``size_scale`` (ours; 0: off). The size is a lesion's effective voxel count: the largest value of its
            sigma-2 Gaussian-blurred mask within 3 voxels, divided by the blur of a single voxel (about the voxel
            count for lesions of up to ~4 voxels' radius; a voxel-scale map, so it is the same on a crop and on a
            whole plane). Why: the painted profile is otherwise nearly the same function of the distance to the
            label's edge for every lesion, while real CMBs' is size-dependent (small ones lighter, large ones dark
            over a wider core); with these products the head's painting can vary linearly with size.
        head_sharp: with ``head_smooth``, also give the head the binary mask (and mask * image) as it is, beside
            its smoothed form (ours; needs ``head_smooth > 0``). Why: a least-squares fit of the head's mask
            features to the training CMBs' radial profiles (``scripts/head_profile_fit.py``) leaves the validation
            lesions' mean profile 0.043 off with the smoothed features alone (1 voxel out: 0.45 against 0.41; large
            lesions too light there, small ones too dark at their centre) and 0.021 off with both: a smooth core
            plus a step at the label's edge is how a large lesion stays dark 1-2 voxels out.

    Forward:
        ``forward(image, mask=None)``: ``image`` (B, 1, X, Y, Z) float in [0, 1] and ``mask`` (B, 1, X, Y, Z)
        binary {0, 1} (any non-zero is treated as lesion; with ``mask_code`` a float code map, checked); or
        ``image`` alone with both channels stacked (B, 2, X, Y, Z), the form sliding-window inferers and exported
        models call (with ``mask_code`` the mask channel is clamped to [0, 1.5]). Returns (B, 1, X, Y, Z) in [0, 1].
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 1,
        channels: int = 32,
        n_res_blocks: int = 6,
        stem_kernel: int = 7,
        norm: str | None = "instance",
        output: str = "residual",
        mask_to_head: bool = True,
        head_gain: float = 4.0,
        mask_blur: Sequence[float] = (),
        mask_code: bool = False,
        head_smooth: float = 0.0,
        smooth_peak: bool = False,
        size_scale: float = 0.0,
        head_sharp: bool = False,
    ) -> None:
        super().__init__()
        self.mask_code = bool(mask_code)
        if output not in ("residual", "sigmoid"):
            raise ValueError(f"output must be 'residual' or 'sigmoid', got {output!r}")
        if channels < 1 or n_res_blocks < 0:
            raise ValueError(f"channels must be >= 1 and n_res_blocks >= 0, got {channels}, {n_res_blocks}")
        self.in_channels, self.output = in_channels, output
        c1, c2, c3 = channels, 2 * channels, 4 * channels
        self.stem = _conv_block(in_channels, c1, stem_kernel, 1, norm)
        self.down1 = _conv_block(c1, c2, 3, 2, norm)
        self.down2 = _conv_block(c2, c3, 3, 2, norm)
        self.res = nn.Sequential(*[ResidualBlock3d(c3, norm) for _ in range(n_res_blocks)])
        # trilinear upsampling + 3^3 convolution (a stride-2 transposed convolution painted checkerboards)
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=2, mode="trilinear"), nn.Conv3d(c3, c2, 3, padding=1, padding_mode="replicate"))
        self.fuse1 = _conv_block(2 * c2, c2, 3, 1, norm)
        self.up2 = nn.Sequential(nn.Upsample(scale_factor=2, mode="trilinear"), nn.Conv3d(c2, c1, 3, padding=1, padding_mode="replicate"))
        self.fuse2 = _conv_block(2 * c1, c1, 3, 1, norm)
        # mask-gated features also feed the 1x1 head directly: mask and mask * image, scaled by `head_gain`.
        # "pull the voxels under the mask towards intensity t" (paint: t = lesion level; remove: t = tissue level;
        # a lesion already there is left alone, as L_ID wants) is then h = g * (a * m + b * m * x), linear in
        # the head's weights; through the stem alone, 800 CPU-preset steps painted nothing. The gain lets Adam,
        # whose steps are about lr per weight, reach unit slopes within a few hundred steps.
        self.mask_to_head, self.head_gain = bool(mask_to_head) and in_channels > 1, float(head_gain)
        # Gaussian-blurred copies of the mask (sigma in voxels) feed the head too (ours): a CMB is darkest at its
        # centre and blooms beyond its label, a profile that is then linear in the head's weights
        self.mask_blur = tuple(float(sg) for sg in mask_blur) if self.mask_to_head else ()
        for i, sg in enumerate(self.mask_blur):
            if sg <= 0:
                raise ValueError(f"mask_blur sigmas must be positive, got {mask_blur}")
            r = max(1, int(round(3 * sg)))
            k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sg) ** 2)
            self.register_buffer(f"_blur{i}", k / k.sum(), persistent=False)
        self.head_smooth = float(head_smooth) if self.mask_to_head else 0.0
        if self.head_smooth < 0:
            raise ValueError(f"head_smooth must be >= 0, got {head_smooth}")
        self.smooth_peak = bool(smooth_peak)
        if self.smooth_peak and self.head_smooth <= 0:
            raise ValueError("smooth_peak needs head_smooth > 0 (it normalises the smoothed mask features)")
        if self.head_smooth > 0:
            r = max(1, int(round(3 * self.head_smooth)))
            k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / self.head_smooth) ** 2)
            self.register_buffer("_smooth", k / k.sum(), persistent=False)
        self.head_sharp = bool(head_sharp)
        if self.head_sharp and self.head_smooth <= 0:
            raise ValueError("head_sharp needs head_smooth > 0 (without smoothing the head's mask features are sharp already)")
        self.size_scale = float(size_scale) if self.mask_to_head else 0.0
        if self.size_scale < 0:
            raise ValueError(f"size_scale must be >= 0, got {size_scale}")
        if self.size_scale > 0:
            k = torch.exp(-0.5 * (torch.arange(-6, 7, dtype=torch.float32) / 2.0) ** 2)
            self.register_buffer("_size_blur", k / k.sum(), persistent=False)
        n_head = 2 * (in_channels - 1) * (1 + int(self.head_sharp) + len(self.mask_blur)) if self.mask_to_head else 0
        n_head *= 2 if self.size_scale > 0 else 1
        if self.mask_code:
            if not self.mask_to_head:
                raise ValueError("mask_code needs mask_to_head (the codes reach the generator through its head)")
            n_head += 2 * (in_channels - 1)
        self.head = nn.Conv3d(c1 + n_head, out_channels, 1)
        if output == "residual":
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            if image.shape[1] != self.in_channels:
                raise ValueError(f"expected {self.in_channels} stacked channels, got input of shape {tuple(image.shape)}")
            x = image
            image = x[:, :1]
        else:
            x = torch.cat([image, mask.to(image.dtype) if self.mask_code and mask.is_floating_point() else (mask > 0).to(image.dtype)], dim=1)
        if x.ndim != 5:
            raise ValueError(f"expected a (B, C, X, Y, Z) input, got shape {tuple(x.shape)}")
        code = None
        if self.mask_code:
            if mask is not None:  # the explicit API: refuse float instance labels (stacked windows are our own)
                self._check_codes(x[:, 1:])
            x = torch.cat([x[:, :1], x[:, 1:].clamp(0.0, 1.5)], dim=1)
            binary = (x[:, 1:] > 0).to(x.dtype)
            code = (x[:, 1:] - 1.0) * binary  # 0 = the median rank, -0.5 / +0.5 the lightest / darkest
            x = torch.cat([x[:, :1], binary], dim=1)
        size = x.shape[2:]
        pad = [(-s) % 4 for s in size]
        if any(pad):
            # F.pad lists the last dimension first
            x = F.pad(x, [0, pad[2], 0, pad[1], 0, pad[0]], mode="replicate")
            code = None if code is None else F.pad(code, [0, pad[2], 0, pad[1], 0, pad[0]], mode="replicate")
        s = self.stem(x)
        d1 = self.down1(s)
        d2 = self.res(self.down2(d1))
        u1 = self.fuse1(torch.cat([self.up1(d2), d1], dim=1))
        u2 = self.fuse2(torch.cat([self.up2(u1), s], dim=1))
        if self.mask_to_head:
            feats = self.head_features(x[:, :1], x[:, 1:], code)
            u2 = torch.cat([u2] + feats, dim=1)
        h = self.head(u2)[:, :, : size[0], : size[1], : size[2]]
        if self.output == "residual":
            out = image + h
            # clamp to [0, 1] in the forward pass only (straight-through): a hard clamp has zero gradient where
            # it bites, so an output pushed out of range could never be pulled back by the L1 terms
            return out + (out.clamp(0.0, 1.0) - out).detach()
        return torch.sigmoid(h)

    def head_features(self, image: torch.Tensor, mask: torch.Tensor, code: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The mask features the 1x1 head gets beside the network's last feature map (``mask_to_head``).

        Args:
            image: (B, 1, X, Y, Z) the input image in [0, 1].
            mask: (B, 1, X, Y, Z) the binary lesion mask {0, 1} (float).
            code: (B, 1, X, Y, Z) contrast codes ``code - 1`` on lesion voxels, 0 elsewhere (``mask_code``), or None.

        Returns:
            the (B, 1, X, Y, Z) features in the head's channel order, each scaled by ``head_gain``: for each of
            the mask (smoothed and peak-normalised with ``head_smooth``/``smooth_peak``), the binary mask
            (``head_sharp``) and the blurred masks (``mask_blur``) the feature alone and times the image; with
            ``size_scale`` all of those again times the lesion-size map; with codes the code and rim maps.
        """
        sharp, peak = mask, None
        if self.head_smooth > 0:
            sharp = self._blurred(mask, self._smooth)
            if self.smooth_peak:  # each lesion's smoothed mask scaled to 1 at its centre
                peak = cube_max(sharp, 3).clamp_min(1e-3)
                sharp = sharp / peak
        masks = [sharp] + ([mask] if self.head_sharp else [])
        masks += [self._blurred(mask, getattr(self, f"_blur{i}")) for i in range(len(self.mask_blur))]
        feats = [t for m in masks for t in (self.head_gain * m, self.head_gain * m * image)]
        if self.size_scale > 0:
            lesion_size = self._lesion_size(mask)  # once: every product uses the same map
            feats += [f * lesion_size for f in feats]
        if code is not None:
            # the nearest lesion's code on the 1-voxel (cubic) shell around it: codes + 1 are > 0 on lesions
            near = F.max_pool3d((code + 1.0) * mask, kernel_size=3, stride=1, padding=1)
            rim = (near - 1.0) * ((near > 0) & (mask <= 0)).to(code.dtype)
            if self.head_smooth > 0:
                code, rim = self._blurred(code, self._smooth), self._blurred(rim, self._smooth)
                if peak is not None:
                    code, rim = code / peak, rim / peak
            feats += [self.head_gain * code, self.head_gain * rim]
        return feats

    def _lesion_size(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) map of the size of the nearest lesion, in voxels / ``size_scale`` (``size_scale``)."""
        k = self._size_blur
        blurred = self._blurred(mask, k)
        one_voxel = float(k[len(k) // 2]) ** 3  # the blur's value at a lone voxel
        return cube_max(blurred, 3) / (one_voxel * self.size_scale)

    @staticmethod
    def _check_codes(code: torch.Tensor) -> None:
        """A code map holds 0 or values in [0.5, 1.5] (float instance labels 2, 3, ... would be read as codes).
        Checked on the ``mask`` argument; the stacked 2-channel form (sliding windows, export tracing, MONAI's
        ``verify_net_in_out`` with random inputs) is clamped to [0, 1.5] instead."""
        bad = (code < 0) | (code > 1.5 + 1e-4) | ((code > 0) & (code < 0.5 - 1e-4))
        if bool(bad.any()):
            raise ValueError(
                f"a contrast-code generator (mask_code) got mask values in [{float(code.min()):g}, {float(code.max()):g}]: "
                "pass a binary or integer instance-label mask, or a code map with 0 outside lesions and 0.5 + rank "
                "(rank in [0, 1]) on them (cmb_synthesis.synthesis.codes)"
            )

    @staticmethod
    def _blurred(m: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur of a (B, C, X, Y, Z) mask with the 1-D kernel ``k`` (replicate borders)."""
        r = (len(k) - 1) // 2
        c = m.shape[1]
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = len(k)
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
            m = F.conv3d(F.pad(m, pad, mode="replicate"), k.to(m.dtype).view(shape).expand(c, 1, *shape[2:]), groups=c)
        return m


class CMBCritic(nn.Module):
    """3-D Wasserstein critic (``D_P`` / ``D_H``): MONAI's :class:`~monai.networks.nets.PatchDiscriminator`
    with normalisation off (batch norm breaks the per-sample gradient penalty of WGAN-GP) and LeakyReLU(0.2).

    Args:
        in_channels: 1 (image only, as in the paper) or 2 (image + mask).
        channels: width of the first layer, doubled at each further layer.
        num_layers_d: stride-2 layers; each spatial size must stay >= 4 after them (use 2 for 16-slice
            patches, 3 for the paper's 32-slice patches).
        kernel_size: convolution kernel (4 as in pix2pix/CycleGAN PatchGAN critics).
        centre_input: subtract each sample's mean image intensity (channel 0, over the whole patch) before scoring
            (ours; False: the paper's critic). The critic is then blind to a global brightness offset, so it cannot
            tell the domains apart by the brightness of their crops, nor push a generator to shift every voxel. Why:
            the CPU preset's healthy crops (centred on sampled lesion sites) are brighter than the pathological
            ones (centred on real CMBs, nearer the brain's edge; training batches: crop mean 0.615 against 0.583,
            background 4.2 % against 7.0 % of the voxels, tissue median 0.648 against 0.645), and the trained
            generators shifted whole patches (``G_HP`` by -0.005 to -0.013, ``G_PH`` by +0.005 to +0.011, alike at
            every distance from the mask beyond 5 voxels: the identity error; ``scripts/synthesis_diagnosis.py
            --offsets``). A mask channel, if any, is left as it is.

    Forward: ``x`` (B, in_channels, X, Y, Z) in [0, 1] -> unbounded patch scores (B, 1, X', Y', Z').
    """

    def __init__(
        self, in_channels: int = 1, channels: int = 32, num_layers_d: int = 3, kernel_size: int = 4,
        centre_input: bool = False,
    ) -> None:
        super().__init__()
        self.centre_input = bool(centre_input)
        self.net = PatchDiscriminator(
            spatial_dims=3,
            channels=channels,
            in_channels=in_channels,
            out_channels=1,
            num_layers_d=num_layers_d,
            kernel_size=kernel_size,
            norm=None,
            bias=True,
        )
        self.num_layers_d = num_layers_d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"expected a (B, C, X, Y, Z) input, got shape {tuple(x.shape)}")
        small = [s for s in x.shape[2:] if s // 2**self.num_layers_d < 4]
        if small:
            raise ValueError(
                f"critic input {tuple(x.shape[2:])} too small for num_layers_d={self.num_layers_d}: every spatial "
                f"size must be >= {4 * 2**self.num_layers_d}"
            )
        if self.centre_input:
            image = x[:, :1]
            x = torch.cat([image - image.mean(dim=(2, 3, 4), keepdim=True), x[:, 1:]], dim=1)
        return self.net(x)[-1]

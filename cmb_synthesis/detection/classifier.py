"""CNN classifier of CMB candidates (second stage of the detector, Faryna et al. section 2 "Lesion detection").

Input: candidate-centred SWI patches (B, 1, PX, PY, PZ) with intensities in [0, 1] (percentile-scaled as in
``transforms.pipelines.preprocessing``), the candidate voxel at index ``P // 2`` of each axis.
Output: one logit per patch (B, 1); ``sigmoid(logit)`` is the probability that the candidate is a CMB.

Nothing here is a new architecture; :func:`build_classifier` configures MONAI networks from bundle values:

- ``"classifier"`` (default, the CPU preset): ``monai.networks.nets.Classifier`` -- strided residual conv
  units (``channels``/``strides``) then a linear layer on the flattened features;
- ``"densenet121"``: ``monai.networks.nets.DenseNet121`` (3-D), the paper-scale choice on a GPU;
- ``"resnet10"`` / ``"resnet18"``: ``monai.networks.nets.resnet10/18`` (3-D).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks import nets

__all__ = ["ARCHITECTURES", "build_classifier", "count_parameters"]

ARCHITECTURES = ("classifier", "densenet121", "resnet10", "resnet18")


def build_classifier(
    name: str = "classifier",
    patch_size: Sequence[int] = (32, 32, 16),
    in_channels: int = 1,
    channels: Sequence[int] = (16, 32, 64),
    strides: Sequence[int] = (2, 2, 2),
    num_res_units: int = 2,
    dropout: float = 0.1,
) -> torch.nn.Module:
    """A 3-D CNN mapping (B, ``in_channels``, *``patch_size``) patches to (B, 1) logits.

    Args:
        name: one of :data:`ARCHITECTURES`.
        patch_size: spatial size of the candidate patches (needed by ``Classifier`` for its linear layer).
        in_channels: image channels (1: SWI).
        channels, strides, num_res_units: widths, downsampling and residual units per stage of
            ``monai.networks.nets.Classifier`` (ignored by the other architectures).
        dropout: dropout probability (``Classifier``: inside the conv units; DenseNet: ``dropout_prob``).

    Raises:
        ValueError: unknown ``name``, ``patch_size`` not 3-D, or ``channels``/``strides`` of unequal length.
    """
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(f"build_classifier: patch_size must be 3 positive integers, got {patch_size}")
    if name == "classifier":
        channels, strides = tuple(int(c) for c in channels), tuple(int(s) for s in strides)
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"build_classifier: channels {channels} and strides {strides} must have the same length")
        return nets.Classifier(
            in_shape=(int(in_channels), *patch_size),
            classes=1,
            channels=channels,
            strides=strides,
            num_res_units=int(num_res_units),
            dropout=float(dropout) if dropout else None,
            last_act=None,
        )
    if name == "densenet121":
        return nets.DenseNet121(spatial_dims=3, in_channels=int(in_channels), out_channels=1, dropout_prob=float(dropout))
    if name in ("resnet10", "resnet18"):
        factory = getattr(nets, name)
        return factory(spatial_dims=3, n_input_channels=int(in_channels), num_classes=1)
    raise ValueError(f"build_classifier: unknown network {name!r}; expected one of {ARCHITECTURES}")


def count_parameters(network: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)

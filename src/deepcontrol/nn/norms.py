"""One registry for every normalisation that can follow a convolution."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from deepcontrol.nn.agc import AutoGainControl2d


class ChannelBias(nn.Module):
    """No normalisation: a learned per-channel bias only (the conv before it has none)."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.to(x.dtype).view(1, -1, 1, 1)


def _group_norm(num_channels: int) -> nn.GroupNorm:
    # 32 groups (Wu & He 2018), fewer when the channels do not divide into 32.
    return nn.GroupNorm(math.gcd(32, num_channels), num_channels)


NormFactory = Callable[[int], nn.Module]  # a norm layer for a number of channels

NORMS: dict[str, Callable[..., nn.Module]] = {
    "bn": nn.BatchNorm2d,
    "agc": AutoGainControl2d,
    # beyond the paper: the background levels it names for future work (AutoGainControl2d)
    "agc-median": partial(AutoGainControl2d, background="median"),
    "agc-window": partial(AutoGainControl2d, background="window"),
    "gn": _group_norm,
    "in": lambda num_channels: nn.InstanceNorm2d(num_channels, affine=True),
    "none": ChannelBias,
}


def norm_factory(name: str, **options: object) -> NormFactory:
    """The norm ``name`` (one of ``NORMS``) with ``options`` as its keyword arguments (e.g.
    ``window=17`` for ``agc-window``), tried on one layer now, so that an option the layer
    does not take is named before a network is built."""
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}: choose one of {', '.join(sorted(NORMS))}")
    if not options:
        return NORMS[name]
    factory = partial(NORMS[name], **options)
    try:
        factory(1)
    except (TypeError, ValueError) as error:
        given = ", ".join(f"norm.{key}={value!r}" for key, value in options.items())
        raise ValueError(f"norm={name} does not take {given}: {error}") from error
    return factory


def make_norm(norm: str | NormFactory, num_channels: int) -> nn.Module:
    """The norm layer for ``num_channels`` channels: ``norm`` names one of ``NORMS`` or is a
    :func:`norm_factory`."""
    return (norm_factory(norm) if isinstance(norm, str) else norm)(num_channels)


class ConvNormReLU(nn.Sequential):
    """k×k conv (no bias: the norm's β replaces it), norm, ReLU. With AGC the ReLU is part of
    the norm layer, which then runs fused on CUDA (``deepcontrol.nn.fused_agc``); the
    parameters keep the same names either way (conv ``0``, norm ``1``)."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: str | NormFactory, kernel: int = 3
    ) -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)
        layer = make_norm(norm, out_channels)
        if isinstance(layer, AutoGainControl2d):
            layer.relu = True
            super().__init__(conv, layer)
        else:
            super().__init__(conv, layer, nn.ReLU(inplace=True))

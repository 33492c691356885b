"""Weight initialisation schemes of the paper (§3): He fan-in, or identity where possible."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

INIT_SCHEMES = ("he", "identity")


def he_fan_in_(conv: nn.Conv2d) -> None:
    """He et al. (2015) fan-in initialisation for a conv followed by ReLU; zero bias."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


@torch.no_grad()
def identity_(conv: nn.Conv2d) -> None:
    """Centre tap of a k×k conv set to the identity: output channel i copies input channel i.

    Where in and out channels differ only the first ``min(in, out)`` channels are copied;
    every other weight is zero. Bias zero.
    """
    kh, kw = conv.kernel_size
    conv.weight.zero_()
    n = min(conv.in_channels, conv.out_channels)
    idx = torch.arange(n)
    conv.weight[idx, idx, kh // 2, kw // 2] = 1.0
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def initialize(convs: Iterable[tuple[nn.Conv2d, bool]], scheme: str) -> None:
    """Initialise ``(conv, first_after_pooling)`` pairs by ``scheme``.

    ``he``: He fan-in for every conv. ``identity``: the paper's alternative, "setting
    identity in all layers except the first after a pooling" (§3); the first conv after
    each (un)pooling, the network's first conv and the classifier keep He fan-in.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init {scheme!r}: choose one of {', '.join(INIT_SCHEMES)}")
    for conv, first_after_pooling in convs:
        if scheme == "identity" and not first_after_pooling:
            identity_(conv)
        else:
            he_fan_in_(conv)

"""Normalisation layers: the paper's AGC and the norms it is compared with."""

from deepcontrol.nn.agc import AutoGainControl2d
from deepcontrol.nn.norms import NORMS, ChannelBias, make_norm

__all__ = ["NORMS", "AutoGainControl2d", "ChannelBias", "make_norm"]

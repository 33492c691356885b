"""Normalisation layers: the paper's AGC and the norms it is compared with."""

from deepcontrol.nn.agc import AutoGainControl2d, agc_mean_scales
from deepcontrol.nn.norms import NORMS, ChannelBias, make_norm

__all__ = ["NORMS", "AutoGainControl2d", "ChannelBias", "agc_mean_scales", "make_norm"]

"""Normalisation layers: the paper's AGC and the norms it is compared with."""

from deepcontrol.nn.agc import (
    AutoGainControl2d,
    agc_mean_scales,
    mean_scale_parameters,
    use_agc_kernels,
)
from deepcontrol.nn.fused_agc import agc_relu
from deepcontrol.nn.norms import (
    NORMS,
    ChannelBias,
    ConvNormReLU,
    NormFactory,
    make_norm,
    norm_factory,
)

__all__ = [
    "NORMS",
    "AutoGainControl2d",
    "ChannelBias",
    "ConvNormReLU",
    "NormFactory",
    "agc_mean_scales",
    "agc_relu",
    "make_norm",
    "mean_scale_parameters",
    "norm_factory",
    "use_agc_kernels",
]

"""The paper's automatic gain control (AGC), eq. (1) of Ruff (2017).

"AGC" here is the automatic gain control of arXiv:1706.03907, a normalisation layer,
not the adaptive gradient clipping of NF-Nets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepcontrol.nn.fused_agc import agc_relu, triton_agc

KERNELS = ("auto", "reference", "triton")  # AutoGainControl2d's ``kernels``
# What eq. (1) subtracts λ times: the paper's per-(sample, channel) mean over the map, or
# one of the variants it names for future work, the median or a sliding-window mean.
BACKGROUNDS = ("mean", "median", "window")


def _checked_kernels(kernels: str) -> str:
    if kernels not in KERNELS:
        raise ValueError(f"AGC kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    return kernels


class AutoGainControl2d(nn.Module):
    """Automatic gain control, eq. (1): ``out = (y - λ·mean_HW(y)) · γ + β``.

    The mean is taken per sample and per channel over the map positions ("per sample
    mean not minibatch", §2), never over the batch; λ (``mean_scale``), γ (``weight``) and
    β (``bias``) are trainable per channel. There is no running statistic and no division
    by a standard deviation, so the layer is identical in train and eval mode, works at
    batch size 1 and couples no two samples.

    Under autocast it casts its parameters to the activation's dtype rather than
    up-casting the activation. With ``relu=True`` the layer also applies the ReLU that
    follows it, and ``kernels`` picks how: ``"auto"`` runs the fused ``agc_relu`` (Triton
    kernels, ``deepcontrol.nn.fused_agc``) on CUDA, in training and evaluation: it passes
    over the activation twice where the reference passes five times (the mean, then an op
    each for λ, γ, β and the ReLU), and in training it saves no activation of its own. It
    runs this readable reference elsewhere; ``"reference"`` or ``"triton"`` force one.
    Both compute the same values.

    ``background`` picks what λ scales, per sample and channel: ``"mean"``, eq. (1); or the
    estimates of the background level the paper names for future work instead, ``"median"``
    (over the map's positions; the lower middle value of an even count, as torch.median)
    and ``"window"``, the mean over a ``window`` × ``window`` neighbourhood of each position
    (9 unless given; over the positions inside the map, at its edges). Those two run the
    reference only, and the median's gradient is taken as the mean's. On CamVid at the
    paper's lr the 9×9 window trained 11 points behind the mean and the median diverged
    (results/camvid-cpu-small).
    """

    def __init__(
        self,
        num_channels: int,
        mean_scale_init: float = 1.0,
        relu: bool = False,
        kernels: str = "auto",
        background: str = "mean",
        window: int | None = None,
    ) -> None:
        super().__init__()
        if background not in BACKGROUNDS:
            raise ValueError(
                f"AGC background must be one of {', '.join(BACKGROUNDS)}, got {background!r}"
            )
        if background != "window" and window is not None:
            raise ValueError(f"AGC window applies to background='window' only, not {background!r}")
        if background == "window":
            window = 9 if window is None else window
            if type(window) is not int or window < 1 or window % 2 == 0:
                raise ValueError(f"AGC window must be a positive odd size, got {window!r}")
        self.num_channels = num_channels
        self.mean_scale_init = mean_scale_init
        self.relu = relu
        self.kernels = _checked_kernels(kernels)
        self.background = background
        self.window = window
        self.mean_scale = nn.Parameter(torch.full((num_channels,), float(mean_scale_init)))
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() != 4 or y.shape[1] != self.num_channels:
            raise ValueError(
                f"AutoGainControl2d({self.num_channels}) expects (N, {self.num_channels}, H, W), "
                f"got {tuple(y.shape)}"
            )
        kernels = self.kernels
        if kernels == "auto":
            fusable = y.is_cuda and triton_agc is not None and self.background == "mean"
            kernels = "triton" if fusable else "reference"
        if kernels == "triton" and self.background != "mean":
            raise ValueError(f"the fused AGC kernels take the mean only, not the {self.background}")
        if self.relu and kernels == "triton":
            return agc_relu(y, self.mean_scale, self.weight, self.bias)
        shape = (1, self.num_channels, 1, 1)
        mean_scale = self.mean_scale.to(y.dtype).view(shape)
        weight = self.weight.to(y.dtype).view(shape)
        bias = self.bias.to(y.dtype).view(shape)
        out = (y - mean_scale * self._background_level(y)) * weight + bias
        return torch.relu(out) if self.relu else out

    def _background_level(self, y: torch.Tensor) -> torch.Tensor:
        if self.background == "mean":
            return y.mean(dim=(2, 3), keepdim=True)
        if self.background == "median":
            # The median forward, the mean's gradient backward (straight through): both
            # levels move one for one with a constant added to the map. The median's own
            # gradient puts a map's whole gradient sum on one position, and held constant
            # the backward forgets that the level moves with the map; both diverged sooner.
            # At lr 0.08 on CamVid this diverged too, in every seed (docs/notes.md).
            mean = y.mean(dim=(2, 3), keepdim=True)
            median = y.flatten(2).median(dim=2).values[..., None, None]
            return mean + (median - mean).detach()
        # along W, then along H: the same window mean, as the count inside the map is the
        # product of the two, in 2k operations per position instead of k²
        k, half = self.window, self.window // 2
        rows = F.avg_pool2d(y, (1, k), 1, (0, half), count_include_pad=False)
        return F.avg_pool2d(rows, (k, 1), 1, (half, 0), count_include_pad=False)

    def extra_repr(self) -> str:
        relu = ", relu=True" if self.relu else ""
        background = "" if self.background == "mean" else f", background={self.background}"
        if self.background == "window":
            background += f", window={self.window}"
        return f"{self.num_channels}, mean_scale_init={self.mean_scale_init}{relu}{background}"


def mean_scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """λ (``mean_scale``) of every AGC layer, in forward order."""
    return [m.mean_scale for m in model.modules() if isinstance(m, AutoGainControl2d)]


def agc_mean_scales(model: nn.Module) -> list[float]:
    """Mean λ over channels of every AGC layer, in forward order.

    The paper reports λ ranging over 0..2 with depth and asks for it graphed per layer.
    """
    return [float(lam.detach().float().mean()) for lam in mean_scale_parameters(model)]


def use_agc_kernels(model: nn.Module, kernels: str) -> nn.Module:
    """``model`` with every AGC layer set to run ``kernels`` (see ``AutoGainControl2d``)."""
    _checked_kernels(kernels)
    for module in model.modules():
        if isinstance(module, AutoGainControl2d):
            module.kernels = kernels
    return model

"""SegNet with pooling indices, as released in SegNet-Tutorial (Badrinarayanan et al.)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from deepcontrol.checks import is_whole_number
from deepcontrol.models.init import initialize
from deepcontrol.nn import ConvNormReLU, NormFactory

# VGG16's 13 convs in five blocks, and the mirrored decoder (SegNet-Tutorial's prototxt).
ENCODER = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
DECODER = ((512, 512, 512), (512, 512, 256), (256, 256, 128), (128, 64), (64,))


def _scaled(blocks: tuple[tuple[int, ...], ...], width: int) -> list[tuple[int, ...]]:
    return [tuple(c * width // 64 for c in block) for block in blocks]


class SegNet(nn.Module):
    """SegNet: VGG16 encoder, 2×2 max-pool with indices, mirrored max-unpool decoder.

    26 convs, no skip connections; every hidden conv is conv→norm→ReLU and the last is a
    64→K conv with bias. ``norm`` picks the layer after each conv, by its name in
    ``NORMS`` or as a ``norm_factory`` (the paper compares ``bn`` with ``agc``). Inputs
    of any size from ``min_input_size`` up work: unpooling is given the pre-pool size.
    ``width`` is the first block's channels (VGG16's 64, the paper's); every layer scales
    with it, so a narrow net (e.g. 8) exercises the same code in tests at 1/64 the size.
    """

    # the least height and width its five poolings take, each halving the map rounded down
    min_input_size = 2 ** len(ENCODER)

    def __init__(
        self,
        num_classes: int = 19,
        norm: str | NormFactory = "bn",
        in_channels: int = 3,
        init: str = "he",
        width: int = 64,
    ) -> None:
        super().__init__()
        if not is_whole_number(width, 1):
            raise ValueError(f"model.width must be a positive integer, got {width!r}")
        self.encoder = nn.ModuleList()
        channels = in_channels
        for widths in _scaled(ENCODER, width):
            self.encoder.append(nn.Sequential(*self._block(channels, widths, norm)))
            channels = widths[-1]
        self.decoder = nn.ModuleList()
        for widths in _scaled(DECODER, width):
            self.decoder.append(nn.Sequential(*self._block(channels, widths, norm)))
            channels = widths[-1]
        self.classifier = nn.Conv2d(channels, num_classes, 3, padding=1)
        initialize(self._convs_with_position(), init)

    @staticmethod
    def _block(
        in_channels: int, widths: tuple[int, ...], norm: str | NormFactory
    ) -> list[ConvNormReLU]:
        layers = []
        for out_channels in widths:
            layers.append(ConvNormReLU(in_channels, out_channels, norm))
            in_channels = out_channels
        return layers

    def _convs_with_position(self) -> list[tuple[nn.Conv2d, bool]]:
        """Every conv with whether it is the first after the input or an (un)pooling."""
        convs = []
        for block in [*self.encoder, *self.decoder]:
            for i, layer in enumerate(block):
                convs.append((layer[0], i == 0))
        convs.append((self.classifier, True))  # the classifier keeps He init too
        return convs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []
        for block in self.encoder:
            x = block(x)
            size = x.shape[-2:]
            x, indices = F.max_pool2d(x, 2, stride=2, return_indices=True)
            pooled.append((indices, size))
        for block in self.decoder:
            indices, size = pooled.pop()
            x = F.max_unpool2d(x, indices, 2, stride=2, output_size=size)
            x = block(x)
        return self.classifier(x)

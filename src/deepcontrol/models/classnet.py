"""ClassNet, the paper's second network, built from its prose description (§3, docs/classnet.md).

The paper gives no diagram or code; every choice the text leaves open is listed, with the
alternative not taken, in docs/classnet.md.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from deepcontrol.models.init import initialize
from deepcontrol.nn import ConvNormReLU, NormFactory

MAX_WIDTH = 256  # "deeper and narrower (up to 256 filters)"
CONTOUR_CHANNELS = 10  # decoder width = NumClasses + 10: the lateral contour path's share


class ProjectedConv(nn.Sequential):
    """A 3×3 conv followed by its 1×1×depth projection ("to support separate lateral
    inhibition"), each with norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str | NormFactory) -> None:
        super().__init__(
            ConvNormReLU(in_channels, out_channels, norm, 3),
            ConvNormReLU(out_channels, out_channels, norm, 1),
        )


class EncoderBlock(nn.Module):
    """``layers`` projected 3×3 convs at one resolution, then a 1×1 projection over the
    concatenation of the block's input and every layer's output ("a final 1x1 projection
    concatenates all layers in a block to support multiple depths at each resolution")."""

    def __init__(self, in_channels: int, width: int, layers: int, norm: str | NormFactory) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        channels = in_channels
        for _ in range(layers):
            self.layers.append(ProjectedConv(channels, width, norm))
            channels = width
        self.merge = ConvNormReLU(in_channels + layers * width, width, norm, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        for layer in self.layers:
            outputs.append(layer(outputs[-1]))
        return self.merge(torch.cat(outputs, dim=1))


class ClassNet(nn.Module):
    """ClassNet (Ruff 2017, §3): a deep, narrow encoder with lateral class detection and a
    thin decoder that outputs class logits and an instance-contour map.

    - Encoder: ``blocks`` blocks, each followed by a 2×2 max-pool (7 poolings by default).
      Widths double from ``width`` up to 256. The input image, average-pooled to the
      block's resolution, is concatenated into the first layer of each block.
    - Lateral heads: a 1×1 conv before each pooling maps the block to the decoder width,
      ``num_classes + 10``. These give multi-resolution class detection.
    - Decoder: from the deepest pooled map, each of ``blocks`` stages up-samples ×2
      (bilinear) and concatenates the lateral head at that resolution. It then applies a
      projected 3×3 conv of decoder width.
    - Heads: a 1×1 conv to ``num_classes`` logits, and one from the last 10 decoder
      channels (the contour path) to a 1-channel contour logit map.

    ``forward`` returns ``(class_logits, contour_logits)``. Any input size works: poolings
    round up and each up-sampling is to the exact size of its lateral map.
    """

    min_input_size = 1  # as SegNet's: the least height and width it takes

    def __init__(
        self,
        num_classes: int = 19,
        norm: str | NormFactory = "bn",
        in_channels: int = 3,
        width: int = 32,
        blocks: int = 7,
        layers_per_block: int = 2,
        init: str = "he",
    ) -> None:
        super().__init__()
        self.blocks, self.layers_per_block = blocks, layers_per_block
        self.decoder_width = num_classes + CONTOUR_CHANNELS
        widths = [min(width * 2**i, MAX_WIDTH) for i in range(blocks)]
        self.encoder = nn.ModuleList()
        self.laterals = nn.ModuleList()
        channels = 0
        for w in widths:
            self.encoder.append(EncoderBlock(channels + in_channels, w, layers_per_block, norm))
            self.laterals.append(ConvNormReLU(w, self.decoder_width, norm, 1))
            channels = w
        self.bottom = ConvNormReLU(channels, self.decoder_width, norm, 1)
        self.decoder = nn.ModuleList(
            ProjectedConv(2 * self.decoder_width, self.decoder_width, norm) for _ in widths
        )
        self.classifier = nn.Conv2d(self.decoder_width, num_classes, 1)
        self.contour = nn.Conv2d(CONTOUR_CHANNELS, 1, 1)
        initialize(self._convs_with_position(), init)

    def _convs_with_position(self) -> list[tuple[nn.Conv2d, bool]]:
        """Every conv, with whether it keeps He init under ``init=identity``: all but the 1×1
        projections that follow a 3×3 conv, which start as the identity (pass-through)."""
        projections = {id(m[1][0]) for m in self.modules() if isinstance(m, ProjectedConv)}
        return [(m, id(m) not in projections) for m in self.modules() if isinstance(m, nn.Conv2d)]

    def path_depths(self) -> tuple[int, int]:
        """(shortest, longest) number of convs from the input to the class logits.

        Longest: every encoder block (``2·layers + 1`` convs each), the bottom projection,
        every decoder stage (2) and the classifier. Shortest: the first block's merge
        projection (which sees the image directly), its lateral head, the last decoder
        stage and the classifier.
        """
        longest = self.blocks * (2 * self.layers_per_block + 1) + 1 + 2 * self.blocks + 1
        return 1 + 1 + 2 + 1, longest

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, laterals = None, []
        for block, lateral in zip(self.encoder, self.laterals, strict=True):
            if x is None:
                x = image
            else:
                x = F.max_pool2d(x, 2, stride=2, ceil_mode=True)
                x = torch.cat([x, F.adaptive_avg_pool2d(image, x.shape[-2:])], dim=1)
            x = block(x)
            laterals.append(lateral(x))
        x = self.bottom(F.max_pool2d(x, 2, stride=2, ceil_mode=True))
        for stage, side in zip(self.decoder, reversed(laterals), strict=True):
            x = F.interpolate(x, size=side.shape[-2:], mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, side], dim=1))
        return self.classifier(x), self.contour(x[:, -CONTOUR_CHANNELS:])

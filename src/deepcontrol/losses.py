"""Training losses."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from deepcontrol.data.io import IGNORE_INDEX


def pixel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Class-weighted per-pixel cross-entropy, summed and divided by the valid pixel count.

    The paper normalises the ENet weights to mean 1 "so that they do not scale the
    learning rate" (§3); that holds only when the loss is divided by the number of
    pixels. PyTorch's weighted ``reduction="mean"`` divides by the sum of the weights
    instead, which would cancel the normalisation.
    """
    if class_weights is not None:
        class_weights = class_weights.to(device=logits.device, dtype=torch.float32)
    per_pixel = F.cross_entropy(
        logits.float(), target, weight=class_weights, ignore_index=ignore_index, reduction="none"
    )
    valid = (target != ignore_index).sum()
    return per_pixel.sum() / valid.clamp(min=1)

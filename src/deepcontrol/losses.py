"""Training losses: the class-weighted pixel cross-entropy and ClassNet's contour loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch.nn import functional as F

from deepcontrol.checks import is_finite_number, is_whole_number
from deepcontrol.data.io import IGNORE_INDEX

Outputs = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[Outputs, torch.Tensor, torch.Tensor | None], torch.Tensor]


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


def contour_iou_loss(
    probability: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, band: int = 3
) -> torch.Tensor:
    """1 − soft IoU of a contour map and its target, over the pixels near a boundary only.

    The paper's ClassNet contour loss is "based on the intersection over union (IoU) of only
    the points near the instance boundaries". Near means within ``band`` pixels (a square
    neighbourhood) of a target boundary pixel; ``valid`` excludes ignored pixels. A batch
    without boundaries has no loss. ``probability`` and ``target`` are (N, H, W) in [0, 1].
    """
    near = F.max_pool2d(target.unsqueeze(1), 2 * band + 1, stride=1, padding=band).squeeze(1)
    mask = (near > 0) & valid
    p, t = probability.float() * mask, target.float() * mask
    intersection = (p * t).sum()
    union = (p + t - p * t).sum()
    return torch.where(union > 0, 1 - intersection / union.clamp(min=1e-12), union * 0)


def build_loss(loss_cfg: DictConfig, class_weights: torch.Tensor | None) -> LossFn:
    """The training objective for a network's outputs.

    A tensor of class logits (SegNet) gets ``pixel_cross_entropy``. A pair (class logits,
    contour logits) (ClassNet) gets the sum of that and ``loss.contour_weight`` ×
    ``contour_iou_loss`` ("simply add the contour and class losses").
    """
    band, weight = loss_cfg.contour_band, loss_cfg.contour_weight
    if not is_whole_number(band, 0):
        raise ValueError(f"loss.contour_band must be an integer >= 0 (pixels), got {band!r}")
    if not is_finite_number(weight, 0):
        raise ValueError(f"loss.contour_weight must be a number >= 0, got {weight!r}")

    def loss_fn(
        outputs: Outputs, labels: torch.Tensor, contours: torch.Tensor | None = None
    ) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return pixel_cross_entropy(outputs, labels, class_weights)
        logits, contour_logits = outputs
        if contours is None:
            raise ValueError("a network with a contour output needs contour targets")
        contour = contour_iou_loss(
            torch.sigmoid(contour_logits.float()).squeeze(1), contours,
            labels != IGNORE_INDEX, band,
        )  # fmt: skip
        return pixel_cross_entropy(logits, labels, class_weights) + weight * contour

    return loss_fn

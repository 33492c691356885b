"""Segmentation metrics from one confusion matrix: pixel error (the paper's), mIoU, IoU."""

from __future__ import annotations

import torch

from deepcontrol.data.io import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates ``counts[true, predicted]`` over non-ignored pixels."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, predicted: torch.Tensor, target: torch.Tensor) -> None:
        # Ignored pixels go to one extra bin that is dropped: unlike boolean indexing or
        # bincount, a fixed-size scatter needs no host sync on a GPU.
        cells = self.num_classes**2
        index = torch.where(target != IGNORE_INDEX, target * self.num_classes + predicted, cells)
        index = index.flatten()
        counts = torch.zeros(cells + 1, dtype=torch.int64, device=self.counts.device)
        counts.index_add_(0, index, torch.ones_like(index))
        self.counts += counts[:cells].view_as(self.counts)

    def pixel_error(self) -> float:
        """Fraction of wrongly labelled pixels among non-ignored ones (Fig. 1's metric)."""
        total = self.counts.sum()
        return float(1.0 - self.counts.diag().sum() / total) if total else float("nan")

    def iou(self) -> torch.Tensor:
        """Per-class intersection over union; NaN for classes absent from target and prediction."""
        counts = self.counts.double()
        intersection = counts.diag()
        union = counts.sum(0) + counts.sum(1) - intersection
        return torch.where(union > 0, intersection / union.clamp(min=1), float("nan"))

    def mean_iou(self) -> float:
        return float(self.iou().nanmean())

"""One epoch of training, one pass of validation, and checkpoints."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from deepcontrol.data.io import IGNORE_INDEX
from deepcontrol.data.loader import DeviceBatches
from deepcontrol.metrics import ConfusionMatrix

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision="bf16"``; full float32 for ``"fp32"``."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be 'fp32' or 'bf16', got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_one_epoch(
    model: nn.Module,
    batches: DeviceBatches,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    precision: str = "fp32",
    progress: bool = False,
    description: str = "",
) -> dict[str, float]:
    """One pass over ``batches``; returns the pixel-weighted mean training loss.

    Stops early, returning a non-finite loss, as soon as the loss stops being finite.
    """
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=batches.device)
    pixels = torch.zeros((), dtype=torch.int64, device=batches.device)
    bar = tqdm(batches, desc=description, disable=not progress, leave=False, unit="batch")
    for step, (images, labels) in enumerate(bar):
        with autocast(batches.device, precision):
            loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        valid = (labels != IGNORE_INDEX).sum()
        total += loss.detach() * valid
        pixels += valid
        if step % 10 == 0 or step == len(batches) - 1:  # a host sync only every few steps
            current = loss.item()
            bar.set_postfix(loss=f"{current:.4f}")
            if not math.isfinite(current):
                return {"train_loss": current}
    return {"train_loss": float(total / pixels.clamp(min=1))}


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: DeviceBatches, loss_fn: LossFn, num_classes: int, precision: str
) -> tuple[dict[str, float], torch.Tensor]:
    """Validation loss (over all valid pixels), pixel error and mIoU; also per-class IoU."""
    model.eval()
    confusion = ConfusionMatrix(num_classes, batches.device)
    total = torch.zeros((), dtype=torch.float64, device=batches.device)
    pixels = torch.zeros((), dtype=torch.int64, device=batches.device)
    for images, labels in batches:
        with autocast(batches.device, precision):
            logits = model(images)
        valid = (labels != IGNORE_INDEX).sum()
        total += loss_fn(logits, labels) * valid
        pixels += valid
        confusion.update(logits.argmax(1), labels)
    metrics = {
        "val_loss": float(total / pixels.clamp(min=1)),
        "val_pixel_error": confusion.pixel_error(),
        "val_miou": confusion.mean_iou(),
    }
    return metrics, confusion.iou()


def save_checkpoint(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)

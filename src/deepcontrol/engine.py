"""One epoch of training, one pass of validation, and checkpoints."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from deepcontrol.atomic import atomic_file
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


def save_checkpoint(
    path: Path,
    model: nn.Module,
    extra: dict,
    optimizer: torch.optim.Optimizer | None = None,
    loader: DeviceBatches | None = None,
) -> None:
    """The model's weights and ``extra``; with ``optimizer`` and ``loader``, all that resuming
    needs (their states and the RNG states).

    Written with ``torch.save`` to a temporary file and renamed, so a crash never leaves half a
    checkpoint.
    """
    state = {"model": model.state_dict(), **extra}
    if optimizer is not None and loader is not None:
        state.update(optimizer=optimizer.state_dict(), loader=loader.state_dict(), rng=_rng_state())
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DeviceBatches,
    device: torch.device,
) -> dict:
    """Restore a resumable checkpoint into ``model``, ``optimizer``, ``loader`` and the RNGs;
    returns the checkpoint (for its epoch, history and so on)."""
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["loader"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state

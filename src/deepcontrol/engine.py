"""One epoch of training, one pass of validation, and checkpoints."""

from __future__ import annotations

import contextlib
import functools
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
from deepcontrol.distributed import all_reduce_sum
from deepcontrol.losses import LossFn, Outputs
from deepcontrol.metrics import ConfusionMatrix

# One SGD step on (images, labels, contours) with an optional loss scale; its loss
StepFn = Callable[..., torch.Tensor]


def class_logits(outputs: Outputs) -> torch.Tensor:
    """The class logits of a network's outputs (ClassNet also returns a contour map)."""
    return outputs if isinstance(outputs, torch.Tensor) else outputs[0]


# train.precision: float32 proper (the paper's), float32 with TF32 products, bf16 autocast
PRECISIONS = ("fp32", "tf32", "bf16")


def check_precision(precision: str) -> None:
    """``train.precision`` is one of ``PRECISIONS``."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision="bf16"``; float32 tensors otherwise."""
    check_precision(precision)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def use_float32_arithmetic(precision: str) -> None:
    """Whether cuDNN's convolutions and cuBLAS's matrix products on float32 tensors round
    their inputs to TF32 (10 of float32's 23 mantissa bits): only for ``"tf32"``.

    PyTorch's own default does so for convolutions on Ampere and later GPUs, so an "fp32"
    run there would not compute as the paper's fp32 did (Theano on a TitanX, which has no
    TF32). Under bf16 autocast the convolutions take bf16 and this reaches only what
    autocast keeps in float32. The flags are the process's: a run sets them before its
    first step, as it sets ``cudnn.benchmark``."""
    check_precision(precision)
    tf32 = precision == "tf32"
    # The flags PyTorch has had since 1.7; its newer per-backend API must not be mixed with
    # them, which other code may still read
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


def sgd_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    images: torch.Tensor,
    labels: torch.Tensor,
    contours: torch.Tensor,
    precision: str,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One SGD step on a batch; its loss. The gradients are of the loss times ``scale``
    where given."""
    # Before the forward, so the last step's gradients (one more copy of the parameters)
    # are not held through it into the backward's start, where the step's memory peaks.
    optimizer.zero_grad(set_to_none=True)
    with autocast(images.device, precision):
        loss = loss_fn(model(images), labels, contours)
    (loss if scale is None else loss * scale).backward()
    optimizer.step()
    return loss


def eager_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, precision: str
) -> StepFn:
    """``sgd_step`` on ``model`` as a ``StepFn``: ``step(images, labels, contours, scale=None)``."""
    return functools.partial(sgd_step, model, optimizer, loss_fn, precision=precision)


def train_one_epoch(
    model: nn.Module,
    batches: DeviceBatches,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    precision: str = "fp32",
    progress: bool = False,
    description: str = "",
    stop: Callable[[], bool] = lambda: False,
    running: dict | None = None,
    step: StepFn | None = None,
) -> dict:
    """One pass over ``batches`` (the rest of it after a mid-epoch resume).

    Returns ``{"train_loss": ...}``, the pixel-weighted mean loss, which is non-finite as
    soon as the loss stops being finite. When ``stop()`` turns true (a signal) it returns
    ``{"interrupted": True, "running": ...}`` instead, the partial sums a checkpoint keeps so
    that ``running`` resumes the epoch exactly. Under DDP the loss of each process is scaled
    so that the summed gradients are those of the global batch's pixel mean. ``step`` takes
    each step in place of ``sgd_step`` (``GraphedSGDStep``, which replays it as a CUDA graph).
    """
    step = step or eager_step(model, optimizer, loss_fn, precision)
    model.train()
    running = running or {"total": 0.0, "pixels": 0}
    total = torch.tensor(running["total"], dtype=torch.float64, device=batches.device)
    pixels = torch.tensor(running["pixels"], dtype=torch.int64, device=batches.device)
    world = batches.world_size
    bar = tqdm(batches, desc=description, disable=not progress, leave=False, unit="batch",
               initial=batches.position, total=len(batches))  # fmt: skip
    for images, labels, contours in bar:
        valid = (labels != IGNORE_INDEX).sum()
        scale = None
        if world > 1:  # DDP averages gradients over processes; undo that, weigh by pixels
            scale = valid * world / all_reduce_sum(valid.clone()).clamp(min=1)
        loss = step(images, labels, contours, scale=scale)
        total += loss.detach() * valid
        pixels += valid
        position = batches.position
        if position % 10 == 0 or position == len(batches):  # a host sync only every few steps
            flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                                 torch.tensor(float(stop()), device=batches.device)])  # fmt: skip
            diverged, stopping = (all_reduce_sum(flags) > 0).tolist()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if diverged:
                return {"train_loss": math.nan}
            if stopping:
                partial = {"total": total.item(), "pixels": int(pixels.item())}
                return {"interrupted": True, "running": partial}
    all_reduce_sum(total)
    all_reduce_sum(pixels)
    return {"train_loss": float(total / pixels.clamp(min=1))}


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: DeviceBatches, loss_fn: LossFn, num_classes: int, precision: str
) -> tuple[dict[str, float], torch.Tensor]:
    """Validation loss (over all valid pixels), pixel error and mIoU; also per-class IoU.

    Under DDP each process evaluates its own part of the split and the sums are combined.
    """
    model.eval()
    confusion = ConfusionMatrix(num_classes, batches.device)
    total = torch.zeros((), dtype=torch.float64, device=batches.device)
    pixels = torch.zeros((), dtype=torch.int64, device=batches.device)
    for images, labels, contours in batches:
        with autocast(batches.device, precision):
            outputs = model(images)
        valid = (labels != IGNORE_INDEX).sum()
        total += loss_fn(outputs, labels, contours) * valid
        pixels += valid
        confusion.update(class_logits(outputs).argmax(1), labels)
    for tensor in (total, pixels, confusion.counts):  # each process evaluated its own part
        all_reduce_sum(tensor)
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
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # torch.load raises what its unpickler meets: no one type
        raise RuntimeError(
            f"{path}: cannot read this checkpoint ({type(e).__name__}: {e}); move it aside "
            "to train the run afresh"
        ) from e
    missing = [key for key in ("model", "optimizer", "loader", "rng")
               if not isinstance(state, dict) or key not in state]  # fmt: skip
    if missing:
        raise RuntimeError(
            f"{path}: not a checkpoint to resume from (no {', '.join(missing)}; best.pt holds "
            "weights only); move it aside to train the run afresh"
        )
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

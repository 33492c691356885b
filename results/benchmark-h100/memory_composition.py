"""What one eager training step holds in memory at its peak, and where that peak falls.

``make bench`` reports each step's peak (``torch.cuda.max_memory_allocated``), not what fills
it. This script runs ``engine.sgd_step`` on ``benchmark``'s network, optimiser and loss, under
a dispatch mode that tracks every tensor storage alive (by its bytes, not the allocator's
rounded blocks, workspaces or fragmentation), and prints the step's peak: when it falls
(forward, backward or the optimiser's step, and the op that reached it) and what is alive
then, by kind:

- parameters, the optimiser's momenta, the batch (images, labels, contours);
- bf16 copies of the parameters that autocast makes (and the convolutions keep for their
  backward);
- max-pooling's int64 indices (SegNet keeps them for its unpooling), apart from its values;
- every other tensor, by the op that made it and the pass it was made in.

Not a test and no part of ``make bench``: a diagnostic, to find which memory a lever would
cut. On a CPU, norm ``agc`` runs the reference layer, not the fused CUDA kernels; there
``none`` stands in for the fused AGC, which H100 run 5 measured at the same peak (0.499
and 0.497 GiB at batch 1, 1.982 and 1.980 at batch 8, bf16, eager). And on a CPU SegNet
unpools in the activations' dtype, as CUDA's autocast does (``unpooling_as_on_cuda``). On a
GPU each count is printed beside the step's ``torch.cuda.max_memory_allocated``, which it
should approach from below.

python results/benchmark-h100/memory_composition.py [--norms agc none bn] [--batches 1 8]
    [--precision bf16] [--network segnet] [--device auto]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import types
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from deepcontrol.benchmark import Config, Setting, random_batch, trained_parts
from deepcontrol.engine import sgd_step
from deepcontrol.models import segnet
from deepcontrol.train import resolve_device

MIB = 2**20


@dataclass
class LiveStorages(TorchDispatchMode):
    """Every storage on ``device`` alive since it was tracked, each with its kind; the total
    and the kinds at its highest."""

    device: torch.device
    kinds: dict[int, tuple[str, int]] = field(default_factory=dict)  # data_ptr: (kind, bytes)
    total: int = 0
    peak: int = 0
    peak_at: str = ""
    peak_kinds: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        super().__init__()

    def track(self, tensor: object, kind: str) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device.type:
            return
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.kinds:
            return
        self.kinds[key] = (kind, size)
        self.total += size
        weakref.finalize(storage, self._freed, key)
        if self.total > self.peak:
            self.peak, self.peak_at = self.total, kind
            self.peak_kinds = Counter()
            for held_kind, held in self.kinds.values():
                self.peak_kinds[held_kind] += held

    def _freed(self, key: int) -> None:
        self.total -= self.kinds.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch._C._current_graph_task_id() != -1:
            when = "backward"
        elif func is torch.ops.aten._fused_sgd_.default:
            when = "optimiser"
        else:
            when = "forward"
        name = func.overloadpacket.__name__
        if name == "_to_copy" and args and self.kind_of(args[0]) == "parameters":
            kind = "bf16 copies of the parameters"
        else:
            kind = f"{when}: {name}"
        for tensor in tree_flatten(out)[0]:
            index = isinstance(tensor, torch.Tensor) and tensor.dtype == torch.int64
            self.track(tensor, f"{kind} (int64 indices)" if index and "pool" in name else kind)
        return out

    def kind_of(self, tensor: object) -> str | None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device.type:
            return None
        held = self.kinds.get(tensor.untyped_storage().data_ptr())
        return held[0] if held else None


def unpooled_by(wrap: Callable[[Callable], Callable]) -> contextlib.AbstractContextManager:
    """Within, SegNet unpools with ``wrap(unpool)`` in place of ``unpool``, its unpooling now."""
    functional = segnet.F
    wrapped = types.SimpleNamespace(max_pool2d=functional.max_pool2d,
                                    max_unpool2d=wrap(functional.max_unpool2d))  # fmt: skip
    return mock.patch.object(segnet, "F", wrapped)


def unpooling_as_on_cuda(device: torch.device) -> contextlib.AbstractContextManager:
    """On a CPU, SegNet unpools in the activations' dtype, as CUDA's autocast does.

    The CPU's autocast runs ``max_unpool2d`` in float32, so each unpooled map would be
    counted twice (float32, then the bf16 copy the convolution takes), which no GPU holds.
    The values are the same either way: unpooling moves values, and bf16 values pass
    through float32 exactly."""
    if device.type != "cpu":
        return contextlib.nullcontext()

    def wrap(unpool):
        def in_input_dtype(*args, **kwargs):
            with torch.autocast("cpu", enabled=False):
                return unpool(*args, **kwargs)

        return in_input_dtype

    return unpooled_by(wrap)


def counted_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    batch: tuple,
    precision: str,
    device: torch.device,
) -> tuple[LiveStorages, torch.Tensor]:
    """The live storages through one ``sgd_step``, counted from what is alive before it (the
    parameters, buffers, momenta and batch), and the step's loss."""
    live = LiveStorages(device)
    for parameter in model.parameters():
        live.track(parameter, "parameters")
    for buffer in model.buffers():  # BN's running statistics: tracked so that views of
        live.track(buffer, "buffers")  # them are not counted as new
    for state in optimizer.state.values():
        for tensor in state.values():
            live.track(tensor, "momenta")
    for tensor in batch:
        live.track(tensor, "the batch")
    with live:
        loss = sgd_step(model, optimizer, loss_fn, *batch, precision)
    return live, loss


def composition(
    setting: Setting, cfg: Config, device: torch.device
) -> tuple[LiveStorages, int | None]:
    """The live storages through the third eager ``sgd_step`` of ``setting`` (the first two
    make the momenta and run cuDNN's algorithm search), and on a GPU the step's
    ``torch.cuda.max_memory_allocated``."""
    model, optimizer, loss_fn = trained_parts(setting, device)
    batch = random_batch(setting, cfg, device)
    with unpooling_as_on_cuda(device):
        for _ in range(2):
            sgd_step(model, optimizer, loss_fn, *batch, setting.precision)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        live, _ = counted_step(model, optimizer, loss_fn, batch, setting.precision, device)
    return live, torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def report(setting: Setting, live: LiveStorages, cuda_peak: int | None) -> str:
    title = f"{setting.network} {setting.norm}, batch {setting.batch}, {setting.precision}, eager"
    lines = [
        f"## {title}",
        f"peak of the live storages: {live.peak / MIB:.1f} MiB, reached by {live.peak_at}",
    ]
    if cuda_peak is not None:
        lines.append(f"torch.cuda.max_memory_allocated over the step: {cuda_peak / MIB:.1f} MiB")
    lines += ["", "| alive at the peak | MiB | share |", "|---|---|---|"]
    for kind, held in live.peak_kinds.most_common():
        lines.append(f"| {kind} | {held / MIB:.1f} | {held / live.peak:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norms", nargs="+", help="agc, none and bn on CUDA; none and bn on a CPU")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--network", default="segnet")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cfg = Config()
    print(f"device {device}, torch {torch.__version__}, input {cfg.height}x{cfg.width}\n")
    for batch in args.batches:
        for norm in args.norms or (["agc"] if device.type == "cuda" else []) + ["none", "bn"]:
            setting = Setting(norm, batch, args.precision, "eager", args.network)
            live, cuda_peak = composition(setting, cfg, device)
            print(report(setting, live, cuda_peak), flush=True)
            del live
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""The whole SGD step, forward to the optimiser's update, replayed as one CUDA graph.

``torch.compile(mode="reduce-overhead")`` graphs the forward and the backward apart and leaves
the optimiser, autograd's per-parameter work and the guards to the host. On an H100 at batch
1 that host work took 5.8 ms a step with AGC against 3.3 ms of device time
(results/benchmark-h100, run 5). One graph launch per step leaves the host nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deepcontrol.checks import is_whole_number
from deepcontrol.engine import StepFn, eager_step, sgd_step
from deepcontrol.losses import LossFn

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # images, labels, contours


def _shapes(inputs: Inputs) -> tuple:
    """What a recorded graph is specific to: each input's shape, strides and dtype."""
    return tuple(None if t is None else (t.shape, t.stride(), t.dtype) for t in inputs)


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The optimiser's settings, which a recorded step holds as constants."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    inputs: Inputs  # the graph's own, into which each batch is copied
    loss: torch.Tensor  # the graph's own, rewritten by each replay


class GraphedSGDStep:
    """``sgd_step`` on ``model`` as one CUDA graph per input shape (``train.cuda_graph``).

    Called as ``step(images, labels, contours)`` (a ``StepFn``), with ``sgd_step``'s result:
    replaying the graph runs the kernels that the eager step runs. The first ``warmup``
    steps of each shape (an epoch's smaller last batch has its own) run eagerly on a side
    stream, as CUDA graphs require: cuDNN's algorithm search, Triton's and torch.compile's
    compilation and the momentum buffers happen there. They train like any other step. The
    next step of that shape is recorded, then replayed for it and for every later one.

    The graph holds the optimiser's settings and the addresses of the parameters and momenta
    as recorded; a changed setting raises rather than being ignored, and an optimiser's
    state loaded after recording would not be seen, so load checkpoints first. The returned
    loss is the graph's own tensor: read it before the next step overwrites it.
    Not under DDP, whose gradient all-reduce a graph would need recorded with it.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        precision: str,
        warmup: int = 3,
    ) -> None:
        if not is_whole_number(warmup, 1):
            # The optimiser makes its momenta at its first step: recorded, every replay
            # would make them afresh from that step's gradient
            raise ValueError(f"GraphedSGDStep's warmup must be 1 or more steps, got {warmup!r}")
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"train.cuda_graph needs the model on a CUDA device, not {device}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.precision, self.warmup, self.device = precision, warmup, device
        self.stream = torch.cuda.Stream(device)
        self.eager_steps: dict[tuple, int] = {}
        self.recorded: dict[tuple, _Recorded] = {}
        self.hyperparameters = _hyperparameters(optimizer)

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        contours: torch.Tensor | None,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if scale is not None:
            raise ValueError("train.cuda_graph does not run under DDP (a loss scale was given)")
        if _hyperparameters(self.optimizer) != self.hyperparameters:
            raise ValueError(
                "the optimiser's settings changed after its step was recorded as a CUDA graph "
                f"(recorded {self.hyperparameters}, now {_hyperparameters(self.optimizer)}); "
                "build a new GraphedSGDStep"
            )
        inputs = (images, labels, contours)
        key = _shapes(inputs)
        recorded = self.recorded.get(key)
        if recorded is None:
            taken = self.eager_steps.get(key, 0)
            if taken < self.warmup:
                self.eager_steps[key] = taken + 1
                return self._side_stream_step(inputs)
            recorded = self.recorded[key] = self._record(inputs)
        for own, new in zip(recorded.inputs, inputs, strict=True):
            if own is not None:
                own.copy_(new)
        recorded.graph.replay()
        return recorded.loss

    def _step(self, inputs: Inputs) -> torch.Tensor:
        return sgd_step(self.model, self.optimizer, self.loss_fn, *inputs, self.precision)

    def _side_stream_step(self, inputs: Inputs) -> torch.Tensor:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            loss = self._step(inputs)
        current.wait_stream(self.stream)
        return loss

    def _record(self, inputs: Inputs) -> _Recorded:
        own = tuple(None if t is None else t.clone() for t in inputs)
        graph = torch.cuda.CUDAGraph()
        # sgd_step sets the gradients to None first, so the backward allocates them in the
        # graph's memory and each replay writes (not adds) them. Recorded on the warm-up's
        # stream, whose per-stream library state (cuBLAS workspaces) the warm-up has set up.
        # torch.compile cannot compile inside a capture (it reads the CUDA RNG state there);
        # a guard failing now would recompile, so make that the error it is.
        with torch.compiler.set_stance("fail_on_recompile"):
            with torch.cuda.graph(graph, stream=self.stream):
                loss = self._step(own)
        return _Recorded(graph, own, loss)


def training_step_fn(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    precision: str,
    cuda_graph: bool,
) -> StepFn:
    """The SGD step training takes (``train.cuda_graph``): ``GraphedSGDStep`` or, without
    CUDA graphs, ``sgd_step`` eagerly. Built after any checkpoint's optimiser state is
    loaded, which a recorded graph would not see."""
    if cuda_graph:
        return GraphedSGDStep(model, optimizer, loss_fn, precision)
    return eager_step(model, optimizer, loss_fn, precision)

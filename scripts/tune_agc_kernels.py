"""Time the fused AGC's kernels per launch configuration, to choose their settings for a GPU.

python scripts/tune_agc_kernels.py [--kernels reduction|elementwise] [--batch 8]
                                   [--precision bf16] [--replays 20]
    On a CUDA GPU: SegNet's AGC inputs at 256×512 (as training feeds them: channels_last,
    under autocast), and for each configuration of ``deepcontrol.nn.triton_agc``'s launches
    every layer's kernels as one training step runs them:
    - ``reduction`` (the default): the reduction's settings (SUMS_TILE, PROGRAMS,
      MAX_CHUNKS, SUMS_WARPS), timing the forward and backward reductions. Each
      configuration's sums are first checked against torch's.
    - ``elementwise``: the elementwise kernels' settings (TILE, ELEMENTWISE_WARPS), timing
      each layer's whole forward and backward (reductions as committed). Each
      configuration's outputs and gradients are first checked to be bit for bit those of
      the committed settings: a tile changes which program computes an element, not how.
    Then the launches are captured in a CUDA graph and replayed, so the time is the
    kernels' and not the host's launching them. Prints ms per step and GB/s over the bytes
    the kernels must move, the fastest first.
    Without a GPU: a small input under Triton's interpreter, checking the results only.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
from collections.abc import Callable, Iterable
from functools import partial

import torch

if not torch.cuda.is_available():  # before Triton is imported (deepcontrol.nn imports it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from deepcontrol.benchmark import AGC_KERNEL_PASSES, Config, Setting, agc_inputs  # noqa: E402
from deepcontrol.checks import integer_from  # noqa: E402
from deepcontrol.nn import triton_agc as kernels  # noqa: E402

GRIDS = {
    "reduction": {"SUMS_TILE": (2048, 4096, 8192, 16384), "PROGRAMS": (512, 1024, 2048, 4096),
                  "MAX_CHUNKS": (256, 1024), "SUMS_WARPS": (4, 8)},
    "elementwise": {"TILE": (2048, 4096, 8192, 16384), "ELEMENTWISE_WARPS": (2, 4, 8, 16)},
}  # fmt: skip


def random_layers(inputs: Iterable[torch.Tensor]) -> list[tuple]:
    """Each layer's (y, out, upstream gradient, (λ, γ, β)), with random λ, γ, β and upstream
    gradient (channels_last, as the next layer's backward returns it)."""
    generator = torch.Generator().manual_seed(0)
    layers = []
    for y in inputs:
        params = [(torch.rand(y.shape[1], generator=generator) + 0.5).to(y.device)
                  for _ in range(3)]  # fmt: skip
        out = kernels.forward(y, *params)[0]
        grad = torch.randn(y.shape, generator=generator).to(y.device, y.dtype)
        layers.append((y, out, grad.contiguous(memory_format=torch.channels_last), params))
    return layers


def reductions(layers: list[tuple]) -> Callable[[], list]:
    """A function running the forward and backward reductions of every layer and returning
    their sums."""

    def run() -> list:
        found = []
        for y, out, grad, (lam, gamma, beta) in layers:
            strides, counts = kernels._strides(y), kernels._counters(y)
            sums = kernels._sums(y, strides, counts)
            param_grads = tuple(torch.empty_like(p) for p in (lam, gamma, beta))
            found.append((sums, kernels._sums(grad, strides, counts, out, beta, sums[0], gamma,
                                              param_grads)))  # fmt: skip
        return found

    return run


def layer_passes(layers: list[tuple]) -> Callable[[], list]:
    """A function running every layer's fused forward and backward and returning the output,
    ``∂L/∂y`` and the parameters' gradients."""

    def run() -> list:
        found = []
        for y, _, grad, params in layers:
            out, sums, counts = kernels.forward(y, *params)
            found.append((out, *kernels.backward(grad, out, sums, counts, *params)))
        return found

    return run


# Activation-sized passes per layer and step that each part's run makes: the reductions
# alone, or the whole layer (reductions and elementwise kernels)
PASSES = {"reduction": AGC_KERNEL_PASSES["_sums_kernel"],
          "elementwise": sum(AGC_KERNEL_PASSES.values())}  # fmt: skip


def wrong_sums(run: Callable[[], list], layers: list) -> str:
    """Where ``run``'s sums differ from torch's beyond float32 reordering; "" if nowhere."""
    for index, ((sums, grad_sums), (y, out, grad, params)) in enumerate(
        zip(run(), layers, strict=True)
    ):
        beta = params[2].to(y.dtype).float().view(1, -1, 1, 1)
        g = grad.float() * (out > 0)
        expected = [y.float().sum((2, 3)), g.sum((2, 3)), (g * (out.float() - beta)).sum((2, 3))]
        for got, want in zip([sums[0], grad_sums[0], grad_sums[1]], expected, strict=True):
            error = float((got - want).norm() / want.norm().clamp(min=1e-30))
            if error > 1e-4:
                return f"layer {index}: relative error {error:.1e}"
    return ""


def other_results(run: Callable[[], list], expected: list) -> str:
    """Where ``run``'s results are not bit for bit ``expected``; "" if nowhere."""
    names = ("out", "∂L/∂y", "∂L/∂λ", "∂L/∂γ", "∂L/∂β")
    for index, (got, want) in enumerate(zip(run(), expected, strict=True)):
        for name, a, b in zip(names, got, want, strict=True):
            if not torch.equal(a, b):
                return f"layer {index}: {name} differs from the committed settings'"
    return ""


def checked_run(part: str, layers: list[tuple]) -> tuple[Callable[[], list], Callable[[], str]]:
    """``part``'s kernels over ``layers``, and the check of their results ("" if right)."""
    if part == "reduction":
        run = reductions(layers)
        return run, partial(wrong_sums, run, layers)
    run = layer_passes(layers)
    return run, partial(other_results, run, run())  # run() now: as committed


def device_ms(run: Callable[[], list], replays: int) -> float:
    """Median ms of one ``run()`` on the GPU: captured in a CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compiles, outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return statistics.median(times)


def committed_settings(part: str = "reduction") -> dict:
    """``part``'s settings as ``deepcontrol.nn.triton_agc`` has them now."""
    return {name: getattr(kernels, name) for name in GRIDS[part]}


def tune(
    inputs: list[torch.Tensor], configurations: list[dict], replays: int, part: str = "reduction"
) -> list[dict]:
    """Each configuration's check and, on a GPU, its time; the committed settings restored."""
    committed = committed_settings(part)
    run, check = checked_run(part, random_layers(inputs))
    nbytes = PASSES[part] * sum(y.numel() * y.element_size() for y in inputs)
    rows = []
    try:
        for configuration in configurations:
            for name, value in configuration.items():
                setattr(kernels, name, value)
            row = {**configuration, "committed": configuration == committed, "wrong": check()}
            if not row["wrong"] and inputs[0].is_cuda:
                row["ms"] = device_ms(run, replays)
                row["gb_per_s"] = nbytes / row["ms"] / 1e6
            rows.append(row)
    finally:
        for name, value in committed.items():
            setattr(kernels, name, value)
    return sorted(rows, key=lambda r: (bool(r["wrong"]), r.get("ms", 0.0)))


def fastest(rows: list[dict], names: Iterable[str]) -> str:
    """The fastest timed configuration, as a line to apply, with its time over the
    committed settings'; "" if none was timed."""
    timed = [row for row in rows if "ms" in row]
    if not timed:
        return ""
    best = timed[0]
    settings = " ".join(f"{name}={best[name]}" for name in names)
    baseline = [row["ms"] for row in timed if row["committed"]]
    relative = (
        f", {best['ms'] / baseline[0]:.3f} of the committed settings' time" if baseline else ""
    )
    return f"fastest: {settings}{relative}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", choices=tuple(GRIDS), default="reduction")
    parser.add_argument("--batch", type=integer_from(1), default=8)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--replays", type=integer_from(1), default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    cfg = Config() if gpu else Config(height=32, width=64)
    setting = Setting("agc", args.batch if gpu else 1, args.precision, "eager")
    inputs = agc_inputs(setting, cfg, device)
    grid = GRIDS[args.kernels]
    committed = committed_settings(args.kernels)
    configurations = [committed] + [
        c for c in (dict(zip(grid, v, strict=True)) for v in itertools.product(*grid.values()))
        if c != committed
    ]  # fmt: skip
    if not gpu:
        configurations = configurations[:2]
    print(
        f"{args.kernels}: {len(inputs)} AGC inputs, {args.precision}, batch {setting.batch}, "
        f"{cfg.height}×{cfg.width}, on {torch.cuda.get_device_name() if gpu else 'cpu'}"
    )
    rows = tune(inputs, configurations, args.replays, args.kernels)
    for row in rows:
        settings = " ".join(f"{name} {row[name]}" for name in grid)
        mark = "  (committed)" if row["committed"] else ""
        if row["wrong"]:
            print(f"{settings}: WRONG, {row['wrong']}{mark}")
        elif "ms" in row:
            print(f"{settings}: {row['ms']:.3f} ms per step, {row['gb_per_s']:.0f} GB/s{mark}")
        else:
            print(f"{settings}: results right (not timed without a GPU){mark}")
    if line := fastest(rows, grid):
        print(line)


if __name__ == "__main__":
    main()

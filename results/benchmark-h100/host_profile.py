"""Where the host's time goes when it issues an eager training step: the fused AGC against BN.

H100 run 4 (README) found the fused AGC's eager step bound by the host: at batch 8 in bf16
the host took 23.1 ms to issue one AGC step and 11.4 ms to issue one BN step
(``run4-loop-profile.txt``), so AGC's step took 28.5 ms where its device needs about 17.5.
That is about 0.47 ms more host time per AGC layer than BN and its ReLU take. Not a test and
no part of ``make bench``: a one-off diagnostic for the next GPU run.

python results/benchmark-h100/host_profile.py
    1. For none, bn and agc, eager bf16 at batches 8 and 1: the host's time to issue one
       training step onto an idle device, and onto one kept busy (each the median of 10),
       beside the step's median time back to back (the report's).
    2. SegNet's 25 AGC inputs at batch 8, as training feeds them, and the host's µs per
       layer to issue: BN and its ReLU, forward and backward through autograd; the fused
       AGC the same way (``AGCReLUFunction``); ``triton_agc.forward`` and ``.backward``
       called directly; and, within those, each kernel's launches.
    3. Python's cProfile over 10 eager AGC steps at batch 8: the functions with the most
       time of their own. On a GPU autograd runs the backward on a thread of its own, which
       cProfile does not see; part 2 times the backward's host work.
    On a CPU: small inputs, Triton under its interpreter and the reference AGC in the
    steps, to check that it runs; its times say nothing about a GPU's host.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# The tuner first: without a GPU it switches on Triton's interpreter before Triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import tune_agc_kernels as tuner  # noqa: E402
from loop_profile import host_ms  # noqa: E402  (this folder, the script's)

from deepcontrol.benchmark import (  # noqa: E402
    Config,
    Result,
    Setting,
    agc_inputs,
    measure_step,
    training_step,
)
from deepcontrol.nn import triton_agc  # noqa: E402
from deepcontrol.nn.fused_agc import AGCReLUFunction  # noqa: E402

KERNELS = ("_sums_kernel", "_agc_relu_kernel", "_agc_relu_grad_kernel")


def measured_step(
    setting: Setting, cfg: Config, device: torch.device
) -> tuple[Result, Callable[[], None] | None]:
    """``measure_step``'s result for ``setting``'s training step, as the report takes it, and
    the step it timed (None if making it failed)."""
    made = []

    def make(*args: object) -> Callable[[], None]:
        made.append(training_step(*args))
        return made[0]

    return measure_step(setting, cfg, device, make), made[0] if made else None


def whole_steps(cfg: Config, device: torch.device, precision: str, batches: tuple) -> None:
    for batch in batches:
        for norm in ("none", "bn", "agc"):
            result, step = measured_step(Setting(norm, batch, precision, "eager"), cfg, device)
            idle = busy = "-"
            if not result.error:
                idle = f"{host_ms(step, device):.2f} ms"
                try:
                    busy = f"{host_ms(step, device, busy=True):.2f} ms"
                except RuntimeError as error:
                    busy = f"- ({error})"
            print(f"step {norm:4s} batch {batch} {precision} eager: the host issues it in "
                  f"{idle} onto an idle device, {busy} onto a busy one; back to back it "
                  f"takes {result.ms_per_step:.2f} ms {result.error}", flush=True)  # fmt: skip


class TimedLaunches:
    """A Triton kernel whose launches add the host's seconds to ``spent[name]``."""

    def __init__(self, kernel, name: str, spent: dict[str, float]) -> None:
        self.kernel, self.name, self.spent = kernel, name, spent

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def timed(*args, **kwargs):
            started = time.perf_counter()
            launch(*args, **kwargs)
            self.spent[self.name] += time.perf_counter() - started

        return timed


def leaves(y: torch.Tensor, *params: torch.Tensor) -> list[torch.Tensor]:
    """Copies of ``y`` and ``params`` that autograd differentiates, made once, as a model's
    parameters and a conv's output are there before the step."""
    return [t.detach().clone().requires_grad_() for t in (y, *params)]


def per_layer(inputs: list[torch.Tensor], device: torch.device, repeats: int = 10) -> None:
    layers = tuner.random_layers(inputs)
    bn_layers = []  # (y, γ, β), BN's running mean and variance, ∂L/∂out
    for y, _, grad, _ in layers:
        c = y.shape[1]
        ones, zeros = torch.ones(c, device=device), torch.zeros(c, device=device)
        bn_layers.append((leaves(y, ones, zeros), (zeros.clone(), ones.clone()), grad))
    agc_layers = [(leaves(y, *params), grad) for y, _, grad, params in layers]

    def bn_relu() -> None:
        for (y, weight, bias), running, grad in bn_layers:
            out = F.relu(F.batch_norm(y, *running, weight, bias, training=True))
            torch.autograd.grad(out, (y, weight, bias), grad)

    def agc_autograd() -> None:
        for differentiated, grad in agc_layers:
            out = AGCReLUFunction.apply(*differentiated)
            torch.autograd.grad(out, differentiated, grad)

    def agc_direct() -> None:
        for y, _, grad, params in layers:
            out, sums, counts = triton_agc.forward(y, *params)
            triton_agc.backward(grad, out, sums, counts, *params)

    n = len(layers)
    print(f"\nhost µs per layer to issue, over {n} AGC inputs of {inputs[0].shape[0]} samples "
          f"({inputs[0].dtype}), the median of {repeats}:")  # fmt: skip
    works = {"BN and ReLU, forward and backward (autograd)": bn_relu,
             "fused AGC, forward and backward (autograd)": agc_autograd,
             "triton_agc.forward and .backward, called directly": agc_direct}  # fmt: skip
    for name, work in works.items():
        work()  # compiles and warms the allocator
        print(f"  {name}: {1000 * host_ms(work, device, repeats) / n:.1f}", flush=True)
    spent: dict[str, float] = defaultdict(float)
    originals = {name: getattr(triton_agc, name) for name in KERNELS}
    try:
        for name, kernel in originals.items():
            setattr(triton_agc, name, TimedLaunches(kernel, name, spent))
        host_ms(agc_direct, device, repeats)
    finally:
        for name, kernel in originals.items():
            setattr(triton_agc, name, kernel)
    launches = ", ".join(f"{name} {1e6 * spent[name] / (repeats * n):.1f}" for name in KERNELS)
    print(f"  of which the launches (the sums launch twice a layer): {launches}", flush=True)


def python_profile(cfg: Config, device: torch.device, precision: str, batch: int) -> None:
    step = training_step(Setting("agc", batch, precision, "eager"), cfg, device)
    for _ in range(cfg.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(10):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    profile.disable()
    print(f"\ncProfile, 10 eager agc steps at batch {batch} ({precision}), by own time:")
    pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(25)


def main() -> None:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    cfg = Config() if gpu else Config(height=32, width=64, warmup=1, steps=3)
    precision, batches = ("bf16", (8, 1)) if gpu else ("fp32", (2,))
    whole_steps(cfg, device, precision, batches)
    per_layer(agc_inputs(Setting("agc", batches[0], precision, "eager"), cfg, device), device)
    python_profile(cfg, device, precision, batches[0])


if __name__ == "__main__":
    main()

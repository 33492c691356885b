"""Whether the fused AGC's counter fills cost what ``agc_through_conv.py`` estimates, and
whether counters kept zeroed across layers and steps run under torch.compile.

Each AGC layer's forward fills fresh counters (``triton_agc._counters``, a ``torch.zeros``)
that its forward and backward reductions use and leave zeroed again: 25 fills a SegNet step,
about 0.09 ms at batch 1 if each costs what AGC's other extra kernels do (an estimate). This
A/B runs the same kernels with the counters taken instead from buffers zeroed once, one per
device, layer shape (samples and channels) and pass (``kept_counters``):

1. every SegNet AGC layer's fused forward and backward, as ``scripts/tune_agc_kernels.py
   --kernels elementwise`` runs them, bf16: first checked bit for bit against the fills'
   results, twice over (so the kept buffers are shown left zeroed); then on a GPU, each
   variant in turn ``--rounds`` times, timed captured in a CUDA graph and replayed (the
   kernels' time) and launched eagerly back to back (at batch 1, the host's);
2. with ``--compiled``, on a GPU, after part 1 at every batch: ``make bench``'s graphed step
   of AGC (torch.compile and the whole step as one CUDA graph) with each variant, from the
   same seed: its ms per step, and how far its parameters end from the fills' after the
   same steps; or the error that compiling it raised.

First, on any machine, it asks whether torch.compile takes kept counters at all
(``compiles_counters``): tensors the compiled graphs did not make, which each reduction
changes by what it reads. It is checked on a stand-in of plain torch ops with the same
pattern, since kernels run by Triton's interpreter cannot be compiled.

Not a test and no part of ``make bench``: a one-off A/B for a GPU run. Without a GPU it
checks part 1's results only (Triton's interpreter, a small input), after the stand-in.

python results/benchmark-h100/counter_fills_ab.py [--batches 1 8] [--rounds 3] [--compiled]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch

# The tuner first: without a GPU it switches on Triton's interpreter before Triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import tune_agc_kernels as tuner  # noqa: E402

from deepcontrol.benchmark import (  # noqa: E402
    Config,
    Setting,
    agc_inputs,
    failure,
    mode_step,
    profiled,
    random_batch,
    step_times,
    trained_parts,
)
from deepcontrol.engine import autocast  # noqa: E402
from deepcontrol.nn import triton_agc  # noqa: E402

VARIANTS = ("fills", "kept")


def saved_counters(saved: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The counters ``_UsesCounters``' backward uses: those its forward saved, as the fused
    AGC's backward uses its forward's (``kept_counters`` changes both)."""
    return saved


@contextlib.contextmanager
def kept_counters() -> Iterator[dict]:
    """Within, the fused AGC takes its counters from buffers kept zeroed, made on first use:
    one per device, layer shape and pass, since the backward's reduction gets its own rather than
    the forward's. torch.compile then finds each buffer changed by one graph only, which
    Inductor can hand to a kernel as it is; the forward's, saved and changed by the
    backward, it would copy in the backward and copy back (``compiles_counters``). Never
    made during a CUDA graph's capture: there a buffer would be the graph's memory, freed
    with the graph, so a layer first seen then gets a fill as before."""
    buffers: dict[tuple, torch.Tensor] = {}
    fill, backward = triton_agc._counters, triton_agc.backward

    def counters(like: torch.Tensor, kind: str = "forward") -> torch.Tensor:
        # _counters sizes them from the samples and channels alone
        key = (like.device, tuple(like.shape[:2]), kind)
        if key in buffers:
            return buffers[key]
        made = fill(like)
        if not (like.is_cuda and torch.cuda.is_current_stream_capturing()):
            buffers[key] = made
        return made

    def backward_with_own_counters(grad_out, out, sums, counts, *params):  # noqa: ANN001, ANN202
        return backward(grad_out, out, sums, counters(out, "backward"), *params)

    with (
        mock.patch.object(triton_agc, "_counters", counters),
        mock.patch.object(triton_agc, "backward", backward_with_own_counters),
        mock.patch(f"{__name__}.saved_counters", lambda saved, like: counters(like, "backward")),
    ):
        yield buffers


def variant(name: str) -> contextlib.AbstractContextManager:
    """Within, the fused AGC's counters as ``name`` ("fills" or "kept") makes them."""
    return contextlib.nullcontext() if name == "fills" else kept_counters()


def check(layers: list[tuple], counters: Callable = kept_counters) -> str:
    """Where the kept counters' results differ from the fills' ("" if nowhere), over two
    runs of every layer; and whether every kept buffer is zero after them."""
    expected = tuner.layer_passes(layers)()
    with counters() as buffers:
        run = tuner.layer_passes(layers)
        for attempt in ("first", "second"):
            if wrong := tuner.other_results(run, expected):
                return f"{attempt} run: {wrong.replace('the committed settings', 'the fills')}"
        left = [key[1:] for key, buffer in buffers.items() if buffer.any()]
    return f"counters ((samples, channels), pass) {left} not left zeroed" if left else ""


def _one(t: torch.Tensor) -> torch.Tensor:
    """1, computed from ``t``, as a kernel's count depends on what it reads."""
    return (t.sum() * 0 + 1).int()


class _UsesCounters(torch.autograd.Function):
    """The fused AGC's use of its counters, in plain torch ops. Each pass, as each of its
    reductions does, counts into them from what it reads, reads what it counted and leaves
    them zeroed: the forward, counters from ``triton_agc._counters``, which it saves; the
    backward, those ``saved_counters`` gives it."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, y: torch.Tensor) -> torch.Tensor:
        counters = triton_agc._counters(y)
        counters.add_(_one(y))
        seen = counters.sum()
        counters.sub_(_one(y))
        ctx.save_for_backward(counters)
        return y * 2 + seen

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        counters = saved_counters(*ctx.saved_tensors, grad)
        counters.add_(_one(grad))
        seen = counters.sum()
        counters.sub_(_one(grad))
        return grad * 2 + seen


def compiles_counters(name: str, device: torch.device, backend: str = "inductor") -> str:
    """Whether torch.compile (``backend``, fullgraph) takes ``_UsesCounters`` with counters
    as ``name`` makes them: "" if three compiled steps give eager's gradient and leave every
    counter zeroed, else what went wrong."""
    y = torch.randn(2, 8, 5, 7, device=device, requires_grad=True)

    def gradient(step: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        step(y).sum().backward()
        grad, y.grad = y.grad, None
        return grad

    with variant(name) as buffers:
        eager = gradient(_UsesCounters.apply)  # eager first, as compiled_step does
        torch._dynamo.reset()
        compiled = torch.compile(_UsesCounters.apply, backend=backend, fullgraph=True)
        try:
            grads = [gradient(compiled) for _ in range(3)]
        except Exception as error:  # its traceback goes to the output
            return failure(error)
        finally:
            torch._dynamo.reset()
        left = [b for b in (buffers or {}).values() if b.any()]
    problems = []
    if wrong := [i for i, grad in enumerate(grads) if not torch.equal(grad, eager)]:
        problems.append(f"the gradients of steps {wrong} differ from eager's")
    if left:
        problems.append(f"{len(left)} counters are not left zeroed")
    return "; ".join(problems)


def eager_ms(run: Callable[[], list], repeats: int) -> float:
    """Median ms of one ``run()`` launched eagerly, back to back."""
    return statistics.median(step_times(run, repeats, torch.device("cuda")))


def time_layers(layers: list[tuple], rounds: int, replays: int) -> dict[str, list[float]]:
    """Each variant's graphed and eager ms over every layer, ``rounds`` times in turn."""
    times = {f"{name} {how}": [] for name in VARIANTS for how in ("graphed", "eager")}
    for _ in range(rounds):
        for name in VARIANTS:
            with variant(name):
                run = tuner.layer_passes(layers)
                times[f"{name} graphed"].append(tuner.device_ms(run, replays))
                times[f"{name} eager"].append(eager_ms(run, replays))
    return times


def kernel_launches(events: list) -> int:
    """Kernel launches among torch.profiler's events, through the runtime or (Triton's) the
    driver."""
    return sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))


def compiled_step(batch: int, cfg: Config, name: str) -> tuple[float, int, list[torch.Tensor]]:
    """Median ms of ``make bench``'s graphed AGC step at ``batch`` with counters as ``name``
    makes them; the kernels its second step launched (compiled, before the graph is
    recorded: what the graph then holds); and the parameters after its warm-up and timed
    steps."""
    device = torch.device("cuda")
    setting = Setting("agc", batch, "bf16", "graphed")
    with variant(name):
        model, optimizer, loss_fn = trained_parts(setting, device)
        data = random_batch(setting, cfg, device)
        # one eager forward and backward first, which leaves the parameters as they were, so
        # that torch.compile finds every layer's kept counters made, not to be made
        with autocast(device, setting.precision):
            model(data[0]).float().sum().backward()
        optimizer.zero_grad(set_to_none=True)
        take = mode_step(setting, model, optimizer, loss_fn)
        take(*data)  # compiles; GraphedSGDStep records from its fourth step
        # profiled before any graph is recorded (run 5's loop profile used the profiler with
        # CUDA graphs on this image); an error here is the caller's, as a failed compile is
        launches = kernel_launches(profiled(lambda: take(*data), device))
        for _ in range(cfg.warmup - 2):
            take(*data)
        ms = statistics.median(step_times(lambda: take(*data), cfg.steps, device))
    return ms, launches, [p.detach().clone() for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--compiled", action="store_true")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    cfg = Config() if gpu else Config(height=32, width=64)
    where = torch.cuda.get_device_name() if gpu else "cpu (Triton's interpreter)"
    print(f"{where}, torch {torch.__version__}, {cfg.height}×{cfg.width}, bf16", flush=True)
    for name in VARIANTS:
        failed = compiles_counters(name, device)
        print(f"torch.compile of the counters' use (a stand-in in torch ops), {name}: "
              f"{failed or 'compiles and runs'}", flush=True)  # fmt: skip
    batches = args.batches if gpu else [1]
    for batch in batches:
        inputs = agc_inputs(Setting("agc", batch, "bf16", "eager"), cfg, device)
        layers = tuner.random_layers(inputs)
        wrong = check(layers)
        verdict = f"WRONG, {wrong}" if wrong else "give the fills' results bit for bit"
        print(f"batch {batch}, {len(layers)} AGC layers: kept counters {verdict}", flush=True)
        if wrong or not gpu:
            continue
        for label, ms in time_layers(layers, args.rounds, args.replays).items():
            print(f"  layers, {label}: {statistics.median(ms):.3f} ms "
                  f"(rounds: {', '.join(f'{m:.3f}' for m in ms)})", flush=True)  # fmt: skip
    for batch in batches if gpu and args.compiled else []:
        steps = {}
        for name in VARIANTS:
            try:
                steps[name] = compiled_step(batch, cfg, name)
                print(f"batch {batch}, compiled graphed step, {name}: {steps[name][0]:.3f} ms, "
                      f"{steps[name][1]} kernels launched", flush=True)  # fmt: skip
            except Exception as error:  # kept counters may not compile (compiles_counters)
                print(f"batch {batch}, compiled graphed step, {name}: {failure(error)}",
                      flush=True)  # fmt: skip
        if len(steps) == len(VARIANTS):
            pairs = zip(steps["kept"][2], steps["fills"][2], strict=True)
            apart = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
                        for a, b in pairs)  # fmt: skip
            print(f"batch {batch}, compiled graphed step: kept's parameters apart from the "
                  f"fills' by at most {apart:.1e} of their largest", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

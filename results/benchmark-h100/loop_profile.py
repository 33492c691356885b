"""Where AGC's training loop loses to its bare step, and whether BN's first eager step is slow.

Run 3 (README) found the loop at 0.83 (eager, batch 8) and 0.84 (CUDA graphs, batch 1) of
AGC's bare step, against 0.92 for BN, and BN's eager batch-1 bf16 step, the process's first
measurement, at 12.37 ms where its fp32 step took 7.33. Not a test and no part of
``make bench``: a one-off diagnostic for the next GPU run.

python results/benchmark-h100/loop_profile.py [eager] [cudagraphs] [graphed]
    Eager and cudagraphs where none is named. In 200 s H100 run 4 ran all of the eager half but
    AGC's profiled epoch (``run4-loop-profile.txt``).
    1. With eager: each of bn, none and agc's eager batch-1 bf16 step, measured twice in
       turn (as ``make bench`` measures it): a first-measurement effect shows as a first
       time above the second.
    2. For bn and agc in each mode named (eager at batch 8, either CUDA-graph mode at
       batch 1: reduce-overhead's, or the whole step graphed, GraphedSGDStep), one
       training loop as ``make bench``'s loop check builds it, warmed up (and compiled) by
       one epoch, then:
       - its bare step on one of its batches, back to back as the report times it, with
         the median (the report's), the mean (what a loop adds up), the 90th percentile
         and the maximum; and the host's time to issue one step onto an idle device;
       - the loop taken apart, each part timed from an idle device to a finished one and
         given in ms per training step, with Python's garbage collections in it: the bare
         steps over the loop's batches (data, no bookkeeping), ``train_one_epoch`` (adds the
         loss sums and a sync every 10 steps), the validation, the whole epoch (the loop
         check), and the epoch with Python's garbage collector off;
       - the epoch under torch.profiler: per training step the launches and host-device
         waits, and the ops with the most host and the most device time.
    On a CPU: the reduced grid's sizes, eager only, to check that it runs.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial

import torch

from deepcontrol.benchmark import (
    Config,
    Setting,
    TrainingLoop,
    _label,
    measure_step,
    profiled,
    seconds,
    step_times,
    training_loop,
)

# Host calls counted per training step; Triton launches through the driver (cuLaunchKernel)
COUNTED = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
           "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
           "cudaMalloc")  # fmt: skip


def first_steps(cfg: Config, device: torch.device, batch: int) -> None:
    for repeat in (1, 2):
        for norm in ("bn", "none", "agc"):
            result = measure_step(Setting(norm, batch, "bf16", "eager"), cfg, device)
            print(f"step {norm:4s} batch {batch} bf16 eager, measurement {repeat}: "
                  f"{result.ms_per_step:.2f} ms {result.error}", flush=True)  # fmt: skip


# GPU clock cycles a queued sleep keeps the device busy: about 0.1 s on an H100, longer than
# the host takes to issue any step here (host_ms checks that it did)
BUSY_CYCLES = 200_000_000


def host_ms(
    work: Callable[[], object], device: torch.device, repeats: int = 10, busy: bool = False
) -> float:
    """The median milliseconds the host takes to issue ``work`` onto an idle device, or with
    ``busy`` onto one kept busy throughout by a sleep queued first, so that no launch finds
    the device idle (H100 run 5 saw AGC's eager step take the host 7.8 ms longer to issue at
    batch 1 than at batch 8). On a CPU ``busy`` changes nothing."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            if busy:
                torch.cuda._sleep(BUSY_CYCLES)
        started = time.perf_counter()
        work()
        times.append(1000 * (time.perf_counter() - started))
        if busy and device.type == "cuda" and torch.cuda.current_stream(device).query():
            raise RuntimeError("the device went idle while the host issued the work: "
                               "the work waits on it, or BUSY_CYCLES is too few")  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(times)


@contextlib.contextmanager
def garbage_collections() -> Iterator[dict]:
    """Python's garbage collections while the block runs: how many of each generation, and
    the seconds they took."""
    seen = {"collections": [0, 0, 0], "seconds": 0.0}
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            seen["collections"][info["generation"]] += 1
            seen["seconds"] += time.perf_counter() - started[0]

    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)


def bare_step(loop: TrainingLoop, cfg: Config, device: torch.device) -> None:
    step = partial(loop.step, *next(iter(loop.train)))  # as train_one_epoch takes it
    loop.model.train()
    for _ in range(cfg.warmup):
        step()
    times = step_times(step, cfg.loop_steps, device)
    p90 = statistics.quantiles(times, n=10, method="inclusive")[-1]
    # the median as the report takes it, the mean as the loop's time adds up
    print(f"bare step, {len(times)} back to back: median {statistics.median(times):.2f} ms, "
          f"mean {statistics.mean(times):.2f}, 90th percentile {p90:.2f}, max {max(times):.2f}; "
          f"host time to issue one step {host_ms(step, device, 5):.2f} ms", flush=True)  # fmt: skip


def loop_parts(loop: TrainingLoop, cfg: Config, device: torch.device) -> None:
    def steps_over_batches() -> None:
        loop.model.train()
        for batch in loop.train:
            loop.step(*batch)

    def without_gc(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            gc.disable()
            try:
                work()
            finally:
                gc.enable()

        return run

    parts = {
        "the bare steps over the loop's batches": steps_over_batches,
        "train_one_epoch": loop.train_epoch,
        "validation": loop.validate,
        "epoch (the loop check)": loop.epoch,
        "epoch, Python's GC off": without_gc(loop.epoch),
    }
    print("| part | ms per training step | GC collections (gen 0/1/2) | GC ms |\n|---|---|---|---|")
    for name, work in parts.items():
        with garbage_collections() as collected:
            took = seconds(work, device)
        counts = "/".join(map(str, collected["collections"]))
        print(f"| {name} | {1000 * took / cfg.loop_steps:.2f} | {counts} | "
              f"{1000 * collected['seconds']:.1f} |", flush=True)  # fmt: skip


def profiled_epoch(loop: TrainingLoop, cfg: Config, device: torch.device) -> None:
    events = profiled(loop.epoch, device)
    counts = {e.key: e.count for e in events if e.key in COUNTED}
    per_step = ", ".join(f"{key} {counts.get(key, 0) / cfg.loop_steps:.1f}" for key in COUNTED)
    print(f"per training step under the profiler (validation included): {per_step}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    if device.type == "cuda":
        print(events.table(sort_by="self_cuda_time_total", row_limit=12), flush=True)


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = Config() if device.type == "cuda" else Config.reduced()
    batches = {"eager": 8, "cudagraphs": 1, "graphed": 1} if device.type == "cuda" else {"eager": 2}
    named = sys.argv[1:] or [mode for mode in ("eager", "cudagraphs") if mode in batches]
    unknown = [mode for mode in named if mode not in batches]
    if unknown:  # before the first measurement, not after minutes of them
        raise SystemExit(f"loop_profile.py: no mode {unknown[0]!r} here; expected {list(batches)}")
    if "eager" in named:
        first_steps(cfg, device, 1)
    for mode in named:
        batch = batches[mode]
        for norm in ("bn", "agc"):
            setting = Setting(norm, batch, "bf16", mode)
            print(f"\n## {_label(setting)}", flush=True)
            loop = training_loop(setting, cfg, device)
            loop.epoch()  # warm-up, and compiling
            bare_step(loop, cfg, device)
            loop_parts(loop, cfg, device)
            profiled_epoch(loop, cfg, device)


if __name__ == "__main__":
    main()

"""Where AGC's training loop loses to its bare step, and whether BN's first eager step is slow.

Run 3 (README) found the loop at 0.83 (eager, batch 8) and 0.84 (CUDA graphs, batch 1) of
AGC's bare step, against 0.92 for BN, and BN's eager batch-1 bf16 step, the process's first
measurement, at 12.37 ms where its fp32 step took 7.33. Not a test and no part of
``make bench``: a one-off diagnostic for the next GPU run.

python results/benchmark-h100/loop_profile.py
    1. Each of bn, none and agc's eager batch-1 bf16 step, measured twice in turn (as
       ``make bench`` measures it): a first-measurement effect shows as a first time
       above the second.
    2. For bn and agc (eager at batch 8, CUDA graphs at batch 1): the bare step's times over
       as many back-to-back steps as the loop trains (the report gives their median, the
       loop their mean, so a slow tail would show here); then the training loop, as
       ``make bench`` runs it, under torch.profiler: the ops with the most host and the most
       device time, and per training step the launches and host-device waits.
    On a CPU: the reduced grid's sizes, eager only, to check that it runs.
"""

from __future__ import annotations

import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from deepcontrol.benchmark import (
    Config,
    Setting,
    _label,
    _loop_images_per_s,
    measure_step,
    step_times,
    training_step,
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


def step_spread(setting: Setting, cfg: Config, device: torch.device) -> None:
    step = training_step(setting, cfg, device)
    for _ in range(cfg.warmup):
        step()
    times = step_times(step, cfg.loop_steps, device)
    p90 = statistics.quantiles(times, n=10, method="inclusive")[-1]
    # the median as the report takes it, the mean as the loop's time adds up
    print(f"\n## bare step {_label(setting)}, {len(times)} steps back to back: median "
          f"{statistics.median(times):.2f} ms, mean {statistics.mean(times):.2f}, 90th "
          f"percentile {p90:.2f}, max {max(times):.2f}", flush=True)  # fmt: skip


def profiled_loop(setting: Setting, cfg: Config, device: torch.device) -> None:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        images_per_s = _loop_images_per_s(setting, cfg, device)  # two epochs: warm-up, timed
    events = profiler.key_averages()
    steps = 2 * cfg.loop_steps
    counts = {e.key: e.count for e in events if e.key in COUNTED}
    per_step = ", ".join(f"{key} {counts.get(key, 0) / steps:.1f}" for key in COUNTED)
    print(f"\n## loop {_label(setting)}: {images_per_s:.1f} images/s under the profiler; per "
          f"training step (two epochs, validation included): {per_step}", flush=True)  # fmt: skip
    print(events.table(sort_by="self_cpu_time_total", row_limit=20))
    if device.type == "cuda":
        print(events.table(sort_by="self_cuda_time_total", row_limit=20), flush=True)


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = Config() if device.type == "cuda" else Config.reduced()
    first_steps(cfg, device, 1)
    modes = [("eager", 8), ("cudagraphs", 1)] if device.type == "cuda" else [("eager", 2)]
    for mode, batch in modes:
        for norm in ("bn", "agc"):
            setting = Setting(norm, batch, "bf16", mode)
            step_spread(setting, cfg, device)
            profiled_loop(setting, cfg, device)


if __name__ == "__main__":
    main()

"""Benchmark SegNet's training step per norm, batch, precision and mode (``make bench``).

python scripts/benchmark.py [--out DIR] [--reduced] [--precisions ...] [--modes ...]
                            [--norms ...]
    On a CUDA GPU: 256×512, batches 1/4/8/16, norms bn/agc/agc-naive/none (--norms for
    others: gn, in, agc-window, agc-median), bf16 and fp32 (float32 proper; --precisions
    tf32 for TF32 products) in eager mode; compiled with
    CUDA graphs (bn/agc/none) at batches 1, 4 and 8, the whole step graphed ("graphed") and
    reduce-overhead's ("cudagraphs"), 20 s to a minute of compiling each;
    ClassNet (bn/agc) at batch 4, where Figure 1 trains it; the validation forward as
    training runs it (batch 16, eval mode); the largest batch under 12 GiB; the training
    loop, validation included, against its bare step timed alike (eager at batch 8, in
    each CUDA-graph mode at batch 1); the issue's targets and Figure 1's GPU-hours.
    Without a GPU (or with --reduced) a small grid on the CPU. Writes OUT/benchmark.md and
    OUT/benchmark.json (OUT: results, or outputs/benchmark-reduced for the small grid) after
    each measurement, so a run killed part way leaves its report.
    With --time-limit, nothing new starts after that many seconds; the report says what is
    left, and the same command goes on from it.

python scripts/benchmark.py --profile agc 8 bf16 cudagraphs
    Where that setting's step time goes, by op and kernel (torch.profiler); measures nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from deepcontrol.benchmark import (
    AGC_KERNELS,
    MODES,
    Config,
    Setting,
    profile_step,
    run_benchmark,
    write_report,
)
from deepcontrol.engine import PRECISIONS
from deepcontrol.nn import NORMS

GPU_OUT = Path("results")
# The reduced grid checks that the code runs; its numbers are no result, and written to
# results/ they would replace the GPU report committed there.
REDUCED_OUT = Path("outputs/benchmark-reduced")
NORM_CHOICES = sorted({*NORMS, *AGC_KERNELS})  # agc-naive: the reference AGC and a ReLU


def seconds(text: str) -> float:
    """``--time-limit``'s value: seconds, 0 or more."""
    value = float(text)  # argparse reports a ValueError as "invalid seconds value"
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text!r}")
    return value


def profile_setting(parser: argparse.ArgumentParser, values: list[str]) -> Setting:
    """``--profile NORM BATCH PRECISION MODE`` as a setting, each checked as ``--norms``,
    ``--precisions`` and ``--modes`` are, before anything is built."""
    norm, batch, precision, mode = values
    for name, value, allowed in (("NORM", norm, NORM_CHOICES), ("PRECISION", precision, PRECISIONS),
                                 ("MODE", mode, MODES)):  # fmt: skip
        if value not in allowed:
            parser.error(f"--profile: {name} must be one of {', '.join(allowed)}, got {value!r}")
    if not (batch.isdigit() and int(batch) >= 1):
        parser.error(f"--profile: BATCH must be a positive integer, got {batch!r}")
    return Setting(norm, int(batch), precision, mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        help=f"where the report goes: {GPU_OUT} for the full grid, {REDUCED_OUT} for the reduced",
    )
    parser.add_argument("--reduced", action="store_true", help="the small CPU grid")
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=PRECISIONS,
        metavar="PRECISION",
        help="instead of bf16 fp32, e.g. bf16 to split a run, or tf32; each one of %(choices)s",
    )
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, metavar="MODE", help="a subset of %(choices)s"
    )
    parser.add_argument(
        "--norms",
        nargs="+",
        choices=NORM_CHOICES,
        metavar="NORM",
        help="the norms timed in eager mode (compiled modes time bn, agc and none), e.g. "
        "bn agc gn agc-window, with --out elsewhere than the report of the default grid; "
        "each one of %(choices)s",
    )
    parser.add_argument("--no-cap", action="store_true", help="skip the memory-cap search")
    parser.add_argument("--fresh", action="store_true", help="ignore an unfinished saved run")
    parser.add_argument(
        "--profile",
        nargs=4,
        metavar=("NORM", "BATCH", "PRECISION", "MODE"),
        help="print where one setting's step time goes (torch.profiler), and measure nothing",
    )
    parser.add_argument(
        "--time-limit",
        type=seconds,
        metavar="SECONDS",
        help="start nothing new after this; the report lists what is left",
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reduced = args.reduced or device.type == "cpu"
    cfg = Config.reduced() if reduced else Config()
    if args.precisions:
        cfg.precisions = tuple(args.precisions)
    if args.modes:
        cfg.modes = tuple(args.modes)
    if args.norms:
        cfg.norms = tuple(args.norms)
    if args.no_cap:
        cfg.memory_cap_gib = None
    setting = profile_setting(parser, args.profile) if args.profile else None
    cfg.time_limit_s = args.time_limit
    if setting is not None:
        print(profile_step(setting, cfg, device))
        return
    out = args.out or (REDUCED_OUT if reduced else GPU_OUT)
    if device.type == "cpu":
        print(f"no CUDA GPU: the reduced grid on the CPU (code paths, not the targets) into {out}")
    saved = out / "benchmark.json"
    previous = None if args.fresh or not saved.is_file() else json.loads(saved.read_text())
    command = "python " + " ".join(sys.argv)
    # the whole report after each measurement, so that a run killed by a time limit leaves it
    report = run_benchmark(
        cfg, device, previous, save=lambda partial: write_report(partial, out, command)
    )
    write_report(report, out, command)
    print((out / "benchmark.md").read_text())


if __name__ == "__main__":
    main()

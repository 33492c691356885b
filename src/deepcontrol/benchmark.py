"""Training-step speed and memory of SegNet per norm, batch, precision and execution mode.

``make bench`` (``scripts/benchmark.py``) runs ``run_benchmark`` and writes
``results/benchmark.md`` and ``.json``. Times are medians of full SGD steps (forward, loss,
backward, optimiser) run back to back after warm-up, as training runs them, taken with CUDA
events on a GPU. On a CPU a reduced grid runs, so that the code stays tested. Each
measurement is saved as it is taken, and a run cut short (a job's time limit) goes on from
what it saved on the same GPU and software.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import platform
import statistics
import subprocess
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList

from deepcontrol.atomic import write_atomic
from deepcontrol.config import compose
from deepcontrol.data.loader import DeviceBatches
from deepcontrol.data.registry import get_format
from deepcontrol.engine import (
    StepFn,
    autocast,
    evaluate,
    train_one_epoch,
    use_float32_arithmetic,
)
from deepcontrol.figure1 import figure1_runs
from deepcontrol.graphed_step import training_step_fn
from deepcontrol.losses import LossFn, build_loss
from deepcontrol.models import MODELS
from deepcontrol.nn import AutoGainControl2d, use_agc_kernels
from deepcontrol.nn.fused_agc import triton_agc
from deepcontrol.provenance import code_version
from deepcontrol.train import compile_model, sgd, use_channels_last

# AGC's implementations (AutoGainControl2d's ``kernels``): "agc" is what training runs, the
# fused function over Triton kernels; "agc-naive" the reference AGC and a separate ReLU, as a
# plain PyTorch user would write it.
AGC_KERNELS = {"agc": "auto", "agc-naive": "reference"}
# cudagraphs: torch.compile(mode="reduce-overhead"), which graphs the forward and the backward;
# graphed: torch.compile's kernels, and the whole step, optimiser included, replayed as one
# CUDA graph (GraphedSGDStep, train.cuda_graph)
MODES = ("eager", "compile", "cudagraphs", "graphed")
COMPILE_MODES = {"eager": False, "compile": "default", "cudagraphs": "reduce-overhead",
                 "graphed": "default"}  # fmt: skip
GRAPH_MODES = ("cudagraphs", "graphed")  # whose memory is taken when their graphs are recorded
TARGET_BATCHES = (1, 8)  # where issue 4's targets are judged
PAPER_NORMS = ("bn", "agc")  # the norms the paper compares
NUM_CLASSES = get_format("cityscapes").num_classes  # the 19 the paper trains on


class Figure1Runs(NamedTuple):
    """Figure 1's runs of one network, norm and batch: each ``epochs`` epochs that train
    ``train_images`` and validate ``val_images`` (its dataset's splits, Cityscapes')."""

    network: str
    norm: str
    batch: int
    epochs: int
    train_images: int
    val_images: int
    runs: int


@functools.cache
def figure1_run_counts() -> tuple[Figure1Runs, ...]:
    """Figure 1's runs, read from its panels' experiment configs: the 12 runs
    ``make reproduce-fig1`` trains."""
    counts = Counter((cfg.model.name, cfg.norm.name, cfg.data.batch_size, cfg.epochs,
                      cfg.data.expected_images.train, cfg.data.expected_images.val)
                     for cfg in figure1_runs().values())  # fmt: skip
    return tuple(Figure1Runs(*key, runs) for key, runs in counts.items())


@dataclass
class Setting:
    norm: str
    batch: int
    precision: str
    mode: str
    network: str = "segnet"


@dataclass
class Result(Setting):
    ms_per_step: float = math.nan
    peak_gib: float = math.nan
    error: str = ""

    @property
    def images_per_s(self) -> float:
        return 1000 * self.batch / self.ms_per_step


@dataclass
class Config:
    height: int = 256
    width: int = 512
    batches: tuple[int, ...] = (1, 4, 8, 16)
    norms: tuple[str, ...] = ("bn", "agc", "agc-naive", "none")
    precisions: tuple[str, ...] = ("bf16", "fp32")
    # Compiling takes 20 s to a minute a setting, so compiled modes run only where the
    # targets and Figure 1's cost look (batches 1, 4 and 8; bf16 first, then fp32, the
    # paper's precision and the default), and only with CUDA graphs by default, which batch 1
    # needs ("compile" on request): the whole step graphed first, then reduce-overhead's.
    modes: tuple[str, ...] = ("eager", "graphed", "cudagraphs")
    compiled_batches: tuple[int, ...] = (1, 4, 8)
    compiled_norms: tuple[str, ...] = ("bn", "agc", "none")
    compiled_precisions: tuple[str, ...] = ("bf16", "fp32", "tf32")  # tf32 if asked for
    warmup: int = 10
    steps: int = 30
    memory_cap_gib: float | None = 12.0  # the paper's TitanX
    # The loop check: an epoch of loop_steps, against as many bare steps, loop_rounds of each
    loop_steps: int = 100
    loop_rounds: int = 3
    val_batch: int = 16  # as training's data.val_batch_size
    # Seconds after which no new measurement starts (a job's or a lease's time limit): the
    # report is still written, lists what went unmeasured, and a rerun goes on from it.
    time_limit_s: float | None = None
    # SegNet's grid above; the other networks only where Figure 1 trains them (ClassNet at
    # batch 4), with BN and AGC, for its cost
    networks: tuple[str, ...] = ("segnet", "classnet")

    def settings(self) -> list[Setting]:
        """Every (precision, mode, batch, norm) to time, compiled ones only where asked;
        then every other network's at its Figure 1 batches."""
        out = []
        for precision in self.precisions:
            for mode in self.modes:
                for batch in self.batches:
                    if mode == "eager":
                        out += [Setting(norm, batch, precision, mode) for norm in self.norms]
                    elif self.compiles(batch, precision):
                        out += [Setting(n, batch, precision, mode) for n in self.compiled_norms]
        others = dict.fromkeys((r.network, r.batch) for r in figure1_run_counts()
                               if r.network != "segnet" and r.network in self.networks)  # fmt: skip
        for network, batch in others:
            out += [Setting(norm, batch, precision, mode, network) for precision in self.precisions
                    for mode in self.modes if mode == "eager" or self.compiles(batch, precision)
                    for norm in PAPER_NORMS]  # fmt: skip
        return out

    def compiles(self, batch: int, precision: str) -> bool:
        """Whether compiled modes are timed at this batch and precision."""
        return batch in self.compiled_batches and precision in self.compiled_precisions

    @classmethod
    def reduced(cls) -> Config:
        """What a CPU can run in seconds: the code paths, not the numbers."""
        return cls(height=64, width=128, batches=(1, 2), norms=("bn", "agc", "none"),
                   precisions=("fp32",), modes=("eager",), warmup=1, steps=3,
                   memory_cap_gib=None, loop_steps=4, val_batch=2)  # fmt: skip


def build(norm: str, device: torch.device, network: str = "segnet") -> nn.Module:
    model = MODELS[network](num_classes=NUM_CLASSES, norm="agc" if norm in AGC_KERNELS else norm)
    model = model.to(device)
    if norm in AGC_KERNELS:
        use_agc_kernels(model, AGC_KERNELS[norm])
    if use_channels_last("auto", device):  # as training does by default
        model = model.to(memory_format=torch.channels_last)
    return model


def failure(error: Exception) -> str:
    """The report's line for a measurement that raised; the traceback goes to the log."""
    traceback.print_exc()
    first_line = (str(error).splitlines() or [""])[0][:200]
    return f"failed: {type(error).__name__}: {first_line}"


def step_times(work: Callable[[], None], steps: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``steps`` back-to-back calls of ``work``, as training makes
    them: nothing waits for the device between calls, so the host queues the next step
    while the device runs the last, and a step costs the longer of the two, not their sum.
    On a GPU, CUDA events between the calls, read after the last; elsewhere the host clock."""
    if device.type != "cuda":
        marks = [time.perf_counter()]
        for _ in range(steps):
            work()
            marks.append(time.perf_counter())
        return [1000 * (end - start) for start, end in itertools.pairwise(marks)]
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for event in events[1:]:
        work()
        event.record()
    events[-1].synchronize()
    return [start.elapsed_time(end) for start, end in itertools.pairwise(events)]


def run_as(model: nn.Module, mode: str) -> nn.Module:
    """``model`` as ``mode`` (one of ``MODES``) runs it, as ``train.compile`` would."""
    if mode != "eager":
        torch._dynamo.reset()  # compile afresh: another setting's graphs and guards would
        # count against the recompile limit
    return compile_model(model, COMPILE_MODES[mode])


def mode_step(
    setting: Setting, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn
) -> StepFn:
    """The SGD step of ``model`` as ``setting``'s mode takes it: ``model`` compiled as
    ``run_as`` makes it, the step graphed whole for ``"graphed"``."""
    return training_step_fn(run_as(model, setting.mode), optimizer, loss_fn,
                            setting.precision, cuda_graph=setting.mode == "graphed")  # fmt: skip


def training_loss() -> LossFn:
    """Training's objective with the default loss settings and no class weights: the pixel
    cross-entropy, plus ClassNet's contour loss for a network with a contour output."""
    return build_loss(compose().loss, class_weights=None)


def seeded_network(setting: Setting, device: torch.device) -> nn.Module:
    """``setting``'s network, seeded so that each measurement of it starts alike, with
    float32's arithmetic set for its precision as training sets it."""
    use_float32_arithmetic(setting.precision)
    torch.manual_seed(0)
    return build(setting.norm, device, setting.network)


def trained_parts(
    setting: Setting, device: torch.device
) -> tuple[nn.Module, torch.optim.Optimizer, LossFn]:
    """``setting``'s network (``seeded_network``), its SGD and training's loss, as every
    timed step has them."""
    model = seeded_network(setting, device)
    return model, sgd(model, lr=0.01, momentum=0.9), training_loss()


def random_images(setting: Setting, cfg: Config, device: torch.device) -> torch.Tensor:
    """A batch of ``setting``'s random input images, channels_last as training feeds them."""
    images = torch.randn(setting.batch, 3, cfg.height, cfg.width, device=device)
    return images.contiguous(memory_format=torch.channels_last)


def random_batch(
    setting: Setting, cfg: Config, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training batch of ``setting``'s: random images, labels and contour targets."""
    images = random_images(setting, cfg, device)
    labels = torch.randint(0, NUM_CLASSES, (setting.batch, cfg.height, cfg.width), device=device)
    contours = (torch.rand(setting.batch, cfg.height, cfg.width, device=device) < 0.1).float()
    return images, labels, contours


def training_step(setting: Setting, cfg: Config, device: torch.device) -> Callable[[], None]:
    """One full SGD step of ``setting``'s network on fixed random data, as it runs it."""
    model, optimizer, loss_fn = trained_parts(setting, device)
    take = mode_step(setting, model, optimizer, loss_fn)
    batch = random_batch(setting, cfg, device)

    def step() -> None:
        take(*batch)

    return step


def validation_pass(setting: Setting, cfg: Config, device: torch.device) -> Callable[[], None]:
    """One validation forward of ``setting``'s network on fixed random data, as training
    evaluates: the uncompiled network in eval mode without gradients, whatever the mode."""
    model = seeded_network(setting, device).eval()
    images = random_images(setting, cfg, device)

    @torch.no_grad()
    def forward() -> None:
        with autocast(device, setting.precision):
            model(images)

    return forward


# Activation-sized bytes each AGC kernel moves per training step, in units of its layers'
# input: the sums (forward: y; backward: ∂L/∂out and out), the forward pass (y in, out out)
# and the backward pass (∂L/∂out and out in, ∂L/∂y out). See deepcontrol.nn.triton_agc.
AGC_KERNEL_PASSES = {"_sums_kernel": 3, "_agc_relu_kernel": 2, "_agc_relu_grad_kernel": 3}


def agc_inputs(setting: Setting, cfg: Config, device: torch.device) -> list[torch.Tensor]:
    """The inputs of every AGC layer in one forward of ``setting``'s network and batch, as
    training computes them (random channels_last images, under its autocast)."""
    model, inputs = build(setting.norm, device, setting.network), []
    hooks = [m.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
             for m in model.modules() if isinstance(m, AutoGainControl2d)]  # fmt: skip
    with torch.no_grad(), autocast(device, setting.precision):
        model(random_images(setting, cfg, device))
    for hook in hooks:
        hook.remove()
    return inputs


def agc_activation_bytes(setting: Setting, cfg: Config, device: torch.device) -> int:
    """Bytes of all AGC layers' inputs in one forward of ``setting``'s network and batch."""
    return sum(y.numel() * y.element_size() for y in agc_inputs(setting, cfg, device))


def agc_kernel_bandwidth(events: list, activation_bytes: int, steps: int) -> list[str]:
    """A line per AGC Triton kernel in profiler ``events`` (``key_averages()``): its device
    time per step, the bytes it must move per step, and so the bandwidth it reached, to set
    against the GPU's peak.

    Only the kernels' own (device) events count. Under torch.compile each launch also has a
    host-side op named after the kernel (``_sums_kernel_0``) whose self device time is the
    same kernel's, which would count it twice."""
    lines = []
    for name, passes in AGC_KERNEL_PASSES.items():
        microseconds = sum(e.self_device_time_total for e in events
                           if name in e.key and e.device_type != DeviceType.CPU)  # fmt: skip
        if not microseconds:
            continue
        seconds = microseconds / 1e6 / steps
        moved = passes * activation_bytes
        lines.append(f"{name}: {1000 * seconds:.3f} ms per step for {moved / 1e9:.3f} GB, "
                     f"{moved / seconds / 1e9:.0f} GB/s")  # fmt: skip
    return lines


def profiled(work: Callable[[], None], device: torch.device) -> EventList:
    """torch.profiler's events (``key_averages``) over ``work``, from an idle device until
    the device has finished it; with the device's kernels on a GPU."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as profiler:
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return profiler.key_averages()


def profile_step(setting: Setting, cfg: Config, device: torch.device, rows: int = 25) -> str:
    """Where one training step's time goes: torch.profiler's table of the ops and kernels of
    ``cfg.steps`` steps after ``cfg.warmup``, the slowest first (device time on a GPU); then
    the bandwidth each AGC Triton kernel reached."""
    step = training_step(setting, cfg, device)
    for _ in range(cfg.warmup):
        step()

    def steps() -> None:
        for _ in range(cfg.steps):
            step()

    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = profiled(steps, device)
    activation_bytes = agc_activation_bytes(setting, cfg, device)
    bandwidth = agc_kernel_bandwidth(events, activation_bytes, cfg.steps)
    return "\n".join([events.table(sort_by=sort, row_limit=rows),
                      f"AGC layers' inputs: {activation_bytes / 1e9:.3f} GB per forward",
                      *(bandwidth or ["No AGC Triton kernel ran on a device."])])  # fmt: skip


def measure_step(
    setting: Setting,
    cfg: Config,
    device: torch.device,
    work: Callable[[Setting, Config, torch.device], Callable[[], None]] = training_step,
) -> Result:
    """Median ms of one full SGD step (or of another ``work``), and peak memory, for
    ``setting``."""
    result = Result(**asdict(setting))
    try:
        step = work(setting, cfg, device)
        # Peak memory: eager, over the timed steps, leaving out cuDNN's one-off algorithm
        # search; CUDA graphs, from the start, since their memory is taken when recorded.
        graphs = setting.mode in GRAPH_MODES
        if device.type == "cuda" and graphs:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(cfg.warmup):
            step()
        if device.type == "cuda" and not graphs:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        result.ms_per_step = statistics.median(step_times(step, cfg.steps, device))
        if device.type == "cuda":
            result.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        result.error = "out of memory"
    except Exception as error:  # one failing setting (a compile error) must not lose the rest
        result.error = failure(error)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def max_batch_under_cap(norm: str, precision: str, cfg: Config, device: torch.device) -> int | None:
    """The largest batch (powers of two, then bisection) whose training step fits in
    ``cfg.memory_cap_gib``, as ``torch.cuda.set_per_process_memory_fraction`` enforces it;
    None if a step failed for another reason than memory."""
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    index = torch.cuda.current_device() if device.index is None else device.index
    device = torch.device("cuda", index)  # the fraction wants an index, not plain "cuda"
    torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.memory_cap_gib / total), device)
    small = replace(cfg, warmup=1, steps=1)

    def fits(batch: int) -> bool:
        error = measure_step(Setting(norm, batch, precision, "eager"), small, device).error
        if error and error != "out of memory":
            raise RuntimeError(f"the memory-cap search for {norm} at batch {batch}: {error}")
        return not error

    try:
        low, high = 0, 1
        while fits(high):
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return low
    except RuntimeError as error:  # measure_step has logged the failing step's traceback
        print(error, flush=True)
        return None
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def _row(result: Result) -> dict:
    """A report row: ``result`` and its images per second."""
    return {**asdict(result), "images_per_s": result.images_per_s}


def loop_efficiency(setting: Setting, cfg: Config, device: torch.device) -> dict:
    """The whole training loop (device-resident uint8 data, normalisation, loss, optimiser,
    logging syncs, and validation amortised: Figure 1's share of validation images, at
    ``cfg.val_batch``, on the uncompiled network) as ``setting`` runs it, against its bare
    step timed alike (``loop_and_bare_seconds``): training images per second of each."""
    row = {**asdict(setting), "loop_images_per_s": math.nan, "bare_step_images_per_s": math.nan,
           "ratio": math.nan, "error": ""}  # fmt: skip
    try:
        loop_s, bare_s = loop_and_bare_seconds(training_loop(setting, cfg, device), cfg, device)
    except Exception as error:  # as in measure_step
        row["error"] = failure(error)
        return row
    images = setting.batch * cfg.loop_steps
    row.update(loop_images_per_s=images / loop_s, bare_step_images_per_s=images / bare_s,
               ratio=bare_s / loop_s)  # fmt: skip
    return row


def loop_and_bare_seconds(
    loop: TrainingLoop, cfg: Config, device: torch.device
) -> tuple[float, float]:
    """The median seconds of ``loop``'s epoch and of its bare steps, over ``cfg.loop_rounds``
    of each taken in turn, after an epoch's warm-up (compiling, recording a CUDA graph).

    Both are timed alike, all of their steps from an idle device to a finished one: against
    the grid's median step, an epoch's mean would count a step's spread as the loop's cost,
    and the host-bound eager AGC step's is wide (H100 run 4: median 28.51 ms, mean 32.00).
    Taking them in turn puts a drifting clock on both alike."""
    loop.epoch()
    loop_s, bare_s = [], []
    for _ in range(cfg.loop_rounds):
        bare_s.append(seconds(loop.bare_steps, device))
        loop_s.append(seconds(loop.epoch, device))
    return statistics.median(loop_s), statistics.median(bare_s)


@dataclass
class TrainingLoop:
    """``setting``'s network training as ``deepcontrol.train`` trains it, on random
    device-resident data (``training_loop``); its epoch's parts, to time together or apart."""

    setting: Setting
    train: DeviceBatches
    val: DeviceBatches
    model: nn.Module  # validation runs it uncompiled, as training does
    step: StepFn  # the SGD step in the setting's mode (mode_step)
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    bare_batch: tuple[torch.Tensor, torch.Tensor, None]  # shaped as the loop's own

    def train_epoch(self) -> None:
        train_one_epoch(self.model, self.train, self.optimizer, self.loss_fn,
                        self.setting.precision, step=self.step)  # fmt: skip

    def validate(self) -> None:
        evaluate(self.model, self.val, self.loss_fn, NUM_CLASSES, self.setting.precision)

    def epoch(self) -> None:
        self.train_epoch()
        self.validate()

    def bare_steps(self) -> None:
        """As many steps as an epoch trains, back to back on one batch: the step alone."""
        self.model.train()  # as train_one_epoch does: validation left it in eval mode
        for _ in range(len(self.train)):
            self.step(*self.bare_batch)


def training_loop(setting: Setting, cfg: Config, device: torch.device) -> TrainingLoop:
    """``cfg.loop_steps`` training batches of ``setting``, and Figure 1's share of validation
    images (500 per 2975 trained) in batches of ``cfg.val_batch``."""
    samples = setting.batch * cfg.loop_steps
    split_sizes = figure1_run_counts()[0]
    val_samples = max(1, round(samples * split_sizes.val_images / split_sizes.train_images))

    def split(n: int, batch_size: int, shuffle: bool) -> DeviceBatches:
        images = torch.randint(0, 256, (n, cfg.height, cfg.width, 3), dtype=torch.uint8)
        labels = torch.randint(0, NUM_CLASSES, (n, cfg.height, cfg.width), dtype=torch.uint8)
        return DeviceBatches(images, labels, batch_size, [128.0] * 3, [1.0] * 3,
                             shuffle=shuffle, device=device)  # fmt: skip

    train, val = split(samples, setting.batch, True), split(val_samples, cfg.val_batch, False)
    model, optimizer, loss_fn = trained_parts(setting, device)
    step = mode_step(setting, model, optimizer, loss_fn)
    # The loop's batches have no contour targets (SegNet's loss reads none): a bare batch
    # with them would be another input to compile for or record a graph of
    images, labels, _ = random_batch(setting, cfg, device)
    return TrainingLoop(setting, train, val, model, step, optimizer, loss_fn,
                        (images, labels, None))  # fmt: skip


def seconds(work: Callable[[], None], device: torch.device) -> float:
    """Wall-clock seconds of ``work``, from an idle device until the device has finished it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "cpu": platform.processor() or platform.machine(),
            "agc_kernels": "reference" if triton_agc is None else "triton",
            "code": code_version()}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())  # fmt: skip
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.CalledProcessError):
            info["driver"] = "unknown (nvidia-smi failed)"
    return info


# The report's sections of per-setting rows, each with how the log names one left unmeasured.
SECTIONS = {"steps": "", "validation": "validation ", "loop": "the training-loop check, "}
# How steps are timed, as reports record it (step_times). Reports written before it was
# recorded timed each step alone, waiting for the device after it, and say nothing.
STEP_TIMING = "run back to back (as training runs them)"
# What each precision computes in, as reports record it (use_float32_arithmetic). Reports
# written before it was recorded ran fp32's convolutions in TF32, PyTorch's default on the
# GPUs they ran on, and say nothing.
ARITHMETIC = ("fp32 is float32 proper (TF32 off), tf32 float32 with cuDNN's and cuBLAS's "
              "products in TF32, bf16 autocast")  # fmt: skip
# How a report says it measured, beside its config; a saved one that says otherwise (or
# nothing) measured another way and is not reused
MEASURED_HOW = {"step_timing": STEP_TIMING, "arithmetic": ARITHMETIC}
# What a saved measurement must share with a new one to be reused.
SAME_MEASUREMENT = ("height", "width", "warmup", "steps", "loop_steps", "loop_rounds",
                    "memory_cap_gib", "val_batch")  # fmt: skip


def reusable(previous: dict | None, cfg: Config, device: torch.device) -> dict | None:
    """``previous`` (a saved report) if it is unfinished and was measured the same way on
    the same GPU and software, so that a run cut short can go on; else None. A finished
    report is never reused: running the benchmark again measures again."""
    if not previous or previous.get("complete", True):
        return None
    now = {"environment": environment(device), **MEASURED_HOW,
           **{k: getattr(cfg, k) for k in SAME_MEASUREMENT}}  # fmt: skip
    then = {"environment": previous.get("environment"),
            **{k: previous.get(k) for k in MEASURED_HOW},
            **{k: previous.get("config", {}).get(k) for k in SAME_MEASUREMENT}}  # fmt: skip
    differ = sorted(k for k in now if now[k] != then[k])
    if differ:
        print(f"not reusing the saved benchmark: its {', '.join(differ)} differ from now's")
        return None
    return previous


# torch.compile's counters (torch._dynamo.utils.counters) of the graphs it captures, and of
# how Inductor's compiled-graph cache and AOTAutograd's cache answered for them
COMPILE_COUNTERS = {
    "graphs": ("stats", "unique_graphs"),
    "inductor_hit": ("inductor", "fxgraph_cache_hit"),
    "inductor_miss": ("inductor", "fxgraph_cache_miss"),
    "inductor_bypass": ("inductor", "fxgraph_cache_bypass"),
    "aot_hit": ("aot_autograd", "autograd_cache_hit"),
    "aot_miss": ("aot_autograd", "autograd_cache_miss"),
    "aot_bypass": ("aot_autograd", "autograd_cache_bypass"),
}


def compile_counts() -> dict[str, int]:
    """``COMPILE_COUNTERS`` as they stand in this process."""
    return {name: counters[group][key] for name, (group, key) in COMPILE_COUNTERS.items()}


def compile_note(before: dict[str, int], after: dict[str, int]) -> str:
    """What torch.compile did between two ``compile_counts``, for the log ("" if nothing):
    the graphs it captured, and how many of their compiled forms each cache had. A compiled
    setting's minute is mostly Inductor's work, which its cache saves (on disk, so a later
    process or a carried cache dir finds it too); a cache that had none did not save it."""
    d = {name: after[name] - before[name] for name in after}
    if not d["graphs"]:
        return ""
    caches = []
    for cache, name in (("inductor", "Inductor"), ("aot", "AOTAutograd")):
        hit, bypass = d[f"{cache}_hit"], d[f"{cache}_bypass"]
        if looked := hit + d[f"{cache}_miss"] + bypass:
            caches.append(f"{name} {hit} of {looked}" + (f" ({bypass} bypassed)" if bypass else ""))
    graphs = f"{d['graphs']} graph{'s' * (d['graphs'] != 1)} compiled"
    return f"{graphs}, from the cache: {', '.join(caches)}" if caches else f"{graphs}, no cache"


def run_benchmark(
    cfg: Config,
    device: torch.device,
    previous: dict | None = None,
    save: Callable[[dict], None] | None = None,
) -> dict:
    """Every step timing of ``cfg``, the validation forwards Figure 1's cost needs, the
    memory-cap search and the loop efficiency (eager, and with CUDA graphs at batch 1).

    Measurements in ``previous`` (see :func:`reusable`) are kept, not taken again; ``save``
    gets the report after each new measurement, assessed (targets and cost from what is
    measured so far), marked ``complete: False`` and listing what is still to come under
    ``pending``, so that a run killed at any point leaves a readable report. Past
    ``cfg.time_limit_s`` nothing new starts: the report lists it under ``unmeasured`` and
    stays ``complete: False``."""
    torch.backends.cudnn.benchmark = True  # as training does (train.cudnn_benchmark)
    limit = math.inf if cfg.time_limit_s is None else cfg.time_limit_s
    deadline = time.monotonic() + limit
    old = reusable(previous, cfg, device) or {}
    report = {"environment": environment(device), "config": asdict(cfg), "steps": [],
              "validation": [], "loop": [], "reused_steps": 0, "unmeasured": [],
              "pending": [], "complete": False, **MEASURED_HOW}  # fmt: skip
    saved = {kind: {_key(row): row for row in old.get(kind, [])} for kind in SECTIONS}
    grid = cfg.settings()
    order = {_key(asdict(s)): i for i, s in enumerate(grid)}

    def progress() -> None:
        if save:
            save(_assessed(report, order, device))

    def late() -> bool:
        return time.monotonic() >= deadline

    def timed(work: Callable[[], object]) -> tuple:
        """``work()``'s result, and the seconds it took as the log gives them: compiling
        included, what plans a GPU lease, with what torch.compile's caches saved of it."""
        started, before = time.monotonic(), compile_counts()
        result = work()
        took = f"{time.monotonic() - started:.0f} s"
        return result, "; ".join(filter(None, (took, compile_note(before, compile_counts()))))

    def take(kind: str, setting: Setting, measure: Callable[[Setting], dict]) -> bool:
        """``setting``'s row in ``report[kind]``: the saved one, or ``measure(setting)``'s if
        the time limit has not passed; False if neither."""
        row, took = saved[kind].get(_key(asdict(setting))), "saved earlier"
        if row is None:
            if late():
                return False
            row, took = timed(lambda: measure(setting))
        elif kind == "steps":
            report["reused_steps"] += 1
        found = (f"loop / bare step {row['ratio']:.2f}" if kind == "loop" else
                 f"{row['ms_per_step']:8.2f} ms {row['peak_gib']:6.2f} GiB peak")  # fmt: skip
        print(f"{kind:10s} {_label(setting):28s} {found} {row['error']}  ({took})", flush=True)
        report[kind].append(row)
        progress()
        return True

    def step(setting: Setting) -> dict:
        return _row(measure_step(setting, cfg, device))

    def validation(setting: Setting) -> dict:
        return _row(measure_step(setting, cfg, device, work=validation_pass))

    def loop(setting: Setting) -> dict:
        return loop_efficiency(setting, cfg, device)

    def cap_search() -> bool:
        cap, took = old.get("max_batch_under_cap"), "saved earlier"
        if not cap:
            if late():
                return False
            cap, took = timed(
                lambda: {
                    norm: max_batch_under_cap(norm, cfg.precisions[0], cfg, device)
                    for norm in PAPER_NORMS
                }
            )
        report["max_batch_under_cap"] = cap
        print(f"{'cap':10s} {cap}  ({took})", flush=True)
        progress()
        return True

    # (what, do it: False if the time limit kept it from being done), in the order they run
    plan: list[tuple[str, Callable[[], bool]]] = []

    def planned(kind: str, setting: Setting, measure: Callable[[Setting], dict]) -> None:
        plan.append((SECTIONS[kind] + _label(setting), lambda: take(kind, setting, measure)))

    # What the targets and Figure 1's cost read comes first, cheapest first (eager steps at
    # Figure 1's batches, validation, the memory cap, the eager loop, then the minute-long
    # compiles: the targets' batches and the CUDA-graphed loop, then Figure 1's other
    # batches), the rest of the grid last: a run cut short keeps them. The first precision's
    # measurements all come before any of the others'.
    figure1 = {(r.network, r.batch) for r in figure1_run_counts()}
    first = [s for s in grid if s.precision == cfg.precisions[0] and s.mode == "eager"
             and (s.network, s.batch) in figure1]  # fmt: skip
    # The targets' batches first; then Figure 1's others, ClassNet before SegNet: with 57
    # norm layers to SegNet's 25, its eager step is the most host-bound (40.9 ms at batch 4
    # with AGC on an H100, to SegNet's 19.4), so CUDA graphs change its price the most.
    compiled = sorted(
        (s for s in grid if s.precision == cfg.precisions[0] and s.mode != "eager"),
        key=lambda s: (s.batch not in TARGET_BATCHES, s.network == "segnet"),
    )
    networks = dict.fromkeys(r.network for r in figure1_run_counts() if r.network in cfg.networks)

    def validations(precision: str) -> None:
        for network in networks:
            for norm in PAPER_NORMS:
                planned("validation", Setting(norm, cfg.val_batch, precision, "eager", network),
                        validation)  # fmt: skip

    def loop_checks(mode: str, batch: int) -> None:
        for norm in PAPER_NORMS:
            planned("loop", Setting(norm, batch, cfg.precisions[0], mode), loop)

    for setting in first:
        planned("steps", setting, step)
    validations(cfg.precisions[0])
    if cfg.memory_cap_gib and device.type == "cuda":
        plan.append(("the memory-cap search", cap_search))
    # The loop eager at the largest target batch; with CUDA graphs at batch 1, where each
    # step is shortest and the loop's own host work has the least time to hide in.
    loop_checks("eager", 8 if 8 in cfg.batches else cfg.batches[-1])
    for setting in compiled:
        if setting.batch in TARGET_BATCHES:
            planned("steps", setting, step)
    for mode in cfg.modes:
        if mode in GRAPH_MODES and any(s.mode == mode and s.batch == 1 for s in compiled):
            loop_checks(mode, 1)
    for setting in compiled:
        if setting.batch not in TARGET_BATCHES:
            planned("steps", setting, step)
    for precision in cfg.precisions[1:]:
        validations(precision)
    for setting in grid:
        if setting not in first and setting not in compiled:
            planned("steps", setting, step)
    for i, (what, do) in enumerate(plan):
        report["pending"] = [later for later, _ in plan[i + 1 :]]
        if not do():
            report["unmeasured"].append(what)
    report["complete"] = not report["unmeasured"]
    return _assessed(report, order, device)


def _assessed(report: dict, order: dict[tuple, int], device: torch.device) -> dict:
    """``report`` with its steps in the grid's ``order`` and its targets and Figure 1's cost
    judged from what it has measured (none on a CPU, whose numbers say nothing of a GPU's)."""
    report["steps"].sort(key=lambda row: order[_key(row)])
    report["targets"] = targets(report) if device.type == "cuda" else []
    report["figure1_cost"] = [
        cost
        for precision in report["config"]["precisions"]
        if (cost := figure1_cost(report, precision))
    ] if device.type == "cuda" else []  # fmt: skip
    return report


def _key(row: dict) -> tuple:
    return row.get("network", "segnet"), row["norm"], row["batch"], row["precision"], row["mode"]


def _label(setting: Setting) -> str:
    """``setting`` for the log: "bn 8 bf16 eager", the network named unless SegNet."""
    network = "" if setting.network == "segnet" else f"{setting.network} "
    return f"{network}{setting.norm} {setting.batch} {setting.precision} {setting.mode}"


def _best(report: dict, norm: str, batch: int, precision: str, modes: tuple[str, ...],
          network: str = "segnet") -> dict | None:  # fmt: skip
    """The fastest of ``report``'s step rows for that setting in any of ``modes``."""
    rows = [r for r in report["steps"] if _key(r)[:4] == (network, norm, batch, precision)
            and r["mode"] in modes and not r["error"]]  # fmt: skip
    return min(rows, key=lambda r: r["ms_per_step"]) if rows else None


def targets(report: dict) -> list[dict]:
    """The issue's targets, each with its measured ratio and whether it is met."""
    out = []

    def add(name: str, value: float | None, bar: float, at_least: bool) -> None:
        met = value is not None and (value >= bar if at_least else value <= bar)
        out.append({"target": name, "value": value, "bar": bar, "met": met})

    precision = report["config"]["precisions"][0]
    for batch in TARGET_BATCHES:
        for mode in report["config"]["modes"]:
            agc = _best(report, "agc", batch, precision, (mode,))
            floor = _best(report, "none", batch, precision, (mode,))
            add(
                f"batch {batch}, {mode}: AGC step / no-norm floor",
                agc and floor and agc["ms_per_step"] / floor["ms_per_step"],
                1.10,
                False,
            )
        agc_best = _best(report, "agc", batch, precision, MODES)
        bn_eager = _best(report, "bn", batch, precision, ("eager",))
        bn_best = _best(report, "bn", batch, precision, MODES)
        add(
            f"batch {batch}: AGC throughput / eager BN",
            agc_best and bn_eager and bn_eager["ms_per_step"] / agc_best["ms_per_step"],
            1.3,
            True,
        )
        add(
            f"batch {batch}: AGC throughput / best BN",
            agc_best and bn_best and bn_best["ms_per_step"] / agc_best["ms_per_step"],
            1.1,
            True,
        )
        agc_eager = _best(report, "agc", batch, precision, ("eager",))
        add(
            f"batch {batch}: AGC peak memory / BN (eager)",
            agc_eager and bn_eager and agc_eager["peak_gib"] / bn_eager["peak_gib"],
            0.8,
            False,
        )
    for norm in PAPER_NORMS:
        eager = _best(report, norm, 1, precision, ("eager",))
        best = _best(report, norm, 1, precision, MODES)
        add(
            f"batch 1, {norm}: best throughput / eager",
            eager and best and eager["ms_per_step"] / best["ms_per_step"],
            3.0,
            True,
        )
    cap = report.get("max_batch_under_cap")
    if cap and None not in cap.values():
        add(
            f"largest batch under {report['config']['memory_cap_gib']} GiB: AGC / BN",
            cap["agc"] / max(cap["bn"], 1),
            1.3,
            True,
        )
    for loop in report["loop"]:
        add(
            f"training loop / bare step, {loop['norm']}, batch {loop['batch']}, {loop['mode']}",
            None if loop.get("error") else loop["ratio"],
            0.9,
            True,
        )
    return out


def figure1_cost(report: dict, precision: str) -> dict | None:
    """GPU-hours for Figure 1's runs in ``precision``, each priced at its own network's and
    norm's best measured step at its batch and validation forward; None if a time it needs
    failed or went unmeasured. ``per_run`` says what each run was priced at, its share, and
    the modes of its step still unmeasured in an unfinished report (``untimed_modes``): while
    any are, the total is an upper bound.

    Each epoch of a run trains its training split at its batch and validates its validation
    split at the validation batch (as training evaluates, eager)."""
    untimed = set(report.get("unmeasured", [])) | set(report.get("pending", []))
    per_run = []
    for run in figure1_run_counts():
        step = _best(report, run.norm, run.batch, precision, MODES, run.network)
        validation = [r for r in report.get("validation", []) if not r["error"]
                      and _key(r)[:2] == (run.network, run.norm)
                      and r["precision"] == precision]  # fmt: skip
        if step is None or not validation:
            return None
        val = validation[0]
        epoch_ms = (math.ceil(run.train_images / run.batch) * step["ms_per_step"]
                    + math.ceil(run.val_images / val["batch"]) * val["ms_per_step"])  # fmt: skip
        untimed_modes = [mode for mode in MODES if _label(
            Setting(run.norm, run.batch, precision, mode, run.network)) in untimed]  # fmt: skip
        per_run.append({"network": run.network, "norm": run.norm, "batch": run.batch,
                        "runs": run.runs, "mode": step["mode"], "ms_per_step": step["ms_per_step"],
                        "gpu_hours": run.runs * run.epochs * epoch_ms / 1000 / 3600,
                        "untimed_modes": untimed_modes})  # fmt: skip
    # fsum: the correctly rounded total, as Python 3.12's sum gives and 3.11's may not, so a
    # report written on the GPU machine's Python reads the same in CI's
    return {"gpu_hours": math.fsum(r["gpu_hours"] for r in per_run),
            "runs": sum(r["runs"] for r in per_run), "precision": precision,
            "per_run": per_run}  # fmt: skip


def write_report(report: dict, out_dir: Path, command: str) -> None:
    """``benchmark.json`` (everything) and ``benchmark.md`` (tables, targets, cost); of an
    unfinished run too, saying what it has still to measure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "benchmark.json", json.dumps(report, indent=1) + "\n")
    env = report["environment"]
    timing = f" {report['step_timing']}" if report.get("step_timing") else ""
    lines = ["# Training-step benchmark: SegNet (and ClassNet where Figure 1 trains it)", "",
             f"Command: `{command}`", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             f"Input {report['config']['height']}×{report['config']['width']}, full SGD step, "
             f"median of {report['config']['steps']} steps{timing} after "
             f"{report['config']['warmup']} warm-up steps. Peak memory is "
             "torch.cuda.max_memory_allocated: over the timed steps (not cuDNN's one-off "
             "algorithm search in the warm-up), or with CUDA graphs from the start (their "
             "memory is taken when they are recorded).", "",
             *([f"Precisions: {report['arithmetic']}.", ""] if report.get("arithmetic") else []),
             *([f"{report['reused_steps']} of {len(report['steps'])} step timings were taken by "
                "an earlier, interrupted invocation on the same device and software.", ""]
               if report["reused_steps"] else []),
             "| network | precision | mode | batch | norm | ms/step | images/s | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["steps"]:
        peak = "—" if math.isnan(r["peak_gib"]) else f"{r['peak_gib']:.2f}"
        lines.append(f"| {_key(r)[0]} | {r['precision']} | {r['mode']} | {r['batch']} | "
                     f"{r['norm']} | {r['ms_per_step']:.2f} | {r['images_per_s']:.1f} | {peak} |"
                     + (f" {r['error']} |" if r["error"] else ""))  # fmt: skip
    if report.get("validation"):
        lines += [
            "",
            "Validation, as training evaluates (the uncompiled network in eval mode, no "
            f"gradients), median of {report['config']['steps']} forwards{timing} after "
            f"{report['config']['warmup']}:",
            "",
            "| network | precision | batch | norm | ms/forward | images/s |",
            "|---|---|---|---|---|---|",
        ]
        for r in report["validation"]:
            lines.append(
                f"| {_key(r)[0]} | {r['precision']} | {r['batch']} | {r['norm']} | "
                f"{r['ms_per_step']:.2f} | {r['images_per_s']:.1f} |"
                + (f" {r['error']} |" if r["error"] else "")
            )
    if "max_batch_under_cap" in report:
        found = ", ".join(f"{k} {'failed (see the log)' if v is None else v}"
                          for k, v in report["max_batch_under_cap"].items())  # fmt: skip
        lines += ["", f"Largest batch under {report['config']['memory_cap_gib']} GiB: {found}"]
    rounds = report["config"].get("loop_rounds")  # older reports: the grid's median step
    bare = (f"its bare step timed alike (the median of {rounds} turns each)" if rounds else
            "the bare step")  # fmt: skip
    lines += ["", "The training loop (data, loss, optimiser, logging, and validation of 500 images "
              f"per 2975 trained), against {bare}:", "",
              "| training loop | mode | batch | loop images/s | bare step images/s | ratio |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for loop in report["loop"]:
        lines.append(f"| {loop['norm']} | {loop['mode']} | {loop['batch']} | "
                     f"{loop['loop_images_per_s']:.1f} | "
                     f"{loop['bare_step_images_per_s']:.1f} | {loop['ratio']:.2f} |"
                     + (f" {loop['error']} |" if loop["error"] else ""))  # fmt: skip
    if report["targets"]:
        lines += ["", "| target | measured | bar | met |", "|---|---|---|---|"]
        for t in report["targets"]:
            # three decimals, so that a ratio just short of its bar (1.096 against 1.1) does
            # not print as the bar itself beside "no"
            value = "—" if t["value"] is None else f"{t['value']:.3f}"
            # no value: a time it needs is still to come, went unmeasured or failed
            met = "not judged" if t["value"] is None else "yes" if t["met"] else "no"
            lines.append(f"| {t['target']} | {value} | {t['bar']} | {met} |")
    else:
        lines += ["", "Targets: not assessed, no CUDA GPU (a reduced CPU run)."]
    for cost in report["figure1_cost"]:
        hours = f"{cost['gpu_hours']:.2f} GPU-hours on this GPU (target ≤ 4 H100-hours)"
        bound = (", an upper bound: a run's step in a mode marked below is not yet measured"
                 if any(r["untimed_modes"] for r in cost["per_run"]) else "")  # fmt: skip
        lines += ["", f"Figure 1 ({cost['runs']} runs, {cost['precision']}): {hours}{bound}.",
                  "", "| network | norm | batch | runs | priced at | ms/step | GPU-hours | "
                  "not yet measured |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in cost["per_run"]:
            lines.append(f"| {r['network']} | {r['norm']} | {r['batch']} | {r['runs']} | "
                         f"{r['mode']} | {r['ms_per_step']:.2f} | {r['gpu_hours']:.2f} | "
                         f"{', '.join(r['untimed_modes']) or '—'} |")  # fmt: skip
    if report["targets"] and not report["figure1_cost"]:
        lines += ["", "Figure 1's cost: not computed, a BN or AGC step time it needs is missing."]
    if report["unmeasured"]:
        lines += ["", f"Not measured, the time limit ({report['config']['time_limit_s']} s) "
                  f"having passed: {'; '.join(report['unmeasured'])}. Running the same "
                  "command again goes on from here."]  # fmt: skip
    if report.get("pending"):
        lines += ["", "Unfinished: this report was written after the last measurement above, "
                  "while the run went on, and was not rewritten since, so the run was still "
                  "going or was stopped there. Still to measure: "
                  f"{'; '.join(report['pending'])}. Running the same command again goes on "
                  "from here."]  # fmt: skip
    write_atomic(out_dir / "benchmark.md", "\n".join(lines) + "\n")

"""Entry point: ``deepcontrol-train [OVERRIDES]`` or ``python -m deepcontrol.train``.

Composes data → model → loss → optimiser → epochs of training and validation; every part
is built elsewhere. ``train(cfg, output_dir)`` runs without Hydra's decorator.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from deepcontrol.atomic import write_atomic
from deepcontrol.checks import is_finite_number, is_whole_number, true_or_false
from deepcontrol.config import CONFIG_DIR
from deepcontrol.data import Data, build_data, ensure_cache
from deepcontrol.distributed import (
    any_process,
    broadcast_buffers,
    init_distributed,
    unwrap,
    wrap_model,
)
from deepcontrol.engine import (
    check_precision,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    train_one_epoch,
    use_float32_arithmetic,
)
from deepcontrol.graphed_step import training_step_fn
from deepcontrol.locks import exclusive_lock
from deepcontrol.logging import RunLogger, check_logger_settings, read_json
from deepcontrol.losses import LossFn, build_loss
from deepcontrol.models import build_model, model_outputs_contours
from deepcontrol.nn import agc_mean_scales, mean_scale_parameters
from deepcontrol.provenance import code_version

log = logging.getLogger("deepcontrol")
# The code that trained a resumed run before, where its summary.json (of older code) names none
CODE_BEFORE = "unknown (before runs recorded their code)"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} but CUDA is not available; use device=cpu or auto")
    return device


def check_sgd_settings(
    lr: object, momentum: object, weight_decay: object, mean_scale_lr_mult: object
) -> None:
    """``optim.*`` as ``sgd`` takes them: finite numbers, none negative (a multiplier of 0
    holds λ at its start), and a momentum below 1, at which the velocity stops decaying.
    PyTorch's SGD would train on with a NaN lr or a momentum of 1.5."""
    numbers = {"lr": lr, "weight_decay": weight_decay, "mean_scale_lr_mult": mean_scale_lr_mult}
    for name, value in numbers.items():
        if not is_finite_number(value, 0):
            raise ValueError(f"optim.{name} must be a number >= 0, got {value!r}")
    if not (is_finite_number(momentum, 0) and momentum < 1):
        raise ValueError(f"optim.momentum must be a number from 0 to below 1, got {momentum!r}")


def sgd(
    model: torch.nn.Module,
    lr: float,
    momentum: float,
    weight_decay: float = 0.0,
    mean_scale_lr_mult: float = 1.0,
) -> torch.optim.SGD:
    """SGD with momentum as training runs it: fused, one pass over the parameters, their
    gradients and momenta per step, where PyTorch's default takes three.

    ``mean_scale_lr_mult`` scales the lr of AGC's λ (every ``mean_scale``), to study λ
    beyond the paper, which trains all parameters at one lr (1, the default)."""
    check_sgd_settings(lr, momentum, weight_decay, mean_scale_lr_mult)
    groups = [{"params": list(model.parameters())}]
    if mean_scale_lr_mult != 1:
        lambdas = mean_scale_parameters(model)
        if not lambdas:
            raise ValueError(
                f"optim.mean_scale_lr_mult={mean_scale_lr_mult} scales the lr of AGC's λ, "
                "but the model has no AGC layer (norm=agc or a variant)"
            )
        is_lambda = {id(p) for p in lambdas}
        rest = [p for p in groups[0]["params"] if id(p) not in is_lambda]
        groups = [{"params": rest}, {"params": lambdas, "lr": lr * mean_scale_lr_mult}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)


def build_optimizer(optim_cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum at a fixed learning rate (§3); the lr is already resolved."""
    if optim_cfg.name != "sgd":
        raise ValueError(f"unknown optim.name {optim_cfg.name!r}: choose sgd")
    return sgd(
        model,
        optim_cfg.lr,
        optim_cfg.momentum,
        optim_cfg.weight_decay,
        optim_cfg.mean_scale_lr_mult,
    )


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def compile_model(model: torch.nn.Module, mode: str | bool) -> torch.nn.Module:
    """``torch.compile`` the training forward (and so backward) for ``train.compile``:
    false, or a mode; ``reduce-overhead`` adds CUDA graphs, which pay off most at small
    batches where launch overhead dominates.

    Shapes stay static: an epoch's smaller last batch gets a graph of its own. By default
    torch.compile would make that second graph dynamic in the batch, and it would then serve
    every later step, with kernels less specialised than the ones the benchmark times."""
    if not mode:
        return model
    if mode is True:
        mode = "default"
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"train.compile must be false or one of {', '.join(COMPILE_MODES)}, got {mode!r}"
        )
    return torch.compile(model, mode=mode, dynamic=False)


def check_cuda_graph(cfg: DictConfig) -> bool:
    """``train.cuda_graph``: true or false. True (``GraphedSGDStep``) needs a CUDA device and
    one process, and rules out ``train.compile=reduce-overhead``, whose own graphs it would
    record inside its one."""
    if not true_or_false("train.cuda_graph", cfg.train.cuda_graph):
        return False
    if cfg.train.compile == "reduce-overhead":
        raise ValueError(
            "train.cuda_graph=true records the whole step as one CUDA graph, and "
            "train.compile=reduce-overhead would record graphs of its own inside it: use "
            "train.compile=default (or false) with it"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("train.cuda_graph=true runs in one process, not under torchrun (DDP)")
    if resolve_device(cfg.device).type != "cuda":
        raise ValueError(f"train.cuda_graph=true needs a CUDA device, got device={cfg.device}")
    return True


def use_channels_last(setting: str | bool, device: torch.device) -> bool:
    """``train.channels_last``: true, false, or auto (on CUDA, where convolutions run fastest
    in NHWC memory; the data loader already hands them NHWC images)."""
    if setting == "auto":
        return device.type == "cuda"
    if not isinstance(setting, bool):
        raise ValueError(f"train.channels_last must be true, false or auto, got {setting!r}")
    return setting


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainingSetup:
    """What one run trains: its data, network, optimiser and loss."""

    data: Data
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn


def build_training(
    cfg: DictConfig, device: torch.device, rank: int = 0, world_size: int = 1
) -> TrainingSetup:
    """The run ``cfg`` as training builds it, as process ``rank`` of ``world_size``: seeded
    with ``cfg.seed`` first, so one config gives the same initial weights wherever it is
    built (training, the tests, the record scripts in ``results/``); the model on ``device``,
    NHWC where ``train.channels_last`` says."""
    seed_everything(cfg.seed)
    data = build_data(cfg.data, device, cfg.seed, rank, world_size, model_outputs_contours(cfg))
    model = build_model(cfg, data.num_classes).to(device)
    if use_channels_last(cfg.train.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    weights = None if data.class_weights is None else data.class_weights.to(device)
    return TrainingSetup(
        data, model, build_optimizer(cfg.optim, model), build_loss(cfg.loss, weights)
    )


# Settings that may change between a run and its resumption without changing the run.
RESUMABLE_CHANGES = (
    "device",
    "logger",
    "train.progress",
    "train.resume",
    "train.compile",
    "train.cuda_graph",
    "train.channels_last",
    "train.cudnn_benchmark",
)

# Why two runs of other settings can meet in one directory, and what to do about it
SWEEP_HINT = (
    "run names carry the model, norm, dataset, batch, lr, seed and epochs, so a sweep over any "
    "other setting needs one hydra.sweep.dir per value"
)

# Settings added since runs were first made, with the value every earlier run had: a saved
# config.yaml without one reads as having it, so those runs are still resumed and skipped.
ADDED_SETTINGS = {"optim.mean_scale_lr_mult": 1.0}

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """The signal that asked training to stop, once one has."""

    signum: int | None = None

    def is_set(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """While inside, SIGTERM and SIGINT are recorded in the yielded request instead of killing
    the process, so training can checkpoint and return (a SLURM preemption, a ``kill``,
    Ctrl-C)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers can only be installed from the main thread
        return

    def handler(signum: int, frame: object) -> None:
        log.info(f"{signal.Signals(signum).name}: checkpointing, then stopping")
        request.signum = signum

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_settings(a: dict, b: dict) -> dict[str, tuple]:
    """The keys of two resolved configs whose values differ, each with (value in ``a``,
    value in ``b``), leaving out those that may change without changing the run
    (``RESUMABLE_CHANGES``)."""
    a, b = _flatten(a), _flatten(b)
    return {
        key: (a.get(key), b.get(key))
        for key in sorted(a.keys() | b.keys())
        if a.get(key) != b.get(key)
        and not any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)
    }


def check_settings(cfg: DictConfig) -> None:
    """The settings that training reads only once it has started, checked before the run's
    directory is touched, so that a run refused for them leaves no config.yaml there."""
    if not is_whole_number(cfg.epochs, 1):
        raise ValueError(f"epochs must be a positive integer, got {cfg.epochs!r}")
    # NumPy's generator, which seed_everything seeds too, takes 32 bits
    if not is_whole_number(cfg.seed, 0, below=2**32):
        raise ValueError(f"seed must be an integer from 0 to 2**32 - 1, got {cfg.seed!r}")
    for name in ("train.progress", "train.resume", "train.cudnn_benchmark", "norm.sync"):
        true_or_false(name, OmegaConf.select(cfg, name))
    check_precision(cfg.train.precision)
    check_logger_settings(cfg.logger)
    optim = cfg.optim
    check_sgd_settings(optim.lr, optim.momentum, optim.weight_decay, optim.mean_scale_lr_mult)
    check_cuda_graph(cfg)


def check_same_run(run_dir: Path, resolved: dict) -> None:
    """Refuse to resume or skip a run whose directory holds a run of other settings. One
    that never finished an epoch or saved a checkpoint (it failed as it started) holds
    nothing to keep, and is trained afresh."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    if not (run_dir / "last.pt").is_file() and not (run_dir / "summary.json").is_file():
        return
    saved = {**ADDED_SETTINGS, **_flatten(OmegaConf.to_container(OmegaConf.load(saved_path)))}
    differ = differing_settings(saved, resolved)
    if differ:
        raise ValueError(
            f"{saved_path}: this directory holds a run with other settings (saved, now: "
            f"{differ}); choose another output directory (hydra.run.dir=..., or "
            f"hydra.sweep.dir=... in a sweep: {SWEEP_HINT}) or start over with "
            "train.resume=false"
        )


def train(cfg: DictConfig, output_dir: Path | str) -> dict:
    """Train one configuration into ``output_dir``; returns its summary.

    With ``train.resume`` a finished run is returned as it is and an unfinished one goes
    on from ``last.pt``. SIGTERM or SIGINT checkpoints mid-epoch and returns with status
    ``interrupted``. Under ``torchrun`` the processes share the run (DDP); rank 0 alone
    writes. A run directory that another process is training (a sweep launched twice, a
    requeued job whose first copy still runs) is left alone: status ``busy``.
    """
    if not logging.getLogger().handlers:  # called outside Hydra, which sets logging up
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_settings(cfg)
    run_dir = Path(output_dir)
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 holds the lock for all processes
        return _train(cfg, run_dir)
    with exclusive_lock(run_dir / ".lock", wait=False) as free:
        if not free:
            log.warning(f"{run_dir}: another process is training this run; leaving it alone")
            return {"status": "busy", "run_dir": str(run_dir)}
        return _train(cfg, run_dir)


def _train(cfg: DictConfig, run_dir: Path) -> dict:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    previous = None  # the summary of the run this one goes on from
    if cfg.train.resume:
        check_same_run(run_dir, resolved)
        previous = read_json(run_dir / "summary.json")
        if previous and previous["status"] in ("finished", "diverged"):
            log.info(f"{run_dir}: already {previous['status']}, nothing to do")
            return previous

    torch.backends.cudnn.benchmark = bool(cfg.train.cudnn_benchmark)
    use_float32_arithmetic(cfg.train.precision)
    place, device = init_distributed(resolve_device(cfg.device))
    if not place.is_main:  # one process speaks for the run
        log.setLevel(logging.WARNING)
    if place.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ensure_cache(cfg.data)  # once, before the other processes read it
    if place.enabled:
        torch.distributed.barrier()
    setup = build_training(cfg, device, place.rank, place.world_size)
    data, model, optimizer, loss_fn = setup.data, setup.model, setup.optimizer, setup.loss_fn

    start_epoch, history, best = 0, [], {"val_pixel_error": math.inf, "epoch": None}
    trained_by: list[str] = []  # the code versions that trained the run before this start
    running = None  # the partial sums of an epoch interrupted midway
    last, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if cfg.train.resume and last.is_file():
        state = load_checkpoint(last, model, optimizer, data.train, device)
        start_epoch, history, best = state["epoch"], state["history"], state["best"]
        running = state.get("running")
        trained_by = (previous or {}).get("code", [CODE_BEFORE])
        where = f" and {state['loader']['position']} steps" if running else ""
        log.info(f"resuming {run_dir} after epoch {start_epoch}{where}")
    model = wrap_model(model, place, cfg.norm.sync)
    net = unwrap(model)  # the network itself: checkpoints, evaluation, λ
    model = compile_model(model, cfg.train.compile)
    # cfg.train.cuda_graph is a bool: check_settings checked it before the run started
    step = training_step_fn(model, optimizer, loss_fn, cfg.train.precision, cfg.train.cuda_graph)

    samples_per_epoch = data.train.num_samples - data.train.dropped_per_epoch
    facts = _run_facts(cfg, data, place.world_size, device, net, trained_by)
    if data.train.dropped_per_epoch:
        log.warning(
            f"the last batch of each epoch ({data.train.dropped_per_epoch} samples) cannot give "
            f"each of {place.world_size} processes a sample and is left out"
        )
    logger = RunLogger(run_dir, cfg, history, enabled=place.is_main)
    if place.is_main:
        write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(resolved))
    logger.log_config(facts)
    log.info(
        f"{cfg.run_name}: {facts['num_parameters']:,} parameters, lr {cfg.optim.lr}, batch "
        f"{cfg.data.batch_size} ({facts['batch_size_per_process']} per process x "
        f"{place.world_size}), {data.train.num_samples} train / {facts['val_samples']} val "
        f"images on {device}; outputs in {run_dir}"
    )
    summary = {"status": "running", "run_dir": str(run_dir), **facts}
    with stop_on_signals() as stop:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            started = time.perf_counter()
            stats = train_one_epoch(
                model, data.train, optimizer, loss_fn, cfg.train.precision,
                cfg.train.progress and place.is_main, f"epoch {epoch}/{cfg.epochs}",
                stop=stop.is_set, running=running, step=step,
            )  # fmt: skip
            running = None
            if stats.get("interrupted"):
                state = {"epoch": epoch - 1, "history": logger.history, "best": best,
                         "config": resolved, "running": stats["running"]}  # fmt: skip
                if place.is_main:
                    save_checkpoint(last, net, state, optimizer, data.train)
                log.info(f"stopped in epoch {epoch}; the same command resumes from {last}")
                summary.update(status="interrupted", signal=stop.signum)
                break
            if not math.isfinite(stats["train_loss"]):
                log.info(f"epoch {epoch}: loss is {stats['train_loss']}, run diverged")
                summary.update(status="diverged", diverged_epoch=epoch)
                break
            broadcast_buffers(model)
            metrics, iou = evaluate(net, data.val, loss_fn, data.num_classes, cfg.train.precision)
            row = {
                "epoch": epoch,
                "samples_seen": epoch * samples_per_epoch,
                **stats,
                **metrics,
                **{f"iou_{name}": float(v) for name, v in zip(data.class_names, iou, strict=True)},
                **{f"lambda_{depth:02d}": v for depth, v in enumerate(agc_mean_scales(net), 1)},
                "lr": cfg.optim.lr,
                "seconds": time.perf_counter() - started,
            }
            logger.log_epoch(row)
            if metrics["val_pixel_error"] < best["val_pixel_error"]:
                best = {"val_pixel_error": metrics["val_pixel_error"], "epoch": epoch}
            state = {"epoch": epoch, "history": logger.history, "best": best, "config": resolved}
            if place.is_main:
                save_checkpoint(last, net, state, optimizer, data.train)
                if best["epoch"] == epoch:  # weights only: best.pt evaluates, last.pt resumes
                    save_checkpoint(best_path, net, state)
            log.info(
                f"epoch {epoch:3d}/{cfg.epochs}  train loss {stats['train_loss']:.4f}  val loss "
                f"{metrics['val_loss']:.4f}  val pixel error {metrics['val_pixel_error']:.4f}  "
                f"mIoU {metrics['val_miou']:.4f}  ({row['seconds']:.1f} s)"
            )
            summary.update(_results(logger.history, best))
            logger.write_summary(summary)
            if epoch < cfg.epochs and any_process(stop.is_set(), device):  # during validation
                log.info(f"stopped after epoch {epoch}; the same command resumes from {last}")
                summary.update(status="interrupted", signal=stop.signum)
                break
        else:
            summary["status"] = "finished"
    summary.update(_results(logger.history, best))
    logger.write_summary(summary)
    return summary


def _run_facts(
    cfg: DictConfig,
    data: Data,
    world_size: int,
    device: torch.device,
    net: torch.nn.Module,
    trained_by: list[str],
) -> dict:
    """What a run's summary records beside its config: the resolved lr and batch split, the
    sizes, the class weights, where it ran, whether its float32 products ran in TF32
    (``use_float32_arithmetic``; runs of code before it say nothing, and ran cuDNN's
    convolutions in TF32 on GPUs that have it), and the code that trained it: the versions
    ``trained_by`` (the starts before this one) and this start's (``code_version``), in the
    order they trained, a start under the same code as the one before adding none."""
    now = code_version()
    return {
        "lr": cfg.optim.lr,
        "batch_size": cfg.data.batch_size,
        "batch_size_per_process": cfg.data.batch_size // world_size,
        "world_size": world_size,
        "num_parameters": sum(p.numel() for p in net.parameters()),
        "train_samples": data.train.num_samples,
        "val_samples": data.val_samples,
        "class_weights": None if data.class_weights is None else data.class_weights.tolist(),
        "device": str(device),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "torch": torch.__version__,
        "tf32": torch.backends.cudnn.allow_tf32,
        "code": trained_by if trained_by[-1:] == [now] else [*trained_by, now],
    }


def _results(history: list[dict], best: dict) -> dict:
    if not history:
        return {"epochs_completed": 0}
    final = history[-1]
    return {
        "epochs_completed": final["epoch"],
        "samples_seen": final["samples_seen"],
        "final_val_pixel_error": final["val_pixel_error"],
        "final_val_loss": final["val_loss"],
        "final_val_miou": final["val_miou"],
        "best_val_pixel_error": best["val_pixel_error"],
        "best_epoch": best["epoch"],
    }


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    summary = train(cfg, HydraConfig.get().runtime.output_dir)
    if summary["status"] == "interrupted":  # a stopped sweep must not start its next run
        sys.exit(128 + (summary.get("signal") or signal.SIGTERM))


if __name__ == "__main__":
    # `python -m deepcontrol.train`: run the imported module's main, not this __main__ copy,
    # so that the SLURM launcher (submitit, cloudpickle) pickles the task by reference.
    from deepcontrol.train import main as imported_main

    imported_main()

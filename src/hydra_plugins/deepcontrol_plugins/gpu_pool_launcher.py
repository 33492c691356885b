"""``hydra/launcher=gpu_pool``: a sweep's runs spread over the GPUs of one machine.

One worker per GPU takes the next run whenever its GPU is free and trains it in a child
process that sees only that GPU (``CUDA_VISIBLE_DEVICES``), so N GPUs work through a sweep
about N times as fast as one. Each child is ``python -m deepcontrol.train OVERRIDES
hydra.run.dir=RUN_DIR``; its output goes to ``RUN_DIR/launcher.log``. A failed run does not
stop the others.
"""

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class GpuPoolLauncherConf:
    _target_: str = "hydra_plugins.deepcontrol_plugins.gpu_pool_launcher.GpuPoolLauncher"
    # CUDA device ids to use, one run on each at a time; null: every visible GPU
    gpus: Optional[List[str]] = None


ConfigStore.instance().store(
    group="hydra/launcher", name="gpu_pool", node=GpuPoolLauncherConf, provider="deepcontrol"
)


def visible_gpus() -> list[str]:
    """The CUDA device ids this process may use."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class GpuPoolLauncher(Launcher):
    def __init__(self, gpus: list[str] | None = None) -> None:
        self.gpus = None if gpus is None else [str(g) for g in gpus]
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        gpus = visible_gpus() if self.gpus is None else self.gpus
        if not gpus:
            log.warning("gpu_pool: no GPU is visible; the runs go one at a time")
            gpus = [None]
        log.info(f"gpu_pool: {len(job_overrides)} runs over GPUs {gpus}")
        todo: queue.Queue = queue.Queue()
        for idx, overrides in enumerate(job_overrides):
            todo.put((idx, list(overrides)))
        returns: list[Optional[JobReturn]] = [None] * len(job_overrides)
        stopping = threading.Event()  # a run was interrupted (Ctrl-C, SIGTERM): start no more

        def worker(gpu: Optional[str]) -> None:
            while not stopping.is_set():
                try:
                    idx, overrides = todo.get_nowait()
                except queue.Empty:
                    return
                returns[idx], code = self._run(initial_job_idx + idx, overrides, gpu)
                if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # the run was stopped
                    stopping.set()

        threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in gpus]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        except KeyboardInterrupt:  # the children got the SIGINT too and are checkpointing
            stopping.set()
            for thread in threads:
                thread.join()
            raise
        for idx, overrides in enumerate(job_overrides):
            if returns[idx] is None:
                not_started = RuntimeError("not started: the sweep was interrupted")
                returns[idx] = JobReturn(list(overrides), status=JobStatus.FAILED,
                                         _return_value=not_started)  # fmt: skip
        return returns

    def _run(self, idx: int, overrides: list[str], gpu: str | None) -> tuple[JobReturn, int]:
        """Train one run in a child process on ``gpu``; its JobReturn and exit code."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        run_dir = Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)
        run_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        command = [sys.executable, "-m", "deepcontrol.train", *overrides,
                   f"hydra.run.dir={run_dir}"]  # fmt: skip
        shown = " ".join(filter_overrides(overrides))
        log.info(f"#{idx} on GPU {gpu}: {shown}")
        with open(run_dir / "launcher.log", "a") as out:
            code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        log.info(f"#{idx} on GPU {gpu}: exit {code}, {run_dir}")
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        result = JobReturn(overrides=overrides, cfg=task, hydra_cfg=cfg, working_dir=str(run_dir),
                           task_name="train", status=JobStatus.COMPLETED)  # fmt: skip
        if code != 0:
            result.status = JobStatus.FAILED
            result.return_value = RuntimeError(
                f"{shown} exited with {code}; see {run_dir / 'launcher.log'}"
            )
        return result, code

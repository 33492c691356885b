"""``hydra/sweeper=panels``: the union of several experiments' sweeps, each run once.

Figure 1's panels share runs (panel c is inside a and b); this sweeper expands every listed
experiment (``hydra.sweeper.experiments``), keeps one job per run directory and hands them
all to the launcher at once, so a pool of GPUs works on every run of the figure together.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List

from hydra.core.config_store import ConfigStore
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from deepcontrol.sweeps import distinct_runs, experiment_jobs

log = logging.getLogger(__name__)


@dataclass
class PanelsSweeperConf:
    _target_: str = "hydra_plugins.deepcontrol_plugins.panels_sweeper.PanelsSweeper"
    experiments: List[str] = field(default_factory=list)


ConfigStore.instance().store(
    group="hydra/sweeper", name="panels", node=PanelsSweeperConf, provider="deepcontrol"
)


class PanelsSweeper(Sweeper):
    def __init__(self, experiments: list[str]) -> None:
        if not experiments:
            raise ValueError("hydra.sweeper.experiments: list the experiments to run")
        self.experiments = list(experiments)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Launcher | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def distinct_jobs(self, arguments: list[str]) -> list[list[str]]:
        """Every experiment's jobs, in order, without a second job for the same directory
        (and refused if two of other settings would share one)."""
        assert self.config is not None and self.hydra_context is not None
        jobs = [job for name in self.experiments for job in experiment_jobs(name, arguments)]
        loader = self.hydra_context.config_loader
        return distinct_runs(jobs, lambda job: loader.load_sweep_config(self.config, job))

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        jobs = self.distinct_jobs(arguments)
        log.info(f"{len(jobs)} distinct runs in {', '.join(self.experiments)}")
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns = self.launcher.launch(jobs, initial_job_idx=0)
        failed = [r for r in returns if r.status.name != "COMPLETED"]
        for r in failed:
            log.error(f"failed: {' '.join(r.overrides or [])}: {r._return_value}")
        for r in returns:
            _ = r.return_value  # raises for the first failed run, after all have run
        return [returns]

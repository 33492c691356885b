"""Expanding a sweep into its runs, the way Hydra's basic sweeper does, and checking that
its runs of different settings do not share a run directory.

An experiment config (``configs/experiment/NAME.yaml``) lists its sweep under
``hydra.sweeper.params``. ``experiment_jobs`` turns it, plus command-line overrides, into
one override list per run; the panel sweeper and the figure code share it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from deepcontrol.config import CONFIG_DIR

log = logging.getLogger(__name__)
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def experiment_params(name: str) -> dict[str, str]:
    """``hydra.sweeper.params`` of ``configs/experiment/NAME.yaml``."""
    path = CONFIG_DIR / "experiment" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such experiment config")
    params = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params", default=None)
    if not params:
        raise ValueError(f"{path}: expected a sweep under hydra.sweeper.params")
    return {str(k): str(v) for k, v in params.items()}


def experiment_jobs(name: str, overrides: list[str] | None = None) -> list[list[str]]:
    """One override list per run of experiment ``name``: ``experiment=NAME``, its sweep, then
    ``overrides`` (which win, and may sweep too; any ``experiment=`` among them is dropped)."""
    extra = [o for o in overrides or [] if o.split("=", 1)[0].lstrip("+~") != "experiment"]
    params = [f"{k}={v}" for k, v in experiment_params(name).items()]
    return sweep_jobs([f"experiment={name}", *params, *extra])


def sweep_jobs(arguments: list[str]) -> list[list[str]]:
    """One override list per run of Hydra's basic sweep over ``arguments`` (a later override
    of a key wins)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(arguments)
    [jobs] = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return jobs


def distinct_runs(
    jobs: list[list[str]], load: Callable[[list[str]], DictConfig]
) -> list[list[str]]:
    """``jobs`` less any whose run directory an earlier job of the same settings takes;
    ``load`` composes a job's config, ``hydra`` node included. Two jobs of other settings in
    one directory are refused before any runs: otherwise the first trains, and the second
    is refused by ``check_same_run`` only when it starts, perhaps hours later."""
    from deepcontrol.train import SWEEP_HINT, differing_settings

    kept, taken = [], {}
    for job in jobs:
        cfg = load(job)
        run_dir = str(Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir))
        task = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
        settings = OmegaConf.to_container(task, resolve=True)
        if run_dir not in taken:
            taken[run_dir] = settings
            kept.append(job)
            continue
        differ = differing_settings(taken[run_dir], settings)
        if differ:
            raise ValueError(
                f"{run_dir}: two runs of this sweep would share this directory with other "
                f"settings ({differ}); {SWEEP_HINT}"
            )
        log.info(f"{run_dir}: already in the sweep ({' '.join(job)})")
    return kept


class DistinctRunsCallback(Callback):
    """Checks a basic sweep's runs with :func:`distinct_runs` before the launcher starts any
    (``hydra.callbacks`` in ``configs/config.yaml``); the panel sweeper checks its own."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
            return
        from hydra.core.global_hydra import GlobalHydra

        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        loader = GlobalHydra.instance().config_loader()
        try:
            distinct_runs(sweep_jobs(arguments), lambda job: loader.load_sweep_config(config, job))
        except ValueError as refused:
            # Hydra turns a callback's exception into a warning and goes on; this must stop
            raise SystemExit(f"Error: {refused}") from refused

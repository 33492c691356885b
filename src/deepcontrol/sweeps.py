"""Expanding an experiment's sweep into its runs, the way Hydra's basic sweeper does.

An experiment config (``configs/experiment/NAME.yaml``) lists its sweep under
``hydra.sweeper.params``. ``experiment_jobs`` turns it, plus command-line overrides, into
one override list per run; the panel sweeper and the figure code share it.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from deepcontrol.config import CONFIG_DIR


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
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    extra = [o for o in overrides or [] if o.split("=", 1)[0].lstrip("+~") != "experiment"]
    params = [f"{k}={v}" for k, v in experiment_params(name).items()]
    arguments = [f"experiment={name}", *params, *extra]  # a later override of a key wins
    parsed = OverridesParser.create().parse_overrides(arguments)
    [jobs] = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return jobs

"""Config plumbing: the configs/ folder, the ``mul`` resolver, and composing without Hydra's CLI."""

from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _mul(a: float, b: float) -> float:
    # Rounded so that 0.02 × 8 prints as 0.16 in run names and logs.
    return round(float(a) * float(b), 10)


OmegaConf.register_new_resolver("mul", _mul, replace=True)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config that ``deepcontrol-train OVERRIDES`` would run (Hydra's own node left out)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides or []))

"""Config plumbing: the configs/ folder, the ``mul``, ``norm_label`` and ``lr_label``
resolvers, and composing without Hydra's CLI."""

from __future__ import annotations

import math
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, Node, OmegaConf

from deepcontrol.checks import is_finite_number

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _mul(a: object, b: object, *, _node_: Node) -> float:
    """``${mul:A,B}``, as ``optim.lr = optim.base_lr × data.batch_size``: both must be
    numbers. ``float(True)`` is 1, so ``optim.base_lr=true`` would train at the batch size
    as its lr; the error names the key and the two settings it is made of."""
    if not (is_finite_number(a, -math.inf) and is_finite_number(b, -math.inf)):
        raise ValueError(
            f"{_node_._get_full_key(None)} = {_node_._value()} needs two numbers, "
            f"got {a!r} and {b!r}"
        )
    # Rounded so that 0.02 × 8 prints as 0.16 in run names and logs.
    return round(float(a) * float(b), 10)


# norm.* keys that are not options of the norm layer: the rest (norm.window) are.
NOT_NORM_OPTIONS = ("name", "label", "sync")


def norm_options(norm: DictConfig) -> dict:
    """The ``norm.*`` keys that are the norm layer's keyword arguments (``norm.window``)."""
    return {key: value for key, value in norm.items() if key not in NOT_NORM_OPTIONS}


def norm_label(norm: DictConfig) -> str:
    """What names a run's norm, in ``run_name`` and in results: ``norm.label`` where the norm
    sets one (``agc-window9``), else its name and then every option it is given
    (``norm=agc +norm.mean_scale_init=0`` is ``agc-mean_scale_init0``), so that runs of
    other options never share a run directory."""
    if norm.get("label") is not None:
        return str(norm.label)
    return "-".join([norm.name, *(f"{key}{value}" for key, value in norm_options(norm).items())])


def lr_label(optim: DictConfig) -> str:
    """What names a run's learning rate in ``run_name``: ``lr0.08``, then λ's multiplier
    where it is not the paper's 1 (``lr0.08-mean_scale_lr_mult20``)."""
    mult = optim.mean_scale_lr_mult
    return f"lr{optim.lr}" + ("" if mult == 1 else f"-mean_scale_lr_mult{mult}")


OmegaConf.register_new_resolver("mul", _mul, replace=True)
OmegaConf.register_new_resolver("norm_label", norm_label, replace=True)
OmegaConf.register_new_resolver("lr_label", lr_label, replace=True)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config that ``deepcontrol-train OVERRIDES`` would run (Hydra's own node left out)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides or []))

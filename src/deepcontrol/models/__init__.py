"""Networks of the paper, built from plain arguments; ``build_model`` reads the config."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig
from torch import nn

from deepcontrol.models.segnet import SegNet

MODELS: dict[str, Callable[..., nn.Module]] = {"segnet": SegNet}


def build_model(cfg: DictConfig, num_classes: int) -> nn.Module:
    """The network ``cfg.model.name`` with the norm ``cfg.norm.name`` after every conv."""
    name = cfg.model.name
    if name not in MODELS:
        raise ValueError(f"unknown model.name {name!r}: choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes, norm=cfg.norm.name, init=cfg.model.init)


__all__ = ["MODELS", "SegNet", "build_model"]

"""Networks of the paper, built from plain arguments; ``build_model`` reads the config."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig
from torch import nn

from deepcontrol.models.classnet import ClassNet
from deepcontrol.models.segnet import SegNet

MODELS: dict[str, Callable[..., nn.Module]] = {"segnet": SegNet, "classnet": ClassNet}

# model.* keys that are not arguments of the network.
NOT_ARGUMENTS = ("name", "input_norm")
# Networks whose second output is a contour map, trained against contour targets.
WITH_CONTOURS = ("classnet",)


def _check(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown model.name {name!r}: choose one of {', '.join(sorted(MODELS))}")


def model_outputs_contours(cfg: DictConfig) -> bool:
    _check(cfg.model.name)
    return cfg.model.name in WITH_CONTOURS


def build_model(cfg: DictConfig, num_classes: int) -> nn.Module:
    """The network ``cfg.model.name`` with the norm ``cfg.norm.name`` after every conv; the
    other ``model.*`` keys (but ``input_norm``, which the data reads) are its arguments."""
    _check(cfg.model.name)
    kwargs = {k: v for k, v in cfg.model.items() if k not in NOT_ARGUMENTS}
    return MODELS[cfg.model.name](num_classes=num_classes, norm=cfg.norm.name, **kwargs)


__all__ = ["MODELS", "ClassNet", "SegNet", "build_model", "model_outputs_contours"]

"""Networks of the paper, built from plain arguments; ``build_model`` reads the config."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from deepcontrol.config import norm_options
from deepcontrol.models.classnet import ClassNet
from deepcontrol.models.segnet import SegNet
from deepcontrol.nn import NormFactory, norm_factory

MODELS: dict[str, type[SegNet | ClassNet]] = {"segnet": SegNet, "classnet": ClassNet}

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


def build_norm(norm_cfg: DictConfig) -> NormFactory:
    """The norm ``norm.name`` with the other ``norm.*`` keys as its options (not ``sync``,
    which DDP reads, nor ``label``, which names runs)."""
    return norm_factory(norm_cfg.name, **norm_options(norm_cfg))


def build_model(cfg: DictConfig, num_classes: int) -> nn.Module:
    """The network ``cfg.model.name`` with the norm of ``cfg.norm`` after every conv; the
    other ``model.*`` keys (but ``input_norm``, which the data reads) are its arguments.
    Refused if its poolings cannot take ``data.height`` × ``data.width`` images."""
    _check(cfg.model.name)
    network = MODELS[cfg.model.name]
    if min(cfg.data.height, cfg.data.width) < network.min_input_size:
        raise ValueError(
            f"data.height={cfg.data.height}, data.width={cfg.data.width}: model={cfg.model.name}"
            f" needs at least {network.min_input_size} pixels each way for its poolings"
        )
    kwargs = {k: v for k, v in cfg.model.items() if k not in NOT_ARGUMENTS}
    return network(num_classes=num_classes, norm=build_norm(cfg.norm), **kwargs)


__all__ = ["MODELS", "ClassNet", "SegNet", "build_model", "build_norm", "model_outputs_contours"]

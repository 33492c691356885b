"""Datasets behind one interface: list → prepare (cache, once) → device-resident batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from deepcontrol.checks import check_positive_integers, true_or_false
from deepcontrol.data.class_weights import enet_class_weights
from deepcontrol.data.io import IGNORE_INDEX, DatasetError
from deepcontrol.data.loader import DeviceBatches
from deepcontrol.data.prepare import ensure_cache, prepare_cache
from deepcontrol.data.registry import FORMATS, DatasetFormat, get_format


@dataclass
class Data:
    """What training needs from a dataset: its two loaders, classes and class weights."""

    train: DeviceBatches
    val: DeviceBatches  # this process's part of the validation split
    class_names: tuple[str, ...]
    class_weights: torch.Tensor | None
    val_samples: int  # the whole validation split, over all processes

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def build_data(
    data_cfg: DictConfig,
    device: torch.device,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    contours: bool = False,
) -> Data:
    """Loaders for the data config (built from its cache, which is made if missing); with
    ``contours`` the batches carry contour targets too (ClassNet).

    ``data.batch_size`` is the global batch: with ``world_size`` processes each takes its
    share of every training batch and evaluates every ``world_size``-th validation sample.
    Validation runs ``data.val_batch_size`` images at a time (shared out the same way),
    whatever the training batch: no norm couples samples in evaluation, so it changes the
    speed, not the metrics, and at training batch 1 a forward per image would bound the
    epoch by kernel launches.
    """
    check_positive_integers(data_cfg, ("batch_size", "val_batch_size"), "data.")
    true_or_false("data.hflip", data_cfg.hflip)
    cache_dir, manifest = ensure_cache(data_cfg)
    train_images = manifest["splits"]["train"]["num_images"]
    if data_cfg.batch_size > train_images:
        # every step would train on the whole split, at the lr of the batch asked for
        raise ValueError(
            f"data.batch_size={data_cfg.batch_size} is larger than the training split of "
            f"{cache_dir} ({train_images} images)"
        )
    if data_cfg.input_norm == "mean":
        std = [1.0, 1.0, 1.0]  # pixel units: see configs/data/cityscapes.yaml
    elif data_cfg.input_norm == "standard":
        std = manifest["std"]
    else:
        raise ValueError(
            f"data.input_norm must be 'mean' or 'standard', got {data_cfg.input_norm!r}"
        )
    common = dict(mean=manifest["mean"], std=std, device=device, contours=contours)
    train = DeviceBatches.from_cache(
        cache_dir, "train", batch_size=data_cfg.batch_size, shuffle=True, hflip=data_cfg.hflip,
        seed=seed, rank=rank, world_size=world_size, **common,
    )  # fmt: skip
    per_process = max(1, data_cfg.val_batch_size // world_size)
    val = DeviceBatches.from_cache(
        cache_dir, "val", part=(rank, world_size), batch_size=per_process, **common
    )
    if data_cfg.class_weights == "enet":
        weights = torch.tensor(manifest["enet_class_weights"])
    elif data_cfg.class_weights == "none":
        weights = None
    else:
        raise ValueError(
            f"data.class_weights must be 'enet' or 'none', got {data_cfg.class_weights!r}"
        )
    val_samples = manifest["splits"]["val"]["num_images"]
    return Data(train, val, tuple(manifest["class_names"]), weights, val_samples)


__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "Data",
    "DatasetError",
    "DatasetFormat",
    "DeviceBatches",
    "build_data",
    "enet_class_weights",
    "ensure_cache",
    "get_format",
    "prepare_cache",
]

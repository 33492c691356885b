"""Batches from the prepared cache, held whole on the training device.

The cache is small (Cityscapes train at 256×512 is 1.2 GB as uint8), so it is loaded once
onto the device and batches are gathered, converted and normalised there: no PNG is
decoded and no worker process runs during training.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


class DeviceBatches:
    """Iterates over one cached split in batches of (normalised float images, long labels).

    ``mean`` and ``std`` are per channel, in pixel units (0..255).
    ``shuffle`` draws a new order each epoch from a seeded generator whose state is part
    of ``state_dict`` (for exact resume). ``hflip`` mirrors each sample with probability 1/2.
    The last batch may be smaller, so every sample is seen exactly once per epoch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: list[float],
        std: list[float],
        shuffle: bool = False,
        hflip: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)  # (N, H, W, 3) uint8
        self.labels = labels.to(self.device)  # (N, H, W) uint8
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.hflip = hflip
        self.generator = torch.Generator().manual_seed(seed)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def from_cache(cls, cache_dir: Path, split: str, **kwargs) -> DeviceBatches:
        images = torch.from_numpy(np.load(Path(cache_dir) / f"{split}_images.npy"))
        labels = torch.from_numpy(np.load(Path(cache_dir) / f"{split}_labels.npy"))
        return cls(images, labels, **kwargs)

    @property
    def num_samples(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.num_samples
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        flips = torch.rand(n, generator=self.generator) < 0.5 if self.hflip else None
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            on_device = index.to(self.device)
            # NHWC uint8 -> NCHW float: the permuted view is channels_last, which convs like.
            images = self.images[on_device].permute(0, 3, 1, 2).float()
            images = (images - self.mean) / self.std
            labels = self.labels[on_device].long()
            if flips is not None:
                flip = flips[index].to(self.device)
                images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
                labels = torch.where(flip.view(-1, 1, 1), labels.flip(-1), labels)
            yield images, labels

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

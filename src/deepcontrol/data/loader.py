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
    """Iterates over one cached split in batches of (normalised float images, long labels,
    float contour targets or None when the loader holds no ``contours``).

    ``mean`` and ``std`` are per channel, in pixel units (0..255).
    ``shuffle`` draws a new order each epoch from a seeded generator. ``hflip`` mirrors each
    sample with probability 1/2. The last batch may be smaller, so every sample is seen
    exactly once per epoch. ``state_dict`` holds the generator as it was when the epoch
    began and the batches consumed since, so a run stopped mid-epoch resumes on the very
    next batch.

    Under DistributedDataParallel each of ``world_size`` processes draws the same global
    batch of ``batch_size`` and keeps its ``rank``-th share, so the optimiser sees the same
    samples per step as a single process would. A last batch too small to give every
    process a sample is left out (``dropped_per_epoch`` says how many samples).
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
        rank: int = 0,
        world_size: int = 1,
        contours: torch.Tensor | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1, got {batch_size}")
        if batch_size % world_size:
            raise ValueError(
                f"data.batch_size={batch_size} is the global batch and must divide among "
                f"{world_size} processes"
            )
        self.device = torch.device(device)
        self.images = images.to(self.device)  # (N, H, W, 3) uint8
        self.labels = labels.to(self.device)  # (N, H, W) uint8
        self.contours = None if contours is None else contours.to(self.device)  # (N, H, W)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.hflip = hflip
        self.generator = torch.Generator().manual_seed(seed)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.rank, self.world_size = rank, world_size
        self._resume_at = 0  # batches of the current epoch already consumed (after a resume)
        self._epoch = None  # (generator state at the epoch's start, batches consumed)

    @classmethod
    def from_cache(
        cls,
        cache_dir: Path,
        split: str,
        part: tuple[int, int] = (0, 1),
        contours: bool = False,
        **kwargs,
    ) -> DeviceBatches:
        """The cached ``split`` (with its contour targets if ``contours``); ``part=(i, n)``
        keeps every n-th sample from the i-th, so n processes evaluating their parts see each
        sample exactly once."""
        i, n = part

        def load(name: str) -> torch.Tensor:
            array = np.load(Path(cache_dir) / f"{split}_{name}.npy", mmap_mode="r")[i::n]
            return torch.from_numpy(np.array(array))

        extra = {"contours": load("contours")} if contours else {}
        return cls(load("images"), load("labels"), **extra, **kwargs)

    @property
    def num_samples(self) -> int:
        return len(self.images)

    @property
    def dropped_per_epoch(self) -> int:
        last = self.num_samples % self.batch_size
        return last if 0 < last < self.world_size else 0

    def __len__(self) -> int:
        return -(-(self.num_samples - self.dropped_per_epoch) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        n, start_state = self.num_samples, self.generator.get_state()
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        flips = torch.rand(n, generator=self.generator) < 0.5 if self.hflip else None
        # Copied to the device once per epoch: a copy per step from pageable host memory
        # would make the host wait for the GPU at every step.
        order = order.to(self.device)
        flips = None if flips is None else flips.to(self.device)
        skip, self._resume_at = self._resume_at, 0
        for step in range(skip, len(self)):
            index = order[step * self.batch_size : (step + 1) * self.batch_size]
            index = index.tensor_split(self.world_size)[self.rank]
            self._epoch = (start_state, step + 1)
            # NHWC uint8 -> NCHW float: the permuted view is channels_last, which convs like.
            images = self.images[index].permute(0, 3, 1, 2).float()
            images = (images - self.mean) / self.std
            labels = self.labels[index].long()
            contours = None if self.contours is None else self.contours[index].float()
            if flips is not None:
                flip = flips[index]
                images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
                labels = torch.where(flip.view(-1, 1, 1), labels.flip(-1), labels)
                if contours is not None:
                    contours = torch.where(flip.view(-1, 1, 1), contours.flip(-1), contours)
            yield images, labels, contours
        self._epoch = None

    @property
    def position(self) -> int:
        """Batches of the current epoch consumed so far (0 between epochs)."""
        return 0 if self._epoch is None else self._epoch[1]

    def state_dict(self) -> dict:
        if self._epoch is None:
            return {"generator": self.generator.get_state(), "position": 0}
        start_state, position = self._epoch
        return {"generator": start_state, "position": position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._resume_at = state.get("position", 0)

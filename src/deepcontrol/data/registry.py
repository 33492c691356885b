"""One registry of dataset formats: how to list a split and map its labels to train ids."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepcontrol.data import camvid, cityscapes


@dataclass(frozen=True)
class DatasetFormat:
    """A layout on disk: its classes, how to list a split, and raw label value → train id."""

    name: str
    class_names: tuple[str, ...]
    list_pairs: Callable[[Path, str], list[tuple[Path, Path]]]
    label_lut: Callable[[], np.ndarray]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


FORMATS: dict[str, DatasetFormat] = {
    "cityscapes": DatasetFormat(
        "cityscapes", cityscapes.CLASS_NAMES, cityscapes.list_pairs, cityscapes.label_lut
    ),
    "camvid": DatasetFormat("camvid", camvid.CLASS_NAMES, camvid.list_pairs, camvid.label_lut),
}


def get_format(name: str) -> DatasetFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown data.format {name!r}: choose one of {', '.join(FORMATS)}")
    return FORMATS[name]

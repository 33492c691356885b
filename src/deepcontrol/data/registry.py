"""One registry of dataset formats: how to list a split and map its labels to train ids."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepcontrol.data import camvid, cityscapes


@dataclass(frozen=True)
class DatasetFormat:
    """A layout on disk: its classes, how to list a split, raw label value → train id, and
    where a label's instance map is (None where the dataset has none)."""

    name: str
    class_names: tuple[str, ...]
    list_pairs: Callable[[Path, str], list[tuple[Path, Path]]]
    label_lut: Callable[[], np.ndarray]
    instance_path: Callable[[Path], Path | None] = lambda label: None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


FORMATS: dict[str, DatasetFormat] = {
    "cityscapes": DatasetFormat(
        "cityscapes",
        cityscapes.CLASS_NAMES,
        cityscapes.list_pairs,
        cityscapes.label_lut,
        cityscapes.instance_path,
    ),
    "camvid": DatasetFormat("camvid", camvid.CLASS_NAMES, camvid.list_pairs, camvid.label_lut),
}


def get_format(name: str) -> DatasetFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown data.format {name!r}: choose one of {', '.join(FORMATS)}")
    return FORMATS[name]

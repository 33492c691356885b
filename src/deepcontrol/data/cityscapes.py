"""Cityscapes fine annotations in the official layout; 19 train classes, ignore 255."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as _cs_labels

from deepcontrol.data.io import IGNORE_INDEX, INVALID, DatasetError

CLASS_NAMES: tuple[str, ...] = tuple(
    lab.name for lab in sorted(_cs_labels, key=lambda lab: lab.trainId) if 0 <= lab.trainId < 255
)

LAYOUT = (
    "<root>/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png and "
    "<root>/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png"
)

HOW_TO_GET = (
    "Register at https://www.cityscapes-dataset.com, then `csDownload gtFine_trainvaltest.zip "
    "leftImg8bit_trainvaltest.zip`, unzip both into one folder, point CITYSCAPES_DATASET (or "
    "data.root) at it and run `deepcontrol-prepare data=cityscapes` once."
)


def label_lut() -> np.ndarray:
    """Cityscapes label id (0..33) to train id, via cityscapesscripts; other values invalid."""
    lut = np.full(256, INVALID, dtype=np.int16)
    for lab in _cs_labels:
        if lab.id >= 0:
            lut[lab.id] = lab.trainId if 0 <= lab.trainId < 255 else IGNORE_INDEX
    return lut


def list_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Every (image, labelIds) pair of ``split``, sorted; errors name what is missing."""
    if not root.is_dir():
        raise DatasetError(
            f"Cityscapes root {root} does not exist. Expected {LAYOUT}. {HOW_TO_GET}"
        )
    image_dir = root / "leftImg8bit" / split
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DatasetError(
            f"{image_dir}: no images of split {split!r}; expected "
            f"{image_dir}/<city>/<name>_leftImg8bit.png (layout: {LAYOUT})"
        )
    pairs = []
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        label = root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelIds.png"
        if not label.is_file():
            raise DatasetError(f"{image}: its label {label} is missing")
        pairs.append((image, label))
    return pairs


def instance_path(label: Path) -> Path | None:
    """The ``*_gtFine_instanceIds.png`` beside a ``*_gtFine_labelIds.png``, if it exists."""
    path = label.with_name(label.name.replace("_gtFine_labelIds.png", "_gtFine_instanceIds.png"))
    return path if path.is_file() else None

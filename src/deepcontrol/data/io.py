"""Reading images and label maps, with errors that name the file and what was expected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IGNORE_INDEX = 255
INVALID = -1  # marks label values outside a dataset's label set in a lookup table


class DatasetError(ValueError):
    """A dataset on disk is missing, incomplete or malformed; the message says where and why."""


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: file not found") from e
    except OSError as e:  # PIL raises UnidentifiedImageError (an OSError) or OSError on truncation
        raise DatasetError(f"{path}: cannot decode image ({e}); expected a valid PNG/JPEG") from e
    return image


def read_rgb(path: Path) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB."""
    return np.asarray(_open(path).convert("RGB"))


def read_label_map(path: Path) -> np.ndarray:
    """A single-channel label map as (H, W) integers, exactly as stored."""
    image = _open(path)
    if image.mode not in ("L", "P", "I", "I;16"):
        raise DatasetError(
            f"{path}: label map has mode {image.mode!r}; expected one channel of class ids (L)"
        )
    return np.asarray(image)


def map_labels(raw: np.ndarray, lut: np.ndarray, path: Path) -> np.ndarray:
    """Raw label values to train ids (``IGNORE_INDEX`` for ignored) through ``lut``.

    Values that ``lut`` marks ``INVALID`` or that lie beyond it stop with an error naming
    ``path``, the offending values and the expected label set.
    """
    values = np.unique(raw)
    known = (values >= 0) & (values < len(lut))
    known[known] = lut[values[known]] != INVALID
    bad = values[~known]
    if bad.size:
        expected = np.flatnonzero(lut != INVALID)
        raise DatasetError(
            f"{path}: label values {sorted(bad.tolist())} are outside the label set "
            f"(expected values in {expected.min()}..{expected.max()}: {expected.tolist()})"
        )
    return lut[raw].astype(np.uint8)

"""Synthetic street scenes written in the exact Cityscapes layout.

Stands in for Cityscapes (which needs an account) so that the real Cityscapes code path
(listing, label-id mapping, resizing, caching) runs in demos and tests with no download.
Each frame is a random street: sky, buildings, vegetation, road, sidewalk, poles with
signs, cars and people, a strip of ego vehicle (ignored) at the bottom; images are
class colours with per-frame lighting, texture and noise. Labels are Cityscapes label
ids; instanceIds follow Cityscapes (``id*1000 + k`` for cars and people).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from deepcontrol.atomic import atomic_dir
from deepcontrol.checks import integer_from
from deepcontrol.data.io import DatasetError

# Cityscapes label ids used by the generator, and a base colour for each (RGB).
SKY, ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, PERSON, CAR, EGO = (
    23, 7, 8, 11, 17, 20, 21, 24, 26, 1,
)  # fmt: skip
COLOURS = {
    SKY: (110, 150, 200), ROAD: (100, 90, 100), SIDEWALK: (170, 120, 160),
    BUILDING: (90, 80, 70), POLE: (140, 140, 140), SIGN: (220, 200, 40),
    VEGETATION: (80, 130, 50), PERSON: (200, 40, 60), CAR: (30, 40, 130), EGO: (20, 20, 20),
}  # fmt: skip
CITIES = {"train": ("aachen", "bremen", "jena"), "val": ("lindau",)}
SETTINGS = "synthetic.json"  # in the dataset's root: the settings it was written with


def street_scene(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random frame: (RGB uint8 image, labelIds uint8, instanceIds uint16)."""
    labels = np.full((height, width), SKY, np.uint8)
    instances = np.zeros((height, width), np.uint16)
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    horizon = int(height * rng.uniform(0.38, 0.55))

    x = 0
    while x < width:  # a row of buildings with random heights
        w = int(width * rng.uniform(0.08, 0.25))
        top = int(horizon * rng.uniform(0.05, 0.7))
        labels[top:horizon, x : x + w] = BUILDING
        x += w + int(width * rng.uniform(0.0, 0.06))
    for _ in range(rng.integers(1, 4)):  # trees in front of the buildings
        cy, cx = horizon * rng.uniform(0.5, 0.95), width * rng.uniform(0, 1)
        ry, rx = height * rng.uniform(0.06, 0.15), width * rng.uniform(0.03, 0.1)
        labels[((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 < 1] = VEGETATION

    vanish = width * rng.uniform(0.35, 0.65)  # road widens from the vanishing point
    spread = rng.uniform(0.9, 1.6) * (rows - horizon)
    below = rows >= horizon
    labels[np.broadcast_to(below, labels.shape)] = SIDEWALK
    labels[below & (np.abs(cols - vanish) < spread)] = ROAD

    for _ in range(rng.integers(1, 4)):  # poles with a sign on top
        px = int(width * rng.uniform(0.02, 0.98))
        base = int(horizon + (height - horizon) * rng.uniform(0.05, 0.3))
        top = int(horizon * rng.uniform(0.2, 0.6))
        pw = max(1, width // 120)
        labels[top:base, px : px + pw] = POLE
        s = max(2, width // 50)
        labels[top : top + s, max(0, px - s // 2) : px + s] = SIGN

    things = [(CAR, rng.integers(1, 5)), (PERSON, rng.integers(0, 4))]
    for cls, count in things:
        for k in range(count):
            y1 = int(horizon + (height - horizon) * rng.uniform(0.1, 0.7))
            scale = (y1 - horizon) / max(1, height - horizon) + 0.2
            h = int(height * (0.12 if cls == CAR else 0.16) * scale)
            w = int(width * (0.12 if cls == CAR else 0.025) * scale)
            x1 = int(width * rng.uniform(0, 0.95))
            region = (slice(max(0, y1 - h), y1), slice(x1, x1 + max(1, w)))
            labels[region] = cls
            instances[region] = cls * 1000 + k

    ego = int(height * rng.uniform(0.04, 0.08))
    labels[height - ego :] = EGO
    instances = np.where(instances > 0, instances, labels).astype(np.uint16)

    # Appearance: class colour, per-frame lighting, a vertical gradient, texture and noise.
    palette = np.zeros((256, 3), np.float32)
    for cls, colour in COLOURS.items():
        palette[cls] = np.clip(np.array(colour) + rng.normal(0, 15, 3), 0, 255)
    image = palette[labels] * rng.uniform(0.7, 1.2)
    image += (rows / height * rng.uniform(-30, 30))[..., None]
    windows = ((rows // 6) % 2 == 0) & ((cols // 5) % 2 == 0) & (labels == BUILDING)
    image[windows] += 35
    image += rng.normal(0, 18, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels, instances


def write_synthetic_cityscapes(
    root: Path | str,
    num_train: int = 48,
    num_val: int = 16,
    height: int = 256,
    width: int = 512,
    seed: int = 0,
) -> Path:
    """Write a synthetic Cityscapes-layout dataset under ``root`` and return ``root``.

    Written to a temporary sibling and renamed, so a half-written dataset never exists. The
    settings go into ``root/synthetic.json``, which :func:`check_synthetic_root` reads.
    """
    root = Path(root)
    settings = {"num_train": num_train, "num_val": num_val, "height": height, "width": width,
                "seed": seed}  # fmt: skip
    rng = np.random.default_rng(seed)
    # replace=False: if another process wrote it meanwhile, its copy is identical.
    with atomic_dir(root, replace=False) as tmp:
        for split, count in (("train", num_train), ("val", num_val)):
            cities = CITIES[split]
            for i in range(count):
                city = cities[i % len(cities)]
                stem = f"{city}_{i // len(cities):06d}_000019"
                image, labels, instances = street_scene(rng, height, width)
                image_dir = tmp / "leftImg8bit" / split / city
                label_dir = tmp / "gtFine" / split / city
                image_dir.mkdir(parents=True, exist_ok=True)
                label_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(image_dir / f"{stem}_leftImg8bit.png")
                Image.fromarray(labels).save(label_dir / f"{stem}_gtFine_labelIds.png")
                Image.fromarray(instances).save(label_dir / f"{stem}_gtFine_instanceIds.png")
        (tmp / "README.md").write_text(
            f"Synthetic street scenes in the Cityscapes layout, written by "
            f"deepcontrol.data.synthetic (seed {seed}, {num_train} train, {num_val} val, "
            f"{width}x{height}). Not real data.\n"
        )
        (tmp / SETTINGS).write_text(json.dumps(settings, indent=1) + "\n")
    return root


def check_synthetic_root(root: Path | str, settings: Mapping[str, int]) -> None:
    """Refuse a synthetic dataset at ``root`` that was not written with ``settings`` (the
    keyword arguments of :func:`write_synthetic_cityscapes`, as ``data.synthetic`` gives
    them). Otherwise a run would train on other data than its config records."""
    root = Path(root)
    path = root / SETTINGS
    if not path.is_file():
        raise DatasetError(
            f"{path} not found: {root} does not record the settings it was written with (it "
            "was written before they were recorded, or not by deepcontrol.data.synthetic), so "
            f"data.synthetic cannot be checked against it; remove {root} and the caches made "
            "from it (data.cache_dir) to have it written anew, or choose another data.root"
        )
    written = json.loads(path.read_text())
    stale = {key: (written.get(key), settings.get(key))
             for key in sorted(written.keys() | settings.keys())
             if written.get(key) != settings.get(key)}  # fmt: skip
    if stale:
        raise DatasetError(
            f"{path}: this synthetic dataset was written with other settings than "
            f"data.synthetic asks for (written, wanted: {stale}); choose another data.root "
            f"and data.cache_dir for these settings, or remove {root} and the caches made "
            "from it (data.cache_dir) to have it written anew"
        )


def main(argv: list[str] | None = None) -> None:
    """``deepcontrol-synthetic ROOT``: write the synthetic dataset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    positive, natural = integer_from(1), integer_from(0)
    parser.add_argument("--num-train", type=positive, default=48)
    parser.add_argument("--num-val", type=positive, default=16)
    parser.add_argument("--height", type=positive, default=256)
    parser.add_argument("--width", type=positive, default=512)
    parser.add_argument("--seed", type=natural, default=0)
    args = parser.parse_args(argv)
    if args.root.exists():
        parser.error(f"{args.root} already exists; remove it first to write a new dataset")
    write_synthetic_cityscapes(
        args.root, args.num_train, args.num_val, args.height, args.width, args.seed
    )
    print(f"wrote synthetic Cityscapes to {args.root}")


if __name__ == "__main__":
    main()

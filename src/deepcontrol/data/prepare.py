"""Decode, map and resize a dataset once into a cache that training reads (§3: 256×512).

Decoding 2048×1024 PNGs is the bottleneck of Cityscapes training, so it is done once:
``<cache_dir>/{train,val}_{images,labels,contours}.npy`` hold uint8 images (N, H, W, 3),
train-id labels (N, H, W) and contour targets (N, H, W; 1 on instance boundaries, for
ClassNet) at the training size, and ``manifest.json`` the source, the per-class pixel counts
of the training split, the ENet class weights, the image mean and std, and whether the
contours come from instance maps or, where a dataset has none, from class boundaries.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from deepcontrol.atomic import atomic_dir
from deepcontrol.checks import check_positive_integers, is_whole_number
from deepcontrol.data import cityscapes
from deepcontrol.data.class_weights import enet_class_weights
from deepcontrol.data.io import IGNORE_INDEX, DatasetError, map_labels, read_label_map, read_rgb
from deepcontrol.data.registry import DatasetFormat, get_format
from deepcontrol.data.synthetic import check_synthetic_root, write_synthetic_cityscapes
from deepcontrol.locks import exclusive_lock

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
MANIFEST = "manifest.json"
CACHE_VERSION = 2  # 2: contour targets


def load_pair(
    image_path: Path,
    label_path: Path,
    lut: np.ndarray,
    height: int,
    width: int,
    instance_path: Path | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (image, train-id label, contour target) triple at ``height``×``width``.

    Images are resized bilinearly with antialiasing (Pillow's resize filters over the
    whole footprint when shrinking), labels and instance maps by nearest neighbour. The
    contours are drawn at the training size from the instance map when there is one, else
    from the labels (``contour_target``).
    """
    image = read_rgb(image_path)
    labels = map_labels(read_label_map(label_path), lut, label_path)
    instances = None if instance_path is None else read_label_map(instance_path)
    for other, path in ((labels, label_path), (instances, instance_path)):
        if other is not None and image.shape[:2] != other.shape:  # label or instance map
            raise DatasetError(
                f"{path}: label is {other.shape[1]}x{other.shape[0]} but its image "
                f"{image_path} is {image.shape[1]}x{image.shape[0]}; expected the same size"
            )
    if image.shape[:2] != (height, width):
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
        labels = np.asarray(Image.fromarray(labels).resize((width, height), Image.NEAREST))
        if instances is not None:
            instances = np.asarray(
                Image.fromarray(instances).resize((width, height), Image.NEAREST)
            )
    return image, labels, contour_target(labels, instances)


def contour_target(labels: np.ndarray, instances: np.ndarray | None = None) -> np.ndarray:
    """1 where a pixel's right or lower neighbour belongs to another instance or class.

    Both pixels of such a pair are marked, so a boundary is two pixels wide. Pairs that
    touch an ignored pixel are not boundaries: what lies under the ignore label is unknown.
    """
    region = labels.astype(np.int64)
    if instances is not None:
        region = region * (int(instances.max()) + 1) + instances  # (class, instance) pairs
    valid = labels != IGNORE_INDEX
    contour = np.zeros(labels.shape, dtype=bool)
    for axis in (0, 1):
        a = [slice(None), slice(None)]
        b = [slice(None), slice(None)]
        a[axis], b[axis] = slice(None, -1), slice(1, None)
        a, b = tuple(a), tuple(b)
        edge = (region[a] != region[b]) & valid[a] & valid[b]
        contour[a] |= edge
        contour[b] |= edge
    return contour.astype(np.uint8)


def _load_star(args: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return load_pair(*args)


def prepare_cache(
    fmt: DatasetFormat,
    root: Path,
    cache_dir: Path,
    height: int,
    width: int,
    workers: int | None = None,
    synthetic: dict | None = None,
) -> dict:
    """Write the cache for ``root`` into ``cache_dir`` and return its manifest.

    Everything is written into a temporary sibling folder that is renamed at the end, so
    an interrupted prepare leaves no half-written cache. ``synthetic``, the settings a
    synthetic ``root`` was written with, goes into the manifest, so that a cache of other
    synthetic data is refused even where its root has been removed.
    """
    root, cache_dir = Path(root).resolve(), Path(cache_dir)
    pairs = {split: fmt.list_pairs(root, split) for split in SPLITS}  # fail before any work
    lut = fmt.label_lut()
    instances = {split: [fmt.instance_path(label) for _, label in split_pairs]
                 for split, split_pairs in pairs.items()}  # fmt: skip
    with_instances = all(path is not None for paths in instances.values() for path in paths)
    if not with_instances:
        log.info(f"{root}: no instance map for every image; class boundaries stand in for "
                 "instance boundaries in the contour targets")  # fmt: skip
    workers = workers or min(8, os.cpu_count() or 1)
    manifest = {
        "version": CACHE_VERSION,
        "format": fmt.name,
        "root": str(root),
        "height": height,
        "width": width,
        "class_names": list(fmt.class_names),
        "ignore_index": IGNORE_INDEX,
        "contours": "instance and class boundaries" if with_instances else "class boundaries",
        "splits": {},
    }
    if synthetic is not None:
        manifest["synthetic"] = synthetic
    # An existing cache is replaced: --force, or a concurrent prepare that finished first.
    with atomic_dir(cache_dir) as tmp, ProcessPoolExecutor(workers) as pool:
        for split, split_pairs in pairs.items():
            n = len(split_pairs)
            images = np.lib.format.open_memmap(
                tmp / f"{split}_images.npy", "w+", np.uint8, (n, height, width, 3)
            )
            labels = np.lib.format.open_memmap(
                tmp / f"{split}_labels.npy", "w+", np.uint8, (n, height, width)
            )
            contours = np.lib.format.open_memmap(
                tmp / f"{split}_contours.npy", "w+", np.uint8, (n, height, width)
            )
            jobs = [
                (img, lbl, lut, height, width, inst if with_instances else None)
                for (img, lbl), inst in zip(split_pairs, instances[split], strict=True)
            ]
            triples = pool.map(_load_star, jobs, chunksize=4)
            for i, (image, label, contour) in enumerate(triples):
                images[i], labels[i], contours[i] = image, label, contour
            for array in (images, labels, contours):
                array.flush()
            counts = np.bincount(labels.reshape(-1), minlength=256)
            manifest["splits"][split] = {
                "num_images": n,
                "pixel_counts": counts[: fmt.num_classes].tolist(),
                "ignored_pixels": int(counts[IGNORE_INDEX]),
                "files": [str(img.relative_to(root)) for img, _ in split_pairs],
            }
            if split == "train":
                # Per-channel statistics over the training images, for input normalisation.
                pixels = images.reshape(-1, 3)
                manifest["mean"] = pixels.mean(axis=0, dtype=np.float64).tolist()
                manifest["std"] = pixels.std(axis=0, dtype=np.float64).tolist()
                manifest["enet_class_weights"] = enet_class_weights(
                    counts[: fmt.num_classes]
                ).tolist()
            del images, labels, contours
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def check_expected_images(expected: object) -> None:
    """``data.expected_images``: null, or image counts of the splits, ``{train: 2975, val:
    500}``, which the cache's counts are compared with."""
    if expected is None:
        return
    if not (isinstance(expected, Mapping) and set(expected) <= set(SPLITS)
            and all(is_whole_number(count, 0) for count in expected.values())):  # fmt: skip
        raise DatasetError(
            "data.expected_images must be null or the image count of each split, such as "
            f"{{train: 2975, val: 500}}, got {expected!r}"
        )


def check_synthetic_settings(synthetic: dict) -> None:
    """``data.synthetic``'s image counts and sizes are positive integers and its seed one
    NumPy takes, checked before any image is written; ``true`` would pass as 1."""
    names = ("num_train", "num_val", "height", "width")
    check_positive_integers(synthetic, names, "data.synthetic.", DatasetError)
    if not is_whole_number(synthetic.get("seed"), 0):
        raise DatasetError(
            f"data.synthetic.seed must be an integer >= 0, got {synthetic.get('seed')!r}"
        )


def ensure_cache(data_cfg: DictConfig, force: bool = False) -> tuple[Path, dict]:
    """The cache for ``data_cfg``: built if missing (or ``force``), checked if present."""
    if data_cfg.root is None:
        how = f" ({cityscapes.HOW_TO_GET})" if data_cfg.format == "cityscapes" else ""
        raise DatasetError(
            f"data.root is not set for data={data_cfg.name}: set it on the command line "
            "(data.root=/path) or through the environment variable named in "
            f"configs/data/{data_cfg.name}.yaml{how}"
        )
    check_positive_integers(data_cfg, ("height", "width"), "data.", DatasetError)
    expected_images = data_cfg.get("expected_images")
    check_expected_images(expected_images)
    fmt = get_format(data_cfg.format)
    root, cache_dir = Path(data_cfg.root), Path(data_cfg.cache_dir)
    synthetic = dict(data_cfg.synthetic) if data_cfg.get("synthetic") else None
    if synthetic is not None:
        check_synthetic_settings(synthetic)
    # Runs started together (a GPU pool, a job array) build a missing cache once: one
    # process builds, the others wait for it and then read it.
    with exclusive_lock(cache_dir.parent / f".{cache_dir.name}.lock"):
        manifest = None if force else read_manifest(cache_dir)
        if manifest is not None:
            wanted = {
                "version": CACHE_VERSION,
                "format": fmt.name,
                "root": str(root.resolve()),
                "height": data_cfg.height,
                "width": data_cfg.width,
            }
            if synthetic is not None:
                wanted["synthetic"] = synthetic
            stale = {k: (manifest.get(k), v) for k, v in wanted.items() if manifest.get(k) != v}
            if stale:
                raise DatasetError(
                    f"{cache_dir / MANIFEST}: cache was made for other settings "
                    f"(cached, wanted: {stale}); rebuild it with `deepcontrol-prepare "
                    f"data={data_cfg.name} --force` or choose another data.cache_dir"
                )
        else:
            # Training reads only the cache, whose manifest keeps the synthetic settings it
            # was built from; so the root's are checked where the cache is built from it
            if synthetic is not None:
                if root.exists():
                    check_synthetic_root(root, synthetic)
                else:
                    write_synthetic_cityscapes(root, **synthetic)
            log.info(f"preparing the {data_cfg.name} cache in {cache_dir} (once)")
            manifest = prepare_cache(
                fmt, root, cache_dir, data_cfg.height, data_cfg.width, synthetic=synthetic
            )
    for split, expected in (expected_images or {}).items():
        found = manifest["splits"][split]["num_images"]
        if found != expected:  # a partial download, or a deliberate subset
            log.warning(
                f"{root}: {found} {split} images, but the official {data_cfg.name} split has "
                f"{expected}"
            )
    return cache_dir, manifest


def main(argv: list[str] | None = None) -> None:
    """``deepcontrol-prepare [--force] [HYDRA OVERRIDES]``, e.g. ``data=cityscapes``."""
    from deepcontrol.config import compose

    parser = argparse.ArgumentParser(
        prog="deepcontrol-prepare",
        description="Build a dataset's training cache once: decoded, mapped and resized.",
    )
    parser.add_argument("--force", action="store_true", help="rebuild a cache that exists")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. data=cityscapes data.root=DIR"
    )
    args = parser.parse_intermixed_args(argv)  # --force before, among or after overrides
    cfg = compose(args.overrides)
    try:
        cache_dir, manifest = ensure_cache(cfg.data, force=args.force)
    except DatasetError as e:
        sys.exit(f"deepcontrol-prepare: {e}")
    counts = ", ".join(f"{s} {m['num_images']}" for s, m in manifest["splits"].items())
    print(f"cache {cache_dir} ready ({manifest['format']}, {counts} images)")


if __name__ == "__main__":
    main()

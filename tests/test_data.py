"""Datasets: label mapping, the cache, the loader, and a clear error for each bad input."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAMVID, CITYSCAPES_SAMPLE, AtenCalls, synthetic_overrides, tiny_config
from PIL import Image

from deepcontrol.data import (
    DatasetError,
    DeviceBatches,
    build_data,
    camvid,
    cityscapes,
    ensure_cache,
    get_format,
    prepare_cache,
    synthetic,
)
from deepcontrol.data.io import map_labels, read_label_map
from deepcontrol.data.prepare import load_pair

CITYSCAPES = get_format("cityscapes")


@pytest.mark.skipif(not CITYSCAPES_SAMPLE.is_dir(), reason=f"{CITYSCAPES_SAMPLE} not present")
def test_label_mapping_on_the_real_cityscapes_frame():
    [(image, label)] = cityscapes.list_pairs(CITYSCAPES_SAMPLE, "val")
    assert image.name == "frankfurt_000000_000294_leftImg8bit.png"
    train_ids = map_labels(read_label_map(label), cityscapes.label_lut(), label)
    official = read_label_map(label.with_name(label.name.replace("labelIds", "labelTrainIds")))
    # The two files were shrunk separately upstream: 77 of 32,768 boundary pixels differ.
    assert (train_ids == official).mean() >= 0.995
    assert set(np.unique(train_ids)) == set(np.unique(official))


def test_cityscapes_lut_follows_cityscapesscripts():
    lut = cityscapes.label_lut()
    assert lut[7] == 0 and lut[26] == 13 and lut[33] == 18  # road, car, bicycle
    assert lut[0] == 255 and lut[1] == 255 and lut[9] == 255  # unlabeled, ego, parking
    assert (lut[34:] == -1).all()
    assert len(cityscapes.CLASS_NAMES) == 19 and cityscapes.CLASS_NAMES[0] == "road"


def test_synthetic_data_is_in_the_cityscapes_layout(synthetic_root):
    pairs = cityscapes.list_pairs(synthetic_root, "train")
    assert len(pairs) == 16 and len(cityscapes.list_pairs(synthetic_root, "val")) == 8
    assert {p.parent.name for p, _ in pairs} == {"aachen", "bremen", "jena"}
    image, label = pairs[0]
    raw = read_label_map(label)
    assert Image.open(image).size == (256, 128) and raw.shape == (128, 256)
    assert set(np.unique(raw)) <= set(np.flatnonzero(cityscapes.label_lut() >= 0))
    instances = read_label_map(Path(str(label).replace("labelIds", "instanceIds")))
    np.testing.assert_array_equal(np.where(instances >= 1000, instances // 1000, instances), raw)


def test_prepare_writes_the_cache(synthetic_root, tmp_path):
    manifest = prepare_cache(CITYSCAPES, synthetic_root, tmp_path / "c", 32, 64, workers=2)
    images = np.load(tmp_path / "c" / "train_images.npy")
    labels = np.load(tmp_path / "c" / "train_labels.npy")
    assert images.shape == (16, 32, 64, 3) and images.dtype == np.uint8
    assert labels.shape == (16, 32, 64) and labels.dtype == np.uint8
    assert np.load(tmp_path / "c" / "val_images.npy").shape == (8, 32, 64, 3)
    assert set(np.unique(labels)) <= set(range(19)) | {255}
    counts = manifest["splits"]["train"]["pixel_counts"]
    assert counts == np.bincount(labels.ravel(), minlength=256)[:19].tolist()
    assert manifest["splits"]["train"]["ignored_pixels"] == int((labels == 255).sum())
    assert manifest == json.loads((tmp_path / "c" / "manifest.json").read_text())
    np.testing.assert_allclose(manifest["mean"], images.reshape(-1, 3).mean(0), rtol=1e-6)
    # resizing is nearest for labels: the first frame's labels are its own, subsampled
    _, label = cityscapes.list_pairs(synthetic_root, "train")[0]
    full = map_labels(read_label_map(label), cityscapes.label_lut(), label)
    small = np.asarray(Image.fromarray(full).resize((64, 32), Image.NEAREST))
    np.testing.assert_array_equal(labels[0], small)
    assert not list(tmp_path.glob(".c.tmp-*"))  # nothing half-written left behind


def test_cache_for_other_settings_is_refused(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, tmp_path / "c")
    ensure_cache(cfg.data)
    cfg.data.height = 16
    with pytest.raises(DatasetError, match=r"manifest.json: cache was made for other settings"):
        ensure_cache(cfg.data)


def test_synthetic_data_of_other_settings_is_refused(synthetic_root, tmp_path):
    """A synthetic root or cache written with other settings than data.synthetic asks for
    would train on other data than the run's config records."""
    cfg = tiny_config(synthetic_root, tmp_path / "c", "data.synthetic.num_train=8")
    with pytest.raises(DatasetError, match=r"synthetic.json: this synthetic dataset was written "
                       r"with other settings .*'num_train': \(16, 8\)"):  # fmt: skip
        ensure_cache(cfg.data)
    unrecorded = tmp_path / "unrecorded"
    shutil.copytree(synthetic_root, unrecorded, ignore=shutil.ignore_patterns("synthetic.json"))
    with pytest.raises(DatasetError, match=r"unrecorded/synthetic.json not found"):
        ensure_cache(tiny_config(unrecorded, tmp_path / "d").data)
    # a cache whose root was removed is checked by the settings in its manifest
    root = tmp_path / "small"
    small = ["data.synthetic.num_train=2", "data.synthetic.num_val=1", "data.synthetic.height=32",
             "data.synthetic.width=64"]  # fmt: skip
    ensure_cache(tiny_config(root, tmp_path / "e", *small).data)
    assert json.loads((root / "synthetic.json").read_text())["num_train"] == 2
    shutil.rmtree(root)
    with pytest.raises(DatasetError, match=r"cache was made for other settings .*'synthetic'"):
        ensure_cache(tiny_config(root, tmp_path / "e", *small, "data.synthetic.num_train=3").data)
    assert not root.exists()  # refused before anything was written
    _, manifest = ensure_cache(tiny_config(root, tmp_path / "e", *small).data)  # as it was made
    assert manifest["splits"]["train"]["num_images"] == 2


def test_validation_batch_is_its_own_setting_shared_among_processes(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, tmp_path / "c", "data.batch_size=2", "data.val_batch_size=6")
    cpu = torch.device("cpu")
    data = build_data(cfg.data, cpu)
    assert (data.train.batch_size, data.val.batch_size, len(data.val)) == (2, 6, 2)  # 8 images
    assert build_data(cfg.data, cpu, rank=1, world_size=2).val.batch_size == 3
    cfg.data.val_batch_size = 0
    with pytest.raises(ValueError, match="data.val_batch_size must be a positive integer, got 0"):
        build_data(cfg.data, cpu)
    # both failed as a str/int comparison that named neither setting
    cfg.data.val_batch_size = "abc"
    with pytest.raises(
        ValueError, match="data.val_batch_size must be a positive integer, got 'abc'"
    ):
        build_data(cfg.data, cpu)
    cfg.data.val_batch_size, cfg.data.batch_size = 6, "abc"
    with pytest.raises(ValueError, match="data.batch_size must be a positive integer, got 'abc'"):
        build_data(cfg.data, cpu)


def test_a_training_batch_the_data_cannot_fill_or_an_unclear_flip_is_refused(
    synthetic_root, tmp_path
):
    cpu = torch.device("cpu")
    # a batch larger than the split trained on all 16 images a step at batch 17's lr
    too_large = tiny_config(synthetic_root, tmp_path / "c", "data.batch_size=17")
    with pytest.raises(ValueError, match=r"data.batch_size=17 is larger than the training "
                       r"split of .*/c \(16 images\)"):  # fmt: skip
        build_data(too_large.data, cpu)
    # "maybe" flipped, being a non-empty string
    with pytest.raises(ValueError, match="data.hflip must be true or false, got 'maybe'"):
        build_data(tiny_config(synthetic_root, tmp_path / "c", "data.hflip=maybe").data, cpu)
    whole_split = tiny_config(synthetic_root, tmp_path / "c", "data.batch_size=16")
    assert build_data(whole_split.data, cpu).train.batch_size == 16


def test_loader_visits_every_sample_once_per_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 2, 3, 3).clone()
    labels = torch.arange(10, dtype=torch.uint8).view(10, 1, 1).expand(10, 2, 3).clone()
    batches = DeviceBatches(
        images, labels, batch_size=4, mean=[1.0, 1.0, 1.0], std=[2.0, 2.0, 2.0], shuffle=True
    )
    assert len(batches) == 3
    seen = [labels_b[:, 0, 0] for _, labels_b, _ in batches]
    assert [len(s) for s in seen] == [4, 4, 2]
    order = torch.cat(seen)
    assert sorted(order.tolist()) == list(range(10))
    assert sorted(torch.cat([lb[:, 0, 0] for _, lb, _ in batches]).tolist()) == list(range(10))
    x, y, _ = next(iter(batches))
    assert x.shape == (4, 3, 2, 3) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x[:, 0, 0, 0], (y[:, 0, 0].float() - 1.0) / 2.0)


def test_loader_order_is_seeded_and_resumable():
    images = torch.zeros(20, 1, 1, 3, dtype=torch.uint8)
    labels = torch.arange(20, dtype=torch.uint8).view(20, 1, 1)
    kwargs = dict(batch_size=5, mean=[0.0] * 3, std=[1.0] * 3, shuffle=True, hflip=True, seed=3)
    a, b = DeviceBatches(images, labels, **kwargs), DeviceBatches(images, labels, **kwargs)
    list(a)  # a whole epoch: the state is the next epoch's
    b.load_state_dict(a.state_dict())
    assert [y.tolist() for _, y, _ in a] == [y.tolist() for _, y, _ in b]
    # stopped after two batches of an epoch: the resumed loader yields the other two
    epoch = iter(a)
    expected = [next(epoch)[1].tolist() for _ in range(4)]
    epoch = iter(b)
    next(epoch), next(epoch)
    assert b.position == 2
    c = DeviceBatches(images, labels, **kwargs)
    c.load_state_dict(b.state_dict())
    assert [y.tolist() for _, y, _ in c] == expected[2:]
    assert [y.tolist() for _, y, _ in c][:2] != expected[:2]  # and the next epoch is a new order
    assert not torch.equal(next(iter(DeviceBatches(images, labels, **kwargs)))[1], labels.long())


def test_processes_share_each_global_batch():
    images = torch.zeros(11, 1, 1, 3, dtype=torch.uint8)
    labels = torch.arange(11, dtype=torch.uint8).view(11, 1, 1)
    kwargs = dict(batch_size=4, mean=[0.0] * 3, std=[1.0] * 3, shuffle=True, seed=1)
    whole = [y.flatten().tolist() for _, y, _ in DeviceBatches(images, labels, **kwargs)]
    parts = [
        [
            y.flatten().tolist()
            for _, y, _ in DeviceBatches(images, labels, rank=r, world_size=2, **kwargs)
        ]  # fmt: skip
        for r in (0, 1)
    ]
    assert [p0 + p1 for p0, p1 in zip(*parts, strict=True)] == whole  # last batch: 2 + 1
    # 4 processes: the last batch (3 samples) cannot give each a sample, and says so
    four = DeviceBatches(images, labels, rank=3, world_size=4, **kwargs)
    assert four.dropped_per_epoch == 3 and len(four) == 2
    with pytest.raises(ValueError, match="global batch and must divide among 3 processes"):
        DeviceBatches(images, labels, rank=0, world_size=3, **kwargs)


# --- every bad input stops with a message naming the path and what was expected ------------


@pytest.fixture
def broken_root(synthetic_root, tmp_path):
    root = tmp_path / "cityscapes"
    shutil.copytree(synthetic_root, root)
    return root


def test_missing_root_explains_layout_and_prepare_command(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as error:
        cityscapes.list_pairs(missing, "train")
    message = str(error.value)
    assert str(missing) in message
    assert "leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png" in message
    assert "gtFine_labelIds.png" in message and "deepcontrol-prepare data=cityscapes" in message


def test_unset_root_names_the_setting():
    from deepcontrol.config import compose

    cfg = compose(["data=cityscapes", "data.root=null"])
    with pytest.raises(DatasetError, match=r"data.root is not set for data=cityscapes"):
        ensure_cache(cfg.data)


def test_an_image_size_that_is_not_a_positive_integer_is_named(synthetic_root, tmp_path):
    # "abc" failed in NumPy's memmap, 0 in a worker's resize, neither naming the setting
    for override, shown in (("data.height=abc", "'abc'"), ("data.width=0", "0")):
        cfg = tiny_config(synthetic_root, tmp_path / "c", override)
        name = override.split("=")[0]
        with pytest.raises(DatasetError, match=f"{name} must be a positive integer, got {shown}"):
            ensure_cache(cfg.data)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "override, message",
    [("data.synthetic.num_train=true", "num_train must be a positive integer, got True"),
     ("data.synthetic.num_val=0", "num_val must be a positive integer, got 0"),
     ("data.synthetic.height=abc", "height must be a positive integer, got 'abc'"),
     ("data.synthetic.seed=-1", "seed must be an integer >= 0, got -1")],
)  # fmt: skip
def test_synthetic_settings_are_named_before_any_image_is_written(override, message, tmp_path):
    # true wrote one training image; abc and -1 failed inside NumPy or PIL, naming no setting
    cfg = tiny_config(tmp_path / "root", tmp_path / "c", override)
    with pytest.raises(DatasetError, match=f"data.synthetic.{message}"):
        ensure_cache(cfg.data)
    assert not (tmp_path / "root").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "value, shown",
    [("3", "3"), ("{train: 4, test: 3}", "{'train': 4, 'test': 3}"),
     ("{train: abc}", "{'train': 'abc'}")],
)  # fmt: skip
def test_expected_image_counts_must_be_counts_of_the_splits(value, shown, synthetic_root, tmp_path):
    # these failed as "'int' object has no attribute 'items'" or a KeyError, after the cache
    cfg = tiny_config(synthetic_root, tmp_path / "c", f"+data.expected_images={value}")
    expected = "null or the image count of each split, such as {train: 2975, val: 500}"
    with pytest.raises(
        DatasetError, match=re.escape(f"expected_images must be {expected}, got {shown}")
    ):
        ensure_cache(cfg.data)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "flag, value", [("--num-train", "0"), ("--height", "abc"), ("--seed", "-1")]
)
def test_synthetic_command_refuses_bad_numbers_as_usage_errors(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:
        synthetic.main([str(tmp_path / "root"), flag, value])
    least = 0 if flag == "--seed" else 1
    assert usage.value.code == 2 and not (tmp_path / "root").exists()
    assert (
        f"argument {flag}: must be an integer >= {least}, got '{value}'" in capsys.readouterr().err
    )


def test_split_without_images(broken_root):
    shutil.rmtree(broken_root / "leftImg8bit" / "val")
    with pytest.raises(DatasetError, match=r"leftImg8bit/val: no images of split 'val'"):
        cityscapes.list_pairs(broken_root, "val")


def test_image_without_label(broken_root):
    label = next((broken_root / "gtFine" / "train" / "jena").glob("*_labelIds.png"))
    label.unlink()
    with pytest.raises(DatasetError, match=rf"its label {label} is missing"):
        cityscapes.list_pairs(broken_root, "train")


def test_label_values_outside_the_label_set(broken_root, tmp_path):
    image, label = cityscapes.list_pairs(broken_root, "train")[0]
    raw = read_label_map(label).copy()
    raw[0, :3] = [40, 41, 200]
    Image.fromarray(raw).save(label)
    with pytest.raises(DatasetError) as error:
        load_pair(image, label, cityscapes.label_lut(), 32, 64)
    assert str(label) in str(error.value)
    assert "label values [40, 41, 200] are outside the label set" in str(error.value)
    with pytest.raises(DatasetError, match="outside the label set"):
        prepare_cache(CITYSCAPES, broken_root, tmp_path / "c", 32, 64, workers=1)
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.tmp-*"))


def test_corrupt_png(broken_root):
    image, label = cityscapes.list_pairs(broken_root, "train")[1]
    image.write_bytes(image.read_bytes()[:200])  # truncated
    with pytest.raises(DatasetError, match=rf"{image}: cannot decode image"):
        load_pair(image, label, cityscapes.label_lut(), 32, 64)
    label.write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=rf"{label}: cannot decode image"):
        read_label_map(label)


def test_label_of_another_size(broken_root):
    image, label = cityscapes.list_pairs(broken_root, "train")[2]
    Image.fromarray(read_label_map(label)[:, :100]).save(label)
    with pytest.raises(DatasetError, match=r"label is 100x128 but its image .* is 256x128"):
        load_pair(image, label, cityscapes.label_lut(), 32, 64)


# --- CamVid ------------------------------------------------------------------------------------


def test_camvid_bad_inputs(tmp_path):
    with pytest.raises(DatasetError, match=r"CamVid root .* does not exist. Expected"):
        camvid.list_pairs(tmp_path / "nowhere", "train")
    with pytest.raises(DatasetError, match=r"train.txt: list of split 'train' is missing"):
        camvid.list_pairs(tmp_path, "train")
    (tmp_path / "train.txt").write_text("train/a.png trainannot/a.png\n")
    with pytest.raises(DatasetError, match=r"train.txt:1: image .*train/a.png is missing"):
        camvid.list_pairs(tmp_path, "train")
    lut = camvid.label_lut()
    assert lut[:11].tolist() == list(range(11)) and lut[11] == 255 and lut[12] == -1


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"real CamVid not present at {CAMVID}")
def test_camvid_from_shared_data(tmp_path):
    assert len(camvid.list_pairs(CAMVID, "train")) == 367
    pairs = camvid.list_pairs(CAMVID, "val")
    assert len(pairs) == 101
    image, labels, _ = load_pair(*pairs[0], camvid.label_lut(), 360, 480)
    assert image.shape == (360, 480, 3) and labels.shape == (360, 480)
    assert set(np.unique(labels)) <= set(range(11)) | {255}
    assert (labels == 255).any()  # void (11) became ignore
    # the whole dataset through the cache, at a reduced size to keep the test fast
    manifest = prepare_cache(get_format("camvid"), CAMVID, tmp_path / "c", 90, 120, workers=2)
    assert manifest["splits"]["train"]["num_images"] == 367
    assert manifest["splits"]["val"]["num_images"] == 101
    counts = manifest["splits"]["train"]["pixel_counts"]
    assert len(counts) == 11 and min(counts) > 0
    assert len(manifest["enet_class_weights"]) == 11


def test_prepare_command(synthetic_root, tmp_path, capsys):
    from deepcontrol.data.prepare import main

    overrides = [*synthetic_overrides(synthetic_root), f"data.cache_dir={tmp_path}/c"]
    main([*overrides, "data.height=16", "data.width=32"])
    assert "train 16, val 8 images" in capsys.readouterr().out
    assert np.load(tmp_path / "c" / "val_labels.npy").shape == (8, 16, 32)
    with pytest.raises(SystemExit, match=r"deepcontrol-prepare: Cityscapes root .* does not exist"):
        main(["data=cityscapes", f"data.root={tmp_path}/missing", f"data.cache_dir={tmp_path}/d"])
    before = (tmp_path / "c" / "manifest.json").stat().st_mtime_ns
    main([*overrides, "--force", "data.height=16", "data.width=32"])  # rebuilt
    assert (tmp_path / "c" / "manifest.json").stat().st_mtime_ns > before
    with pytest.raises(SystemExit) as help_exit:  # help, not Hydra's parse error on "--help"
        main(["--help"])
    assert help_exit.value.code == 0 and "usage: deepcontrol-prepare" in capsys.readouterr().out


def test_image_counts_other_than_the_official_split_are_reported(synthetic_root, tmp_path, caplog):
    cfg = tiny_config(synthetic_root, tmp_path / "c", "+data.expected_images={train: 2975}")
    ensure_cache(cfg.data)
    assert "16 train images, but the official synthetic split has 2975" in caplog.text


def test_loader_copies_to_the_device_once_per_epoch_whatever_its_length():
    """Copying a step's indices from pageable host memory would make the host wait for the GPU
    at every step. The meta device stands in for the GPU: copies onto it show, and reading it
    on the host (a sync on a GPU) fails."""
    for samples in (6, 21):
        images = torch.zeros(samples, 2, 3, 3, dtype=torch.uint8)
        labels = torch.zeros(samples, 2, 3, dtype=torch.uint8)
        batches = DeviceBatches(images, labels, batch_size=3, mean=[0.0] * 3, std=[1.0] * 3,
                                shuffle=True, hflip=True, device="meta",
                                contours=torch.zeros(samples, 2, 3))  # fmt: skip
        with AtenCalls() as ops:
            steps = [[t.device.type for t in batch] for batch in batches]
        assert steps == [["meta"] * 3] * (samples // 3)
        assert ops.crossings("cpu", "meta") == ["_to_copy.default"] * 2  # the order, the flips
        assert not ops.crossings("meta", "cpu")

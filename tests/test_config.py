"""The Hydra config: the learning-rate rule, run names and the config groups."""

import pytest

from deepcontrol.config import CONFIG_DIR, compose


@pytest.mark.parametrize("batch, lr", [(1, 0.02), (4, 0.08), (8, 0.16)])
def test_lr_is_base_times_batch(batch, lr):
    cfg = compose([f"data.batch_size={batch}"])
    assert cfg.optim.lr == lr
    assert f"-b{batch}-lr{lr}-" in cfg.run_name


def test_explicit_lr_wins_and_defaults_follow_the_paper():
    cfg = compose(["data.batch_size=8", "optim.lr=0.32"])
    assert cfg.optim.lr == 0.32
    default = compose([])
    assert default.optim.momentum == 0.9 and default.optim.weight_decay == 0.0
    assert default.epochs == 150 and default.data.batch_size == 4
    assert default.model.init == "he" and default.train.precision == "fp32"


def test_every_norm_and_dataset_has_a_config():
    for norm in ("bn", "agc", "gn", "in", "none"):
        assert compose([f"norm={norm}"]).norm.name == norm
    cityscapes = compose(["data=cityscapes"]).data
    assert (cityscapes.height, cityscapes.width, cityscapes.class_weights) == (256, 512, "enet")
    assert compose(["data=camvid"]).data.height == 360
    assert sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml")) == [
        "camvid", "cityscapes", "synthetic"
    ]  # fmt: skip

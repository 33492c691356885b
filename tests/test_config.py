"""The Hydra config: the learning-rate rule, run names and the config groups."""

import re

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from deepcontrol.config import CONFIG_DIR, compose
from deepcontrol.models import build_model
from deepcontrol.nn import AutoGainControl2d
from deepcontrol.results import run_record


@pytest.mark.parametrize("batch, lr", [(1, 0.02), (4, 0.08), (8, 0.16)])
def test_lr_is_base_times_batch(batch, lr):
    cfg = compose([f"data.batch_size={batch}"])
    assert cfg.optim.lr == lr
    assert f"-b{batch}-lr{lr}-" in cfg.run_name


@pytest.mark.parametrize(
    "override, got",
    [("optim.base_lr=true", "True and 4"), ("data.batch_size=abc", "0.02 and 'abc'"),
     ("data.batch_size=true", "0.02 and True")],
)  # fmt: skip
def test_the_lr_rule_refuses_what_is_not_a_number_naming_its_settings(override, got):
    # float(True) is 1: optim.base_lr=true would otherwise train at lr 4.0
    cfg = compose([override])
    rule = "optim.lr = ${mul:${optim.base_lr},${data.batch_size}}"
    with pytest.raises(
        InterpolationResolutionError, match=re.escape(f"{rule} needs two numbers, got {got}")
    ):
        OmegaConf.to_container(cfg.optim, resolve=True)


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


@pytest.mark.parametrize("overrides, window", [([], 9), (["norm.window=33"], 33)])
def test_the_window_size_reaches_every_layer_the_run_name_and_the_record(
    overrides, window, tmp_path
):
    cfg = compose(["norm=agc-window", "model.width=8", *overrides])
    layers = [m for m in build_model(cfg, 19).modules() if isinstance(m, AutoGainControl2d)]
    assert len(layers) == 25 and {layer.window for layer in layers} == {window}
    # runs of two sizes never share a directory (hydra.sweep.subdir is the run name)
    assert cfg.run_name.startswith(f"segnet-agc-window{window}-synthetic-b4-")
    OmegaConf.save(cfg, tmp_path / "config.yaml", resolve=True)
    assert run_record(tmp_path)["norm"] == f"agc-window{window}"


@pytest.mark.parametrize("norm", ["bn", "agc", "agc-median", "gn", "in", "none"])
def test_a_norm_without_options_is_named_by_its_name(norm):
    # the names every run directory so far was made under: a change would orphan them
    assert compose([f"norm={norm}"]).run_name.startswith(f"segnet-{norm}-synthetic-b4-")
    assert compose([f"norm={norm}", "norm.sync=true"]).run_name.startswith(f"segnet-{norm}-")


def test_an_option_given_on_the_command_line_names_the_run(tmp_path):
    cfg = compose(["norm=agc", "model.width=8", "+norm.mean_scale_init=0"])
    layers = [m for m in build_model(cfg, 19).modules() if isinstance(m, AutoGainControl2d)]
    assert {layer.mean_scale.abs().max().item() for layer in layers} == {0.0}
    # so a sweep over the option never puts two settings in one directory
    assert cfg.run_name.startswith("segnet-agc-mean_scale_init0-synthetic-b4-")
    assert compose(["norm=agc", "+norm.mean_scale_init=1"]).run_name != cfg.run_name
    OmegaConf.save(cfg, tmp_path / "config.yaml", resolve=True)
    assert run_record(tmp_path)["norm"] == "agc-mean_scale_init0"


def test_lambdas_lr_multiplier_names_the_run_only_where_it_is_not_the_papers():
    assert "-lr0.08-s0-" in compose(["norm=agc"]).run_name  # every run so far: unchanged
    cfg = compose(["norm=agc", "optim.mean_scale_lr_mult=20"])
    assert cfg.run_name == "segnet-agc-synthetic-b4-lr0.08-mean_scale_lr_mult20-s0-e150"

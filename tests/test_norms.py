"""The norm registry."""

import pytest
import torch
from torch import nn

from deepcontrol.nn import (
    NORMS,
    AutoGainControl2d,
    ChannelBias,
    ConvNormReLU,
    make_norm,
    norm_factory,
)


@pytest.mark.parametrize(
    "name, cls", [("bn", nn.BatchNorm2d), ("agc", AutoGainControl2d), ("gn", nn.GroupNorm),
                  ("in", nn.InstanceNorm2d), ("none", ChannelBias),
                  ("agc-median", AutoGainControl2d), ("agc-window", AutoGainControl2d)],
)  # fmt: skip
def test_every_norm_builds_and_keeps_shape(name, cls):
    norm = make_norm(name, 64)
    assert isinstance(norm, cls)
    x = torch.randn(2, 64, 5, 7)
    assert norm(x).shape == x.shape


def test_group_norm_uses_32_groups_or_fewer():
    assert make_norm("gn", 512).num_groups == 32
    assert make_norm("gn", 24).num_groups == 8
    assert make_norm("gn", 7).num_groups == 1


def test_instance_norm_has_affine_parameters():
    norm = make_norm("in", 8)
    assert norm.affine and norm.weight.shape == (8,)


def test_none_is_a_learned_bias():
    norm = make_norm("none", 3)
    with torch.no_grad():
        norm.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    out = norm(torch.zeros(1, 3, 2, 2))
    assert out[0, :, 0, 0].tolist() == [1.0, 2.0, 3.0]


def test_unknown_norm_lists_the_choices():
    assert set(NORMS) == {"bn", "agc", "gn", "in", "none", "agc-median", "agc-window"}
    with pytest.raises(ValueError) as error:
        make_norm("layernorm", 8)
    message = str(error.value)
    assert "'layernorm'" in message
    for name in NORMS:
        assert name in message


@pytest.mark.parametrize("norm", ["agc", "agc-median", "agc-window"])
def test_every_agc_takes_in_the_relu_after_it(norm):
    block = ConvNormReLU(3, 8, norm)
    assert len(block) == 2 and block[1].relu
    assert block[1].background == {"agc": "mean", "agc-median": "median"}.get(norm, "window")
    assert (block(torch.randn(2, 3, 6, 6)) >= 0).all()


def test_a_norm_takes_its_options_and_a_bad_one_is_named():
    layer = make_norm(norm_factory("agc-window", window=33), 8)
    assert layer.background == "window" and layer.window == 33
    assert ConvNormReLU(3, 8, norm_factory("agc-window", window=5))[1].window == 5
    with pytest.raises(ValueError, match=r"norm=agc-window does not take norm.window=8: .*odd"):
        norm_factory("agc-window", window=8)
    with pytest.raises(ValueError, match=r"norm=agc does not take norm.window=9: .*'window' only"):
        norm_factory("agc", window=9)  # the paper's mean would ignore it
    with pytest.raises(ValueError, match=r"norm=bn does not take norm.windw=3: .*'windw'"):
        norm_factory("bn", windw=3)

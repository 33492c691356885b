"""SegNet as in SegNet-Tutorial: layout, parameter counts, shapes, initialisation."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO
from torch import nn

from deepcontrol.config import compose
from deepcontrol.models import SegNet, build_model
from deepcontrol.nn import AutoGainControl2d


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_with_19_classes():
    assert count(SegNet(19, "bn")) == 29_446_035
    # one more parameter, λ, per normalised channel
    assert count(SegNet(19, "agc")) == 29_453_971


def test_layout_26_convs_and_only_the_classifier_has_bias():
    model = SegNet(19, "agc")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 26
    assert [c.bias is not None for c in convs] == [False] * 25 + [True]
    assert sum(isinstance(m, AutoGainControl2d) for m in model.modules()) == 25
    widths = [c.out_channels for c in convs]
    assert widths == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
                      512, 512, 512, 512, 512, 256, 256, 256, 128, 128, 64, 64, 19]  # fmt: skip


@pytest.mark.parametrize("height, width", [(256, 512), (360, 480), (37, 53)])
def test_output_shape(height, width):
    model = SegNet(11 if height == 360 else 19, "agc").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, height, width))
    assert out.shape == (1, 11 if height == 360 else 19, height, width)


def test_he_fan_in_init():
    torch.manual_seed(0)
    model = SegNet(19, "bn")
    conv = model.encoder[3][1][0]  # conv4_2: 512 → 512, fan-in 4608
    expected_std = (2.0 / (512 * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)
    assert torch.count_nonzero(model.classifier.bias) == 0


def test_identity_init_spares_the_first_conv_after_each_pooling():
    model = SegNet(19, "bn", init="identity")
    first = model.encoder[1][0][0]  # first conv after pool 1: He
    second = model.encoder[1][1][0]  # 128 → 128: identity centre tap
    assert first.weight.std() > 0.01
    expected = torch.zeros_like(second.weight)
    expected[torch.arange(128), torch.arange(128), 1, 1] = 1
    assert torch.equal(second.weight, expected)
    narrowing = model.decoder[1][2][0]  # 512 → 256: the first 256 channels copied
    assert narrowing.weight[:, :, 1, 1].diagonal().tolist() == [1.0] * 256
    assert narrowing.weight.sum().item() == 256
    x = torch.randn(1, 128, 6, 6).relu()
    torch.testing.assert_close(second(x), x)


def test_width_scales_every_layer_and_must_be_positive():
    narrow = SegNet(19, "bn", width=8)
    full = SegNet(19, "bn")
    widths = [c.out_channels for c in narrow.modules() if isinstance(c, nn.Conv2d)]
    expected = [c.out_channels // 8 for c in full.modules() if isinstance(c, nn.Conv2d)]
    assert widths[:-1] == expected[:-1] and widths[-1] == 19
    for bad in (0, -8, 8.0):
        with pytest.raises(ValueError, match="model.width must be a positive integer"):
            SegNet(19, width=bad)


def test_unknown_init_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        SegNet(19, init="xavier")


def test_an_image_smaller_than_its_poolings_take_is_refused_when_built():
    # 31 rows failed inside the fifth max-pool; 32, and sizes that are no multiple of 32, run
    model = build_model(compose(["model.width=4", "data.height=33", "data.width=32"]), 19)
    assert model(torch.randn(1, 3, 33, 32)).shape == (1, 19, 33, 32)
    with pytest.raises(ValueError, match="data.height=31, data.width=64: model=segnet needs at "
                       "least 32 pixels each way for its poolings"):  # fmt: skip
        build_model(compose(["model.width=4", "data.height=31", "data.width=64"]), 19)
    summary = subprocess.run(
        [sys.executable, "scripts/model_summary.py", "--height", "16"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert summary.returncode == 2
    assert "--height and --width must be at least 32 (SegNet)" in summary.stderr


def test_build_model_from_config():
    cfg = compose(["norm=agc", "model.init=identity"])
    model = build_model(cfg, num_classes=11)
    assert isinstance(model, SegNet)
    assert model.classifier.out_channels == 11
    assert any(isinstance(m, AutoGainControl2d) for m in model.modules())

"""The identities behind results/benchmark-h100/agc_through_conv.py: AGC's mean and its
gradient's constant part taken through the 3×3 convolution before it."""

import statistics
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "results" / "benchmark-h100"))
import agc_through_conv  # noqa: E402
from agc_through_conv import check, tap_sums  # noqa: E402

from deepcontrol.benchmark import Config, Setting, agc_inputs  # noqa: E402

CPU = torch.device("cpu")


@pytest.mark.parametrize("h, w", [(1, 1), (1, 4), (3, 1), (2, 2), (6, 9)])
def test_each_identity_holds_to_float64_rounding(h, w):
    errors = check(torch.float64, 2, 3, 5, h, w)
    assert set(errors) == {"forward mean", "input gradient", "weight gradient", "bias gradient"}
    assert max(errors.values()) < 1e-12, errors


def test_the_tap_sums_are_what_each_tap_reads():
    """Tap (i, j) of a 3×3 convolution with padding 1 reads the map shifted by (i - 1, j - 1),
    zero outside it: summing that shifted map directly gives the same sums."""
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    direct = torch.stack([torch.stack([padded[..., i:i + 5, j:j + 4].sum((2, 3))
                                       for j in range(3)], -1) for i in range(3)], -2)  # fmt: skip
    torch.testing.assert_close(tap_sums(x), direct, rtol=0, atol=1e-12)


def corner_left_out(x: torch.Tensor) -> torch.Tensor:
    """``tap_sums`` with one tap's sum wrong: its corner left out."""
    sums = tap_sums(x)
    sums[..., 0, 0] = sums[..., 0, 0] - x[:, :, -1, -1]
    return sums


def test_a_wrong_identity_is_caught():
    """With one tap's sum off, the check reports errors far above rounding, so a passing
    check is not one that cannot fail."""
    with mock.patch.object(agc_through_conv, "tap_sums", corner_left_out):
        errors = check(torch.float64, 2, 3, 5, 6, 9)
    assert errors["forward mean"] > 1e-3 and errors["weight gradient"] > 1e-3, errors


def test_the_byte_count_sees_every_agc_layer_of_segnet():
    """The inputs Part 1 counts (``agc_inputs``): 25, one per convolution an AGC follows (at
    32×64 here, the bench's 256×512 scaled), the first and last at full size."""
    setting = Setting("agc", 1, "bf16", "eager")
    shapes = [tuple(y.shape) for y in agc_inputs(setting, Config(height=32, width=64), CPU)]
    assert len(shapes) == 25
    assert shapes[0] == shapes[-1] == (1, 64, 32, 64)
    assert min(h for *_, h, _ in shapes) == 2  # the fifth block's, after four poolings


def test_bf16_agreement_counts_each_layer_and_a_flip_is_a_differing_output():
    rows = agc_through_conv.bf16_agreement(Config(height=32, width=64), batch=2)
    assert [channels for channels, *_ in rows][:3] == [64, 64, 128]
    assert len(rows) == 25
    for _, means, apart, outputs, flips in rows:
        assert 0 <= flips <= outputs <= 1 and 0 <= means <= 1 and apart >= 0
    # rounding leaves most means as the reference's; one tap's sum wrong, most not
    assert statistics.median(means for _, means, *_ in rows) < 0.5
    with mock.patch.object(agc_through_conv, "tap_sums", corner_left_out):
        wrong = agc_through_conv.bf16_agreement(Config(height=32, width=64), batch=2)
    assert statistics.median(means for _, means, *_ in wrong) > 0.75

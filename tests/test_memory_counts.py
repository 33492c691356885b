"""The memory counts behind results/benchmark-h100/cpu-memory-*.txt: what they count is what
is alive, and the cuts they try leave the step as it was."""

import contextlib
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "results" / "benchmark-h100"))
import memory_composition  # noqa: E402
import memory_levers  # noqa: E402
from memory_composition import composition, counted_step  # noqa: E402
from memory_levers import check_same_step, levers  # noqa: E402

from deepcontrol.benchmark import Config, Setting  # noqa: E402
from deepcontrol.engine import sgd_step  # noqa: E402
from deepcontrol.losses import pixel_cross_entropy  # noqa: E402
from deepcontrol.models.segnet import SegNet  # noqa: E402
from deepcontrol.train import sgd  # noqa: E402

SMALL = Config(height=32, width=64)
CPU = torch.device("cpu")


def nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def test_the_count_is_what_stays_alive_after_a_step():
    """After a counted step what is still counted is exactly what is still alive: the
    parameters, momenta and batch counted from the start, the step's gradients and loss."""
    torch.manual_seed(0)
    model = SegNet(num_classes=5, norm="none", width=8)
    optimizer = sgd(model, lr=0.01, momentum=0.9)
    images, labels = torch.randn(2, 3, 32, 64), torch.randint(0, 5, (2, 32, 64))

    def loss_fn(outputs, labels, contours):
        return pixel_cross_entropy(outputs, labels)

    sgd_step(model, optimizer, loss_fn, images, labels, None, "bf16")  # makes the momenta
    momenta = [state["momentum_buffer"] for state in optimizer.state.values()]
    live, loss = counted_step(model, optimizer, loss_fn, (images, labels, None), "bf16", CPU)
    parameters = list(model.parameters())
    held = nbytes(parameters) + nbytes(momenta) + nbytes([images, labels])
    assert live.total == held + nbytes(p.grad for p in parameters) + loss.untyped_storage().nbytes()
    assert live.peak == sum(live.peak_kinds.values())
    assert live.peak_kinds["parameters"] == nbytes(parameters)
    assert live.peak_kinds["momenta"] == nbytes(momenta)
    assert live.peak > held  # the activations kept for the backward


@pytest.mark.parametrize("cut", ["copies", "unpool", "optimiser"])
def test_each_cut_leaves_the_step_as_it_was(cut):
    check_same_step(Setting("none", 1, "bf16", "eager"), SMALL, CPU, (cut,))  # raises if not


@pytest.mark.slow
def test_batch_1_peak_and_what_the_three_cuts_save():
    """SegNet at 256x512, batch 1, as results/benchmark-h100/cpu-memory-*.txt count it."""
    setting, full = Setting("none", 1, "bf16", "eager"), Config()
    plain, _ = composition(setting, full, CPU)
    kinds = plain.peak_kinds
    assert plain.peak_at.startswith("backward:")
    # every weight cast to bf16 once (half its float32 bytes) and kept to the peak
    copies = kinds["bf16 copies of the parameters"]
    assert copies == pytest.approx(kinds["parameters"] / 2, rel=0.01)
    assert kinds["forward: max_pool2d_with_indices (int64 indices)"] > 0
    with levers(("copies", "unpool", "optimiser")):
        cut, _ = composition(setting, full, CPU)
    assert cut.peak_kinds["bf16 copies of the parameters"] < 2**20  # the one cast in use
    assert plain.peak - cut.peak > copies + 20 * 2**20  # the unpooled inputs: 30 MiB more


def test_a_cut_that_changes_the_step_is_caught(monkeypatch):
    real_step = memory_composition.sgd_step

    @contextlib.contextmanager
    def nudging(names):
        """A cut that moves the first parameter after the step."""

        def nudged(model, *args, **kwargs):
            loss = real_step(model, *args, **kwargs)
            with torch.no_grad():
                next(model.parameters()).add_(1e-3)
            return loss

        with mock.patch.object(memory_composition, "sgd_step", nudged if names else real_step):
            yield

    monkeypatch.setattr(memory_levers, "levers", nudging)
    with pytest.raises(AssertionError, match="with nudge, .* differs after one step"):
        check_same_step(Setting("none", 1, "bf16", "eager"), SMALL, CPU, ("nudge",))

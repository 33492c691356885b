"""results/benchmark-h100/counter_fills_ab.py: counters kept zeroed across layers and runs
give the fused AGC's results bit for bit, and the check would see them wrong."""

import contextlib
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_agc_inputs

from deepcontrol.nn import fused_agc

pytestmark = pytest.mark.skipif(fused_agc.triton_agc is None, reason="Triton is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "results" / "benchmark-h100"))
import counter_fills_ab  # noqa: E402
from counter_fills_ab import (  # noqa: E402
    check,
    compiles_counters,
    kept_counters,
    kernel_launches,
    tuner,
)


def small_layers() -> list[tuple]:
    """The two small layers the tuner's tests use: several chunks per sample with two
    samples, and one sample whose channels make two blocks (no counter size shared)."""
    return tuner.random_layers(small_agc_inputs())


def test_kept_counters_give_the_fills_results_and_are_made_once_per_shape_and_pass():
    layers = small_layers()
    assert check(layers) == ""
    with kept_counters() as buffers:
        run = tuner.layer_passes(layers)
        run()
        made = {key: id(buffer) for key, buffer in buffers.items()}
        run()
        assert {key: id(buffer) for key, buffer in buffers.items()} == made
    assert sorted(kind for *_, kind in made) == ["backward", "backward", "forward", "forward"]


def test_counters_that_start_unzeroed_are_caught():
    """Counters made with ones, as memory reused without its fill would be: the check
    reports which result first differs."""

    @contextlib.contextmanager
    def unzeroed():
        with kept_counters() as buffers:
            zeros = torch.zeros
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(counter_fills_ab.torch, "zeros", lambda *a, **k: zeros(*a, **k) + 1)
                yield buffers

    assert check(small_layers(), unzeroed).startswith("first run: layer 0:")


@pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor on a CPU needs a C++ compiler")
def test_the_counters_use_compiles_with_kept_counters_and_a_wrong_one_is_caught(monkeypatch):
    """The stand-in (counters the compiled graphs did not make, each pass counting into them
    by what it reads) compiles under Inductor and gives eager's gradients with either
    variant; a backward that leaves its counters at -1 fails the check."""
    cpu = torch.device("cpu")
    assert compiles_counters("fills", cpu) == ""
    assert compiles_counters("kept", cpu) == ""

    def leaves_minus_one(ctx, grad):
        counters = counter_fills_ab.saved_counters(*ctx.saved_tensors, grad)
        counters.sub_((grad.sum() * 0 + 1).int())
        return grad * 2 + counters.sum()

    monkeypatch.setattr(counter_fills_ab._UsesCounters, "backward", staticmethod(leaves_minus_one))
    assert "counters are not left zeroed" in compiles_counters("kept", cpu)


def test_kernel_launches_counts_the_runtimes_and_the_drivers_launches_only():
    class Event:
        def __init__(self, key: str, count: int) -> None:
            self.key, self.count = key, count

    events = [Event("cudaLaunchKernel", 3), Event("cudaLaunchKernelExC", 1),
              Event("cuLaunchKernelEx", 2), Event("cudaMemcpyAsync", 5),
              Event("cudaGraphLaunch", 7), Event("aten::relu", 4)]  # fmt: skip
    assert kernel_launches(events) == 6

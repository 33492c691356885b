"""results/benchmark-h100/counter_fills_ab.py: counters kept zeroed across layers and runs
give the fused AGC's results bit for bit, and the check would see them wrong."""

import contextlib
import sys
from pathlib import Path

import pytest
import torch

from deepcontrol.nn import fused_agc

pytestmark = pytest.mark.skipif(fused_agc.triton_agc is None, reason="Triton is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "results" / "benchmark-h100"))
import counter_fills_ab  # noqa: E402
from counter_fills_ab import check, kept_counters, tuner  # noqa: E402


def small_layers() -> list[tuple]:
    """Two layers: several chunks per sample with two samples, and one sample whose channels
    make two blocks; the second shares no counter size with the first."""
    generator = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = [(torch.randn(shape, generator=generator) + 0.3).to(device, torch.bfloat16)
              .contiguous(memory_format=torch.channels_last)
              for shape in ((2, 16, 24, 40), (1, 80, 9, 7))]  # fmt: skip
    return tuner.random_layers(inputs)


def test_kept_counters_give_the_fills_results_and_are_made_once_per_size():
    layers = small_layers()
    assert check(layers) == ""
    with kept_counters() as buffers:
        run = tuner.layer_passes(layers)
        run()
        made = {key: id(buffer) for key, buffer in buffers.items()}
        run()
        assert {key: id(buffer) for key, buffer in buffers.items()} == made
    assert len(made) == 2


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

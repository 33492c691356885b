"""scripts/tune_agc_kernels.py: each configuration's results are checked before it is timed."""

import importlib.util
from pathlib import Path

import pytest
from conftest import small_agc_inputs

from deepcontrol.nn import fused_agc

pytestmark = pytest.mark.skipif(fused_agc.triton_agc is None, reason="Triton is not installed")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tune_agc_kernels.py"


@pytest.fixture(scope="module")
def tuner():
    spec = importlib.util.spec_from_file_location("tune_agc_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecordedLaunches:
    """Stands in for a Triton kernel and records each launch's grid and warps."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs["num_warps"]))
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_each_configuration_is_checked_with_its_own_launches_and_the_committed_restored(
    tuner, monkeypatch
):
    committed = tuner.committed_settings()
    # few, small chunks: several programs per sample and the last program's loop over them;
    # warps other than the committed ones, whatever the tuner has them set to
    other = {"SUMS_TILE": 1024, "PROGRAMS": 4096, "MAX_CHUNKS": 2,
             "SUMS_WARPS": 2 if committed["SUMS_WARPS"] == 4 else 4}  # fmt: skip
    recorded = RecordedLaunches(tuner.kernels._sums_kernel)
    monkeypatch.setattr(tuner.kernels, "_sums_kernel", recorded)
    rows = tuner.tune(small_agc_inputs(), [committed, other], replays=2)
    assert [row["wrong"] for row in rows] == ["", ""]
    assert [row["committed"] for row in rows if row["SUMS_TILE"] == 1024] == [False]
    assert tuner.committed_settings() == committed
    # the forward that makes each layer's output, then each configuration's check: a
    # forward and a backward reduction for each of the 2 layers
    assert len(recorded.launches) == 2 + 4 + 4
    as_committed, as_other = recorded.launches[2:6], recorded.launches[6:]
    assert {warps for _, warps in as_committed} == {committed["SUMS_WARPS"]}
    assert {warps for _, warps in as_other} == {other["SUMS_WARPS"]}
    # the first layer (960 positions) is cut into the other's MAX_CHUNKS
    assert [grid[2] for grid, _ in as_other[:2]] == [2, 2]


def test_wrong_sums_are_reported_not_timed(tuner, monkeypatch):
    sums = tuner.kernels._sums
    monkeypatch.setattr(tuner.kernels, "_sums", lambda *args: sums(*args) * 1.001)
    [row] = tuner.tune(small_agc_inputs(), [tuner.committed_settings()], replays=2)
    assert row["wrong"].startswith("layer 0: relative error 1.0e-03")
    assert "ms" not in row


def test_elementwise_configurations_launch_their_own_tiles_and_give_the_same_bits(
    tuner, monkeypatch
):
    committed = tuner.committed_settings("elementwise")
    other = {"TILE": 1024, "ELEMENTWISE_WARPS": 2 if committed["ELEMENTWISE_WARPS"] == 4 else 4}
    recorded = RecordedLaunches(tuner.kernels._agc_relu_kernel)
    monkeypatch.setattr(tuner.kernels, "_agc_relu_kernel", recorded)
    rows = tuner.tune(small_agc_inputs(), [committed, other], replays=2, part="elementwise")
    assert [row["wrong"] for row in rows] == ["", ""]
    assert tuner.committed_settings("elementwise") == committed
    # each layer's forward: making the layers' outputs, the committed results, then each
    # configuration's check
    assert len(recorded.launches) == 2 * 4
    as_committed, as_other = recorded.launches[4:6], recorded.launches[6:]
    assert {warps for _, warps in as_committed} == {committed["ELEMENTWISE_WARPS"]}
    assert {warps for _, warps in as_other} == {other["ELEMENTWISE_WARPS"]}
    # the first layer: 16 channels, so 64 positions a tile of 1024, over its 960 positions
    assert as_other[0][0] == (2, 1, 15)


def test_elementwise_results_other_than_the_committed_are_reported_not_timed(tuner, monkeypatch):
    committed = tuner.committed_settings("elementwise")
    forward = tuner.kernels.forward

    def tile_dependent(*args):
        out, sums, counts = forward(*args)
        return (out if tuner.kernels.TILE == committed["TILE"] else out * 2), sums, counts

    monkeypatch.setattr(tuner.kernels, "forward", tile_dependent)
    other = {**committed, "TILE": 1024}
    rows = tuner.tune(small_agc_inputs(), [committed, other], replays=2, part="elementwise")
    assert [row["wrong"] for row in rows] == [
        "",
        "layer 0: out differs from the committed settings'",
    ]
    assert "ms" not in rows[1]


def test_fastest_names_the_settings_to_apply_and_their_time_over_the_committed(tuner):
    rows = [
        {"TILE": 8192, "ELEMENTWISE_WARPS": 4, "committed": False, "wrong": "", "ms": 1.5},
        {"TILE": 4096, "ELEMENTWISE_WARPS": 8, "committed": True, "wrong": "", "ms": 2.0},
        {"TILE": 1024, "ELEMENTWISE_WARPS": 2, "committed": False, "wrong": "layer 0"},
    ]
    names = ("TILE", "ELEMENTWISE_WARPS")
    assert tuner.fastest(rows, names) == (
        "fastest: TILE=8192 ELEMENTWISE_WARPS=4, 0.750 of the committed settings' time"
    )
    assert tuner.fastest(rows[2:], names) == ""

"""scripts/compare_runs.py (the second half of `make demo`), the table it prints and the
metrics it reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from deepcontrol.results import comparison_table


def write_run(run_dir: Path, errors: list[float]) -> Path:
    run_dir.mkdir(parents=True)
    lines = ["epoch,train_loss,val_pixel_error"]
    lines += [f"{epoch},1.0,{error}" for epoch, error in enumerate(errors, start=1)]
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run_dir


def compare_runs(*args: str) -> subprocess.CompletedProcess:
    script = REPO / "scripts" / "compare_runs.py"
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True)


def test_latest_compares_the_newest_sweeps_runs_epoch_by_epoch(tmp_path):
    write_run(tmp_path / "2026-01-01_00-00-00" / "old-run", [0.9])
    write_run(tmp_path / "2026-01-02_00-00-00" / "bn", [0.85, 0.5, 0.25])
    write_run(tmp_path / "2026-01-02_00-00-00" / "agc", [0.7, 0.4])  # stopped an epoch early
    shown = compare_runs("--latest", str(tmp_path))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[1].split() == ["epoch", "agc", "bn"] and "old-run" not in shown.stdout
    assert lines[2].split() == ["1", "0.7000", "0.8500"]
    assert lines[4].split() == ["3", "0.2500"]  # agc's cell is blank
    assert lines[4].index("0.2500") > lines[1].index("agc") + len("agc")  # in bn's column


def test_a_run_of_the_same_name_in_two_sweeps_keeps_both_columns(tmp_path):
    first = write_run(tmp_path / "a" / "run", [0.5])
    second = write_run(tmp_path / "b" / "run", [0.25])
    table = comparison_table([first, second])
    assert table.splitlines()[1].split() == ["epoch", str(first), str(second)]
    assert table.splitlines()[2].split() == ["1", "0.5000", "0.2500"]


def test_bad_input_is_named(tmp_path):
    run = write_run(tmp_path / "run", [0.5])
    with pytest.raises(ValueError, match=r"run/metrics.csv: no column 'val_miou'; it has epoch, "):
        comparison_table([run], "val_miou")
    with (run / "metrics.csv").open("a") as f:
        f.write("2,1.0\n")  # a row cut short
    with pytest.raises(ValueError, match=r"run/metrics.csv, line 3: expected a number in each "
                       r"of 3 columns, got \['2', '1.0', None\]"):  # fmt: skip
        comparison_table([run])
    cut_short = compare_runs(str(run))  # both were tracebacks from the command
    assert cut_short.returncode == 1 and "Traceback" not in cut_short.stderr
    assert cut_short.stderr.startswith(f"compare_runs: {run / 'metrics.csv'}, line 3: expected ")
    not_a_run = compare_runs(str(tmp_path / "nothing"))
    assert not_a_run.returncode == 1 and not_a_run.stderr.startswith(
        f"compare_runs: {tmp_path / 'nothing' / 'metrics.csv'}: no metrics.csv"
    )
    missing = compare_runs("--latest", str(tmp_path / "missing"))
    assert missing.returncode == 2
    assert "missing: not a folder; expected one of timestamped sweeps" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty: no sweep folders" in compare_runs("--latest", str(empty)).stderr

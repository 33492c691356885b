"""The Makefile's two ways to run (its own .venv, or an interpreter named with PY), and what
reproduce-fig1 passes on."""

import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

TARGETS = ("demo", "test", "lint", "bench", "reproduce-fig1", "fig1-smoke")


def make_commands(target: str, *args: str) -> str:
    """The commands ``make TARGET ARGS`` would run, printed and not run."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL")}
    command = ["make", "-n", "-B", "--no-print-directory", target, *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target", TARGETS)
def test_py_runs_a_target_in_that_environment_without_making_a_venv(target):
    own = make_commands(target, "PY=/opt/env/bin/python3")
    assert "venv" not in own and "pip install" not in own
    for line in own.splitlines():
        if line.strip() and not line.startswith("\t"):  # a command, not a continuation
            command = re.sub(r"^(WANDB_\w+=\S+ )+", "", line)
            assert command.startswith("/opt/env/bin/python3 "), line
    default = make_commands(target)
    assert "-m venv .venv" in default and ".venv/bin/python " in default


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_seeds_reach_the_training_sweep_and_the_figure_but_not_the_cache():
    commands = make_commands("reproduce-fig1", "PY=python3", "SEEDS=0,1,2", "ARGS=epochs=3")
    prepare, train, collect, plot = commands.replace("\\\n", "").splitlines()
    assert prepare.split() == ["python3", "scripts/prepare_data.py", "data=cityscapes", "epochs=3"]
    assert "epochs=3 seed=0,1,2" in train and train.split()[2:4] == [
        "deepcontrol.train",
        "--multirun",
    ]
    assert plot.endswith("data=cityscapes epochs=3 seed=0,1,2")
    assert "seed" not in make_commands("reproduce-fig1", "PY=python3")

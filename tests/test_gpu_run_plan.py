"""The commands of "The next GPU run" (results/benchmark-h100/README.md) name what exists.

A GPU session has 15 minutes of device time, and a command that fails on a mistyped path,
test id or option spends them for nothing; each is checked here, on the CPU, beforehand.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "results" / "benchmark-h100" / "README.md"
SECTION = "## The next GPU run"
COMMAND_LIMIT = 2000  # characters: the device tool's limit on one command


def gpu_commands() -> list[str]:
    """The section's fenced blocks that run on the device machine (they write under $OUT)."""
    text = README.read_text()
    assert SECTION in text, f"{README} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^ *```\n(.*?)^ *```$", section, flags=re.M | re.S)
    return [re.sub(r"^ +", "", b, flags=re.M) for b in blocks if "$OUT" in b]


COMMANDS = gpu_commands()


def test_the_plan_has_its_two_calls() -> None:
    assert len(COMMANDS) == 2 and all("make bench" in c for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=["call-1", "call-2"])
def test_each_call_is_valid_bash_within_the_tools_limit(command: str) -> None:
    assert len(command) <= COMMAND_LIMIT
    checked = subprocess.run(["bash", "-n"], input=command, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("command", COMMANDS, ids=["call-1", "call-2"])
def test_what_each_call_runs_exists(command: str) -> None:
    words = shlex.split(command.replace("$(", "").replace(")", ""), comments=True)
    for script in (w for w in words if w.endswith(".py")):
        assert (REPO / script).is_file(), script
    for node in (w for w in words if "::" in w):
        path, name = node.split("::")
        assert re.search(rf"^def {name}\(", (REPO / path).read_text(), flags=re.M), node
    cache_verbs = [words[i + 1] for i, w in enumerate(words) if w.endswith("compile_cache.py")]
    assert set(cache_verbs) <= {"pack", "unpack"}


@pytest.mark.parametrize("command", COMMANDS, ids=["call-1", "call-2"])
def test_make_bench_gets_options_it_takes_and_time_to_finish_its_last_measurement(
    command: str,
) -> None:
    """Every option passed in BENCH_ARGS is one scripts/benchmark.py takes; ``timeout``
    leaves 90 s after ``--time-limit``, the longest a compiled setting has taken."""
    (line,) = [line for line in command.splitlines() if "make bench" in line]
    timeout = float(re.search(r"timeout (\d+) make bench", line).group(1))
    args = re.search(r'BENCH_ARGS="([^"]*)"', line).group(1).split()
    options = set(re.findall(r'"(--[a-z-]+)"', (REPO / "scripts" / "benchmark.py").read_text()))
    assert {a for a in args if a.startswith("--")} <= options
    limit = float(args[args.index("--time-limit") + 1])
    assert timeout - limit >= 90
    assert "BENCH_OUT=outputs/bench" in line  # both calls write and go on from one report

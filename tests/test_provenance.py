"""Which code a result came from (``deepcontrol.provenance``)."""

import subprocess

import pytest
import torch

from deepcontrol import benchmark
from deepcontrol.provenance import PACKAGE, UNKNOWN, code_version


def test_the_code_is_named_by_the_last_commit_that_changed_it(tmp_path, monkeypatch):
    """Committing results or docs leaves the code the same, so a benchmark cut short goes
    on after its partial report is committed; a change to the code does not."""
    monkeypatch.delenv("DEEPCONTROL_COMMIT", raising=False)

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, capture_output=True, text=True, check=True)  # fmt: skip
        return done.stdout.strip()

    def commit(path: str, text: str) -> str:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
        git("add", path)
        git("commit", "-q", "-m", path)
        return git("rev-parse", "--short=12", "HEAD")

    package = tmp_path / "src" / "deepcontrol"
    package.mkdir(parents=True)
    assert code_version(package) == UNKNOWN  # not a git checkout yet
    git("init", "-q")
    assert code_version(package) == UNKNOWN  # no commit yet
    code = commit("src/deepcontrol/kernels.py", "a = 1\n")
    commit("results/benchmark.json", "{}\n")
    assert code_version(package) == code
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "bench.py").write_text("")  # untracked: not the code
    (package / "kernels.py").write_text("a = 2\n")
    assert code_version(package) == code + "-dirty"
    changed = commit("src/deepcontrol/kernels.py", "a = 2\n")
    assert code_version(package) == changed != code
    # a copy installed into an environment inside this repository is not its src/
    installed = tmp_path / ".venv" / "lib" / "site-packages" / "deepcontrol"
    installed.mkdir(parents=True)
    assert code_version(installed) == UNKNOWN
    monkeypatch.setenv("DEEPCONTROL_COMMIT", "fbf3f84")  # a copied tree without git
    assert code_version(installed) == "fbf3f84"
    assert benchmark.environment(torch.device("cpu"))["code"] == "fbf3f84"


def test_this_checkout_names_its_own_commit(monkeypatch):
    """The tests run from this checkout's src/ (an editable install), which git names."""
    monkeypatch.delenv("DEEPCONTROL_COMMIT", raising=False)

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=PACKAGE, capture_output=True, text=True)

    if git("rev-parse", "--git-dir").returncode:
        pytest.skip("this tree has no git history (a copied working tree)")
    last = git("log", "-1", "--format=%h", "--abbrev=12", "--", ":/src", ":/scripts")
    assert code_version().removesuffix("-dirty") == last.stdout.strip() != ""

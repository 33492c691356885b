"""Which code a result came from: the last commit that changed the package or its scripts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# The code that trains and measures, as git pathspecs from the checkout's root. A commit that
# changes nothing here (results, docs) leaves the code the same, so a benchmark cut short
# goes on after its partial report is committed.
CODE_PATHS = (":/src", ":/scripts")
PACKAGE = Path(__file__).resolve().parent
UNKNOWN = "unknown (not run from a git checkout of deepcontrol; set DEEPCONTROL_COMMIT)"


def code_version(package: Path = PACKAGE) -> str:
    """The last commit that changed ``CODE_PATHS``, with ``-dirty`` when they have uncommitted
    changes; ``$DEEPCONTROL_COMMIT`` where it is set (a copied tree without git history).

    ``package`` is the package's folder. It names a commit only where it is the checkout's
    ``src/deepcontrol`` (an editable install, ``PYTHONPATH=src``): a copy installed into an
    environment inside some other repository would otherwise take that repository's commit.
    """
    if os.environ.get("DEEPCONTROL_COMMIT"):
        return os.environ["DEEPCONTROL_COMMIT"]
    package = Path(package).resolve()

    def git(*args: str) -> str:
        # --no-optional-locks: status would otherwise refresh the index, taking index.lock,
        # which fails the user's own git commands while a sweep's runs start
        done = subprocess.run(["git", "--no-optional-locks", *args], cwd=package,
                              capture_output=True, text=True, check=True)  # fmt: skip
        return done.stdout.strip()

    try:
        root = Path(git("rev-parse", "--show-toplevel")).resolve()
        if root / "src" / package.name != package:
            return UNKNOWN
        commit = git("log", "-1", "--format=%h", "--abbrev=12", "--", *CODE_PATHS)
        changes = git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
    except (OSError, subprocess.CalledProcessError):  # no git, or not a git checkout
        return UNKNOWN
    if not commit:
        return UNKNOWN
    return commit + ("-dirty" if changes else "")

"""Outputs appear whole or not at all: write beside the target, then rename over it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed over ``path`` if the block succeeds."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path, replace: bool = True) -> Iterator[Path]:
    """An empty temporary folder beside ``path`` to fill; it becomes ``path`` if the block
    succeeds. An existing ``path`` is replaced, or with ``replace=False`` kept (another
    process wrote the same thing meanwhile)."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            if not replace:
                return
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)

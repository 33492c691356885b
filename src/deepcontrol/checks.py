"""What a setting may be, for the checks that refuse bad ones by name.

YAML's ``true`` is a Python bool, and a bool is an int: without these, ``epochs=true``
would pass as 1. And any non-empty string is truthy: ``train.resume=maybe`` would read as
true.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Mapping


def is_whole_number(value: object, least: int, below: float = math.inf) -> bool:
    """``value`` is an integer (not a bool) from ``least`` up to, not including, ``below``."""
    return isinstance(value, int) and not isinstance(value, bool) and least <= value < below


def check_positive_integers(
    settings: Mapping, names: Iterable[str], prefix: str, error: type[ValueError] = ValueError
) -> None:
    """Each of ``names`` in ``settings``, the config group ``prefix`` (``"data."``), is an
    integer >= 1; otherwise ``error`` naming the first that is not (``DatasetError`` where
    the cache is made, which ``deepcontrol-prepare`` reports in one line)."""
    for name in names:
        if not is_whole_number(settings.get(name), 1):
            raise error(f"{prefix}{name} must be a positive integer, got {settings.get(name)!r}")


def true_or_false(name: str, value: object) -> bool:
    """``value``, the setting ``name``, if it is a bool; otherwise a ValueError naming it."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def is_finite_number(value: object, least: float) -> bool:
    """``value`` is an int or float (not a bool), finite and at least ``least``."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and least <= value < math.inf)  # fmt: skip


def integer_from(least: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``least``, or a usage error saying so."""

    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}")
        return value

    return integer

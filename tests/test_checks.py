"""The predicates that settings' checks share (``deepcontrol.checks``)."""

import math

from deepcontrol.checks import is_finite_number, is_whole_number


def test_a_whole_number_is_an_int_in_its_range_and_never_a_bool():
    assert is_whole_number(1, 1) and is_whole_number(2**32 - 1, 0, below=2**32)
    for value in (True, 0, 1.0, "1", None):  # YAML's true is a bool, and a bool an int
        assert not is_whole_number(value, 1), value
    assert not is_whole_number(2**32, 0, below=2**32)


def test_a_finite_number_is_an_int_or_float_from_its_least_and_never_a_bool():
    assert is_finite_number(0, 0) and is_finite_number(2.5, 0)
    for value in (False, -0.1, math.inf, math.nan, "1", None):
        assert not is_finite_number(value, 0), value

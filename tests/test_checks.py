"""The predicates that settings' checks share (``deepcontrol.checks``)."""

import argparse
import math

import pytest

from deepcontrol.checks import (
    check_positive_integers,
    integer_from,
    is_finite_number,
    is_whole_number,
    true_or_false,
)
from deepcontrol.data.io import DatasetError


def test_a_whole_number_is_an_int_in_its_range_and_never_a_bool():
    assert is_whole_number(1, 1) and is_whole_number(2**32 - 1, 0, below=2**32)
    for value in (True, 0, 1.0, "1", None):  # YAML's true is a bool, and a bool an int
        assert not is_whole_number(value, 1), value
    assert not is_whole_number(2**32, 0, below=2**32)


def test_a_finite_number_is_an_int_or_float_from_its_least_and_never_a_bool():
    assert is_finite_number(0, 0) and is_finite_number(2.5, 0)
    for value in (False, -0.1, math.inf, math.nan, "1", None):
        assert not is_finite_number(value, 0), value


def test_positive_integers_name_the_first_that_is_not_with_the_error_asked_for():
    settings = {"height": 32, "width": True, "batch": 0}
    check_positive_integers(settings, ("height",), "data.")
    with pytest.raises(ValueError, match=r"^data.width must be a positive integer, got True$"):
        check_positive_integers(settings, ("height", "width", "batch"), "data.")
    with pytest.raises(DatasetError, match="data.batch must be a positive integer, got 0"):
        check_positive_integers(settings, ("batch",), "data.", DatasetError)
    with pytest.raises(ValueError, match="data.missing must be a positive integer, got None"):
        check_positive_integers(settings, ("missing",), "data.")


def test_true_or_false_passes_a_bool_on_and_names_anything_else():
    assert true_or_false("train.resume", True) is True
    assert true_or_false("train.resume", False) is False
    for value in ("maybe", 1, None):  # "maybe" and 1 are truthy
        with pytest.raises(ValueError, match=f"train.resume must be true or false, got {value!r}"):
            true_or_false("train.resume", value)


def test_integer_from_is_an_argparse_type_that_says_what_it_wanted():
    positive = integer_from(1)
    assert positive("3") == 3 and integer_from(0)("0") == 0
    for text in ("0", "-2", "abc", "2.5"):
        with pytest.raises(
            argparse.ArgumentTypeError, match=f"must be an integer >= 1, got '{text}'"
        ):
            positive(text)
    parser = argparse.ArgumentParser(prog="p", exit_on_error=False)
    parser.add_argument("--batch", type=positive)
    with pytest.raises(argparse.ArgumentError, match="must be an integer >= 1, got '0'"):
        parser.parse_args(["--batch", "0"])

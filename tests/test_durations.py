"""One grammar for durations, in commands and in vars files."""

from __future__ import annotations

import pytest

from configserver.durations import duration_seconds


@pytest.mark.parametrize(("text", "seconds"), [
    ("30m", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600), ("1d12h", 129600),
    ("1.5d", 129600), (" 2H ", 7200), ("1d 12h", 129600), ("0m", 0),
])
def test_each_form(text, seconds):
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "7 days", "d", "-1d", "1y", "１d", None, 7])
def test_what_is_not_a_duration(text):
    assert duration_seconds(text) is None


def test_an_absurd_length_is_a_number_for_the_caller_to_refuse_never_an_error():
    assert duration_seconds("9" * 400 + "d") == float("inf")

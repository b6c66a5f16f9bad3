"""Sizes with units on the command line (dsedge.units)."""

from __future__ import annotations

import pytest

from dsedge.units import parse_size


@pytest.mark.parametrize("text, expected", [
    ("4G", 4 * 1024**3), ("512M", 512 * 1024**2), ("1.5GiB", 3 * 1024**3 // 2), ("64k", 65536), ("2T", 2 * 1024**4),
    ("1073741824", 1024**3), ("2e9", 2_000_000_000), (" 8 GB ", 8 * 1024**3), ("100b", 100),
])
def test_sizes_people_write(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "4X", "-1G", "0", "0.1", "four", "4 G B", "inf", "nan", "1e400"])
def test_what_is_not_a_size(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_a_bad_size_flag_is_a_usage_error_naming_the_forms(capsys):
    from dsedge.cli import main

    assert main(["run", "some.bundle", "-p", "hi", "--memory-budget", "2Q"]) == 2
    assert "4G, 512M" in capsys.readouterr().err

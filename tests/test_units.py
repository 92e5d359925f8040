from __future__ import annotations

import pytest

from autoglm_rt import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12Gi", 12 * 2**30),
        ("512Mi", 512 * 2**20),
        ("512MiB", 512 * 2**20),
        ("1.5G", 1_500_000_000),
        ("4096", 4096),
        (" 2 ki ", 2048),
        ("0", 0),
        (7, 7),
        (3.9, 3),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "Gi", "12Xi", "-1", "1e3", "12 Gi B", "nan"])
def test_parse_size_rejects_malformed_strings(bad: str) -> None:
    with pytest.raises(ValueError, match="limit"):
        parse_size(bad, name="limit")


@pytest.mark.parametrize("bad", [True, None, [1], b"12Gi"])
def test_parse_size_rejects_wrong_types(bad: object) -> None:
    with pytest.raises(TypeError, match="limit"):
        parse_size(bad, name="limit")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), float("inf")])
def test_parse_size_rejects_negative_and_nonfinite(bad: float) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size() -> None:
    assert format_size(100) == "100 B"
    assert format_size(3 * 2**30) == "3.00 GiB"
    assert format_size(1536) == "1.50 KiB"

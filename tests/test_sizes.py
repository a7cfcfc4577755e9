"""parse_bytes: sizes as users write them, and clear errors for anything else."""

from __future__ import annotations

import pytest

from headinfer.sizes import format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        (24e9, 24_000_000_000),
        ("20GiB", 20 << 30),
        ("20 gb", 20 << 30),
        ("512MiB", 512 << 20),
        ("1.5k", 1536),
        ("2e10", 20_000_000_000),
        (" 7 ", 7),
    ],
)
def test_sizes(value: object, expected: int) -> None:
    assert parse_bytes(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value", [0, "0", "0GiB", -5, "-5", 0.5, float("nan"), float("inf"), "nan", "inf", "1e999"]
)
def test_not_a_positive_size(value: object) -> None:
    with pytest.raises(ValueError, match="^host_memory_limit: "):
        parse_bytes(value, "host_memory_limit")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["lots", "20 GiBs", ""])
def test_not_a_size(value: str) -> None:
    with pytest.raises(ValueError, match="^gpu_budget: expected bytes"):
        parse_bytes(value)


@pytest.mark.parametrize("value", [True, False, None, [1], b"20GiB"])
def test_wrong_types(value: object) -> None:
    with pytest.raises(TypeError, match="^gpu_budget: expected bytes"):
        parse_bytes(value)  # type: ignore[arg-type]


def test_format_bytes() -> None:
    assert format_bytes(0) == "0"
    assert format_bytes(3 << 30) == "3.00 GiB"
    assert format_bytes(12 << 20) == "12.0 MiB"

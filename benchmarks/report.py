"""The printed table and the JSON file."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .harness import Row

__all__ = ["format_table", "format_value", "write_json"]

_HEADERS = (
    "database",
    "workload",
    "figure",
    "median",
    "std. error",
    "q1 .. q3",
    "target",
    "result",
)


def format_value(value: float, unit: str) -> str:
    """A figure with its unit, e.g. ``1.013x``, ``7.21 us``, ``412,000 ev/s``,
    ``63.2 MB``; ``n/a`` for a figure not measured."""
    if unit == "x":
        return f"{value:.3f}x"
    if unit == "us":
        return f"{value:.2f} us"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "MB":
        return f"{value:.1f} MB"
    if unit == "n/a":
        return "n/a"
    if unit == "ev/s":
        return f"{value:,.0f} ev/s"
    if unit == "B":
        return f"{value:,.0f} B"
    return f"{value:,.0f}"


def _range(row: Row) -> str:
    if row.q1 is None or row.q3 is None:
        return ""
    q1, q3 = format_value(row.q1, row.unit), format_value(row.q3, row.unit)
    return f"{q1.split()[0]} .. {q3}"


def _result(row: Row, enforced: bool) -> str:
    if row.passed is None:
        return ""
    if not enforced:
        return "(quick)"
    verdict = "pass" if row.passed else "FAIL"
    return f"{verdict} (?)" if row.uncertain else verdict


def format_table(rows: Sequence[Row], *, enforced: bool) -> str:
    """The rows as an aligned plain-text table (it is also valid Markdown)."""
    cells = [
        (
            row.database,
            row.workload,
            row.figure,
            format_value(row.value, row.unit),
            _error(row),
            _range(row),
            row.target or "",
            _result(row, enforced),
        )
        for row in rows
    ]
    widths = [
        max(len(line[column]) for line in [_HEADERS, *cells])
        for column in range(len(_HEADERS))
    ]

    def line(values: Sequence[str]) -> str:
        padded = (
            value.ljust(width) for value, width in zip(values, widths, strict=True)
        )
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(_HEADERS), rule, *(line(values) for values in cells)])


def _error(row: Row) -> str:
    error = row.median_error
    if error is None:
        return ""
    return "+/- " + format_value(error, row.unit)


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write the figures, creating the directory if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=_encode) + "\n")


def _encode(value: object) -> Any:
    if isinstance(value, Row):
        return {
            **dataclasses.asdict(value),
            "median_error": value.median_error,
            "uncertain": value.uncertain,
        }
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot encode {type(value).__name__}")

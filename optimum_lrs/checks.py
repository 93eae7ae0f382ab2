"""Field checks shared by the config classes: each failure names the class, the field, what it must be and
what it got, so that a wrong value is caught where it is written."""

from __future__ import annotations

import math
from typing import Any


def fail(owner: str, field: str, allowed: str, value: Any) -> None:
    raise ValueError(f"{owner}.{field} must be {allowed}, got {value!r}")


def real(owner: str, field: str, value: Any, low: float, high: float, low_open: bool = False,
         high_open: bool = False) -> float:
    """A finite number in the interval, as a float."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(owner, field, f"a finite number in {interval}", value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        fail(owner, field, f"in {interval}", value)
    return float(value)


def integer(owner: str, field: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        fail(owner, field, f"an integer >= {low}", value)
    return value


def choice(owner: str, field: str, value: Any, options: tuple) -> Any:
    if value not in options:
        fail(owner, field, f"one of {options}", value)
    return value


def flag(owner: str, field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        fail(owner, field, "True or False", value)
    return value


def known_keys(owner: str, given: dict, known: set[str]) -> None:
    """Refuse keys a config does not have: a typo must not pass silently."""
    unknown = sorted(k for k in given if k not in known)
    if unknown:
        raise ValueError(f"{owner} got unknown keys {unknown}; known keys are {sorted(known)}")

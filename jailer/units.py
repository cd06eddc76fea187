"""Human units in profiles: sizes ("128MiB") and durations ("1.5s")."""

from __future__ import annotations

import math
import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class UnitError(ValueError):
    pass


def parse_size(value: object) -> int:
    """Bytes from "128MiB", "1.5GiB", "64KB", "4096" or a plain int."""
    if isinstance(value, bool):
        raise UnitError(f"expected a size like \"128MiB\", got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UnitError(f"expected a non-negative size, got {value}")
        return value
    if not isinstance(value, str):
        raise UnitError(f"expected a size like \"128MiB\", got {value!r}")
    m = _SIZE_RE.match(value)
    if not m:
        raise UnitError(f"expected a size like \"128MiB\", got {value!r}")
    number, unit = m.groups()
    size = float(number) * _SIZE_FACTORS[(unit or "b").lower()]
    if not math.isfinite(size):
        raise UnitError(f"size {value[:40]!r} is too large")
    return int(size)


def parse_duration(value: object) -> float:
    """Seconds from "1.5s", "250ms", "2m", "1h" (a bare number is refused: say the unit)."""
    if not isinstance(value, str) or isinstance(value, bool):
        raise UnitError(f"expected a duration like \"1.5s\" or \"250ms\", got {value!r}")
    m = _DURATION_RE.match(value)
    if not m:
        raise UnitError(f"expected a duration like \"1.5s\" or \"250ms\", got {value!r}")
    number, unit = m.groups()
    return float(number) * _DURATION_FACTORS[unit]


def format_size(n: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B"


def format_duration(seconds: float) -> str:
    ms = round(seconds * 1000)
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"

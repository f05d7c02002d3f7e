"""One parser per kind of quantity, each listing the units it accepts."""

from __future__ import annotations

import re

from mosaic_export.core.errors import UserError

_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"

BYTE_UNITS = {
    "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}
BANDWIDTH_UNITS = {f"{u}/s": v for u, v in BYTE_UNITS.items()}
FLOPS_UNITS = {"FLOPS": 1, "GFLOPS": 10**9, "TFLOPS": 10**12, "PFLOPS": 10**15}
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def _parse(text: str | int | float, units: dict[str, float], what: str) -> float:
    accepted = ", ".join(units)
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise UserError(f"expected {what} as a string such as '8GiB' (units: {accepted}), "
                        f"got {text!r}")
    if isinstance(text, (int, float)) or re.fullmatch(_NUMBER, text):
        raise UserError(f"expected {what} with a unit (one of: {accepted}), got bare number {text!r}")
    m = re.fullmatch(_NUMBER + r"([A-Za-z/]+)\s*", text)
    if not m or m.group(2) not in units:
        raise UserError(f"expected {what} as a number and one of the units {accepted}; got {text!r}")
    return float(m.group(1)) * units[m.group(2)]


def parse_bytes(text: str) -> int:
    """'80MiB' -> 83886080. Units: B, KB, MB, GB, TB (powers of 10), KiB, MiB, GiB, TiB."""
    return int(round(_parse(text, BYTE_UNITS, "a size")))


def parse_bandwidth(text: str) -> float:
    """'68GB/s' -> bytes per second."""
    return _parse(text, BANDWIDTH_UNITS, "a bandwidth")


def parse_flops(text: str) -> float:
    """'10TFLOPS' -> floating-point operations per second."""
    return _parse(text, FLOPS_UNITS, "a compute rate")


def parse_seconds(text: str) -> float:
    """'200ms' -> 0.2."""
    return _parse(text, TIME_UNITS, "a time")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

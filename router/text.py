"""Text for people and for JSON: a file name that is not UTF-8 keeps its bytes visible.

Python reads such a name as surrogate escapes ("caf\\udce9.dcm"), which no UTF-8 output can
carry: a terminal, the routing log, and the Prefect API (whose JSON bodies are strict
UTF-8) would each fail on it. Shown with backslash escapes instead, the name stays
recognisable and every output can take it.
"""

from __future__ import annotations

from typing import Any


def printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def printable_data(value: Any) -> Any:
    """`value` (JSON-like data) with every string made printable."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable_data(k): printable_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable_data(v) for v in value]
    return value

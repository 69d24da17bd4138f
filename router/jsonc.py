"""JSON with `//` and `/* */` comments and trailing commas.

Routing files are written by hand (the seed's own example carries a comment), so the
loader forgives comments and trailing commas, and nothing else. Comments are blanked
rather than removed so that the line and column of a syntax error still point at the
user's text.
"""

from __future__ import annotations

import json
from typing import Any


class JsoncError(ValueError):
    """Syntax error with the position in the original text."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(f"line {line}, column {column}: {message}" if line else message)
        self.line = line
        self.column = column


def _blank(text: str) -> str:
    """Keep newlines, replace everything else by spaces."""
    return "".join(c if c == "\n" else " " for c in text)


def strip_comments(text: str) -> str:
    """Blank comments and trailing commas outside strings; positions are preserved."""
    out: list[str] = []
    i, n = 0, len(text)
    last_comma: int | None = None  # index in `out` of a comma not yet followed by a value
    after_value = False  # the last significant character ended a value (not [ { , :)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
            last_comma = None
            after_value = True
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(_blank(text[i:j]))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                line = text.count("\n", 0, i) + 1
                col = i - (text.rfind("\n", 0, i) + 1) + 1
                raise JsoncError("comment opened with /* is never closed", line, col)
            out.append(_blank(text[i : j + 2]))
            i = j + 2
        elif c == ",":
            # a comma with no value before it ("[,]") is left for json to refuse
            last_comma = len(out) if after_value else None
            after_value = False
            out.append(c)
            i += 1
        elif c in "]}":
            if last_comma is not None:
                out[last_comma] = " "
            last_comma = None
            after_value = True
            out.append(c)
            i += 1
        else:
            if not c.isspace():
                last_comma = None
                after_value = c not in "[{:"
            out.append(c)
            i += 1
    return "".join(out)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r} in one object")
        result[key] = value
    return result


def loads(text: str) -> Any:
    """Parse JSON with comments and trailing commas; duplicate keys are errors."""
    cleaned = strip_comments(text)
    try:
        return json.loads(cleaned, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise JsoncError(exc.msg, exc.lineno, exc.colno) from None
    except RecursionError:
        raise JsoncError("nested too deeply") from None
    except ValueError as exc:  # duplicate key, or an integer too long to convert
        raise JsoncError(str(exc)) from None

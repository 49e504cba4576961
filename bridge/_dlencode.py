"""The one serialiser of dead-letter records, shared by the file, Kafka and Postgres destinations.

A dead letter must be writable whatever the event held (DESIGN.md §3), so :func:`encode_record` never raises on
content: its text always encodes to UTF-8, as lone surrogates (bytes decoded with ``surrogateescape``, a ``\\ud800``
escape let through) are written as ``\\ud800`` escapes instead of raising an encoding error. What plain
``json.dumps`` refuses (NaN and infinities, bytes, keys that are not strings, objects JSON has no type for, nesting
deeper than its recursion allows) goes through an iterative fallback that keeps what it can and
says what it changed under the record's ``"encoding_notes"``:

- a non-finite float becomes the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``;
- bytes become ``{"raw_b64": ...}``; a set or tuple a list; a non-string key its ``str``; any other object its
  ``repr``;
- a value nested deeper than :data:`MAX_DEPTH` levels is kept as its JSON text in a string
  (``{"json_text": "...", "note": ...}``), so the line stays readable by any JSON parser.

:func:`storable_json` further adapts the text for Postgres ``jsonb``, which refuses ``\\u0000`` and unpaired
surrogate escapes: those become the six visible characters of their escape (the string then holds a backslash).
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any

__all__ = ["MAX_DEPTH", "encode_record", "encode_value", "storable_json", "storable_text"]

MAX_DEPTH = 200
"""Nesting kept as JSON structure; deeper values are kept as JSON text (see the module docstring)."""


def encode_record(record: dict[str, Any]) -> str:
    """``record`` as one line of JSON text (no newline in it) that encodes to UTF-8, whatever it holds."""
    notes: list[str] = []
    text = encode_value(record, notes)
    if not notes:
        return text
    annotated = dict(record)
    annotated["encoding_notes"] = sorted(set(notes))
    return encode_value(annotated, [])


def encode_value(value: Any, notes: list[str] | None = None) -> str:
    """``value`` as JSON text that encodes to UTF-8; what had to change is appended to ``notes`` (see the module
    docstring)."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError, OverflowError):
        # the fallback handles every one of these, without recursion
        text = _Fallback([] if notes is None else notes).encode(value)
    # Outside strings JSON text is ASCII, so a surrogate is always inside a string, where its escape is valid.
    return _SURROGATE.sub(_escape_char, text) if _SURROGATE.search(text) else text


_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_char(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group(0)):04x}"


class _Fallback:
    """An iterative encoder: no recursion, so no nesting depth makes it fail."""

    def __init__(self, notes: list[str]) -> None:
        self.notes = notes

    def encode(self, value: Any, *, depth_limit: int = MAX_DEPTH) -> str:
        out: list[str] = []
        # a stack of pending work: a value to encode at a depth, or a literal piece of text
        stack: list[tuple[Any, int] | str] = [(value, 0)]
        seen: set[int] = set()
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                out.append(item)
                continue
            node, depth = item
            if isinstance(node, (dict, list, tuple, set, frozenset)) and depth >= depth_limit:
                self.notes.append(f"values nested deeper than {depth_limit} levels are kept as JSON text")
                out.append(_dumps({"json_text": _Fallback(self.notes).encode(node, depth_limit=1 << 62),
                                   "note": f"nested deeper than {depth_limit} levels"}))
                continue
            if isinstance(node, dict):
                if id(node) in seen:
                    self.notes.append("a value that contains itself is cut")
                    out.append('"<cycle>"')
                    continue
                seen.add(id(node))
                stack.append("}")
                entries = list(node.items())
                for index in range(len(entries) - 1, -1, -1):
                    key, child = entries[index]
                    stack.append((child, depth + 1))
                    stack.append((", " if index else "") + _dumps(self._key(key)) + ": ")
                out.append("{")
            elif isinstance(node, (list, tuple, set, frozenset)):
                if id(node) in seen:
                    self.notes.append("a value that contains itself is cut")
                    out.append('"<cycle>"')
                    continue
                seen.add(id(node))
                if isinstance(node, (set, frozenset)):
                    node = sorted(node, key=repr)
                stack.append("]")
                for index in range(len(node) - 1, -1, -1):
                    stack.append((node[index], depth + 1))
                    if index:
                        stack.append(", ")
                out.append("[")
            else:
                out.append(self._scalar(node))
        return "".join(out)

    def _key(self, key: Any) -> str:
        if isinstance(key, str):
            return key
        self.notes.append("object keys that are not strings are kept as their text")
        return str(key)

    def _scalar(self, value: Any) -> str:
        if value is None or isinstance(value, (bool, str)):
            return _dumps(value)
        if isinstance(value, int):
            try:
                return str(int(value))
            except ValueError:  # more digits than Python converts to text by default
                self.notes.append("integers too long for decimal text are kept as hex")
                return _dumps({"hex": hex(value)})
        if isinstance(value, float):
            if math.isfinite(value):
                return repr(float(value))
            self.notes.append("NaN and infinite numbers are kept as strings")
            return _dumps("NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity"))
        if isinstance(value, (bytes, bytearray, memoryview)):
            self.notes.append("bytes are kept as base64 under raw_b64")
            return _dumps({"raw_b64": base64.b64encode(bytes(value)).decode("ascii")})
        self.notes.append(f"{type(value).__name__} values are kept as their repr")
        try:
            text = repr(value)
        except Exception as exc:  # a broken __repr__ must not stop the dead letter
            text = f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
        return _dumps(text)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# An escape in JSON text: a valid surrogate pair, an escape jsonb refuses, or any other escape (consumed so
# that an escaped backslash followed by "u0000" is not mistaken for a NUL escape).
_ESCAPE = re.compile(r"\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})|\\u(0000|d[89a-f][0-9a-f]{2})|\\.")


def storable_json(text: str) -> str:
    """JSON text from :func:`encode_value` made acceptable to Postgres ``jsonb``: each ``\\u0000`` and unpaired
    surrogate escape becomes a string holding the escape's own six characters."""
    if "\\u" not in text:
        return text
    return _ESCAPE.sub(lambda m: "\\" + m.group(0) if m.group(3) is not None else m.group(0), text)


_UNSTORABLE_CHARS = re.compile("[\\x00\\ud800-\\udfff]")


def storable_text(text: str) -> str:
    """``text`` for a Postgres ``text`` column (no NUL, no lone surrogate): those characters become their
    ``\\uXXXX`` escape text. A valid pair cannot occur in a Python str (it would be one code point)."""
    return _UNSTORABLE_CHARS.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)

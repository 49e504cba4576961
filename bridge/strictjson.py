"""Strict JSON decoding, one rule for every source kind (DESIGN.md §3 "Decoding is strict").

JSON per RFC 8259, which Python's :mod:`json` stretches: it takes ``NaN``/``Infinity``, turns ``1e400`` into
``inf``, keeps a lone ``\\ud800`` escape as a surrogate code point (which no UTF-8 writer can encode), raises
ValueError past 4,300 integer digits and RecursionError past about a thousand levels of nesting. Each of those
would break a later step (rendering, sending, dead-letter writing) instead of failing here, where the event can
still be dead-lettered as undecodable. :func:`loads` is the one decoder; :class:`Undecodable` carries the reason.

The checks are cheap on the usual value: C-level scans before any Python-level work (a bracket count bounds the
depth; no ``\\u`` in the text means no surrogate escape; at the interpreter's default limit it refuses integers
over 4,300 digits itself, else a linear scan looks for a run of 4,301 digits). Only float literals get a
Python-level check (for overflow) as they are parsed. The depth scan that runs when the bracket count is high
never recurses.
"""

from __future__ import annotations

import json
import math
import re
import sys
from itertools import accumulate
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "Undecodable", "loads", "utf8"]

MAX_DEPTH = 512
"""Deepest nesting accepted: 512 levels of arrays/objects decode, 513 do not."""
MAX_INT_DIGITS = 4300
"""Longest integer accepted (Python's default int/str conversion limit, whatever sys says at run time)."""


class Undecodable(ValueError):
    """The input is not strict JSON (or not UTF-8); ``reason`` says why, for a dead-letter record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _reject_constant(name: str) -> Any:
    raise Undecodable(f"{name} is not JSON")


def _shown(literal: str) -> str:
    return literal if len(literal) <= 24 else f"{literal[:20]}… ({len(literal)} characters)"


def _checked_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise Undecodable(f"number {_shown(literal)} is beyond a double's range")
    return value


def _checked_int(literal: str) -> int:
    digits = len(literal) - (literal[0] == "-")
    if digits > MAX_INT_DIGITS:
        raise Undecodable(f"integer of {digits} digits (more than {MAX_INT_DIGITS:,})")
    return int(literal)


# The usual decoder: the C scanner calls these hooks for NaN/Infinity and float literals only, not for integers
# (a regex that looked for exponents instead would cost more than the calls on typical values).
_FAST = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_checked_float)
# For text that may hold a long integer: integers too go through a Python-level check.
_CHECKING = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_checked_float, parse_int=_checked_int)

# A run of more than 4,300 digits; the lookbehind starts a match at a run's first digit only (linear scan).
_LONG_DIGITS = re.compile(rf"(?<!\d)\d{{{MAX_INT_DIGITS + 1}}}")
# Strings with their escapes, so that brackets inside them do not count as nesting. Possessive, and an unterminated
# string runs to the end: a match never fails after a quote, so no input makes the scan quadratic.
_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
# A \u escape of a surrogate that really is an escape: preceded by an even number of backslashes.
_SURROGATE_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u([dD][89a-fA-F][0-9a-fA-F]{2})")


def utf8(raw: bytes) -> str:
    """``raw`` as strict UTF-8 text, or Undecodable saying where it is not."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Undecodable(f"not UTF-8: {exc.reason} at byte {exc.start}") from None


def _depth(text: str) -> int:
    """Deepest nesting of arrays and objects outside strings, without recursion (C-level passes only)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _lone_surrogate(text: str) -> str | None:
    """The first unpaired surrogate escape, as a reason, or None."""
    pending: re.Match[str] | None = None  # a high surrogate escape waiting for its low half
    for match in _SURROGATE_ESCAPE.finditer(text):
        high = match.group(1)[1] in "89abAB"
        if pending is not None:
            if not high and match.start(1) - 2 == pending.end():
                pending = None  # a valid pair
                continue
            return _lone(pending)
        if not high:
            return _lone(match)
        pending = match
    return None if pending is None else _lone(pending)


def _lone(match: re.Match[str]) -> str:
    return f"lone surrogate \\u{match.group(1)} at character {match.start(1) - 2}"


def loads(raw: str | bytes) -> Any:
    """Decode ``raw`` (bytes: UTF-8) as strict JSON; raises :class:`Undecodable` with the reason otherwise."""
    text = utf8(raw) if isinstance(raw, bytes) else raw
    size = len(text)
    # Each check first asks what is cheapest: a text shorter than the limit cannot break it.
    if size > MAX_DEPTH and text.count("[") + text.count("{") > MAX_DEPTH and _depth(text) > MAX_DEPTH:
        raise Undecodable(f"nested deeper than {MAX_DEPTH} levels")
    if "\\u" in text and (lone := _lone_surrogate(text)) is not None:
        raise Undecodable(lone)
    decoder = _FAST
    # No integer can be too long, or the interpreter refuses one itself (a ValueError, said our way by _failed).
    if size > MAX_INT_DIGITS and sys.get_int_max_str_digits() != MAX_INT_DIGITS and _LONG_DIGITS.search(text):
        decoder = _CHECKING
    try:
        return decoder.decode(text)
    except (ValueError, RecursionError) as exc:
        return _failed(decoder, text, exc)


def _failed(decoder: json.JSONDecoder, text: str, exc: ValueError | RecursionError) -> Any:
    """Undecodable for what a decoder raised, or the value when decoding again with every check says it is fine."""
    if isinstance(exc, Undecodable):
        raise exc
    if isinstance(exc, json.JSONDecodeError):
        raise Undecodable(f"{exc.msg.removesuffix(' at')} at line {exc.lineno} column {exc.colno}") from None
    if isinstance(exc, ValueError) and decoder is _FAST:
        # The interpreter's own integer limit: decode again, checking every integer, to say which one.
        try:
            return _CHECKING.decode(text)
        except (ValueError, RecursionError) as again:
            return _failed(_CHECKING, text, again)
    raise Undecodable(f"not decodable: {exc}") from None  # not expected past the checks; never let one escape

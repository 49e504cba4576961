"""bridge.strictjson: every rule of DESIGN.md §3 "Decoding is strict", the valid edge cases next to each, and the
promise that no input makes the checks themselves fail or take quadratic time."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any

import pytest

from bridge.strictjson import MAX_DEPTH, Undecodable, loads, utf8


def reason(raw: str | bytes) -> str:
    with pytest.raises(Undecodable) as caught:
        loads(raw)
    assert isinstance(caught.value, ValueError)
    return caught.value.reason


def nested(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


def nested_objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"a": [1, 2.5, "x", true, false, null]}', {"a": [1, 2.5, "x", True, False, None]}),
        (b'{"caf\xc3\xa9": "\xe2\x82\xac"}', {"café": "€"}),
        ("1e308", 1e308),
        ("-1.7976931348623157e308", -1.7976931348623157e308),
        ("1e-400", 0.0),  # underflow is a double (zero), not out of range
        ("1" * 4300, int("1" * 4300)),
        ("-" + "9" * 4300, -int("9" * 4300)),
        ("0." + "0" * 5000 + "1", 0.0),  # a long fraction is not a long integer
        ('"\\ud83d\\ude00"', "\U0001f600"),  # a valid surrogate pair
        ('"\\uD83D\\uDE00"', "\U0001f600"),
        ('"\\\\ud800"', "\\ud800"),  # an escaped backslash followed by the text ud800
        ('"\\\\\\\\ud800"', "\\\\ud800"),
        ('"\\u00e9\\n"', "é\n"),
        ('"' + "[" * 5000 + '"', "[" * 5000),  # brackets inside a string are not nesting
        ('["\\"[' + "[" * 600 + '"]', ['"[' + "[" * 600]),
        ("[" + "[]," * 5000 + "[]]", [[]] * 5001),  # many brackets, shallow
    ],
)
def test_valid_json_decodes(raw: str | bytes, expected: Any) -> None:
    assert loads(raw) == expected


def test_nesting_of_exactly_512_levels_decodes_and_513_does_not() -> None:
    assert MAX_DEPTH == 512
    value = loads(nested(512))
    for _ in range(511):
        value = value[0]
    assert value == []
    assert loads(nested_objects(512)) is not None
    assert reason(nested(513)) == "nested deeper than 512 levels"
    assert reason(nested_objects(513)) == "nested deeper than 512 levels"
    assert reason("[" * 300 + '{"a":' * 213 + "1" + "}" * 213 + "]" * 300) == "nested deeper than 512 levels"


@pytest.mark.parametrize("depth", [600, 900, 1000, 5000, 100_000])
def test_deep_nesting_is_undecodable_never_a_recursion_error(depth: int) -> None:
    assert reason(nested(depth)) == "nested deeper than 512 levels"
    assert reason(nested_objects(depth)) == "nested deeper than 512 levels"
    assert reason("[" * depth) == "nested deeper than 512 levels"  # unclosed too


def test_deep_nesting_is_refused_even_near_the_recursion_limit() -> None:
    # Called from deep inside a stack, 512 levels still decode: the decoder's own recursion stays far below it.
    def at_depth(n: int) -> Any:
        return loads(nested(512)) if n == 0 else at_depth(n - 1)

    assert at_depth(sys.getrecursionlimit() // 3) is not None


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_undecodable(literal: str) -> None:
    assert reason(literal) == f"{literal} is not JSON"
    assert reason(f'{{"x": [1, {literal}]}}') == f"{literal} is not JSON"


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "1.5E+309", "1e0400", "9" * 400 + ".0"])
def test_floats_beyond_a_double_are_undecodable(literal: str) -> None:
    found = reason(f"[{literal}]")
    assert "beyond a double's range" in found
    assert len(found) < 100  # a 400-digit literal is shortened in the reason


def test_integers_over_4300_digits_are_undecodable() -> None:
    assert reason("1" * 4301) == "integer of 4301 digits (more than 4,300)"
    assert reason("[-" + "7" * 5000 + "]") == "integer of 5000 digits (more than 4,300)"


def test_integers_over_4300_digits_are_undecodable_whatever_sys_allows() -> None:
    previous = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # no limit: the rule is the bridge's, not the interpreter's
    try:
        assert reason("1" * 4301) == "integer of 4301 digits (more than 4,300)"
    finally:
        sys.set_int_max_str_digits(previous)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('"\\ud800"', "lone surrogate \\ud800 at character 1"),
        ('"\\udc00"', "lone surrogate \\udc00 at character 1"),
        ('"ok \\ud800 x"', "lone surrogate \\ud800 at character 4"),
        ('"\\ud800\\ud800\\udc00"', "lone surrogate \\ud800 at character 1"),  # two highs: the first is alone
        ('"\\ud83d\\ude00\\udE00"', "lone surrogate \\udE00 at character 13"),
        ('"\\DBFF"', None),  # not an escape of u: the JSON itself is invalid
        ('"\\\\\\ud800"', "lone surrogate \\ud800 at character 3"),  # escaped backslash, then a real escape
        ('["\\ud800", "\\udc00"]', "lone surrogate \\ud800 at character 2"),  # halves in two strings
    ],
)
def test_lone_surrogate_escapes_are_undecodable(raw: str, expected: str | None) -> None:
    found = reason(raw)
    if expected is not None:
        assert found == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\xff", "not UTF-8: invalid start byte at byte 0"),
        (b'{"a": "\xc3"}', "not UTF-8: invalid continuation byte at byte 7"),
        (b'"\xed\xa0\x80"', "not UTF-8: invalid continuation byte at byte 1"),  # a surrogate encoded raw
    ],
)
def test_bytes_must_be_utf8(raw: bytes, expected: str) -> None:
    assert reason(raw) == expected
    with pytest.raises(Undecodable):
        utf8(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", "Expecting value at line 1 column 1"),
        (b"", "Expecting value at line 1 column 1"),
        ("{truncated", "Expecting property name enclosed in double quotes at line 1 column 2"),
        ('{"a": 1}\n{"b": 2}', "Extra data at line 2 column 1"),
        ('"tab\there"', "Invalid control character at line 1 column 5"),
    ],
)
def test_invalid_json_says_where(raw: str | bytes, expected: str) -> None:
    assert reason(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 513 + '"' + '\\"' * 200_000,  # unterminated strings full of escaped quotes
        '"' + "\\" * 400_001 + "u",
        "[" * 600 + "\\" * 400_000,
        "[" * 513 + "1" * 400_000,
        "[" + ",".join(["1" * 4300] * 100) + "]",
        json.dumps(["\U0001f600" * 1000] * 100),  # 100,000 escaped surrogate pairs
    ],
)
def test_checks_stay_linear_on_adversarial_text(raw: str) -> None:
    started = time.thread_time()  # CPU time: a loaded machine stretches wall time, not this
    with contextlib.suppress(Undecodable):
        loads(raw)
    assert time.thread_time() - started < 1.0  # quadratic behaviour would take minutes at these sizes

"""The extra Jinja filters templates get besides Jinja's own: tojson, fromjson, b64encode, b64decode, sha256
and datetime (DESIGN.md §2), with the helpers they share. ``bridge.templates`` installs :data:`FILTERS` in its
environment and reports :class:`FilterError` messages to the user as they are.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Callable, ItemsView, KeysView, ValuesView
from datetime import UTC, datetime, timedelta
from types import GeneratorType
from typing import Any

from jinja2 import Undefined


class FilterError(Exception):
    """A filter got a value it cannot handle; the message is shown to the user as is."""


# Lists in JSON; Jinja's map/select give generators, dict methods give views.
SEQUENCES = (list, tuple, GeneratorType, KeysView, ValuesView, ItemsView, range)


def _json_default(value: Any) -> Any:
    if isinstance(value, Undefined):
        str(value)  # a StrictUndefined raises its own error here, which names the missing attribute
    if isinstance(value, SEQUENCES):
        return list(value)
    raise TypeError(f"a {type(value).__name__} value is not JSON-serialisable")


def _tojson(value: Any, indent: int | None = None) -> str:
    """Compact JSON, keys in insertion order, non-ASCII kept (not Jinja's HTML-escaping tojson)."""
    separators = (",", ":") if indent is None else (",", ": ")
    try:
        return json.dumps(
            value,
            ensure_ascii=False,
            separators=separators,
            indent=indent,
            allow_nan=False,
            default=_json_default,
        )
    except (TypeError, ValueError) as exc:
        raise FilterError(f"tojson: {exc}") from exc


def _fromjson(value: Any) -> Any:
    if not isinstance(value, (str, bytes, bytearray)):
        raise FilterError(f"fromjson expects JSON text, got {type(value).__name__}")
    try:
        return json.loads(value)
    except ValueError as exc:
        raise FilterError(f"fromjson: invalid JSON: {exc}") from exc


def _as_bytes(value: Any, name: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise FilterError(f"{name} expects text or bytes, got {type(value).__name__} (use |string first)")


def _b64encode(value: Any) -> str:
    """Standard base64 (with padding) of the UTF-8 bytes of a string, or of bytes."""
    return base64.b64encode(_as_bytes(value, "b64encode")).decode("ascii")


def _b64decode(value: Any, encoding: str | None = "utf-8") -> str | bytes:
    """Base64 → text. Accepts the standard and URL-safe alphabets, missing padding and whitespace.

    The decoded bytes must be valid in ``encoding`` (a render error otherwise); ``b64decode(none)`` returns
    the raw bytes instead, e.g. for ``|sha256`` (bytes cannot go into a JSON payload as they are).
    """
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError as exc:
            raise FilterError("b64decode: invalid base64: not ASCII") from exc
    if not isinstance(value, str):
        raise FilterError(f"b64decode expects base64 text, got {type(value).__name__}")
    text = "".join(value.split()).translate(_URLSAFE_TO_STANDARD)
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise FilterError(f"b64decode: invalid base64: {exc}") from exc
    if encoding is None:
        return data
    try:
        return data.decode(encoding)
    except LookupError as exc:
        raise FilterError(f"b64decode: unknown encoding {encoding!r}") from exc
    except UnicodeDecodeError as exc:
        raise FilterError(
            f"b64decode: the decoded bytes are not valid {encoding}; b64decode(none) gives the raw bytes"
        ) from exc


_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


def _sha256(value: Any) -> str:
    """Hex SHA-256 of the UTF-8 bytes of a string, or of bytes."""
    return hashlib.sha256(_as_bytes(value, "sha256")).hexdigest()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _datetime(value: Any) -> str:
    """Epoch milliseconds (int/float), an ISO-8601 string or a datetime → ``2026-11-24T14:23:01.123Z``.

    Naive input is UTC; sub-millisecond digits are truncated. A string of digits is not taken as
    milliseconds (``|int`` says so explicitly).
    """
    try:
        if isinstance(value, bool):
            raise FilterError("datetime expects epoch milliseconds or an ISO-8601 string, got bool")
        if isinstance(value, (int, float)):
            if isinstance(value, float) and not math.isfinite(value):
                raise FilterError(f"datetime: {value} is not a time")
            moment = _EPOCH + timedelta(milliseconds=value)
        elif isinstance(value, str):
            try:
                moment = datetime.fromisoformat(value.strip())
            except ValueError:
                raise FilterError(f"datetime: {value!r} is not an ISO-8601 date-time") from None
        elif isinstance(value, datetime):
            moment = value
        else:
            raise FilterError(
                f"datetime expects epoch milliseconds or an ISO-8601 string, got {type(value).__name__}"
            )
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:
        raise FilterError(f"datetime: {value!r} is out of range") from None
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:{moment.minute:02d}:"
        f"{moment.second:02d}.{moment.microsecond // 1000:03d}Z"
    )


FILTERS: dict[str, Callable[..., Any]] = {
    "tojson": _tojson,
    "fromjson": _fromjson,
    "b64encode": _b64encode,
    "b64decode": _b64decode,
    "sha256": _sha256,
    "datetime": _datetime,
}
"""The filters by the name templates use."""

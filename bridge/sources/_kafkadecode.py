"""Kafka records → events: key/value decoding per format, headers, timestamps, ordering keys.

A record is anything with the attributes of aiokafka's ``ConsumerRecord`` (topic, partition, offset, key, value,
headers, timestamp); no client library is imported here.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Protocol

from bridge._clock import iso_ms
from bridge.config import KafkaSourceConfig
from bridge.errors import DecodeError
from bridge.sources import Event


class KafkaRecord(Protocol):
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Any: ...  # a sequence of (name, bytes | None)
    @property
    def timestamp(self) -> int: ...


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _no_constants(name: str) -> Any:
    # NaN and Infinity are Python extensions, not JSON; a payload holding them could not be sent on as JSON.
    raise ValueError(f"{name} is not valid JSON")


_JSON = json.JSONDecoder(parse_constant=_no_constants)  # one decoder: json.loads with options builds one per call


def decode(raw: bytes | None, fmt: str) -> tuple[Any, str | None]:
    """``(decoded, None)``, or ``(base64 of raw, reason)`` when ``raw`` does not decode as ``fmt``.
    A null key or value stays None in every format."""
    if raw is None:
        return None, None
    if fmt == "bytes":
        return b64(raw), None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        utf8 = f"not UTF-8: {exc.reason} at byte {exc.start}"
        return b64(raw), f"not valid JSON ({utf8})" if fmt == "json" else utf8
    if fmt == "text":
        return text, None
    try:
        return _JSON.decode(text), None
    except ValueError as exc:  # JSONDecodeError is a ValueError
        return b64(raw), f"not valid JSON ({exc})"
    except RecursionError:
        return b64(raw), "not decodable JSON (nested too deeply)"


def headers_text(headers: Any) -> dict[str, str | None]:
    """Header name → value as text (UTF-8, undecodable bytes replaced); a repeated name keeps its last value."""
    out: dict[str, str | None] = {}
    for name, value in headers or ():
        out[name] = None if value is None else bytes(value).decode("utf-8", errors="replace")
    return out


def order_key(record: KafkaRecord, ordering: str) -> Any:
    if ordering == "none":
        return None
    if ordering == "key" and record.key is not None:
        return (record.topic, record.partition, bytes(record.key))
    return (record.topic, record.partition)


def record_event(source_id: str, kc: KafkaSourceConfig, record: KafkaRecord) -> Event:
    """The event of one record. A key or value that does not decode in its format makes an event with
    ``error`` set (dead-lettered, not retried) whose undecodable part holds the raw bytes as base64 text."""
    topic, partition, offset = record.topic, record.partition, record.offset
    key, key_problem = decode(record.key, kc.key_format)
    value, value_problem = decode(record.value, kc.value_format)
    error: DecodeError | None = None
    problems = []
    if key_problem is not None:
        problems.append(f"key is {key_problem} for key_format {kc.key_format}; event.key holds the raw key as base64")
    if value_problem is not None:
        problems.append(
            f"value is {value_problem} for value_format {kc.value_format}; event.value holds the raw value as base64"
        )
    if problems:
        error = DecodeError(f"kafka record {topic}/{partition}@{offset}: " + "; ".join(problems))
    timestamp = record.timestamp
    has_time = timestamp is not None and timestamp >= 0  # -1: a record written without a timestamp
    return Event(
        id=f"kafka:{topic}:{partition}:{offset}",
        source=source_id,
        fields={
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "key": key,
            "value": value,
            "headers": headers_text(record.headers),
            "timestamp": timestamp if has_time else None,
            "timestamp_iso": iso_ms(timestamp) if has_time else None,
        },
        error=error,
        order_key=order_key(record, kc.ordering),
    )

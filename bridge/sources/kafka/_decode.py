"""Kafka records → events: key/value decoding per format, headers, timestamps, ordering keys.

A record is anything with the attributes of aiokafka's ``ConsumerRecord`` (topic, partition, offset, key, value,
headers, timestamp); no client library is imported here.
"""

from __future__ import annotations

import base64
from typing import Any, Protocol

from bridge import strictjson
from bridge._clock import iso_ms
from bridge.errors import DecodeError
from bridge.sources import Event
from bridge.sources.kafka.spec import KafkaSourceConfig


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


def decode(raw: bytes | None, fmt: str) -> tuple[Any, str | None]:
    """``(decoded, None)``, or ``(raw content, reason)`` when ``raw`` does not decode as ``fmt``: the raw content
    is the raw text when ``raw`` is UTF-8, else None (the caller then carries it as base64). A null key or value
    stays None in every format."""
    if raw is None:
        return None, None
    if fmt == "bytes":
        return b64(raw), None
    try:
        text = strictjson.utf8(raw)
    except strictjson.Undecodable as exc:
        return None, f"not valid JSON ({exc.reason})" if fmt == "json" else exc.reason
    if fmt == "text":
        return text, None
    try:
        return strictjson.loads(text), None
    except strictjson.Undecodable as exc:
        return text, f"not valid JSON ({exc.reason})"


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
    """The event of one record. A key or value that does not decode in its format makes an event with ``error``
    set (dead-lettered with ``binding: null``, not retried) that carries the undecodable part raw: as text in
    ``key``/``value`` when it is UTF-8, else as base64 in ``key_raw_b64``/``raw_b64`` (the part itself None)."""
    topic, partition, offset = record.topic, record.partition, record.offset
    key, key_problem = decode(record.key, kc.key_format)
    value, value_problem = decode(record.value, kc.value_format)
    timestamp = record.timestamp
    has_time = timestamp is not None and timestamp >= 0  # -1: a record written without a timestamp
    fields = {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "key": key,
        "value": value,
        "headers": headers_text(record.headers),
        "timestamp": timestamp if has_time else None,
        "timestamp_iso": iso_ms(timestamp) if has_time else None,
    }
    error: DecodeError | None = None
    if key_problem is not None or value_problem is not None:
        problems = []
        for part, field, problem, decoded, fmt, data in (
            ("key", "key_raw_b64", key_problem, key, kc.key_format, record.key),
            ("value", "raw_b64", value_problem, value, kc.value_format, record.value),
        ):
            if problem is None:
                continue
            if decoded is None and data is not None:
                fields[field] = b64(bytes(data))
                held = f"event.{field} holds the raw {part} as base64"
            else:
                held = f"event.{part} holds the raw {part} as text"
            problems.append(f"{part} is {problem} for {part}_format {fmt}; {held}")
        error = DecodeError(f"kafka record {topic}/{partition}@{offset}: " + "; ".join(problems))
    return Event(
        id=f"kafka:{topic}:{partition}:{offset}",
        source=source_id,
        fields=fields,
        error=error,
        order_key=order_key(record, kc.ordering),
    )

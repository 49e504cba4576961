"""The Kafka dead-letter destination: each record becomes one message on a topic of the source's own cluster.

A message has a size limit (the producer's ``max_request_size``, 1 MiB; a broker or topic may set a lower one),
and a dead letter that is over it would fail at every attempt: the dispatcher would hold the event, and with it
its partition, forever. So a record is made to fit before it is sent: its biggest values (the event's value or
content, raw or not, the rendered payload; then, if still needed, the key, headers, bind config and error message) are
replaced, largest first, by a marker ``{"truncated": true, "original_bytes": n, "sha256": hex}`` (a string is
measured and hashed as its UTF-8 text, anything else as its JSON text) until it fits, and the record lists what
it lost under ``truncated``. What identifies the event and says what went wrong stays: source, event id, topic,
partition, offset, binding, error code, attempts. The original is still in its topic at that offset. Should the
broker reject a message as too large all the same, the limit is lowered and the record cut again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, RecordListTooLargeError

from bridge._dlencode import encode_record, encode_value
from bridge.config import DeadLetterConfig, SourceConfig
from bridge.errors import DeadLetterError
from bridge.sources.kafka._conn import shared_options
from bridge.sources.kafka._probe import explain_connection_failure
from bridge.sources.kafka.spec import KafkaSourceConfig

log = logging.getLogger("bridge.sources.kafka")

MAX_REQUEST_BYTES = 1_048_576  # the producer's max_request_size (aiokafka's default, set explicitly to match)
_FRAMING_BYTES = 512  # more than the record batch header and per-record overhead take besides key/value/headers
_MIN_LIMIT_BYTES = 16_384  # a broker that refuses this much refuses the smallest dead letter too
_MARKER_BYTES = 120  # about what a marker takes: smaller values are not worth replacing

# Replaced in this order of groups, the largest of a group first: the bulk of an event before what describes it.
# An undecodable value that is not UTF-8 is carried as base64 in event.raw_b64 (a key in event.key_raw_b64).
_BULK_FIELDS: tuple[tuple[str, ...], ...] = (
    ("event", "value"), ("event", "raw_b64"), ("event", "content"), ("payload",),
)
_OTHER_FIELDS: tuple[tuple[str, ...], ...] = (
    ("event", "key"), ("event", "key_raw_b64"), ("event", "headers"), ("binding", "config"), ("error", "message"),
)


def _encode(value: Any) -> bytes:
    return encode_value(value).encode("utf-8")


def truncation_marker(value: Any) -> dict[str, Any]:
    """What stands in for a value cut from a dead letter."""
    raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else _encode(value)
    return {"truncated": True, "original_bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def fit_record(record: dict[str, Any], limit: int) -> tuple[bytes, list[str]]:
    """``record`` as JSON of at most ``limit`` bytes if it can be (see the module docstring), and the dotted paths
    of the values replaced by markers. ``record`` itself is left as it is."""
    encoded = encode_record(record).encode("utf-8")
    if len(encoded) <= limit:
        return encoded, []
    # One level deeper than the top is copied: markers replace values of "event", "binding" and "error".
    fitted = {key: dict(value) if isinstance(value, dict) else value for key, value in record.items()}
    cut: list[str] = []
    for group in (_BULK_FIELDS, _OTHER_FIELDS):
        present: list[tuple[int, tuple[str, ...], dict[str, Any]]] = []
        for path in group:
            parent = fitted if len(path) == 1 else fitted.get(path[0])
            if isinstance(parent, dict) and parent.get(path[-1]) is not None:
                present.append((len(_encode(parent[path[-1]])), path, parent))
        for size, path, parent in sorted(present, key=lambda found: -found[0]):
            if size <= _MARKER_BYTES:
                break
            parent[path[-1]] = truncation_marker(parent[path[-1]])
            cut.append(".".join(path))
            fitted["truncated"] = cut
            encoded = encode_record(fitted).encode("utf-8")
            if len(encoded) <= limit:
                return encoded, cut
    return encoded, cut  # everything big is a marker now: the smallest this record gets


class KafkaDeadLetter:
    """Produces each dead-letter record as a JSON value to a topic (``acks=all``); ``write`` returns once the
    broker acknowledged it. Key: the original record's key bytes when known, else the event id; headers
    ``error_code`` and ``source``. A record over the size limit is cut to fit (see the module docstring)."""

    def __init__(self, kc: KafkaSourceConfig, topic: str) -> None:
        self.topic = topic
        self._kc = kc
        self._bootstrap = kc.bootstrap_servers
        self._producer: Any = None
        self._starting: asyncio.Lock | None = None
        self._limit = MAX_REQUEST_BYTES  # lowered for good when the broker refuses a message as too large

    def describe(self) -> str:
        return f"kafka topic {self.topic} on {self._bootstrap}"

    async def _started(self) -> Any:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._producer is None:
                # The source's connection, security and shared client options (see _conn), made when first
                # needed: a TLS file that cannot be loaded is then a refusal, retried, not a failed start.
                producer = AIOKafkaProducer(**shared_options(self._kc), acks="all",
                                            max_request_size=MAX_REQUEST_BYTES)
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
        return self._producer

    async def write(self, record: dict[str, Any], *, key: bytes | None = None) -> None:
        if key is None:  # a null key, or a record not from a live event (a replay, a test): key it by the event id
            key = _event_id(record).encode("utf-8", "backslashreplace")
        error = record.get("error") or {}
        headers = [
            ("error_code", str(error.get("code", "")).encode("utf-8", "backslashreplace")),
            ("source", str(record.get("source", "")).encode("utf-8", "backslashreplace")),
        ]
        framing = _FRAMING_BYTES + len(key) + sum(len(name) + len(value) for name, value in headers)
        limit = self._limit
        while True:
            value, cut = fit_record(record, limit - framing)
            try:
                producer = await self._started()
                await producer.send_and_wait(self.topic, value, key=key, headers=headers)
            except (MessageSizeTooLargeError, RecordListTooLargeError) as exc:
                if limit <= _MIN_LIMIT_BYTES:
                    raise DeadLetterError(
                        f"Kafka topic {self.topic} refuses even a {len(value)}-byte dead letter as too large: {exc!r}"
                    ) from exc
                limit = max(_MIN_LIMIT_BYTES, min(limit, len(value) + framing) // 2)
                self._lower_limit(limit, len(value) + framing, exc)
                continue
            except KafkaConnectionError as exc:
                cause = await explain_connection_failure(self._kc)
                why = f"cannot connect to Kafka: {cause}" if cause is not None else repr(exc)
                raise DeadLetterError(f"cannot write a dead letter to Kafka topic {self.topic}: {why}") from exc
            except Exception as exc:  # KafkaError, a socket error while starting, a TLS file that cannot be loaded:
                # a refusal, retried by the caller
                raise DeadLetterError(f"cannot write a dead letter to Kafka topic {self.topic}: {exc!r}") from exc
            if cut:
                log.warning("dead letter of event %s: %s cut to a truncation marker (size, sha256) to fit the "
                            "%d-byte limit of Kafka topic %s", _event_id(record), ", ".join(cut), limit, self.topic)
            return

    def _lower_limit(self, limit: int, refused: int, exc: Exception) -> None:
        if limit < self._limit:
            self._limit = limit
            log.warning("Kafka topic %s refused a %d-byte dead letter as too large (%r); dead letters are cut to "
                        "%d bytes from now on", self.topic, refused, exc, limit)

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()


def _event_id(record: dict[str, Any]) -> str:
    event = record.get("event")
    return str(event.get("id", "")) if isinstance(event, dict) else ""


def kafka_dead_letter(config: DeadLetterConfig, source: SourceConfig) -> KafkaDeadLetter:
    """The ``dead_letter.kafka_topic`` destination of ``source``, on the source's own cluster and security."""
    if config.kafka_topic is None:
        raise DeadLetterError(f"source {source.id!r}: dead_letter has no kafka_topic")
    if not isinstance(source.kind_config, KafkaSourceConfig):
        raise DeadLetterError(
            f"source {source.id!r}: dead_letter.kafka_topic needs a kafka source (it uses the source's cluster); "
            f"a {source.kind} source has none"
        )
    return KafkaDeadLetter(source.kind_config, config.kafka_topic)

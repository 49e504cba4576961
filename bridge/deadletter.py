"""Dead-letter destinations.

A destination receives one record per failed (event, binding), or one with ``binding: null`` for an event that
failed before any binding was involved. ``write`` returns only once the record is durable; if it raises, the
event must not be acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from bridge.config import DeadLetterConfig, SourceConfig
from bridge.errors import DeadLetterError


class DeadLetterSink(Protocol):
    """Where records go once an event cannot be delivered."""

    def describe(self) -> str: ...

    async def write(self, record: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...


class FileDeadLetter:
    """Appends one JSON object per line; each write is flushed and fsynced before it returns.

    Writes that arrive together share one fsync (group commit), so a burst of failures does not cost one
    disk flush per record.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pending: list[tuple[str, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def describe(self) -> str:
        return f"file {self.path}"

    async def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((line, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="dead-letter-flush")
        await asyncio.shield(done)

    async def _flush_loop(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(_append_durably, self.path, "".join(line for line, _ in batch))
            except OSError as exc:
                err = DeadLetterError(f"cannot write dead letter to {self.path}: {exc}")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)


def _append_durably(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) from a dead-letter file, skipping a torn or foreign line."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield number, record


DestinationFactory = Callable[[DeadLetterConfig, SourceConfig], DeadLetterSink]


def _file_destination(config: DeadLetterConfig, source: SourceConfig) -> DeadLetterSink:
    assert config.file is not None
    return FileDeadLetter(config.file)


def _postgres_destination(config: DeadLetterConfig, source: SourceConfig) -> DeadLetterSink:
    from bridge.sources.postgres import postgres_dead_letter  # asyncpg stays inside the postgres kind

    return postgres_dead_letter(config, source)


def _kafka_destination(config: DeadLetterConfig, source: SourceConfig) -> DeadLetterSink:
    from bridge.sources.kafka import kafka_dead_letter  # aiokafka stays inside the kafka kind

    return kafka_dead_letter(config, source)


def destination_key(config: DeadLetterConfig, source: SourceConfig) -> str:
    """Sources whose destinations have the same key share one sink (one file, one table on one database)."""
    if config.file is not None:
        return f"file:{config.file}"
    server = getattr(source.kind_config, "dsn", None) or getattr(source.kind_config, "bootstrap_servers", "")
    return f"{config!r}@{server}"


def open_destination(config: DeadLetterConfig, source: SourceConfig) -> DeadLetterSink:
    """The destination a source's config names: a file, a Kafka topic or a Postgres table."""
    for key, factory in DESTINATIONS.items():
        if getattr(config, key) is not None:
            return factory(config, source)
    raise DeadLetterError(f"source {source.id!r} has no usable dead-letter destination")


DESTINATIONS: dict[str, DestinationFactory] = {
    "file": _file_destination,
    "kafka_topic": _kafka_destination,
    "postgres_table": _postgres_destination,
}

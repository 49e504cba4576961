"""Dead-letter destinations.

A destination receives one record per failed (event, binding), or one with ``binding: null`` for an event that
failed before any binding was involved. ``write`` returns only once the record is durable; if it raises (always a
DeadLetterError: a destination that refuses, never the record's content), the event must not be acknowledged.
Every destination serialises with ``bridge._dlencode``, which cannot fail on content.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from bridge._dlencode import encode_record
from bridge.config import DeadLetterConfig, SourceConfig
from bridge.errors import DeadLetterError
from bridge.sources import REGISTRY, spec_of


class DeadLetterSink(Protocol):
    """Where records go once an event cannot be delivered."""

    def describe(self) -> str: ...

    async def write(self, record: dict[str, Any], *, key: bytes | None = None) -> None:
        """Store ``record`` durably; ``key`` is the event's raw key (:attr:`Event.raw_key`), for a destination that
        keys its records (a Kafka topic)."""
        ...

    async def close(self) -> None: ...


class FileDeadLetter:
    """Appends one JSON object per line; each write is flushed and fsynced before it returns.

    Writes that arrive together share one fsync (group commit), so a burst of failures does not cost one
    disk flush per record. A torn last line (a short write on a full disk, a crash mid-write) is cut off before
    the next write, so a retried record starts on a line of its own; the directory is fsynced when the file is
    created, so a durable record is never in a file that the directory forgets.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pending: list[tuple[str, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def describe(self) -> str:
        return f"file {self.path}"

    async def write(self, record: dict[str, Any], *, key: bytes | None = None) -> None:
        del key  # a line has no key; the record holds the decoded one
        try:
            line = encode_record(record) + "\n"
        except Exception as exc:  # MemoryError and the like: a refusal to retry, never an escape
            raise DeadLetterError(f"cannot serialise a dead letter for {self.path}: {exc!r}") from exc
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
            except Exception as exc:  # not only OSError: whatever stops this write must reach the writers
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
    data = text.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        created = True
    except FileExistsError:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)  # read: to find a torn line
        created = False
    try:
        if created:
            _fsync_directory(path.parent)
        else:
            _cut_torn_line(fd)
        before = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, "no progress writing the dead letter")
                view = view[written:]
            os.fsync(fd)
        except OSError:
            # Every record of this batch will be written again: take back what got through, so that complete
            # lines of the batch are not recorded twice (if this fails too, the next write cuts the torn line).
            with contextlib.suppress(OSError):
                os.ftruncate(fd, before)
            raise
    finally:
        os.close(fd)


def _cut_torn_line(fd: int) -> None:
    """Truncate the file to its last complete line when it does not end with a newline."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            os.ftruncate(fd, start + newline + 1)
            break
        end = start
    else:
        os.ftruncate(fd, 0)
    os.fsync(fd)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict):
                yield number, record


def destination_key(config: DeadLetterConfig, source: SourceConfig) -> str:
    """Sources whose destinations have the same key share one sink (one file, one table on one database)."""
    if config.file is not None:
        return f"file:{config.file}"
    return f"{config!r}@{spec_of(source).connection(source)}"


def open_destination(config: DeadLetterConfig, source: SourceConfig) -> DeadLetterSink:
    """The destination a source's config names: a file, or a kind's own (a Kafka topic, a Postgres table), which
    is written through the source's connection and so needs a source of that kind (DeadLetterError if not)."""
    if config.file is not None:
        return FileDeadLetter(config.file)
    for spec in REGISTRY.values():
        key = spec.dead_letter_key
        if key is not None and getattr(config, key) is not None:
            return spec.open_dead_letter(config, source)  # it refuses a source of another kind
    raise DeadLetterError(f"source {source.id!r} has no usable dead-letter destination")

"""`bridge deadletters`: list, show and replay dead-letter records of the file destination.

Replaying delivers a record again the way live delivery would: the recorded event goes through the source's
:class:`~bridge.dispatch.Dispatcher` with a table holding only the record's binding, so ``when``, the payload
template (today's, so a fixed template applies), ``payload_schema``, the binding's ``condition_function_id``,
the delivery mode and the retry policy all apply as they do in ``bridge up``. A replay that fails again writes no
new dead letter: it is reported and the record stays as it was.

Each record is replayed at most once unless ``force`` is given. Marks live in a sidecar next to the dead-letter
file (``<file>.replayed``, one JSON line per replay), keyed by the record's identity (the sha256 of its canonical
JSON), not by its line, so they survive records being appended or a torn line being repaired; the dead-letter
file itself is only ever appended to by the running bridge. A mark is written and fsynced right after its
delivery succeeded; a crash between the two delivers that record again on the next replay (at-least-once).
Concurrent replays are serialised by an exclusive ``flock`` on ``<file>.lock``: the second waits, then sees the
first's marks.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from bridge._clock import iso_now
from bridge.bindings import Binding, BindingTable
from bridge.config import BridgeConfig, SourceConfig
from bridge.deadletter import read_records
from bridge.dispatch import Dispatcher
from bridge.errors import BridgeError
from bridge.sources import Event, Outcome

if TYPE_CHECKING:
    from bridge.engine import EngineLink  # the iii SDK: imported only when a replay connects


@dataclass(frozen=True)
class DeadLetter:
    ref: str  # how the operator names it: "LINE" or "FILE:LINE" when several files exist
    file: Path
    line: int
    record: dict[str, Any]
    replayed_at: str | None
    key: str = ""  # the record's identity (record_key)


def record_key(record: dict[str, Any]) -> str:
    """A record's identity: the sha256 of its canonical JSON (sorted keys, ASCII), whatever line it is on."""
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def dead_letter_files(config: BridgeConfig) -> list[Path]:
    files: list[Path] = []
    for candidate in [config.defaults.dead_letter.file, *(s.delivery.dead_letter.file for s in config.sources)]:
        if candidate is not None and candidate not in files:
            files.append(candidate)
    return files


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".replayed")


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def load(config: BridgeConfig, source: str | None = None) -> list[DeadLetter]:
    files = dead_letter_files(config)
    several = len(files) > 1
    letters: list[DeadLetter] = []
    for path in files:
        records = list(read_records(path))
        keys = {line: record_key(record) for line, record in records}
        marks = _marks(path, keys)
        for line, record in records:
            if source is not None and record.get("source") != source:
                continue
            ref = f"{path.name}:{line}" if several else str(line)
            letters.append(DeadLetter(ref, path, line, record, marks.get(keys[line]), keys[line]))
    return letters


def _marks(path: Path, keys: dict[int, str]) -> dict[str, str]:
    """Record key → when it was replayed. Marks of earlier versions name a line number only: they are mapped
    through ``keys`` (line → key) as the file reads now."""
    marks: dict[str, str] = {}
    for _, mark in read_records(_sidecar(path)):
        key = mark.get("key")
        if not isinstance(key, str):
            line = mark.get("line")
            key = keys.get(line) if isinstance(line, int) else None
        if key is not None:
            marks.setdefault(key, str(mark.get("at") or "?"))
    return marks


def format_list(letters: list[DeadLetter], out: TextIO) -> None:
    if not letters:
        out.write("no dead letters\n")
        return
    out.write(f"{'REF':<8} {'AT':<24} {'SOURCE':<16} {'FUNCTION':<24} {'ERROR':<26} EVENT\n")
    for d in letters:
        rec = d.record
        binding = rec.get("binding") or {}
        error = rec.get("error") or {}
        event = rec.get("event") or {}
        status = "  (replayed)" if d.replayed_at else ""
        out.write(
            f"{d.ref:<8} {rec.get('last_attempt_at') or '-'!s:<24} {rec.get('source')!s:<16} "
            f"{binding.get('function_id', '-')!s:<24} {error.get('code')!s:<26} {event.get('id')}{status}\n"
        )


def select(letters: list[DeadLetter], refs: list[str]) -> list[DeadLetter]:
    by_ref = {d.ref: d for d in letters}
    missing = [r for r in refs if r not in by_ref]
    if missing:
        raise BridgeError(f"no dead letter {', '.join(missing)} (see `bridge deadletters list`)")
    return [by_ref[r] for r in refs]


async def replay(
    config: BridgeConfig,
    letters: list[DeadLetter],
    out: TextIO,
    *,
    force: bool = False,
    every: bool = False,
    connect_timeout_s: float = 15.0,
) -> int:
    """Deliver each record again through its source's dispatcher; return how many were not delivered. A record
    already replayed is refused (counted) unless ``force``; with ``every`` (``--all``) one that another replay
    delivered meanwhile is skipped quietly instead (it was chosen as not replayed yet)."""
    if not letters:
        return 0
    with ExitStack() as locks:
        marks: dict[Path, dict[str, str]] = {}
        for path in sorted({d.file for d in letters}):
            locks.enter_context(await _ReplayLock.take(path))
            # Read again under the lock: a replay that held it may have marked records since `load`.
            marks[path] = _marks(path, {line: record_key(rec) for line, rec in read_records(path)})
        replayer = _Replayer(config, out, connect_timeout_s)
        failures = 0
        try:
            for letter in letters:
                at = marks[letter.file].get(letter.key)
                if at is not None and not force:
                    if every:
                        out.write(f"{letter.ref}: already replayed at {at}; skipped\n")
                        continue
                    out.write(f"{letter.ref}: already replayed at {at}; not delivered again "
                              "(--force delivers it again)\n")
                    failures += 1
                    continue
                if await replayer.replay_one(letter):
                    marks[letter.file][letter.key] = _mark(letter)
                    out.write(f"{letter.ref}: replayed to {letter.record['binding']['function_id']}\n")
                else:
                    failures += 1
        finally:
            await replayer.close()
    return failures


class _ReplayLock:
    """An exclusive flock on ``<dead-letter file>.lock``, held for a whole replay."""

    POLL_S = 0.1

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    async def take(cls, path: Path) -> _ReplayLock:
        """Polled rather than blocking, so that Ctrl-C ends a replay waiting for another one at once."""
        lock = _lock_path(path)
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        told = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return cls(fd)
                except BlockingIOError:
                    if not told:
                        print(f"bridge: another replay holds {lock}; waiting for it", file=sys.stderr)
                        told = True
                    await asyncio.sleep(cls.POLL_S)
        except BaseException:
            os.close(fd)
            raise

    def __enter__(self) -> _ReplayLock:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # closing the descriptor drops the flock


class _Captured:
    """The dead-letter sink of a replay: a record that fails again is reported, not appended a second time."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def describe(self) -> str:
        return "replay (reported, not written)"

    async def write(self, record: dict[str, Any], *, key: bytes | None = None) -> None:
        self.records.append(record)

    async def close(self) -> None:
        return None


class _Replayer:
    """One dispatcher per source, each with a one-binding table that holds the record being replayed. The engine
    link is made when the first record needs it (refusing records needs no engine)."""

    def __init__(self, config: BridgeConfig, out: TextIO, connect_timeout_s: float) -> None:
        self._config = config
        self._out = out
        self._connect_timeout_s = connect_timeout_s
        self._link: EngineLink | None = None
        self._dispatchers: dict[str, tuple[Dispatcher, BindingTable, _Captured]] = {}

    async def _connected(self) -> EngineLink:
        from bridge.engine import EngineLink

        if self._link is None:
            link = self._link = EngineLink(self._config.engine)

            async def start() -> None:
                link.start([])

            await link.on_loop(start)
            try:
                await asyncio.wait_for(link.on_loop(link.wait_connected), self._connect_timeout_s)
            except TimeoutError:
                raise BridgeError(f"the iii engine at {self._config.engine.url} is unreachable") from None
        return self._link

    async def close(self) -> None:
        if self._link is not None:
            await self._link.on_loop(self._link.close)
            await asyncio.to_thread(self._link.shutdown)

    async def replay_one(self, letter: DeadLetter) -> bool:
        rec = letter.record
        ref = letter.ref
        binding = rec.get("binding")
        if not isinstance(binding, dict):
            self._out.write(f"{ref}: skipped: the event failed before any binding was involved ({_err(rec)})\n")
            return False
        source_id = str(rec.get("source"))
        try:
            source = self._config.source(source_id)
        except KeyError:
            self._out.write(f"{ref}: skipped: source {source_id!r} is not in the config any more\n")
            return False
        try:
            event, bound = _event(rec, source), _binding(binding, source)
        except (KeyError, TypeError, ValueError) as exc:
            self._out.write(f"{ref}: skipped: the record is incomplete ({type(exc).__name__}: {exc})\n")
            return False
        link = await self._connected()
        dispatcher, table, captured = self._dispatcher(source, link)

        async def deliver() -> Outcome:
            # On the link's loop, where the dispatcher reads the table: one hop per record from this command's own
            # loop, which a replay (no hot path) can afford.
            for old in table.snapshot():
                table.remove(old.id)
            table.upsert(bound)
            captured.records.clear()
            return await dispatcher.deliver(event)

        with _QuietDispatch():
            outcome = await link.on_loop(deliver)
        if outcome == "delivered":
            return True
        if outcome == "filtered":
            self._out.write(f"{ref}: not delivered: filtered by `when` or the binding's condition function; "
                            "not marked as replayed\n")
            return False
        self._out.write(f"{ref}: replay failed: {_err(captured.records[-1]) if captured.records else outcome}\n")
        return False

    def _dispatcher(self, source: SourceConfig, link: EngineLink) -> tuple[Dispatcher, BindingTable, _Captured]:
        if source.id not in self._dispatchers:
            table, captured = BindingTable(source.id), _Captured()
            self._dispatchers[source.id] = (Dispatcher(source, table, link, captured), table, captured)
        return self._dispatchers[source.id]


def _event(rec: dict[str, Any], source: SourceConfig) -> Event:
    view = rec["event"]
    if not isinstance(view, dict):
        raise TypeError("event is not an object")
    fields = {k: v for k, v in view.items() if k not in ("id", "source")}
    return Event(id=str(view["id"]), source=source.id, fields=fields)


def _binding(view: dict[str, Any], source: SourceConfig) -> Binding:
    namespace = view.get("namespace")
    config = view.get("config") or {}
    if not isinstance(config, dict):
        raise TypeError("binding.config is not an object")
    return Binding(
        id=str(view["id"]),
        trigger_type=source.id,
        function_id=str(view["function_id"]),
        namespace=None if namespace in (None, "default") else str(namespace),
        config=config,
    )


class _QuietDispatch:
    """The dispatcher's warnings speak of dead-lettering, which a replay does not do: its outcome is printed."""

    def __enter__(self) -> None:
        self._logger = logging.getLogger("bridge.dispatch")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self._logger.setLevel(self._level)


def _mark(letter: DeadLetter) -> str:
    """Append the record's mark and make it durable; returns its time."""
    at = iso_now()
    path = _sidecar(letter.file)
    binding = letter.record.get("binding") or {}
    line = json.dumps({"key": letter.key, "event_id": (letter.record.get("event") or {}).get("id"),
                       "binding_id": binding.get("id"), "line": letter.line, "at": at}) + "\n"
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
    if new:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return at


def _err(rec: dict[str, Any]) -> str:
    error = rec.get("error") or {}
    return f"{error.get('code')}: {error.get('message')}"

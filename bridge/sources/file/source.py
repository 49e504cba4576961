"""The ``file`` source: files appearing, changing or disappearing in a directory become events.

Flow of one file: the watcher (watchfiles, the only module importing it) or the initial scan reports a path →
it waits in ``pending`` until its size and mtime stopped changing for ``settle_ms`` → it moves to ``ready`` →
the submitter stats it again, reads its content right then, and submits the event (``submit`` waits while no
function is bound or the in-flight window is full, so files wait on disk, not in memory) → once the event is
done, ``after_delivery`` is applied and the version is recorded in the checkpoint.

Delivery is at-least-once across restarts: the checkpoint (``state_dir/file/<source id>.jsonl``) records each
acknowledged version ``(mtime_ns, size)``; on start every file not recorded at its current version is
delivered (``created`` if never recorded, ``modified`` otherwise) and recorded files that are gone become
``deleted`` events. Versions whose change kind is not in ``changes`` are recorded without delivery, so that
``created`` and ``modified`` stay told apart.

Paths: ``include``/``exclude`` globs are tried on the file name and on the POSIX relative path (see
:class:`~bridge.sources.file._state.PathFilter`). Symlinks to files inside the directory are files under the
link's name; symlinks resolving outside it, and directory symlinks, are ignored.

Containment: a file is stat'ed, read, deleted or moved only through the watched directory's descriptor, opened
once, walking each relative path one component at a time without following symlinks
(:mod:`bridge.sources.file._fs`). A directory on the path swapped for a symlink at any moment makes that one
operation fail (a warning is logged, the file is skipped until its path is real again, a refused after_delivery
leaves the file in place), so nothing outside the directory is ever read into an event, moved or deleted.

Replicas: one active bridge per watched directory, through an exclusive ``flock`` on ``.iii-bridge.lock`` in
that directory (excluded from events). A second bridge stands by and retries every second.

Dry run (`bridge up --dry-run`): the source reads the directory like an active replica but is none. It neither
takes nor waits for the lock (so it shows files beside a live bridge, and a live bridge started after it does
not stand by), never creates the watched directory (it waits for it), applies no ``after_delivery`` whatever the
config says, and does not advertise itself (:meth:`Sink.activate`). Its checkpoint goes to the state_dir it is
given, which the runtime makes a scratch directory: nothing in the watched directory or the real state_dir is
written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from watchfiles import Change, awatch

from bridge._clock import iso_from_ns
from bridge._tasks import cancel_and_wait, first_ended
from bridge.config import SourceConfig
from bridge.errors import DecodeError
from bridge.sources import Event, Outcome, Sample, Sink
from bridge.sources.file._fs import open_base
from bridge.sources.file._state import (
    Checkpoint,
    CheckpointLog,
    DirLock,
    PathFilter,
    Tree,
    Version,
    inside,
    parse_version,
    read_content,
    safe_name,
    version_text,
)
from bridge.sources.file.spec import FileSourceConfig

log = logging.getLogger("bridge.sources.file")

# watchfiles logs every batch ("N changes detected") at INFO, which would drown the bridge's own lines; an
# operator who configured that logger explicitly keeps their level.
if logging.getLogger("watchfiles").level == logging.NOTSET:
    logging.getLogger("watchfiles").setLevel(logging.WARNING)

_WATCH_STEP_MS = 10  # with debounce 200: changes reach us ~15 ms after they happen (watchfiles' default: ~50)
_WATCH_DEBOUNCE_MS = 200
_SETTLE_BATCH = 500  # stats per settle round before yielding to the loop
_READ_INLINE_BYTES = 64 * 1024  # larger contents are read in a thread
_DRY_RUN_DIR_POLL_S = 1.0  # a dry run does not create a missing watched directory: it looks again this often


@dataclass(eq=False)
class _Flight:
    """One version of a path submitted and not yet acknowledged (``version`` None: a deletion). ``quiet``
    entries were never submitted: a change not in ``changes``, recorded once the versions before it are."""

    version: str | None
    quiet: bool = False


class FileSource:
    """Watches ``config.kind_config.path``; see the module docstring for the semantics."""

    def __init__(self, config: SourceConfig, state_dir: Path, *, dry_run: bool = False) -> None:
        if not isinstance(config.kind_config, FileSourceConfig):
            raise TypeError(f"source {config.id} is not a file source")
        self.config = config
        self._fc: FileSourceConfig = config.kind_config
        name = safe_name(config.id)
        self._dry_run = dry_run
        self._log = CheckpointLog(state_dir / "file" / f"{name}.jsonl")
        self._lock = None if dry_run else DirLock(self._fc.path, state_dir / "file" / f"{name}.lock", config.id)
        # A dry run leaves every file in place, whatever after_delivery says.
        self._after_mode: Literal["keep", "delete", "move"] = "keep" if dry_run else self._fc.after_delivery
        self._settle_s = self._fc.settle_ms / 1000
        self._tree: Tree | None = None
        self._stopped = False  # run() is over; acknowledgements of events in flight may still arrive
        self._move_rel: str | None = None  # move_to relative to the watched directory, when inside it (at start)
        self._cp = Checkpoint()
        self._pending: OrderedDict[str, tuple[float, Version | None]] = OrderedDict()  # rel → (due, stat seen)
        self._ready: OrderedDict[str, Version | None] = OrderedDict()  # rel → settled stat
        self._in_flight: dict[str, list[_Flight]] = {}
        self._pending_wake = asyncio.Event()
        self._ready_wake = asyncio.Event()

    def figures(self) -> dict[str, list[Sample]]:
        return {}  # the file kind declares no figures of its own

    # --- the run ----------------------------------------------------------------------------------------------

    async def run(self, sink: Sink) -> None:
        fc = self._fc
        self._stopped = False
        if self._dry_run:
            await self._start_dry_run()
        else:
            await self._become_active(sink)
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        try:
            self._move_rel = self._skip_prefix()
            tree = self._tree = Tree(fc.path, fc.recursive, PathFilter(fc.include, fc.exclude, self._move_rel))
            self._cp = await asyncio.to_thread(self._log.load)
            tasks.append(asyncio.create_task(self._watch(stop), name=f"{self.config.id} watcher"))
            # The watcher's first step sets up its inotify watches synchronously; scanning after it means a
            # file created during the scan is seen by one or the other (duplicates merge in `pending`).
            await asyncio.sleep(0)
            found = await asyncio.to_thread(tree.walk)
            self._initial(found)
            log.info(
                "file source %s: watching %s (%s), %d file(s) pending from the initial scan, %d checkpointed",
                self.config.id, fc.path, "recursive" if fc.recursive else "top level only",
                len(self._pending), len(self._cp.versions),
            )
            tasks.append(asyncio.create_task(self._settle(), name=f"{self.config.id} settle"))
            tasks.append(asyncio.create_task(self._submit_loop(sink), name=f"{self.config.id} submit"))
            await first_ended(tasks)
            raise RuntimeError(f"file source {self.config.id}: the watch on {fc.path} ended")
        finally:
            stop.set()  # the watcher thread checks it every step; cancelling alone would wait for its timeout
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(cancel_and_wait(tasks), timeout=5)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._log.wait_idle(), timeout=5)
            finally:
                if self._lock is not None:
                    self._lock.release()
                    sink.deactivate()  # another replica may take the lock and provide the trigger type now
                self._stopped = True
                self._close_tree_when_idle()

    async def _become_active(self, sink: Sink) -> None:
        """Create the watched directory if needed, take its lock (standing by while another bridge holds it),
        then advertise the trigger type: from here on this replica delivers."""
        assert self._lock is not None
        fc = self._fc
        if not fc.path.is_dir():
            fc.path.mkdir(parents=True, exist_ok=True)
            log.info("file source %s: created the watched directory %s", self.config.id, fc.path)
        await self._lock.acquire()
        sink.activate()

    async def _start_dry_run(self) -> None:
        """Wait for the watched directory (creating it would be a change); take no lock and advertise nothing,
        so that a live bridge on the same directory is neither kept waiting nor drawn from."""
        fc = self._fc
        if not fc.path.is_dir():
            log.info("file source %s: dry run: %s does not exist; waiting for it (a dry run does not create it)",
                     self.config.id, fc.path)
            while not fc.path.is_dir():
                await asyncio.sleep(_DRY_RUN_DIR_POLL_S)
        log.info(
            "file source %s: dry run: reading %s without its replica lock and without touching any file "
            "(no lock file, no after_delivery; checkpoints only in the scratch state_dir)", self.config.id, fc.path,
        )

    def _skip_prefix(self) -> str | None:
        """``move_to`` relative to the watched directory when it lies inside it: moved files are not new files."""
        if self._fc.move_to is None:
            return None
        root, target = os.path.realpath(self._fc.path), os.path.realpath(self._fc.move_to)
        if target == root or not inside(target, root):
            return None
        return os.path.relpath(target, root).replace(os.sep, "/")

    def _initial(self, found: list[tuple[str, Version]]) -> None:
        assert self._tree is not None
        seen: set[str] = set()
        for rel, v in found:
            seen.add(rel)
            if self._cp.get(rel) != version_text(v):
                self._add_pending(rel, v)
        forget: list[tuple[str, str | None]] = []
        for rel in list(self._cp.versions):
            if rel in seen:
                continue
            if self._wants(rel):
                self._add_pending(rel, None)  # gone while we were down
            else:
                forget.append((rel, None))  # the filter changed: not ours any more
        if forget:
            self._apply(forget)

    def _wants(self, rel: str) -> bool:
        assert self._tree is not None
        return (self._fc.recursive or "/" not in rel) and self._tree.filter.matches_file(rel)

    # --- watching ---------------------------------------------------------------------------------------------

    async def _watch(self, stop: asyncio.Event) -> None:
        changes_iter = awatch(
            self._fc.path,
            watch_filter=None,
            debounce=_WATCH_DEBOUNCE_MS,
            step=_WATCH_STEP_MS,
            stop_event=stop,
            recursive=self._fc.recursive,
            ignore_permission_denied=True,
        )
        # aclosing: a cancellation while we process a batch must still close the inotify instance now.
        async with contextlib.aclosing(changes_iter) as batches:
            async for batch in batches:
                await self._on_changes(batch)

    async def _on_changes(self, batch: set[tuple[Change, str]]) -> None:
        tree = self._tree
        assert tree is not None
        if any(change == Change.deleted for change, _ in batch) and not self._fc.path.is_dir():
            # The watch dies with the directory and would report nothing once it is back; failing lets the
            # runtime start the source again, which recreates the directory.
            raise RuntimeError(f"file source {self.config.id}: the watched directory {self._fc.path} was removed")
        new_dirs: list[str] = []
        real_dirs: dict[str, str] = {}
        for change, reported in batch:
            rel = tree.relative(reported, real_dirs)
            if rel is None or tree.filter.excluded(rel):
                continue
            cur = tree.stat(rel)
            if cur is None and tree.is_dir(rel):
                if change == Change.added and self._fc.recursive:
                    new_dirs.append(rel)
                continue
            if cur is None:
                # A directory moved away is one event: its known files are gone too.
                for known in self._cp.files_under(rel):
                    self._add_pending(known, None)
            if self._wants(rel):
                self._add_pending(rel, cur)
        # Rescan new directories: files written into them before their watch existed raised no event.
        walked: list[str] = []
        for rel_dir in sorted(new_dirs):
            if any(rel_dir.startswith(w + "/") for w in walked):
                continue
            walked.append(rel_dir)
            for rel, v in await asyncio.to_thread(tree.walk, rel_dir):
                self._add_pending(rel, v)

    # --- settling ---------------------------------------------------------------------------------------------

    def _add_pending(self, rel: str, seen: Version | None) -> None:
        if rel in self._pending or rel in self._ready:
            return  # its stat is compared again when it is due: nothing to add
        self._pending[rel] = (time.monotonic() + self._settle_s, seen)
        self._pending_wake.set()

    async def _settle(self) -> None:
        """Due candidates whose stat did not change since they were queued are settled. Every entry waits the
        same settle_ms, so the dict's insertion order is its due order and only the front is looked at."""
        assert self._tree is not None
        while True:
            if not self._pending:
                self._pending_wake.clear()
                await self._pending_wake.wait()
                continue
            now = time.monotonic()
            for _ in range(_SETTLE_BATCH):
                if not self._pending:
                    break
                rel, (due, seen) = next(iter(self._pending.items()))
                if due > now:
                    break
                del self._pending[rel]
                cur = self._tree.stat(rel)
                if cur == seen:
                    self._ready[rel] = cur
                    self._ready_wake.set()
                else:
                    self._pending[rel] = (now + self._settle_s, cur)  # still changing: wait again
            if self._pending:
                due = next(iter(self._pending.values()))[0]
                await asyncio.sleep(max(0.0, due - time.monotonic()))

    # --- submitting -------------------------------------------------------------------------------------------

    async def _submit_loop(self, sink: Sink) -> None:
        while True:
            if not self._ready:
                self._ready_wake.clear()
                await self._ready_wake.wait()
                continue
            if not sink.has_bindings():
                # Files wait on disk: nothing is read until some function can receive it.
                await sink.wait_for_bindings()
                continue
            rel, settled = self._ready.popitem(last=False)
            await self._submit_one(sink, rel, settled)

    def _latest(self, rel: str) -> str | None:
        """The newest version submitted or recorded (None: never seen, or its deletion is the newest)."""
        flights = self._in_flight.get(rel)
        return flights[-1].version if flights else self._cp.get(rel)

    async def _submit_one(self, sink: Sink, rel: str, settled: Version | None) -> None:
        assert self._tree is not None
        cur = self._tree.stat(rel)
        if cur != settled:
            self._add_pending(rel, cur)
            return
        latest = self._latest(rel)
        if cur is None:
            if latest is None:
                return  # never delivered (or our own delete/move): nothing to tell
            if "deleted" not in self._fc.changes:
                self._record_quietly(rel, None)
                return
            await self._submit(sink, rel, parse_version(latest), "deleted", None, None)
            return
        version = version_text(cur)
        if version == latest:
            return
        change = "created" if latest is None else "modified"
        if change not in self._fc.changes:
            self._record_quietly(rel, version)
            return
        content: Any = None
        error: DecodeError | None = None
        raw_b64: str | None = None
        if self._fc.content != "none":
            args = (self._tree.dir, rel, self._fc.content, self._fc.max_content_bytes, cur)
            result = read_content(*args) if cur[1] <= _READ_INLINE_BYTES else await asyncio.to_thread(
                read_content, *args
            )
            if result is None:
                self._add_pending(rel, self._tree.stat(rel))  # changed or vanished while we read it
                return
            content, reason, raw_b64 = result
            if reason is not None:
                log.warning("file source %s: %s; the event goes to the dead letter", self.config.id, reason)
                error = DecodeError(reason)
        await self._submit(sink, rel, cur, change, content, error, raw_b64)

    async def _submit(
        self, sink: Sink, rel: str, version: Version, change: str, content: Any, error: DecodeError | None,
        raw_b64: str | None = None,
    ) -> None:
        assert self._tree is not None
        mtime_ns, size = version
        deleted = change == "deleted"
        event = Event(
            # A deletion carries the version it removes; the suffix keeps its id apart from that version's.
            id=f"file:{rel}:{mtime_ns}:{size}" + (":deleted" if deleted else ""),
            source=self.config.id,
            fields={
                "path": self._tree.absolute(rel),
                "relative_path": rel,
                "name": rel.rpartition("/")[2],
                "change": change,
                "size": size,
                "mtime": iso_from_ns(mtime_ns),
                "content": content,
                **({"raw_b64": raw_b64} if raw_b64 is not None else {}),  # undecodable bytes, for the dead letter
            },
            error=error,
            order_key=rel,  # two versions of one file are delivered one after the other, in order
        )
        flight = _Flight(None if deleted else version_text(version))
        self._in_flight.setdefault(rel, []).append(flight)

        async def on_done(outcome: Outcome) -> None:
            await self._ack(rel, flight, version)

        try:
            await sink.submit(event, on_done)
        except BaseException:
            self._drop_flight(rel, flight)
            raise

    def _drop_flight(self, rel: str, flight: _Flight) -> list[_Flight]:
        flights = self._in_flight.get(rel, [])
        if flight in flights:
            flights.remove(flight)
        if not flights:
            self._in_flight.pop(rel, None)
        return flights

    # --- acknowledging ----------------------------------------------------------------------------------------

    async def _ack(self, rel: str, flight: _Flight, version: Version) -> None:
        """after_delivery first (whatever the outcome: a dead letter holds the event), then the checkpoint."""
        gone = flight.version is None
        if not gone and self._after_mode != "keep":
            gone = self._after_delivery(rel, version)
        # Memory is updated in the same step as the unlink/move, so the watcher's report of it finds nothing.
        records: list[tuple[str, str | None]] = [(rel, None if gone else flight.version)]
        flights = self._drop_flight(rel, flight)
        while flights and flights[0].quiet:
            records.append((rel, flights.pop(0).version))
        if not flights:
            self._in_flight.pop(rel, None)
        self._close_tree_when_idle()
        await asyncio.shield(self._apply(records))

    def _close_tree_when_idle(self) -> None:
        """Events in flight at shutdown are still acknowledged (after_delivery included) after run() ended: the
        watched directory's descriptor is released once the last of them is."""
        if self._stopped and not self._in_flight and self._tree is not None:
            self._tree.close()

    def _after_delivery(self, rel: str, version: Version) -> bool:
        """Delete or move the delivered file; True when it is gone. A file changed since is a newer version
        with its own event: it is kept. Both walk the path from the watched directory's descriptor, so a
        directory swapped for a symlink meanwhile fails the operation instead of reaching outside. Runs without
        awaiting (see _ack)."""
        assert self._tree is not None
        src = self._tree.absolute(rel)
        try:
            if self._tree.version(rel) != version:
                log.info("file source %s: %s changed since delivery; kept for its next event", self.config.id, src)
                return False
            if self._after_mode == "delete":
                self._tree.dir.unlink(rel)
            else:
                self._move(rel)
        except FileNotFoundError:
            return True
        except OSError as exc:
            log.error(
                "file source %s: cannot %s %s after delivery: %s; it stays and is not delivered again unless "
                "it changes", self.config.id, self._after_mode, src, exc.strerror or exc,
            )
            return False
        return True

    def _move(self, rel: str) -> None:
        """Move ``rel`` below ``move_to``, keeping its relative path; ``move_to`` inside the watched directory is
        reached like any path in it (no symlink followed), one outside is the operator's path as configured."""
        assert self._tree is not None and self._fc.move_to is not None
        with contextlib.ExitStack() as stack:
            if self._move_rel is not None:
                base = stack.enter_context(self._tree.dir.directory(self._move_rel, create=True))
            else:
                base = open_base(self._fc.move_to)
                stack.callback(os.close, base)
            moved = self._tree.dir.move(rel, base, rel)
        if moved != rel:
            log.info("file source %s: %s existed; moved %s to %s", self.config.id,
                     os.path.join(self._fc.move_to, rel), self._tree.absolute(rel),
                     os.path.join(self._fc.move_to, moved))

    def _record_quietly(self, rel: str, version: str | None) -> None:
        """Record a version (None: forget the path) that is not delivered, after what is in flight for it."""
        flights = self._in_flight.get(rel)
        if flights:
            flights.append(_Flight(version, quiet=True))
        else:
            self._apply([(rel, version)])

    def _apply(self, records: list[tuple[str, str | None]]) -> asyncio.Future[None]:
        lines: list[dict[str, Any]] = []
        for rel, version in records:
            if version is None:
                self._cp.remove(rel)
                lines.append({"p": rel, "d": True})
            else:
                self._cp.set(rel, version)
                lines.append({"p": rel, "v": version})
        return self._log.append(lines)

"""What the file source keeps on disk: the checkpoint log (the last version recorded for each file) and the
directory lock that keeps one replica active per watched directory, with the version format they share.

Kept apart from the scanning and matching in ``_state.py``, which re-exports these names for ``source.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

log = logging.getLogger("bridge.sources.file")

Version = tuple[int, int]
"""(mtime_ns, size) of one file: what identifies a version of it."""

LOCK_NAME = ".iii-bridge.lock"


def version_text(v: Version) -> str:
    return f"{v[0]}:{v[1]}"


def parse_version(text: str) -> Version:
    mtime, size = text.split(":")
    return int(mtime), int(size)


# --- the checkpoint -------------------------------------------------------------------------------------------


class Checkpoint:
    """Relative path → last recorded version, with an index of the directories holding them (so that a
    directory moved out of the tree, which the kernel reports as one event, can produce its files' deletions)."""

    def __init__(self) -> None:
        self.versions: dict[str, str] = {}
        self._dirs: dict[str, int] = {}

    def __contains__(self, rel: str) -> bool:
        return rel in self.versions

    def get(self, rel: str) -> str | None:
        return self.versions.get(rel)

    def set(self, rel: str, version: str) -> None:
        if rel not in self.versions:
            for d in _parents(rel):
                self._dirs[d] = self._dirs.get(d, 0) + 1
        self.versions[rel] = version

    def remove(self, rel: str) -> None:
        if self.versions.pop(rel, None) is None:
            return
        for d in _parents(rel):
            left = self._dirs[d] - 1
            if left:
                self._dirs[d] = left
            else:
                del self._dirs[d]

    def files_under(self, rel_dir: str) -> list[str]:
        if rel_dir not in self._dirs:
            return []
        prefix = rel_dir + "/"
        return [p for p in self.versions if p.startswith(prefix)]


def _parents(rel: str) -> list[str]:
    parts = rel.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


class CheckpointLog:
    """The append-only checkpoint file: ``{"p": rel, "v": "mtime_ns:size"}`` or ``{"p": rel, "d": true}``
    per line; the last line for a path wins.

    Appends are group-committed: lines queued while a write+fsync runs go out together in the next one, so a
    burst of acknowledgements costs a few fsyncs, and each caller returns once its own line is durable. The
    flush runs in its own task, so an acknowledgement that arrives after the source stopped (shutdown drains
    in-flight events) is still recorded, and a cancelled caller never strands the others.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._buffer: list[str] = []
        self._batch: asyncio.Future[None] | None = None
        self._flusher: asyncio.Task[None] | None = None

    def load(self) -> Checkpoint:
        """Read the log (a torn last line is ignored) and rewrite it compactly when it has grown."""
        cp = Checkpoint()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return cp
        lines = raw.split(b"\n")
        torn = lines.pop() != b""  # after a crash mid-write the last line has no newline
        bad = 0
        for line in lines:
            try:
                rec = json.loads(line)
                rel = rec["p"]
                if rec.get("d"):
                    cp.remove(rel)
                else:
                    parse_version(rec["v"])
                    cp.set(rel, rec["v"])
            except (ValueError, KeyError, TypeError, AttributeError):
                bad += 1
        if bad:
            log.warning("checkpoint %s: ignored %d unreadable line(s)", self.path, bad)
        if torn or bad or len(lines) > max(1000, 2 * len(cp.versions)):
            self._rewrite(cp)
        return cp

    def _rewrite(self, cp: Checkpoint) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for rel, v in cp.versions.items():
                fh.write(_line({"p": rel, "v": v}))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)

    def append(self, records: list[dict[str, Any]]) -> asyncio.Future[None]:
        """Queue lines; the returned future completes once they are durable."""
        self._buffer.extend(_line(r) for r in records)
        if self._batch is None:
            self._batch = asyncio.get_running_loop().create_future()
        fut = self._batch
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name=f"checkpoint {self.path.name}")
        return fut

    async def wait_idle(self) -> None:
        if self._flusher is not None:
            await asyncio.shield(self._flusher)

    async def _flush(self) -> None:
        while self._buffer:
            lines, fut = self._buffer, self._batch
            self._buffer, self._batch = [], None
            try:
                await asyncio.to_thread(self._write, lines)
            except Exception as exc:
                log.error("checkpoint %s: cannot write: %s", self.path, exc)
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
                    fut.add_done_callback(_retrieve)  # an unawaited record must not warn at GC
            else:
                if fut is not None and not fut.done():
                    fut.set_result(None)

    def _write(self, lines: list[str]) -> None:
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
        if new:
            _fsync_dir(self.path.parent)


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- one active replica per directory -------------------------------------------------------------------------


class DirLock:
    """An exclusive ``flock`` on ``.iii-bridge.lock`` in the watched directory: every bridge watching that
    directory, whatever its state_dir, takes the same lock. Where the directory is not writable, the lock file
    is ``state_dir/file/<source id>.lock`` instead (which then only excludes bridges sharing the state_dir)."""

    RETRY_S = 1.0

    def __init__(self, watched: Path, fallback: Path, source_id: str) -> None:
        self._watched = watched / LOCK_NAME
        self._fallback = fallback
        self._source_id = source_id
        self._fd: int | None = None

    async def acquire(self) -> None:
        path = self._open()
        assert self._fd is not None
        waited = False
        try:
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        log.info(
                            "file source %s: another bridge holds %s; standing by, retrying every %.0f s",
                            self._source_id, path, self.RETRY_S,
                        )
                        waited = True
                    await asyncio.sleep(self.RETRY_S)
        except BaseException:
            self.release()
            raise
        if waited:
            log.info("file source %s: got %s; this replica is now active", self._source_id, path)
        with contextlib.suppress(OSError):
            st = os.fstat(self._fd)
            # A lock file hard-linked to some other file must not have that file truncated.
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, f"{os.getpid()} {os.uname().nodename}\n".encode(), 0)

    def _open(self) -> Path:
        # O_NOFOLLOW: a lock file replaced by a symlink must not make the bridge create or write a file elsewhere.
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            self._fd = os.open(self._watched, flags, 0o644)
            return self._watched
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OSError(
                    exc.errno, f"{self._watched} is a symlink; the bridge does not follow it (remove it to let "
                    "the source start)"
                ) from None
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            log.warning(
                "file source %s: cannot create %s (%s); locking %s instead, which only keeps out bridges "
                "sharing this state_dir", self._source_id, self._watched, exc.strerror, self._fallback,
            )
        self._fallback.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self._fallback, flags, 0o644)
        return self._fallback

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

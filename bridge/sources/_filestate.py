"""Private helpers of the file source: path matching, scanning, the checkpoint log and the directory lock.

Kept apart from ``file.py`` so that the source itself reads as the flow of one file (watch → settle → submit →
acknowledge) while the mechanics live here. Nothing here imports watchfiles.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterable
from datetime import UTC, datetime
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


def iso_mtime(mtime_ns: int) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``, computed from integer nanoseconds (no float rounding)."""
    seconds, rest = divmod(mtime_ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{rest // 1_000_000:03d}Z"


def safe_name(source_id: str) -> str:
    """A file name for a trigger type id; ids with other characters get a hash so two ids never collide."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", source_id)
    if cleaned != source_id or cleaned.startswith("."):
        cleaned = f"{cleaned.lstrip('.')}-{hashlib.sha256(source_id.encode()).hexdigest()[:10]}"
    return cleaned


def inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


# --- matching -------------------------------------------------------------------------------------------------


def _compile(patterns: Iterable[str]) -> re.Pattern[str] | None:
    parts = [fnmatch.translate(p) for p in patterns]
    return re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None


class PathFilter:
    """``include``/``exclude`` globs (fnmatch, case-sensitive), each tried on the file name and on the relative
    path. ``*`` also matches ``/`` when a glob is tried on the relative path, so ``orders/*.json`` matches
    ``orders/2024/x.json``. A file is excluded when an exclude glob matches its name, its relative path, or the
    name or relative path of any directory above it (so ``.*`` excludes ``.git/config``). The lock file and
    ``move_to`` (when it lies inside the watched directory) are always excluded."""

    def __init__(self, include: Iterable[str], exclude: Iterable[str], skip_prefix: str | None) -> None:
        self._include = _compile(include)
        self._exclude = _compile(exclude)
        self._skip_prefix = skip_prefix  # relative path of move_to inside the watched directory, if it is

    def _excluded_one(self, name: str, rel: str) -> bool:
        return self._exclude is not None and bool(self._exclude.match(name) or self._exclude.match(rel))

    def dir_excluded(self, rel: str) -> bool:
        """Whether a directory (its own name and relative path only; callers prune while walking down)."""
        if self._skip_prefix is not None and (rel == self._skip_prefix or rel.startswith(self._skip_prefix + "/")):
            return True
        return self._excluded_one(rel.rpartition("/")[2], rel)

    def excluded(self, rel: str) -> bool:
        """Whether a path is excluded, by itself or by a directory above it."""
        if rel == LOCK_NAME:
            return True
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if self.dir_excluded("/".join(parts[:i])):
                return True
        return self._excluded_one(parts[-1], rel) or (
            self._skip_prefix is not None and rel.startswith(self._skip_prefix + "/")
        )

    def included(self, rel: str) -> bool:
        return self._include is not None and bool(
            self._include.match(rel.rpartition("/")[2]) or self._include.match(rel)
        )

    def matches_file(self, rel: str) -> bool:
        return self.included(rel) and not self.excluded(rel)


# --- the file system ------------------------------------------------------------------------------------------


class Tree:
    """The watched directory: canonical relative paths, stat of regular files, the initial walk.

    Relative paths are canonical: no directory in them is a symlink (the kernel reports events in a directory
    under whichever path watched it last, possibly through a symlink). A symlink to a file inside the tree is a
    file under the link's own name; symlinks resolving outside, and symlinked directories (their target is
    watched at its real path already, and following them could loop), are ignored.
    """

    def __init__(self, root: Path, recursive: bool, path_filter: PathFilter) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.recursive = recursive
        self.filter = path_filter

    def absolute(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def relative(self, reported: str, real_dirs: dict[str, str] | None = None) -> str | None:
        """The canonical relative path of a path the watcher reported, or None when it is outside the tree.
        ``real_dirs`` caches resolved parents within one batch of changes (many share a directory)."""
        parent, name = os.path.split(reported)
        if real_dirs is None:
            real_parent = os.path.realpath(parent)
        elif (real_parent := real_dirs.get(parent, "")) == "":
            real_parent = real_dirs[parent] = os.path.realpath(parent)
        if not inside(real_parent, self.real_root) or not name:
            return None
        rel_parent = os.path.relpath(real_parent, self.real_root)
        rel = name if rel_parent == "." else f"{rel_parent}/{name}"
        if not self.recursive and "/" in rel:
            return None
        return rel.replace(os.sep, "/")

    def stat(self, rel: str) -> Version | None:
        """The version of a regular file (through an inside symlink), or None (missing, directory, outside)."""
        path = os.path.join(self.real_root, rel)
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(path)
                if not inside(real, self.real_root):
                    log.debug("ignoring %s: symlink to %s, outside the watched directory", path, real)
                    return None
                st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return st.st_mtime_ns, st.st_size

    def is_dir(self, rel: str) -> bool:
        """A real directory (not a symlink to one)."""
        try:
            return stat.S_ISDIR(os.lstat(os.path.join(self.real_root, rel)).st_mode)
        except OSError:
            return False

    def walk(self, start: str = "") -> list[tuple[str, Version]]:
        """Every matching regular file below ``start`` (relative; "" = the root) with its version. Runs in a
        thread: it only touches the file system."""
        found: list[tuple[str, Version]] = []
        stack = [start]
        while stack:
            rel_dir = stack.pop()
            try:
                entries = list(os.scandir(os.path.join(self.real_root, rel_dir)))
            except OSError as exc:
                log.debug("cannot list %s: %s", os.path.join(self.real_root, rel_dir), exc)
                continue
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                try:
                    is_link = entry.is_symlink()
                    is_dir = not is_link and entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir:
                    if self.recursive and not self.filter.dir_excluded(rel):
                        stack.append(rel)
                    continue
                if is_link and os.path.isdir(entry.path):
                    log.debug("not following directory symlink %s", entry.path)
                    continue
                if self.filter.matches_file(rel):
                    v = self.stat(rel)
                    if v is not None:
                        found.append((rel, v))
        return found


def read_content(path: str, mode: str, max_bytes: int, expected: Version) -> tuple[Any, str | None] | None:
    """Read and decode one file version. Returns (content, None), (None, reason) for a decode error, or None
    when the file is no longer ``expected`` (changed or vanished: the settle loop takes it again)."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if (st.st_mtime_ns, st.st_size) != expected:
                return None
            if st.st_size > max_bytes:
                return None, f"{path}: {st.st_size} bytes is more than max_content_bytes ({max_bytes})"
            data = fh.read(max_bytes + 1)
            st = os.fstat(fh.fileno())
            if (st.st_mtime_ns, st.st_size) != expected or len(data) != expected[1]:
                return None
    except FileNotFoundError:
        return None
    except OSError as exc:
        return None, f"{path}: cannot read the file: {exc.strerror or exc}"
    return decode(path, data, mode)


def decode(path: str, data: bytes, mode: str) -> tuple[Any, str | None]:
    if mode == "bytes":
        return base64.b64encode(data).decode("ascii"), None
    if mode == "text":
        try:
            return data.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            return None, f"{path}: not UTF-8 text (content: text): invalid byte at offset {exc.start}"
    try:
        return json.loads(data, parse_constant=_reject_constant), None
    except json.JSONDecodeError as exc:
        return None, f"{path}: invalid JSON (content: json): {exc.msg} at line {exc.lineno} column {exc.colno}"
    except (ValueError, RecursionError) as exc:
        return None, f"{path}: invalid JSON (content: json): {exc}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def move_aside(src: str, dst: str) -> str:
    """Move ``src`` to ``dst`` (creating directories) without ever replacing an existing file: when ``dst``
    exists, ``name.1.ext``, ``name.2.ext``, ... are tried. Returns where the file went."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    stem, ext = os.path.splitext(dst)
    candidate, n = dst, 0
    while True:
        try:
            # link() refuses an existing target atomically, which rename() would silently replace.
            os.link(src, candidate)
        except FileExistsError:
            n += 1
            candidate = f"{stem}.{n}{ext}"
            continue
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            try:
                _copy_exclusive(src, candidate)
            except FileExistsError:
                n += 1
                candidate = f"{stem}.{n}{ext}"
                continue
        os.unlink(src)
        return candidate


def _copy_exclusive(src: str, dst: str) -> None:
    """Across file systems: copy into a file that must not exist yet, make it durable, keep the mtime."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout)
        fout.flush()
        os.fsync(fout.fileno())
    shutil.copystat(src, dst)


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
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()} {os.uname().nodename}\n".encode(), 0)

    def _open(self) -> Path:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            self._fd = os.open(self._watched, flags, 0o644)
            return self._watched
        except OSError as exc:
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

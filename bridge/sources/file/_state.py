"""Private helpers of the file source: path matching, scanning, the checkpoint log and the directory lock.

Kept apart from ``source.py`` so that the source itself reads as the flow of one file (watch → settle → submit →
acknowledge) while the mechanics live here. Nothing here imports watchfiles. The checkpoint log and the directory
lock are in ``_checkpoint.py``; they are re-exported here so that ``source.py`` imports from one place.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bridge import strictjson
from bridge.sources.file._checkpoint import (
    LOCK_NAME,
    Checkpoint,
    CheckpointLog,
    DirLock,
    Version,
    parse_version,
    version_text,
)
from bridge.sources.file._fs import Refused, RootDir

__all__ = [
    "LOCK_NAME",
    "Checkpoint",
    "CheckpointLog",
    "DirLock",
    "PathFilter",
    "Refused",
    "RootDir",
    "Tree",
    "Version",
    "decode",
    "inside",
    "parse_version",
    "read_content",
    "safe_name",
    "version_text",
]

log = logging.getLogger("bridge.sources.file")


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
    watched at its real path already, and following them could loop), are ignored. Every stat, listing and read
    goes through :class:`~bridge.sources.file._fs.RootDir`, which never follows a symlink on the way, so a
    directory swapped for a symlink at any moment cannot lead outside. ``close`` releases the directory.
    """

    def __init__(self, root: Path, recursive: bool, path_filter: PathFilter) -> None:
        self.root = root
        self.dir = RootDir(root)
        self.real_root = self.dir.real
        self.recursive = recursive
        self.filter = path_filter

    def close(self) -> None:
        self.dir.close()

    def absolute(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def relative(self, reported: str, real_dirs: dict[str, str] | None = None) -> str | None:
        """The canonical relative path of a path the watcher reported, or None when it is outside the tree.
        ``real_dirs`` caches resolved parents within one batch of changes (many share a directory). A path
        only names a file here: every operation on it walks it again from the watched directory."""
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
        try:
            return self.version(rel)
        except Refused as exc:
            self.dir.note_refused(exc)
            return None

    def version(self, rel: str) -> Version | None:
        """:meth:`stat`, but a path that leads through a symlink raises :class:`Refused` instead of None."""
        try:
            st = self.dir.stat(rel)
        except Refused:
            raise
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return st.st_mtime_ns, st.st_size

    def is_dir(self, rel: str) -> bool:
        """A real directory (not a symlink to one)."""
        try:
            return stat.S_ISDIR(self.dir.lstat(rel).st_mode)
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
                with self.dir.directory(rel_dir) as fd:
                    entries = list(os.scandir(fd))
            except Refused as exc:
                self.dir.note_refused(exc)
                continue
            except OSError as exc:
                log.debug("cannot list %s: %s", os.path.join(self.root, rel_dir), exc)
                continue
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                try:
                    is_dir = not entry.is_symlink() and entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir:
                    if self.recursive and not self.filter.dir_excluded(rel):
                        stack.append(rel)
                    continue
                # A symlink leaf is a file when it resolves to one inside; a directory symlink is not followed.
                if self.filter.matches_file(rel):
                    v = self.stat(rel)
                    if v is not None:
                        found.append((rel, v))
        return found


Decoded = tuple[Any, str | None, str | None]
"""``(content, None, None)``, or ``(raw text or None, reason, raw bytes as base64 or None)`` for a decode error."""


def read_content(root: RootDir, rel: str, mode: str, max_bytes: int, expected: Version) -> Decoded | None:
    """Read and decode one file version (see :data:`Decoded`), or None when the file is no longer ``expected``
    (changed, vanished or reachable only through a symlink: the settle loop takes it again)."""
    path = os.path.join(root.path, rel)
    try:
        fd = root.open_file(rel)
    except FileNotFoundError:
        return None
    except Refused as exc:
        root.note_refused(exc)
        return None
    except OSError as exc:
        return None, f"{path}: cannot read the file: {exc.strerror or exc}", None
    try:
        with open(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or (st.st_mtime_ns, st.st_size) != expected:
                return None
            if st.st_size > max_bytes:
                return None, f"{path}: {st.st_size} bytes is more than max_content_bytes ({max_bytes})", None
            data = fh.read(st.st_size + 1)  # one byte more shows a file still growing; max_bytes would allocate
            st = os.fstat(fh.fileno())
            if (st.st_mtime_ns, st.st_size) != expected or len(data) != expected[1]:
                return None
    except OSError as exc:
        return None, f"{path}: cannot read the file: {exc.strerror or exc}", None
    return decode(path, data, mode)


def decode(path: str, data: bytes, mode: str) -> Decoded:
    """``data`` as ``mode`` wants it (see :data:`Decoded`): undecodable content is carried raw, as the file's text
    when it is UTF-8, else as base64."""
    if mode == "bytes":
        return base64.b64encode(data).decode("ascii"), None, None
    try:
        text = strictjson.utf8(data)
    except strictjson.Undecodable as exc:
        where = exc.reason.removeprefix("not UTF-8: ")
        return None, f"{path}: not UTF-8 text (content: {mode}): {where}", base64.b64encode(data).decode("ascii")
    if mode == "text":
        return text, None, None
    try:
        return strictjson.loads(text), None, None
    except strictjson.Undecodable as exc:
        return text, f"{path}: invalid JSON (content: json): {exc.reason}", None


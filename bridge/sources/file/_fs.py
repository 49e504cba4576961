"""Contained file-system access for the file source: nothing is read, stat'ed, moved or deleted outside the
watched directory.

Paths given to the kernel as strings are resolved at the moment of the call, so a directory on the path that is
swapped for a symlink (``mv d d.old; ln -s /etc d``) between two calls would lead the next one outside. Here
the watched directory is opened once as a descriptor and every relative path is walked from it one component
at a time with ``O_NOFOLLOW``: a symlink anywhere on the path makes the operation fail with :class:`Refused`
instead of following it. The leaf is opened with ``O_NOFOLLOW`` too; a symlink leaf (a file symlink inside the
tree, which the source delivers under the link's name) is resolved here, by its text, and its target walked the
same way, so a link whose target lies outside, or whose target path has a symlinked directory in it, is refused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import shutil
import stat
import time
from pathlib import Path

log = logging.getLogger("bridge.sources.file")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in for a file must not block the open (the caller checks S_ISREG on the descriptor).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_MAX_LINK_HOPS = 8  # a symlink leaf may point at another inside symlink, this many times
_MOVE_FALLBACK_ERRNOS = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP)
_REFUSAL_LOG_S = 60.0  # the same refusal is logged once a minute, not once per stat


class Refused(OSError):
    """The operation would have left the watched directory through a symlink; nothing was done."""


class RootDir:
    """The watched directory, held open for the life of the source, and the contained operations on it."""

    def __init__(self, path: Path | str) -> None:
        self.path = os.path.abspath(path)
        self.real = os.path.realpath(path)
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._logged: dict[str, float] = {}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        # A source abandoned with events still in flight never reaches close(); the descriptor must not leak.
        self.close()

    # --- walking ----------------------------------------------------------------------------------------------

    def parent(self, rel: str, *, create: bool = False) -> tuple[OpenDirs, str]:
        """The directories holding ``rel`` (a context manager giving the last one's descriptor) and ``rel``'s
        last name."""
        parts = _parts(rel)
        return OpenDirs(self.fd, parts[:-1], create=create), parts[-1]

    def directory(self, rel_dir: str, *, create: bool = False) -> OpenDirs:
        """The directory ``rel_dir`` ("" = the root), as a context manager giving its descriptor."""
        return OpenDirs(self.fd, _parts(rel_dir) if rel_dir else [], create=create)

    def _follow(self, rel: str, target: str) -> str:
        """Where the symlink ``rel`` points, relative to the root; Refused when that is outside."""
        if posixpath.isabs(target):
            norm = posixpath.normpath(target)
            for base in (self.real, self.path):
                prefix = base.rstrip("/") + "/"
                if norm.startswith(prefix):
                    return norm[len(prefix):]
            raise Refused(errno.ELOOP, f"{rel} is a symlink to {target}, outside the watched directory")
        norm = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
        if norm in (".", "..") or norm.startswith("../"):
            raise Refused(errno.ELOOP, f"{rel} is a symlink to {target}, outside the watched directory")
        return norm

    # --- operations -------------------------------------------------------------------------------------------

    def lstat(self, rel: str) -> os.stat_result:
        """The entry ``rel`` itself (a symlink is not followed)."""
        dirs, name = self.parent(rel)
        with dirs as fd:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def stat(self, rel: str) -> os.stat_result:
        """What ``rel`` is, through symlink leaves that stay inside."""
        for _ in range(_MAX_LINK_HOPS + 1):
            dirs, name = self.parent(rel)
            with dirs as fd:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    return st
                rel = self._follow(rel, os.readlink(name, dir_fd=fd))
        raise Refused(errno.ELOOP, f"{rel}: more than {_MAX_LINK_HOPS} symlinks in a row")

    def open_file(self, rel: str) -> int:
        """A read-only descriptor of ``rel`` (through symlink leaves that stay inside); the caller closes it and
        checks that it is a regular file."""
        for _ in range(_MAX_LINK_HOPS + 1):
            dirs, name = self.parent(rel)
            with dirs as fd:
                try:
                    return os.open(name, _FILE_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
                    rel = self._follow(rel, os.readlink(name, dir_fd=fd))
        raise Refused(errno.ELOOP, f"{rel}: more than {_MAX_LINK_HOPS} symlinks in a row")

    def unlink(self, rel: str) -> None:
        """Remove the entry ``rel`` (a symlink leaf itself, never its target)."""
        dirs, name = self.parent(rel)
        with dirs as fd:
            os.unlink(name, dir_fd=fd)

    def resolve(self, rel: str) -> str:
        """``rel`` itself, or for a symlink leaf the inside path it leads to (Refused when that is outside)."""
        for _ in range(_MAX_LINK_HOPS + 1):
            dirs, name = self.parent(rel)
            with dirs as fd:
                try:
                    target = os.readlink(name, dir_fd=fd)
                except OSError as exc:
                    if exc.errno == errno.EINVAL:  # not a symlink
                        return rel
                    raise
            rel = self._follow(rel, target)
        raise Refused(errno.ELOOP, f"{rel}: more than {_MAX_LINK_HOPS} symlinks in a row")

    def move(self, rel: str, dest_fd: int, dest_rel: str) -> str:
        """Move ``rel`` to ``dest_rel`` below the directory ``dest_fd`` (creating directories, never following a
        symlink there either), never replacing an existing file: when the name is taken, ``name.1.ext``,
        ``name.2.ext``, ... are tried. A symlink leaf moves the file it leads to inside (as its content was the
        event's) and is removed. Returns the relative path it went to."""
        *dest_dirs, dest_name = _parts(dest_rel)
        stem, ext = posixpath.splitext(dest_name)
        target = self.resolve(rel)
        with contextlib.ExitStack() as stack:
            link_dirs, name = self.parent(rel)
            link_fd = stack.enter_context(link_dirs)
            if target == rel:
                src_fd, src_name = link_fd, name
            else:
                src_dirs, src_name = self.parent(target)
                src_fd = stack.enter_context(src_dirs)
            dir_fd = stack.enter_context(OpenDirs(dest_fd, dest_dirs, create=True))
            candidate, n = dest_name, 0
            while True:
                try:
                    # link() refuses an existing target atomically, which rename() would silently replace.
                    os.link(src_name, candidate, src_dir_fd=src_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                except FileExistsError:
                    n += 1
                    candidate = f"{stem}.{n}{ext}"
                    continue
                except OSError as exc:
                    if exc.errno not in _MOVE_FALLBACK_ERRNOS:
                        raise
                    try:
                        _copy_exclusive(src_fd, src_name, dir_fd, candidate)
                    except FileExistsError:
                        n += 1
                        candidate = f"{stem}.{n}{ext}"
                        continue
                os.unlink(name, dir_fd=link_fd)
                return posixpath.join(*dest_dirs, candidate)

    # --- telling the operator ---------------------------------------------------------------------------------

    def note_refused(self, exc: Refused) -> None:
        """Log a refusal, once a minute for the same one (a swapped directory is stat'ed again and again)."""
        now = time.monotonic()
        key = str(exc)
        if now - self._logged.get(key, -_REFUSAL_LOG_S) < _REFUSAL_LOG_S:
            return
        if len(self._logged) > 256:
            self._logged.clear()
        self._logged[key] = now
        log.warning(
            "file source: in %s: %s; not followed (the bridge never reads, moves or deletes anything outside "
            "the watched directory). The file is skipped until its path is a real directory again.",
            self.path, exc.strerror or exc,
        )


class OpenDirs:
    """Directories opened one below the other from ``start_fd`` without following a symlink (``create``: making
    the missing ones), as a context manager that gives the last descriptor (``start_fd`` itself when ``dirs`` is
    empty) and closes what it opened. A class rather than a generator: it runs several times per file."""

    __slots__ = ("_opened", "fd")

    def __init__(self, start_fd: int, dirs: list[str], *, create: bool = False) -> None:
        self._opened: list[int] = []
        fd = start_fd
        try:
            for i, part in enumerate(dirs):
                fd = _open_dir(fd, part, dirs, i, create)
                self._opened.append(fd)
        except BaseException:
            self.close()
            raise
        self.fd = fd

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._opened:
            os.close(fd)
        self._opened.clear()


def _copy_exclusive(src_dir_fd: int, src_name: str, dst_dir_fd: int, dst_name: str) -> None:
    """Across file systems: copy into a file that must not exist yet, make it durable, keep mode and mtime."""
    with open(os.open(src_name, _FILE_FLAGS, dir_fd=src_dir_fd), "rb") as fin:
        st = os.fstat(fin.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{src_name} is not a regular file")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with open(os.open(dst_name, flags, 0o600, dir_fd=dst_dir_fd), "wb") as fout:
            shutil.copyfileobj(fin, fout)
            fout.flush()
            os.fchmod(fout.fileno(), stat.S_IMODE(st.st_mode))
            os.utime(fout.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(fout.fileno())


def open_base(path: Path | str) -> int:
    """A descriptor of a directory the operator configured (``move_to`` outside the watched one), made if
    missing; symlinks in the configured path itself are the operator's and are followed."""
    os.makedirs(path, exist_ok=True)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _open_dir(parent_fd: int, name: str, dirs: list[str], i: int, create: bool) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o777, dir_fd=parent_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except NotADirectoryError:
        # O_DIRECTORY | O_NOFOLLOW on a symlink fails like on a file: tell the two apart for the log line.
        try:
            is_link = stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
        except OSError:
            is_link = False
        if is_link:
            shown = "/".join(dirs[: i + 1])
            raise Refused(errno.ELOOP, f"{shown} is a symlink where a directory was") from None
        raise


def _parts(rel: str) -> list[str]:
    """The components of a relative path; a component that could climb or is empty is refused."""
    parts = rel.split("/")
    if "" in parts or "." in parts or ".." in parts:
        raise Refused(errno.EINVAL, f"{rel!r} is not a plain relative path")
    return parts

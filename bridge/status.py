"""The live status line of `bridge up` on a terminal: one compact line, redrawn in place about once a second.

It is shown only when stderr is a terminal (and not with ``--quiet``); log records go to the same stream, and
the log handler clears the line before each record and redraws it after (:func:`bridge.logs.attach_overlay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TextIO

from bridge import logs

REFRESH_S = 1.0
_CLEAR = "\r\x1b[2K"  # carriage return, then erase the whole line


@dataclass(frozen=True)
class SourceStatus:
    """What the line shows of one source, read from its counters."""

    id: str
    bindings: int
    received: int
    in_flight: int
    dead_lettered: int


def status_enabled(stream: TextIO, *, quiet: bool, env: Mapping[str, str] | None = None) -> bool:
    """Whether to show the line: ``stream`` is a terminal that can erase a line, and not ``--quiet``."""
    if quiet:
        return False
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False
    term = (os.environ if env is None else env).get("TERM", "")
    return tty and term != "dumb"


def format_status(
    engine_connected: bool, sources: Sequence[SourceStatus], rates: Mapping[str, float], width: int,
    note: str | None = None,
    mode: str | None = None,
) -> str:
    """``engine up (observe mode) · orders: 2 bound, 12.5 ev/s, 3 in flight, 0 dead · ... · <note>``, cut to
    ``width`` columns. ``note``: the last config reload, if any; ``mode``: how the bridge offers its sources to this
    engine (trigger or observe), once known."""
    parts = ["engine up" if engine_connected else "engine DOWN"]
    if mode is not None:
        parts[0] += f" ({mode} mode)"
    for s in sources:
        rate = rates.get(s.id, 0.0)
        parts.append(
            f"{s.id}: {s.bindings} bound, {_rate(rate)} ev/s, {s.in_flight} in flight, {s.dead_lettered} dead"
        )
    if note:
        parts.append(note)
    line = " · ".join(parts)
    if width > 1 and len(line) > width - 1:  # the last column would wrap on some terminals
        line = line[: max(0, width - 2)] + "…"
    return line


def _width(stream: TextIO) -> int:
    """Columns of the terminal behind ``stream`` (stderr, which may differ from stdout's)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return shutil.get_terminal_size(fallback=(120, 24)).columns


def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


class StatusLine:
    """Draws ``snapshot()`` on ``stream`` every ``interval_s`` while :meth:`run` runs."""

    def __init__(
        self,
        stream: TextIO,
        snapshot: Callable[[], tuple[bool, list[SourceStatus]]],
        *,
        mode: Callable[[], str | None] = lambda: None,
        interval_s: float = REFRESH_S,
        note: Callable[[], str | None] | None = None,
    ) -> None:
        """``note()``: a last part of the line (the last config reload), or None."""
        self._stream = stream
        self._snapshot = snapshot
        self._note = note
        self._mode = mode
        self._interval_s = interval_s
        self._text = ""
        self._shown = False
        self._lock: AbstractContextManager[Any] = threading.RLock()
        self._last: tuple[float, dict[str, int]] | None = None

    # logs.Overlay: called by the log handler with its lock held ------------------------------------------------

    def clear(self) -> None:
        if self._shown:
            self._write(_CLEAR)
            self._shown = False

    def redraw(self) -> None:
        if self._text and not self._shown:
            self._write(_CLEAR + self._text)
            self._shown = True

    # the loop --------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Draw until cancelled; then erase the line and detach from the log handler."""
        lock = logs.attach_overlay(self)
        if lock is not None:
            self._lock = lock
        try:
            while True:
                self.tick()
                await asyncio.sleep(self._interval_s)
        finally:
            logs.attach_overlay(None)
            with self._lock:
                self.clear()
                self._text = ""

    def tick(self, now: float | None = None) -> str:
        """Take a snapshot, compute rates since the previous one, draw the line; returns its text."""
        now = time.monotonic() if now is None else now
        connected, sources = self._snapshot()
        received = {s.id: s.received for s in sources}
        rates: dict[str, float] = {}
        if self._last is not None:
            before, counts = self._last
            elapsed = now - before
            if elapsed > 0:
                rates = {sid: max(0, n - counts.get(sid, n)) / elapsed for sid, n in received.items()}
        self._last = (now, received)
        width = _width(self._stream)
        note = self._note() if self._note is not None else None
        text = format_status(connected, sources, rates, width, note, self._mode())
        with self._lock:
            self._text = text
            self._shown = False
            self._write(_CLEAR + text)
            self._shown = True
        return text

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # a vanished terminal must not stop the bridge
            self._stream.write(text)
            self._stream.flush()

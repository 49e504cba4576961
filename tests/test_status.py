"""The live status line: its text, when it is shown, and how it shares the terminal with log lines."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge import logs
from bridge.status import SourceStatus, StatusLine, format_status, status_enabled

CLEAR = "\r\x1b[2K"


def test_format() -> None:
    rows = [SourceStatus("orders", 2, 100, 3, 1), SourceStatus("inbox", 0, 0, 0, 0)]
    line = format_status(True, rows, {"orders": 12.345, "inbox": 250.0}, 200)
    assert line == (
        "engine up · orders: 2 bound, 12.3 ev/s, 3 in flight, 1 dead · inbox: 0 bound, 250 ev/s, 0 in flight, 0 dead"
    )
    assert format_status(False, [], {}, 80) == "engine DOWN"
    assert format_status(True, [], {}, 80, mode="observe") == "engine up (observe mode)"
    short = format_status(True, rows, {}, 30)
    assert short == "engine up · orders: 2 bound,…" and len(short) == 29


def test_shown_only_on_a_terminal_without_quiet() -> None:
    assert not status_enabled(io.StringIO(), quiet=False)
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            assert status_enabled(tty, quiet=False, env={"TERM": "xterm"})
            assert not status_enabled(tty, quiet=True, env={"TERM": "xterm"})
            assert not status_enabled(tty, quiet=False, env={"TERM": "dumb"})
    finally:
        os.close(master)
        os.close(slave)


def test_rates_come_from_the_counters_between_ticks() -> None:
    received = {"n": 0}
    stream = io.StringIO()
    line = StatusLine(stream, lambda: (True, [SourceStatus("s", 1, received["n"], 0, 0)]))
    assert "0.0 ev/s" in line.tick(now=100.0)
    received["n"] = 30
    assert "15.0 ev/s" in line.tick(now=102.0)
    assert stream.getvalue().count(CLEAR) == 2


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logs.attach_overlay(None)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_log_records_clear_the_line_first_and_it_comes_back_after(restore_logging: None) -> None:
    stream = io.StringIO()
    logs.configure("text", stream=stream)
    line = StatusLine(stream, lambda: (True, [SourceStatus("s", 1, 0, 0, 0)]))
    logs.attach_overlay(line)
    line.tick(now=1.0)
    logging.getLogger("bridge.test").info("hello")
    logs.attach_overlay(None)
    logging.getLogger("bridge.test").info("after")
    status = "engine up · s: 1 bound, 0.0 ev/s, 0 in flight, 0 dead"
    text = stream.getvalue()
    # drawn; erased before the record; the record on a clean line; drawn again below it
    assert re.fullmatch(
        rf"{re.escape(CLEAR + status + CLEAR)}\S+ INFO    bridge\.test: hello\n{re.escape(CLEAR + status)}"
        r"\S+ INFO    bridge\.test: after\n",
        text,
    ), repr(text)


def _run_on_a_terminal(tmp_path: Path, *extra: str, settle_s: float = 2.3) -> str:
    """`bridge up --dry-run` with stderr on a pseudo-terminal for ``settle_s`` once up; what the terminal got."""
    (tmp_path / "in").mkdir(exist_ok=True)
    config = tmp_path / "bridge.yaml"
    config.write_text("version: 1\nstate_dir: state\nsources:\n  s:\n    file: {path: ./in}\n")
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "up", "--dry-run", "-c", str(config), *extra],
        stdout=subprocess.DEVNULL, stderr=slave, cwd=tmp_path, env={**os.environ, "TERM": "xterm"},
    )
    os.close(slave)
    received = b""
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and b"bridge up:" not in received:
            received += _read(master, 0.2)
        settle = time.monotonic() + settle_s
        while time.monotonic() < settle:
            received += _read(master, 0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        received += _read(master, 0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return received.decode("utf-8", errors="replace")


def _read(fd: int, timeout: float) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:  # the child closed the terminal
        return b""


def test_on_a_real_terminal(tmp_path: Path) -> None:
    shown = _run_on_a_terminal(tmp_path)  # long enough for two refreshes at least
    assert shown.count("engine up · s: 1 bound, 0.0 ev/s, 0 in flight, 0 dead") >= 2, shown
    lines = [line for line in shown.replace("\r\n", "\n").split("\n") if "SIGTERM received" in line]
    assert len(lines) == 1 and lines[0].startswith(CLEAR)  # the status line was erased before the record
    assert re.search(r"\n\S+ INFO    bridge\.runtime: bridge stopped\r?\n$", shown), shown[-300:]
    quiet = _run_on_a_terminal(tmp_path, "--quiet", settle_s=1.2)
    assert "bridge up:" in quiet and "\x1b[2K" not in quiet and "engine up" not in quiet

"""What the test services share: the start error, a free port, running a coroutine from sync code, stopping a
child process, the tail of its log."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import socket
import subprocess
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")

PORT_ATTEMPTS = 3
"""How often a throwaway server is started on a new free port when the last one was taken meanwhile."""


class ServiceStartError(RuntimeError):
    """A test service did not come up in time; the message ends with the tail of its log."""


class ExitedEarly(ServiceStartError):
    """The server process exited while starting, most likely because its port was taken meanwhile."""


def run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from async code (a benchmark, an async test): asyncio.run refuses to nest, so use a fresh thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path | None, max_bytes: int = 4000) -> str:
    if path is None or not path.exists():
        return "(no log)"
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        text = f.read().decode("utf-8", errors="replace").strip()
    return text or "(log is empty)"


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def terminate(proc: subprocess.Popen[bytes], sig: signal.Signals, grace_s: float) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

"""Run `bridge up` as a real child process in tests: start, watch its log, stop gracefully or kill -9."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType


class BridgeProcess:
    """A `python -m bridge up -c CONFIG` child process whose stderr goes to a log file."""

    __test__ = False

    def __init__(
        self,
        config: Path,
        engine_url: str,
        *,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.config = config
        self.engine_url = engine_url
        self.extra_args = extra_args
        self.env = env or {}
        self.log_path = log_path or config.with_name(f"bridge-{time.monotonic_ns()}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout_path = self.log_path.with_suffix(".out")

    def start(self, *, wait_ready: bool = True, timeout: float = 20.0) -> BridgeProcess:
        env = {**os.environ, "III_URL": self.engine_url, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as err, open(self.stdout_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "up", "-c", str(self.config), *self.extra_args],
                stdout=out,
                stderr=err,
                env=env,
                cwd=self.config.parent,
            )
        if wait_ready:
            self.wait_for_log(r"bridge up: \d+ source", timeout=timeout)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stdout(self) -> str:
        try:
            return self.stdout_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, *, timeout: float = 10.0, count: int = 1) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if len(rx.findall(text)) >= count:
                return text
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"bridge exited with {self.proc.returncode}; log:\n{text[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen in the bridge log within {timeout} s; log:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"bridge did not stop within {timeout} s; log:\n{self.log()[-4000:]}") from None

    def kill(self) -> None:
        """kill -9: no shutdown, no last checkpoint."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def freeze(self) -> None:
        """SIGSTOP: the process keeps its connections but does nothing (a stalled host); :meth:`thaw` resumes it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> BridgeProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

"""Loads the suite's fixtures explicitly: the package ships no pytest plugin, so installing iii-bridge adds no
fixture to anyone else's test run.

Also keeps one stuck test from holding the whole run: a test stopped by pytest-timeout can leave an iii-sdk
client's loop thread (not a daemon) running, and the interpreter would wait for it forever after the summary.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

pytest_plugins = ("tests.support.fixtures",)

_LINGER_S = 10.0
_exit_status = 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    deadline = time.monotonic() + _LINGER_S
    for thread in _lingering():
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = _lingering()
    if not stuck:
        return
    names = ", ".join(t.name for t in stuck)
    sys.stderr.write(f"\npytest: {len(stuck)} thread(s) still running after the session ({names}); "
                     f"exiting without waiting for them\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)


def _lingering() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]

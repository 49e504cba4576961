"""Small helpers for tests that drive the bridge through real files."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")


def drop(inbox: Path, name: str, content: Any) -> Path:
    """Write a file the way producers should: to a hidden temp name, then rename into place."""
    path = inbox / name
    tmp = inbox / f".{name}.tmp"
    tmp.write_text(content if isinstance(content, str) else json.dumps(content))
    tmp.rename(path)
    return path


def wait_for(predicate: Callable[[], _T], timeout: float = 10.0, what: str = "condition") -> _T:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

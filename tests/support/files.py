"""Small helpers for tests that drive the bridge through real files (``wait_for`` is re-exported from
:mod:`bridge.testing.waiting` for them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bridge.testing.waiting import wait_for

__all__ = ["drop", "read_jsonl", "wait_for"]


def drop(inbox: Path, name: str, content: Any) -> Path:
    """Write a file the way producers should: to a hidden temp name, then rename into place."""
    path = inbox / name
    tmp = inbox / f".{name}.tmp"
    tmp.write_text(content if isinstance(content, str) else json.dumps(content))
    tmp.rename(path)
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

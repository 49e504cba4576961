"""Key paths as users read them, shared by config diagnostics and template errors (no other import here, so
that both can use it)."""

from __future__ import annotations

from collections.abc import Iterable


def format_path(path: Iterable[str | int]) -> str:
    """``sources.orders.kafka.topics[0]``: a key path as users read it (empty for the document itself)."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text

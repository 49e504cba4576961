"""Small text helpers the kinds' docs prose shares with :mod:`bridge._docsprose`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from bridge._redact import redact


def relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` (POSIX separators, ``./`` prefix) so no machine path is shown."""
    text = os.path.relpath(path, base).replace(os.sep, "/")
    return text if text.startswith("../") else f"./{text}"


def names(values: Iterable[str]) -> str:
    """```a`, `b``` with credentials masked."""
    return ", ".join(f"`{redact(v)}`" for v in values)

"""Waiting for a log line: the readiness a component announces in its log, for tests that must not act before
it (a fixed sleep guesses, and loses under load)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

__all__ = ["LogWatch", "watch_log"]


class LogWatch(logging.Handler):
    """Counts the records of a logger whose message matches ``pattern``."""

    def __init__(self, pattern: str) -> None:
        super().__init__(logging.DEBUG)
        self._pattern = re.compile(pattern)
        self.seen = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self._pattern.search(record.getMessage()):
            self.seen += 1


@contextlib.contextmanager
def watch_log(logger: str, pattern: str, level: int = logging.INFO) -> Iterator[LogWatch]:
    """Watch ``logger`` for ``pattern`` during the block, lowering its level to ``level`` meanwhile when it would
    drop such records (then restoring it)."""
    target = logging.getLogger(logger)
    watch = LogWatch(pattern)
    previous = target.level
    if not target.isEnabledFor(level):
        target.setLevel(level)
    target.addHandler(watch)
    try:
        yield watch
    finally:
        target.removeHandler(watch)
        target.setLevel(previous)

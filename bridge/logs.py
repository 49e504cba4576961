"""Logging set-up: human text by default, one JSON object per line with ``log_format: json``.

Both formats pass every message (and traceback) through :func:`redact_text`, a last line of defence: a DSN or a
password that reaches a log call through an exception message or a config repr is masked before it is written.

JSON lines carry ``trigger_type``, ``event_id``, ``binding_id`` and ``function_id`` when the log call passed
them with ``extra=``. A live status line (:mod:`bridge.status`) can share the stream: the handler clears it
before a record is written and redraws it after, so neither garbles the other.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from typing import Any, Protocol, TextIO

from bridge.config import REDACTED, redact_dsn

_CONTEXT_KEYS = ("trigger_type", "event_id", "binding_id", "function_id")

# `'password': 'x'`, `"api_token": "x"`, `secret=x` as they appear in reprs of mappings and in messages.
_SECRET_PAIR = re.compile(
    r"""(?P<key>['"]?\b\w*(?:password|passwd|secret|token|api_?key)\w*\b['"]?\s*[:=]\s*)"""
    r"""(?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s,;&}\])]+)""",
    re.IGNORECASE,
)


def redact_text(text: str) -> str:
    """``text`` with credentials in URLs/DSNs and the values of password/secret/token pairs masked."""
    masked = redact_dsn(text)
    if not any(word in masked.lower() for word in ("pass", "secret", "token", "key")):
        return masked  # the common case, without running the second expression
    return _SECRET_PAIR.sub(lambda m: m.group("key") + _quoted(m.group("value")), masked)


def _quoted(value: str) -> str:
    if value[:1] in ("'", '"') and value != REDACTED:
        return value[0] + REDACTED + value[0]
    return REDACTED


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact_text(record.getMessage()),
        }
        for key in _CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


class Overlay(Protocol):
    """Something drawn on the log stream between records (the live status line)."""

    def clear(self) -> None:
        """Erase it; called with the handler's lock held, before a record is written."""

    def redraw(self) -> None:
        """Draw it again; called with the handler's lock held, after a record is written."""


class _Handler(logging.StreamHandler[TextIO]):
    overlay: Overlay | None = None

    def emit(self, record: logging.LogRecord) -> None:
        overlay = self.overlay  # Handler.handle() holds self.lock here
        if overlay is None:
            super().emit(record)
            return
        overlay.clear()
        try:
            super().emit(record)
        finally:
            overlay.redraw()


def configure(log_format: str = "text", level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Route the bridge's logs (and the SDK's warnings) to ``stream`` (stderr by default)."""
    handler = _Handler(stream or sys.stderr)
    formatter: logging.Formatter = (
        _JsonFormatter()
        if log_format == "json"
        else _TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
    )
    formatter.converter = time.gmtime  # logs are in UTC, like event timestamps
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("bridge").setLevel(level)


def attach_overlay(overlay: Overlay | None) -> threading.RLock | None:
    """Have the handler installed by :func:`configure` clear/redraw ``overlay`` around each record (None:
    stop). Returns the lock the overlay must hold while it draws, or None when no such handler is installed."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _Handler):
            handler.overlay = overlay
            if handler.lock is None:
                handler.createLock()
            return handler.lock
    return None

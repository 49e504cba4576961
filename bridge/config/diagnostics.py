"""Problems found in bridge.yaml, and their text and JSON forms.

One line per problem, like a compiler::

    bridge.yaml:14:7: error[unknown-key] sources.orders.kafka.topik: unknown key; did you mean 'topics'?

Codes are stable (tools and tests match on them):

==================== ======================================================================================
yaml-syntax          the file is not YAML (or not UTF-8 text, or uses tabs for indentation, or an alias loop,
                     or nests deeper than 64 levels)
duplicate-key        a key appears twice in one mapping
unknown-key          a key the schema does not know at that level
missing-key          a required key is absent
type                 a value has the wrong type
value                a value has the right type but is not allowed (enum, range, pattern, combination), or a
                     number of more than 1,000 digits, a lone surrogate escape, a path the system refuses
env-undefined        ``${VAR}`` names an unset variable and gives no default
env-syntax           a malformed ``${...}`` reference
source-kind          a source does not declare exactly one source kind (kafka, postgres, file, ...)
source-id            a source id is not a valid trigger type id
schema-ref           a ``{$ref: file}`` schema cannot be read or parsed
bind-schema-invalid  bind_schema or payload_schema is not a valid JSON Schema 2020-12 (or not an object)
schema-keyword       (warning) an unknown keyword in a bind_schema or payload_schema, likely a typo
template-syntax      a ``payload`` or ``when`` template does not compile
path-missing         (warning) a watched directory does not exist yet
path-not-dir         a path that must be a directory is something else
file-missing         a file the config names (TLS certificate, key) does not exist, is a directory or cannot be read
file-unreadable      bridge.yaml itself cannot be read
url-credentials      (warning) ``engine.url`` carries a password or token, which the iii SDK writes to disk
enqueue-observe      (warning) ``delivery.mode: enqueue``, which observers (engines with ``observe.v1``) get as sync
==================== ======================================================================================
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bridge._keypath import format_path

__all__ = [
    "Problem", "Severity", "did_you_mean", "format_path", "has_errors", "json_type", "summary", "unknown_key_hint",
]

Severity = Literal["error", "warning"]


SIMILARITY_CUTOFF = 0.72
"""How close (difflib's ratio) a name must be to an allowed one to be suggested, everywhere: ``topik`` → ``topics``
(0.73) is a typo worth naming, ``renamed`` → ``created`` (0.71) is another word."""


def did_you_mean(name: str, allowed: Iterable[str]) -> str | None:
    """``did you mean 'x'?`` naming the allowed name closest to ``name``, or None when none is close."""
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=SIMILARITY_CUTOFF)
    return f"did you mean {close[0]!r}?" if close else None


def unknown_key_hint(name: str, allowed: list[str]) -> str:
    """A hint naming the closest allowed name, else the list of allowed names (when short)."""
    close = did_you_mean(name, allowed)
    if close:
        return close
    if len(allowed) <= 12:
        return "allowed: " + ", ".join(sorted(allowed)) if allowed else "no keys are allowed here"
    return f"{len(allowed)} keys are allowed here; `bridge schema` lists them"


def json_type(value: Any) -> str:
    """The JSON Schema type name of a parsed JSON or YAML value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file. ``line``/``col`` are 1-based; 0 means unknown."""

    code: str
    path: str
    message: str
    hint: str | None = None
    line: int = 0
    col: int = 0
    file: str | None = None
    severity: Severity = "error"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def format_text(self) -> str:
        """``file:line:col: severity[code] path: message; hint``; parts that are unknown are left out."""
        where = self.file or ""
        if self.line:
            where += f":{self.line}:{self.col}" if where else f"{self.line}:{self.col}"
        text = f"{where}: " if where else ""
        text += f"{self.severity}[{self.code}] "
        if self.path:
            text += f"{self.path}: "
        text += self.message
        if self.hint:
            text += f"; {self.hint}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "col": self.col,
            "severity": self.severity,
            "code": self.code,
            "path": self.path,
            "message": self.message,
            "hint": self.hint,
        }


def has_errors(problems: Iterable[Problem]) -> bool:
    return any(p.is_error for p in problems)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary(problems: Sequence[Problem]) -> str:
    """``2 errors, 1 warning`` (or ``no problems``)."""
    errors = sum(1 for p in problems if p.is_error)
    warnings = len(problems) - errors
    parts = [_count(errors, "error")] if errors else []
    if warnings:
        parts.append(_count(warnings, "warning"))
    return ", ".join(parts) or "no problems"

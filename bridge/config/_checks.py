"""The semantic checks of bridge.yaml: the rules its JSON Schema cannot express (one source kind, options
that go together, paths that must exist, dead letters a source can write, user schemas, template syntax), and
the helpers they share with ``bridge.config._load``, which runs :class:`Semantics` after the schema checks. Each
kind's own rules are its spec's (``KindSpec.check``), reported through this class.
"""

from __future__ import annotations

import errno
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from bridge import sources
from bridge._redact import redact_dsn
from bridge.config._analysis import Analysis
from bridge.config.diagnostics import Problem, Severity, did_you_mean, format_path
from bridge.config.model import (
    DEFAULT_STATE_DIR,
    DeadLetterConfig,
    DeliveryConfig,
    RetryConfig,
    observable_function_id,
    resolve_path,
)
from bridge.config.schemas import SchemaFileError, check_user_schema, load_schema_file, resolve_pointer
from bridge.config.yamlpos import KeyPath, iter_paths
from bridge.sources import is_set
from bridge.templates import TemplateCompileError, compile_tree, compile_when

_DEAD_LETTER_FILE = next(f.name for f in fields(DeadLetterConfig))  # "file": the destination every source can use


def as_mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class Semantics:
    """The rules JSON Schema does not express. Each check looks only at values of the right type (a wrong
    type is already reported), so a broken part of the file does not hide problems elsewhere."""

    def __init__(self, result: Analysis, failed: set[KeyPath],
                 missing: list[tuple[Problem, KeyPath, tuple[str, ...]]]) -> None:
        self.r = result
        self.data: dict[str, Any] = result.data or {}
        self.failed = failed
        self.missing = missing

    def add(self, code: str, path: KeyPath, message: str, hint: str | None = None, *, key: bool = False,
            severity: Severity = "error") -> None:
        if path not in self.failed:
            self.r.add(code, path, message, hint, key=key, severity=severity)

    def require(self, parent: KeyPath, names: tuple[str, ...], message: str, hint: str | None = None) -> None:
        problem = self.r.add("missing-key", parent, message, hint, key=True)
        self.missing.append((problem, parent, names))

    def run(self) -> None:
        url = as_mapping(self.data.get("engine")).get("url")
        if isinstance(url, str) and ("@" in url.partition("://")[2] or redact_dsn(url) != url):
            self.add("url-credentials", ("engine", "url"),
                     "the URL carries credentials; the iii SDK writes it into a file under ~/.iii/run that "
                     "other users of this machine can read", "set III_TOKEN instead (sent as a bearer token)",
                     severity="warning")
        state_dir = self.data.get("state_dir", DEFAULT_STATE_DIR)
        if isinstance(state_dir, str):
            self.directory(("state_dir",), state_dir, warn_missing=False)
        defaults = as_mapping(as_mapping(self.data.get("defaults")).get("delivery"))
        self.delivery(("defaults", "delivery"), defaults, defaults, whole=True)
        functions: dict[str, str] = {}  # observable function id -> the source registered as it
        for sid, source in as_mapping(self.data.get("sources")).items():
            if isinstance(source, dict):
                self.source(sid, source, defaults)
                self.function_id(sid, source, functions)

    # -- paths

    def resolve(self, value: str) -> Path:
        return resolve_path(self.r.base_dir, value)

    def _unusable(self, path: KeyPath, target: Path) -> bool:
        """Whether ``target`` cannot even be looked up (a name too long, a loop of links); reported if so."""
        try:
            os.stat(target)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return False
            self.add("value", path, f"not a usable path: {exc.strerror or exc}")
            return True
        except ValueError:  # a NUL character
            self.add("value", path, "not a usable path: it contains a NUL character")
            return True
        return False

    def directory(self, path: KeyPath, value: str, *, warn_missing: bool) -> None:
        target = self.resolve(value)
        if self._unusable(path, target) or target.is_dir():
            return
        if target.exists():
            self.add("path-not-dir", path, f"{target} is not a directory")
        elif warn_missing:
            self.add("path-missing", path, f"{target} does not exist; it will be created when the bridge starts",
                     severity="warning")

    def existing_file(self, path: KeyPath, value: str) -> None:
        target = self.resolve(value)
        if self._unusable(path, target):
            return
        if target.is_dir():
            self.add("file-missing", path, f"{target} is a directory, not a file")
        elif not target.exists():
            self.add("file-missing", path, f"no such file: {target}")

    def readable_file(self, path: KeyPath, value: str) -> Path | None:
        target = self.resolve(value)
        if self._unusable(path, target):
            return None
        if target.is_dir() or not target.exists():
            self.existing_file(path, value)
            return None
        if not target.is_file():  # a FIFO would block the read below
            self.add("file-missing", path, f"{target} is not a regular file")
            return None
        try:
            with target.open("rb"):
                pass
        except OSError as exc:
            self.add("file-missing", path, f"cannot read {target}: {exc.strerror or exc}")
            return None
        return target

    # -- sources

    def source(self, sid: str, source: dict[str, Any], defaults: dict[str, Any]) -> None:
        here: KeyPath = ("sources", sid)
        registry = sources.REGISTRY
        kinds = [k for k in source if k in registry]  # as written, so the second one is the one to blame
        if not kinds:
            typo = any(did_you_mean(k, registry) for k in source)
            if not typo:
                self.add("source-kind", here, "no source kind", f"set exactly one of: {', '.join(registry)}",
                         key=True)
        elif len(kinds) > 1:
            self.add("source-kind", (*here, kinds[1]), f"a source has exactly one kind; found {' and '.join(kinds)}",
                     "split it into one source per kind", key=True)
        kind = kinds[0] if len(kinds) == 1 else None
        for name in kinds:  # even with two kinds, each block's own problems are worth reporting
            block = source[name]
            if isinstance(block, dict):
                registry[name].check(self, (*here, name), block)
        own = as_mapping(source.get("delivery"))
        merged = merge_delivery(defaults, own)
        self.delivery((*here, "delivery"), own, merged, whole=False, kind=kind)
        for name in ("bind_schema", "payload_schema"):
            self.r.schemas[(sid, name)] = self.schema((*here, name), source.get(name), name == "bind_schema")
        self.templates(here, source)

    def function_id(self, sid: str, source: dict[str, Any], functions: dict[str, str]) -> None:
        """Two sources cannot be one observable function (observe mode): the engine keeps the first owner."""
        own = source.get("function_id")
        function_id = observable_function_id(sid, own if isinstance(own, str) else None)
        other = functions.setdefault(function_id, sid)
        if other != sid:
            path: KeyPath = ("sources", sid, "function_id") if isinstance(own, str) else ("sources", sid)
            self.add("duplicate-function-id", path,
                     f"source {other} is the observable function {function_id} already (engines with observe.v1)",
                     "give each source its own function_id", key=not isinstance(own, str))

    # -- delivery

    def delivery(self, here: KeyPath, own: dict[str, Any], merged: dict[str, Any], *, whole: bool,
                 kind: str | None = None) -> None:
        """``own`` is the mapping as written at ``here``, ``merged`` what applies; ``whole`` for defaults."""
        mode, queue = merged.get("mode", DeliveryConfig.mode), merged.get("queue")
        if mode == "enqueue" and not is_set(queue) and (whole or "mode" in own or "queue" in own):
            self.require(here, ("queue",), "mode: enqueue needs a queue")
        if mode == "enqueue" and own.get("mode") == "enqueue":
            self.add("enqueue-observe", (*here, "mode"),
                     "enqueue has no equivalent for observers: on an engine with observe.v1 (iii 0.25 and later) "
                     "the bridge delivers to its observers with sync instead",
                     "keep it for an engine before 0.25, choose sync or void for a newer one", severity="warning")
        if is_set(own.get("queue")) and mode != "enqueue":
            self.add("value", (*here, "queue"), "only used with mode: enqueue", key=True)
        retry, own_retry = as_mapping(merged.get("retry")), as_mapping(own.get("retry"))
        low = retry.get("initial_backoff_ms", RetryConfig.initial_backoff_ms)
        high = retry.get("max_backoff_ms", RetryConfig.max_backoff_ms)
        if (whole or own_retry) and isinstance(low, int) and isinstance(high, int) and high < low:
            self.add("value", (*here, "retry", "max_backoff_ms"),
                     f"max_backoff_ms ({high}) is less than initial_backoff_ms ({low})")
        written = own.get("dead_letter")
        if isinstance(written, dict):
            keys = _dead_letter_keys()
            chosen = [k for k in keys if is_set(written.get(k))]
            if len(chosen) != 1:
                found = " and ".join(chosen) if chosen else "none"
                self.add("value", (*here, "dead_letter"),
                         f"set exactly one of {', '.join(keys)} (found {found})", key=True)
            for spec in sources.REGISTRY.values():
                if spec.dead_letter_key is not None and spec.dead_letter_key in written:
                    path = (*here, "dead_letter", spec.dead_letter_key)
                    spec.check_dead_letter(self, path, written[spec.dead_letter_key])
        if kind is not None:
            self.dead_letter_kind(here, merged, kind, inherited=not isinstance(written, dict))

    def dead_letter_kind(self, here: KeyPath, merged: dict[str, Any], kind: str, *, inherited: bool) -> None:
        dead = as_mapping(merged.get("dead_letter"))
        for needs, spec in sources.REGISTRY.items():
            name = spec.dead_letter_key
            if name is None or not is_set(dead.get(name)) or kind == needs:
                continue
            message = f"a {name} dead letter needs a {needs} source (it is written with the source's connection)"
            if inherited:
                self.add("value", here[:-1], f"the default dead_letter: {message}",
                         "give this source its own delivery.dead_letter", key=True)
            else:
                self.add("value", (*here, "dead_letter", name), message, key=True)

    # -- schemas and templates

    def schema(self, here: KeyPath, value: Any, bind: bool) -> dict[str, Any] | None:
        """The schema at ``here`` (inline, or loaded from its ``{$ref: file}``) when it is usable."""
        if not isinstance(value, dict) or here in self.failed:
            return None
        ref = value.get("$ref")
        if set(value) == {"$ref"} and isinstance(ref, str) and not ref.startswith("#"):
            return self.schema_file(here, ref, bind)
        errors = 0
        for f in check_user_schema(value, must_be_object=bind):
            errors += f.severity == "error"
            self.add(f.code, (*here, *f.path), f.message, f.hint, key=f.code == "schema-keyword" or not f.path,
                     severity=f.severity)
        return None if errors else value

    def schema_file(self, here: KeyPath, ref: str, bind: bool) -> dict[str, Any] | None:
        file_part, _, fragment = ref.partition("#")
        shown = os.path.normpath(os.path.join(os.path.dirname(self.r.display), file_part))
        self.r.schema_files.add(self.resolve(file_part))
        try:
            document, positions = load_schema_file(self.resolve(file_part))
            schema, prefix = resolve_pointer(document, fragment)
        except SchemaFileError as exc:
            where = f" (line {exc.line}, column {exc.col})" if exc.line else ""
            self.add("schema-ref", (*here, "$ref"), f"cannot load {shown}: {exc.message}{where}")
            return None
        if not isinstance(schema, dict):
            self.add("bind-schema-invalid", (*here, "$ref"), f"{ref} must be a JSON object (a schema)")
            return None
        errors = 0
        for f in check_user_schema(schema, must_be_object=bind):
            errors += f.severity == "error"
            inner = (*prefix, *f.path)
            if positions is None:  # valid JSON that the YAML reader refuses: point at the $ref instead
                self.add(f.code, (*here, "$ref"), f"{shown}: {format_path(inner) or '(root)'}: {f.message}",
                         f.hint, severity=f.severity)
                continue
            pos = positions.key_at(inner) if f.code == "schema-keyword" else positions.at(inner)
            self.r.problems.append(Problem(f.code, format_path(inner), f.message, f.hint, pos.line, pos.col,
                                           shown, f.severity))
        return None if errors else schema

    def templates(self, here: KeyPath, source: dict[str, Any]) -> None:
        payload, when = source.get("payload"), source.get("when")
        found: list[tuple[tuple[str | int, ...], int, str]] = []
        if payload is not None:
            try:
                compile_tree(payload, root=(*here, "payload"))
            except TemplateCompileError as exc:
                found.extend((p.path, p.line, p.message) for p in exc.problems)
            except _COMPILER_FAILURES:
                found.extend(_failing_leaves(payload, (*here, "payload")))
        if isinstance(when, str):
            try:
                compile_when(when)
            except TemplateCompileError as exc:
                found.extend(((*here, "when"), p.line, p.message) for p in exc.problems)
            except _COMPILER_FAILURES:
                found.append(((*here, "when"), 1, _TOO_COMPLEX))
        for path, line, message in found:
            row, col, exact = self.r.positions.in_text(tuple(path), line)
            if not exact:
                message += f" (line {line} of the template)"
            self.r.problems.append(Problem("template-syntax", format_path(path), message, None, row, col,
                                           self.r.display))


def _dead_letter_keys() -> list[str]:
    """``file`` and each kind's own destination key, in registry order."""
    own = [s.dead_letter_key for s in sources.REGISTRY.values() if s.dead_letter_key is not None]
    return [_DEAD_LETTER_FILE, *own]


# What Python's own compiler raises on a template nested past its limits (70 parentheses, 100 nested ifs);
# templates.py turns these into template problems itself, this is the last line of defence.
_COMPILER_FAILURES = (RecursionError, SyntaxError, MemoryError)
_TOO_COMPLEX = "the template is nested too deeply to compile"


def _failing_leaves(tree: Any, root: KeyPath) -> list[tuple[KeyPath, int, str]]:
    """Each string leaf of ``tree`` that does not compile, with why, for a tree whose compile crashed."""
    out: list[tuple[KeyPath, int, str]] = []
    for path, value in iter_paths(tree, root):
        if not isinstance(value, str):
            continue
        try:
            compile_tree(value, root=path)
        except TemplateCompileError as exc:
            out.extend((p.path, p.line, p.message) for p in exc.problems)
        except _COMPILER_FAILURES:
            out.append((path, 1, _TOO_COMPLEX))
    return out


def merge_delivery(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged key by key over ``base``, nested mappings too, except ``dead_letter``: it names one
    destination, so a source's own replaces the default one as a whole."""
    out = dict(base)
    for key, value in over.items():
        if key != "dead_letter" and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_delivery(out[key], value)
        else:
            out[key] = value
    return out

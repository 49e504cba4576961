"""The semantic checks of bridge.yaml: the rules its JSON Schema cannot express (one source kind, options
that go together, paths that must exist, dead letters a source can write, user schemas, template syntax), and
the helpers they share with ``bridge.config._load``, which runs :class:`Semantics` after the schema checks.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge._redact import redact_dsn
from bridge.config.diagnostics import Problem, Severity, format_path
from bridge.config.schemas import KINDS, SchemaFileError, check_user_schema, load_schema_file, resolve_pointer
from bridge.config.yamlpos import KeyPath, iter_paths
from bridge.templates import TemplateCompileError, compile_tree, compile_when

if TYPE_CHECKING:
    from bridge.config._load import Analysis

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}(\.[A-Za-z_][A-Za-z0-9_$]{0,62})?$")


def did_you_mean(name: str, allowed: list[str], cutoff: float = 0.6) -> str:
    """A hint naming the closest allowed name, else the list of allowed names (when short)."""
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=cutoff)
    if close:
        return f"did you mean {close[0]!r}?"
    if len(allowed) <= 12:
        return "allowed: " + ", ".join(sorted(allowed)) if allowed else "no keys are allowed here"
    return f"{len(allowed)} keys are allowed here; `bridge schema` lists them"


def as_mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _set(value: Any) -> bool:
    """Whether an optional value is really given (null and empty lists count as absent)."""
    return value is not None and value != [] and value != ""


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
        state_dir = self.data.get("state_dir", ".bridge")
        if isinstance(state_dir, str):
            self.directory(("state_dir",), state_dir, warn_missing=False)
        defaults = as_mapping(as_mapping(self.data.get("defaults")).get("delivery"))
        self.delivery(("defaults", "delivery"), defaults, defaults, whole=True)
        for sid, source in as_mapping(self.data.get("sources")).items():
            if isinstance(source, dict):
                self.source(sid, source, defaults)

    # -- paths

    def resolve(self, value: str) -> Path:
        return Path(os.path.abspath(self.r.base_dir / os.path.expanduser(value)))

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

    # -- sources

    def source(self, sid: str, source: dict[str, Any], defaults: dict[str, Any]) -> None:
        here: KeyPath = ("sources", sid)
        kinds = [k for k in source if k in KINDS]  # as written, so the second one is the one to blame
        if not kinds:
            typo = any(did_you_mean(k, list(KINDS)) in {f"did you mean {n!r}?" for n in KINDS} for k in source)
            if not typo:
                self.add("source-kind", here, "no source kind", "set exactly one of: kafka, postgres, file",
                         key=True)
        elif len(kinds) > 1:
            self.add("source-kind", (*here, kinds[1]), f"a source has exactly one kind; found {' and '.join(kinds)}",
                     "split it into one source per kind", key=True)
        kind = kinds[0] if len(kinds) == 1 else None
        checks = {"kafka": self.kafka, "postgres": self.postgres, "file": self.file}
        for name in kinds:  # even with two kinds, each block's own problems are worth reporting
            block = source[name]
            if isinstance(block, dict):
                checks[name]((*here, name), block)
        own = as_mapping(source.get("delivery"))
        merged = merge_delivery(defaults, own)
        self.delivery((*here, "delivery"), own, merged, whole=False, kind=kind)
        for name in ("bind_schema", "payload_schema"):
            self.r.schemas[(sid, name)] = self.schema((*here, name), source.get(name), name == "bind_schema")
        self.templates(here, source)

    def kafka(self, here: KeyPath, block: dict[str, Any]) -> None:
        topics, pattern = _set(block.get("topics")), _set(block.get("topic_pattern"))
        if topics and pattern:
            self.add("value", (*here, "topic_pattern"), "set either topics or topic_pattern, not both", key=True)
        elif not topics and not pattern:
            self.require(here, ("topics", "topic_pattern"), "missing topics (or topic_pattern)",
                         "name the topics to consume: topics: [orders]")
        if pattern and isinstance(block["topic_pattern"], str):
            try:
                re.compile(block["topic_pattern"])
            except (re.error, OverflowError, RecursionError) as exc:  # a{99999999999}; ((((...)))) nested deep
                self.add("value", (*here, "topic_pattern"), f"not a valid regular expression: {exc}")
        security = block.get("security")
        if isinstance(security, dict):
            self.security((*here, "security"), security)

    def security(self, here: KeyPath, sec: dict[str, Any]) -> None:
        protocol = sec.get("protocol", "PLAINTEXT")
        if not isinstance(protocol, str):
            return
        if protocol.startswith("SASL_"):
            for name in ("username", "password"):
                if not _set(sec.get(name)):
                    self.require(here, (name,), f"protocol {protocol} needs {name}")
        else:
            for name in ("sasl_mechanism", "username", "password"):
                if _set(sec.get(name)):
                    self.add("value", (*here, name), "only used with protocol SASL_PLAINTEXT or SASL_SSL",
                             f"protocol is {protocol}", key=True)
        tls = protocol in ("SSL", "SASL_SSL")
        for name in ("ca_file", "cert_file", "key_file"):
            value = sec.get(name)
            if not isinstance(value, str) or not value:
                continue
            if not tls:
                self.add("value", (*here, name), "only used with protocol SSL or SASL_SSL",
                         f"protocol is {protocol}", key=True)
            else:
                self.existing_file((*here, name), value)
        if _set(sec.get("cert_file")) != _set(sec.get("key_file")):
            name = "key_file" if _set(sec.get("cert_file")) else "cert_file"
            self.require(here, (name,), f"cert_file and key_file go together; {name} is missing")

    def postgres(self, here: KeyPath, block: dict[str, Any]) -> None:
        dsn = block.get("dsn")
        if isinstance(dsn, str) and _unencoded_password(dsn):
            self.add("value", (*here, "dsn"), "the password seems to hold an unencoded # ? / or @, which the "
                     "database client reads as the end of the host", "percent-encode them: %23 %3F %2F %40",
                     severity="warning")
        mode = block.get("mode", "listen")
        table = block.get("outbox_table")
        if mode == "outbox" and not _set(table):
            self.require(here, ("outbox_table",), "mode: outbox needs outbox_table",
                         "bridge sql SOURCE prints the table's DDL")
        elif mode != "outbox" and _set(table):
            self.add("value", (*here, "outbox_table"), "only used with mode: outbox", key=True)
        if isinstance(table, str) and table and not _IDENTIFIER.match(table):
            self.add("value", (*here, "outbox_table"), f"{table!r} is not a plain SQL table name",
                     "letters, digits and _, optionally schema-qualified: app.bridge_outbox")
        if mode == "listen" and not _set(block.get("channels")):
            self.require(here, ("channels",), "mode: listen needs at least one channel in channels")

    def file(self, here: KeyPath, block: dict[str, Any]) -> None:
        path = block.get("path")
        if isinstance(path, str) and path:
            self.directory((*here, "path"), path, warn_missing=True)
        after, move_to = block.get("after_delivery", "keep"), block.get("move_to")
        if after == "move" and not _set(move_to):
            self.require(here, ("move_to",), "after_delivery: move needs move_to")
        elif after != "move" and _set(move_to):
            self.add("value", (*here, "move_to"), "only used with after_delivery: move", key=True)
        if after == "move" and isinstance(move_to, str) and move_to:
            self.directory((*here, "move_to"), move_to, warn_missing=False)

    # -- delivery

    def delivery(self, here: KeyPath, own: dict[str, Any], merged: dict[str, Any], *, whole: bool,
                 kind: str | None = None) -> None:
        """``own`` is the mapping as written at ``here``, ``merged`` what applies; ``whole`` for defaults."""
        mode, queue = merged.get("mode", "sync"), merged.get("queue")
        if mode == "enqueue" and not _set(queue) and (whole or "mode" in own or "queue" in own):
            self.require(here, ("queue",), "mode: enqueue needs a queue")
        if _set(own.get("queue")) and mode != "enqueue":
            self.add("value", (*here, "queue"), "only used with mode: enqueue", key=True)
        retry, own_retry = as_mapping(merged.get("retry")), as_mapping(own.get("retry"))
        low, high = retry.get("initial_backoff_ms", 200), retry.get("max_backoff_ms", 30000)
        if (whole or own_retry) and isinstance(low, int) and isinstance(high, int) and high < low:
            self.add("value", (*here, "retry", "max_backoff_ms"),
                     f"max_backoff_ms ({high}) is less than initial_backoff_ms ({low})")
        written = own.get("dead_letter")
        if isinstance(written, dict):
            chosen = [k for k in ("file", "kafka_topic", "postgres_table") if _set(written.get(k))]
            if len(chosen) != 1:
                found = " and ".join(chosen) if chosen else "none"
                self.add("value", (*here, "dead_letter"),
                         f"set exactly one of file, kafka_topic, postgres_table (found {found})", key=True)
            table = written.get("postgres_table")
            if isinstance(table, str) and table and not _IDENTIFIER.match(table):
                self.add("value", (*here, "dead_letter", "postgres_table"), f"{table!r} is not a plain SQL table name")
        if kind is not None:
            self.dead_letter_kind(here, merged, kind, inherited=not isinstance(written, dict))

    def dead_letter_kind(self, here: KeyPath, merged: dict[str, Any], kind: str, *, inherited: bool) -> None:
        dead = as_mapping(merged.get("dead_letter"))
        for name, needs in (("kafka_topic", "kafka"), ("postgres_table", "postgres")):
            if not _set(dead.get(name)) or kind == needs:
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


def _unencoded_password(dsn: str) -> bool:
    """Whether a URL DSN's password (up to the LAST @) holds a character that ends the host for a URL parser.
    ``host:5432/db?x=a@b`` is a port and a query, not a password: digits before the first / ? # are a port."""
    scheme, sep, rest = dsn.partition("://")
    at = rest.rfind("@")
    if not sep or not scheme or at < 0:
        return False
    user, colon, password = rest[:at].partition(":")
    if not colon or any(c in user for c in "/?#"):
        return False
    head = re.split(r"[/?#]", password, maxsplit=1)[0]
    return any(c in password for c in "/?#@") and not head.isdigit()


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

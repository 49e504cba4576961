"""Checking bridge.yaml: reading, ``${VAR}`` substitution, JSON Schema validation, then the semantic checks
the schema cannot express. Every problem is collected; nothing stops at the first one.

config.py turns a document that passed into the frozen dataclasses.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bridge.diagnostics import Problem, Severity, format_path
from bridge.schemas import (
    KINDS,
    SchemaFileError,
    bridge_validator,
    check_user_schema,
    load_schema_file,
    resolve_pointer,
)
from bridge.templates import TemplateCompileError, compile_tree, compile_when
from bridge.yamlpos import KeyPath, Positions, decode_text, load_yaml

# AIOKafkaConsumer arguments that client_options may not hold (the bridge sets them, or YAML cannot express
# them), each with where to go instead. Every other argument is in schemas/source-kafka.json.
MANAGED_CLIENT_OPTIONS = {
    "bootstrap_servers": "set kafka.bootstrap_servers instead",
    "group_id": "set kafka.group_id instead",
    "auto_offset_reset": "set kafka.start_from instead",
    "enable_auto_commit": "the bridge commits offsets itself (kafka.commit_interval_ms)",
    "auto_commit_interval_ms": "the bridge commits offsets itself (kafka.commit_interval_ms)",
    "key_deserializer": "set kafka.key_format instead",
    "value_deserializer": "set kafka.value_format instead",
    "security_protocol": "set kafka.security.protocol instead",
    "sasl_mechanism": "set kafka.security.sasl_mechanism instead",
    "sasl_plain_username": "set kafka.security.username instead",
    "sasl_plain_password": "set kafka.security.password instead",
    "sasl_kerberos_service_name": "SASL mechanisms are PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 (kafka.security)",
    "sasl_kerberos_domain_name": "SASL mechanisms are PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 (kafka.security)",
    "sasl_oauth_token_provider": "SASL mechanisms are PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 (kafka.security)",
    "ssl_context": "set kafka.security.ca_file, cert_file and key_file instead",
    "partition_assignment_strategy": "not settable from YAML (it takes Python classes)",
    "loop": "the bridge runs the consumer on its own loop",
}

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}(\.[A-Za-z_][A-Za-z0-9_$]{0,62})?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPE_NAMES = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "true or false", "null": "null"}


@dataclass
class Analysis:
    """What the checks produced: the substituted document (when it is a mapping), problems, resolved schemas."""

    path: Path  # absolute
    display: str  # as the user wrote it
    data: dict[str, Any] | None = None
    positions: Positions = field(default_factory=Positions)
    problems: list[Problem] = field(default_factory=list)
    schemas: dict[tuple[str, str], dict[str, Any] | None] = field(default_factory=dict)
    invalid: set[KeyPath] = field(default_factory=set)  # values the YAML reader refused (e.g. a !tag)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def add(self, code: str, path: KeyPath, message: str, hint: str | None = None, *, key: bool = False,
            severity: Severity = "error") -> Problem:
        pos = self.positions.key_at(path) if key else self.positions.at(path)
        problem = Problem(code, format_path(path), message, hint, pos.line, pos.col, self.display, severity)
        self.problems.append(problem)
        return problem


def did_you_mean(name: str, allowed: list[str], cutoff: float = 0.6) -> str:
    """A hint naming the closest allowed name, else the list of allowed names (when short)."""
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=cutoff)
    if close:
        return f"did you mean {close[0]!r}?"
    if len(allowed) <= 12:
        return "allowed: " + ", ".join(sorted(allowed)) if allowed else "no keys are allowed here"
    return f"{len(allowed)} keys are allowed here; `bridge schema` lists them"


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------------------------------------------------
# reading


def read(path: Path, display: str) -> Analysis:
    """Read and parse bridge.yaml; the result has ``data`` unless the file is unreadable or not a mapping."""
    result = Analysis(Path(os.path.abspath(path)), display)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        result.problems.append(Problem("file-unreadable", "", "no such file", None, 0, 0, display))
        return result
    except IsADirectoryError:
        result.problems.append(Problem("file-unreadable", "", "is a directory, not a file", None, 0, 0, display))
        return result
    except OSError as exc:
        message = f"cannot read: {exc.strerror or exc}"
        result.problems.append(Problem("file-unreadable", "", message, None, 0, 0, display))
        return result
    text, problems = decode_text(raw, display)
    result.problems.extend(problems)
    if text is None:
        return result
    document, problems = load_yaml(text, display)
    result.problems.extend(problems)
    if document is None:
        return result
    result.positions = document.positions
    result.invalid = document.invalid
    if document.data is None:
        result.add("type", (), "the file is empty", "start with 'version: 1' and a 'sources:' mapping")
    elif not isinstance(document.data, dict):
        kind = _TYPE_NAMES.get(_json_type(document.data), "a scalar")
        result.add("type", (), f"the top level must be a mapping, not {kind}",
                   "start with 'version: 1' and a 'sources:' mapping")
    else:
        result.data = document.data
    return result


def _json_type(value: Any) -> str:
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


# ---------------------------------------------------------------------------------------------------------
# ${VAR} substitution


_RESOLVER = yaml.resolver.Resolver()
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_TYPED_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float")}


def _as_scalar(text: str) -> Any:
    """``text`` read as a plain YAML scalar: "9092" → 9092, "false" → False, "" → None; else the text."""
    tag = _RESOLVER.resolve(yaml.ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
    if tag not in _TYPED_TAGS:
        return text
    return _CONSTRUCTOR.yaml_constructors[tag](_CONSTRUCTOR, yaml.ScalarNode(tag, text))


class _EnvError(Exception):
    def __init__(self, code: str, message: str, hint: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint


def _substitute_text(text: str, env: Mapping[str, str]) -> tuple[str, int]:
    """``text`` with every ``${VAR}``/``${VAR:default}`` replaced and ``$${`` unescaped; and how many
    references it held."""
    out: list[str] = []
    refs = 0
    i = 0
    while True:
        j = text.find("$", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out), refs
        out.append(text[i:j])
        if text.startswith("$${", j):
            out.append("${")
            i = j + 3
        elif text.startswith("${", j):
            end = text.find("}", j + 2)
            if end < 0:
                raise _EnvError("env-syntax", "unterminated ${ reference", "write $${ for a literal ${")
            name, colon, default = text[j + 2 : end].partition(":")
            if not _ENV_NAME.match(name):
                raise _EnvError("env-syntax", f"invalid variable name {name!r} in ${{...}}",
                                "names are letters, digits and _; write $${ for a literal ${")
            value = env.get(name)
            if value is None:
                if not colon:
                    raise _EnvError("env-undefined", f"environment variable {name} is not set",
                                    f"set it, or give a default: ${{{name}:value}}")
                value = default
            out.append(value)
            refs += 1
            i = end + 1
        else:
            out.append("$")
            i = j + 1


def substitute(result: Analysis, env: Mapping[str, str]) -> set[KeyPath]:
    """Replace references in every string value of ``result.data``; the paths that failed are returned
    (later checks skip them: the reference is the problem, not the type of what it would have been)."""
    failed: set[KeyPath] = set()

    def walk(value: Any, path: KeyPath) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*path, i)) for i, v in enumerate(value)]
        if not isinstance(value, str) or "$" not in value:
            return value
        try:
            text, refs = _substitute_text(value, env)
        except _EnvError as exc:
            result.add(exc.code, path, exc.message, exc.hint)
            failed.add(path)
            return value
        whole = refs == 1 and value.startswith("${") and value.endswith("}") and value.find("}") == len(value) - 1
        return _as_scalar(text) if whole else text

    assert result.data is not None
    result.data = walk(result.data, ())
    return failed


# ---------------------------------------------------------------------------------------------------------
# JSON Schema


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (int, float)):
        return str(value)
    return _TYPE_NAMES[_json_type(value)]


def _type_message(expected: Any, instance: Any) -> str:
    names = [expected] if isinstance(expected, str) else list(expected)
    wanted = " or ".join(_TYPE_NAMES.get(n, n) for n in names if n != "null" or len(names) == 1)
    if "null" in names and len(names) > 1:
        wanted += " or null"
    return f"expected {wanted}, got {_describe(instance)}"


def schema_problems(result: Analysis, skip: set[KeyPath],
                    missing: list[tuple[Problem, KeyPath, tuple[str, ...]]],
                    suggested: set[tuple[KeyPath, str]]) -> None:
    """Map every JSON Schema error to a problem at the offending key or value."""
    errors = list(bridge_validator().iter_errors(result.data))
    # A value of the wrong type gets one problem, not also "must be at least 100" for the same value.
    mistyped = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    _numbers(result, result.data, (), skip | {tuple(e.absolute_path) for e in errors})
    for error in errors:
        path: KeyPath = tuple(error.absolute_path)
        if path in skip or (path in mistyped and error.validator != "type"):
            continue
        kind, value, instance = error.validator, error.validator_value, error.instance
        if "propertyNames" in error.schema_path:
            result.add("source-id", (*path, instance), f"{instance!r} is not a valid trigger type id",
                       "use letters, digits and _ . : -, starting with a letter or digit", key=True)
        elif kind in ("additionalProperties", "unevaluatedProperties") and value is False:
            _unknown_keys(result, path, error.schema, instance, suggested)
        elif kind == "required":
            for name in value:
                if name not in instance:
                    problem = result.add("missing-key", path, f"missing required key {name!r}", key=True)
                    missing.append((problem, path, (name,)))
        elif kind == "type":
            result.add("type", path, _type_message(value, instance))
        elif kind == "enum":
            options = [o for o in value if isinstance(o, str)]
            shown = ", ".join("null" if o is None else str(o) for o in value)
            hint = did_you_mean(instance, options, 0.75) if isinstance(instance, str) else None
            result.add("value", path, f"{_describe(instance)} is not one of: {shown}",
                       hint if hint and hint.startswith("did") else None)
        elif kind == "const":
            hint = "this bridge reads version: 1" if path == ("version",) else None
            result.add("value", path, f"must be {_describe(value)}, got {_describe(instance)}", hint)
        elif kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
            words = {"minimum": "at least", "exclusiveMinimum": "more than", "maximum": "at most",
                     "exclusiveMaximum": "less than"}[kind]
            result.add("value", path, f"must be {words} {value}, got {_describe(instance)}")
        elif kind == "minLength":
            result.add("value", path, "must not be empty" if value == 1 else f"must be at least {value} characters")
        elif kind == "maxLength":
            result.add("value", path, f"must be at most {value} characters")
        elif kind in ("minItems", "minProperties"):
            noun = "item" if kind == "minItems" else "entry"
            result.add("value", path, f"must have at least {value} {noun}{'' if value == 1 else 's'}")
        elif kind == "uniqueItems":
            twice = next((v for i, v in enumerate(instance) if v in instance[:i]), None)
            result.add("value", path, f"{_describe(twice)} is listed more than once")
        elif kind == "pattern":
            result.add("value", path, f"{_describe(instance)} does not match {value}")
        else:
            result.add("value", path, error.message)


_SAFE_INTEGER = 2**53 - 1  # beyond it JSON numbers lose precision, and timers overflow long before
_FREE_FORM = frozenset({"payload", "bind_schema", "payload_schema", "when"})


def _numbers(result: Analysis, value: Any, path: KeyPath, skip: set[KeyPath]) -> None:
    """NaN and infinities anywhere (JSON has none), and integers too large to be meant (not in payloads)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _numbers(result, item, (*path, key), skip)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _numbers(result, item, (*path, index), skip)
    elif path in skip:
        return
    elif isinstance(value, float) and not math.isfinite(value):
        result.add("value", path, f"{value} is not a number JSON can hold")
    elif (isinstance(value, int) and not isinstance(value, bool) and abs(value) > _SAFE_INTEGER
          and not (len(path) > 2 and path[0] == "sources" and path[2] in _FREE_FORM)):
        result.add("value", path, f"{value} is too large (at most {_SAFE_INTEGER})")


def _unknown_keys(result: Analysis, path: KeyPath, schema: Any, instance: Any,
                  suggested: set[tuple[KeyPath, str]]) -> None:
    known = list(_mapping(schema).get("properties", {}))
    managed = path[-1:] == ("client_options",)
    for key in instance:
        if key in known:
            continue
        if managed and key in MANAGED_CLIENT_OPTIONS:
            result.add("unknown-key", (*path, key), "not allowed in client_options",
                       MANAGED_CLIENT_OPTIONS[key], key=True)
            continue
        hint = did_you_mean(key, known)
        if hint and hint.startswith("did you mean"):
            suggested.add((path, hint.split("'")[1]))
        result.add("unknown-key", (*path, key), "unknown key", hint, key=True)


# ---------------------------------------------------------------------------------------------------------
# everything


def analyze(path: Path, display: str, env: Mapping[str, str]) -> Analysis:
    """Every check, in order; ``schemas`` holds the resolved bind/payload schemas of every source."""
    result = read(path, display)
    if result.data is None:
        return result
    failed = substitute(result, env) | result.invalid
    missing: list[tuple[Problem, KeyPath, tuple[str, ...]]] = []
    suggested: set[tuple[KeyPath, str]] = set()
    schema_problems(result, failed, missing, suggested)
    _Semantics(result, failed, missing).run()
    # A typo such as `topcis:` is one mistake: keep its "did you mean 'topics'?", drop "missing topics".
    dropped = {id(p) for p, parent, names in missing if any((parent, n) in suggested for n in names)}
    kept = [p for p in result.problems if id(p) not in dropped]
    unique: dict[Problem, None] = dict.fromkeys(kept)
    result.problems = sorted(unique, key=lambda p: (p.file != display, p.file or "", p.line, p.col))
    return result


# ---------------------------------------------------------------------------------------------------------
# semantic checks


def _set(value: Any) -> bool:
    """Whether an optional value is really given (null and empty lists count as absent)."""
    return value is not None and value != [] and value != ""


class _Semantics:
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
        state_dir = self.data.get("state_dir", ".bridge")
        if isinstance(state_dir, str):
            self.directory(("state_dir",), state_dir, warn_missing=False)
        defaults = _mapping(_mapping(self.data.get("defaults")).get("delivery"))
        self.delivery(("defaults", "delivery"), defaults, defaults, whole=True)
        for sid, source in _mapping(self.data.get("sources")).items():
            if isinstance(source, dict):
                self.source(sid, source, defaults)

    # -- paths

    def resolve(self, value: str) -> Path:
        return Path(os.path.abspath(self.r.base_dir / os.path.expanduser(value)))

    def directory(self, path: KeyPath, value: str, *, warn_missing: bool) -> None:
        target = self.resolve(value)
        if target.is_dir():
            return
        if target.exists():
            self.add("path-not-dir", path, f"{target} is not a directory")
        elif warn_missing:
            self.add("path-missing", path, f"{target} does not exist; it will be created when the bridge starts",
                     severity="warning")

    def existing_file(self, path: KeyPath, value: str) -> None:
        target = self.resolve(value)
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
        own = _mapping(source.get("delivery"))
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
            except re.error as exc:
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
        retry, own_retry = _mapping(merged.get("retry")), _mapping(own.get("retry"))
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
        dead = _mapping(merged.get("dead_letter"))
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
        if isinstance(when, str):
            try:
                compile_when(when)
            except TemplateCompileError as exc:
                found.extend(((*here, "when"), p.line, p.message) for p in exc.problems)
        for path, line, message in found:
            row, col, exact = self.r.positions.in_text(tuple(path), line)
            if not exact:
                message += f" (line {line} of the template)"
            self.r.problems.append(Problem("template-syntax", format_path(path), message, None, row, col,
                                           self.r.display))


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

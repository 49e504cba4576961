"""`bridge test`: reading and checking test files (``bridge.test.yaml``) against a loaded bridge.yaml.

A test file is checked like bridge.yaml: every problem at once, each at its line:col, in the format of
``bridge.config.diagnostics``. Beyond the shared codes (yaml-syntax, duplicate-key, unknown-key, missing-key, type,
value, file-unreadable) a test file can have:

================ =========================================================================================
unknown-source   a case names a source bridge.yaml does not have
bind-config      a case's ``config`` breaks the source's bind_schema (one problem per violation)
event-field      a case's ``event`` has a field the source's kind does not have
duplicate-name   two cases of one file have the same name
================ =========================================================================================

Running the cases is ``bridge._caserun``; the output formats are ``bridge._caseout``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from bridge.config import BridgeConfig
from bridge.config._yamllimits import read_capped
from bridge.config.diagnostics import Problem, did_you_mean, format_path, json_type, unknown_key_hint
from bridge.config.schemas import SCHEMA_DIR, BindValidator, violations
from bridge.config.yamlpos import KeyPath, Positions, decode_text, load_yaml
from bridge.sources import REGISTRY

__all__ = ["Case", "TestFile", "check_file", "event_fields", "tests_schema"]

TESTS_SCHEMA_FILE = "bridge-test.schema.json"


def event_fields(kind: str) -> tuple[str, ...]:
    """The ``event`` fields a source of ``kind`` has (DESIGN.md §2). The one place `bridge test` learns them."""
    return tuple(name for name, _, _ in REGISTRY[kind].event_fields)


@cache
def _schema() -> dict[str, Any]:
    data = json.loads((SCHEMA_DIR / TESTS_SCHEMA_FILE).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def tests_schema() -> dict[str, Any]:
    """The JSON Schema of test files (a fresh copy), as ``bridge schema --tests`` prints it."""
    return json.loads(json.dumps(_schema()))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Case:
    """One test case, as written (``config`` not yet defaulted)."""

    file: str  # as displayed
    index: int  # position in the file's `tests` list
    line: int
    name: str
    source: str
    config: dict[str, Any]
    binding: dict[str, Any]
    event: dict[str, Any]
    expect: dict[str, Any] | None  # None: no expectation yet (`--update` records one)


@dataclass
class TestFile:
    """A test file: its cases when it has no error, and every problem found."""

    __test__ = False  # not a pytest class, whatever imports it

    path: Path
    display: str
    text: str | None = None
    cases: list[Case] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def unreadable(self) -> bool:
        return any(p.code == "file-unreadable" for p in self.problems)


class _Checker:
    def __init__(self, result: TestFile, positions: Positions) -> None:
        self.result = result
        self.positions = positions

    def add(self, code: str, path: KeyPath, message: str, hint: str | None = None, *, key: bool = False) -> None:
        pos = self.positions.key_at(path) if key else self.positions.at(path)
        self.result.problems.append(
            Problem(code, format_path(path), message, hint, pos.line, pos.col, self.result.display))


def check_file(path: Path, display: str, config: BridgeConfig) -> TestFile:
    """Read and check the test file at ``path`` against ``config``; ``cases`` is empty when it has an error."""
    result = TestFile(Path(os.path.abspath(path)), display)
    try:
        raw = read_capped(path)
    except IsADirectoryError:
        result.problems.append(Problem("file-unreadable", "", "is a directory, not a file", None, 0, 0, display))
        return result
    except OSError as exc:
        reason = "no such file" if isinstance(exc, FileNotFoundError) else f"cannot read: {exc.strerror or exc}"
        result.problems.append(Problem("file-unreadable", "", reason, None, 0, 0, display))
        return result
    text, problems = decode_text(raw, display)
    result.problems.extend(problems)
    if text is None:
        return result
    result.text = text
    document, problems = load_yaml(text, display)
    result.problems.extend(problems)
    if document is None:
        return result
    checker = _Checker(result, document.positions)
    data = document.data
    if not isinstance(data, dict):
        checker.add("type", (), "the file is empty" if data is None else "the top level must be a mapping",
                    "start with 'tests:' and a list of cases")
        return result
    bad = _schema_problems(checker, data, document.invalid)
    tests = data.get("tests")
    if isinstance(tests, list):
        _semantics(checker, tests, config, bad)
    result.problems.sort(key=lambda p: (p.line, p.col))
    if not any(p.is_error for p in result.problems) and isinstance(tests, list):
        result.cases = [_case(result, document.positions, i, raw_case) for i, raw_case in enumerate(tests)]
    return result


_TYPE_NAMES = {"object": "a mapping", "array": "a list", "string": "a string", "boolean": "true or false",
               "null": "null"}


def _kind(value: Any) -> str:
    return _TYPE_NAMES.get(json_type(value), "a number")  # integer and number both read "a number"


def _schema_problems(checker: _Checker, data: dict[str, Any], invalid: set[KeyPath]) -> set[KeyPath]:
    """Map every JSON Schema error to a problem; returns the paths that had one. ``invalid`` holds the values
    the YAML reader refused (and reported): they get no second problem."""
    errors = list(Draft202012Validator(_schema()).iter_errors(data))
    mistyped = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    suggested: set[tuple[KeyPath, str]] = set()
    missing: list[tuple[KeyPath, str]] = []
    bad: set[KeyPath] = set()
    for error in errors:
        path: KeyPath = tuple(error.absolute_path)
        bad.add(path)
        kind, value, instance = error.validator, error.validator_value, error.instance
        if path in invalid or (path in mistyped and kind != "type"):
            continue
        if kind == "additionalProperties":
            known = list(error.schema.get("properties", {}))
            for key in instance:
                if key not in known:
                    hint = unknown_key_hint(key, known)
                    if hint.startswith("did you mean"):
                        suggested.add((path, hint.split("'")[1]))
                    checker.add("unknown-key", (*path, key), "unknown key", hint, key=True)
        elif kind == "required":
            missing.extend((path, name) for name in value if name not in instance)
        elif kind == "type":
            names = [value] if isinstance(value, str) else list(value)
            wanted = " or ".join(_TYPE_NAMES.get(n, n) for n in names)
            checker.add("type", path, f"expected {wanted}, got {_kind(instance)}")
        elif kind == "enum":
            close = did_you_mean(instance, value) if isinstance(instance, str) else None
            checker.add("value", path, f"{instance!r} is not one of: {', '.join(value)}", close)
        elif kind == "minLength":
            checker.add("value", path, "must not be empty")
        elif kind == "minProperties":
            checker.add("value", path, "must have at least one entry",
                        "expect any of: when, payload, payload_contains, error, error_contains")
        else:
            checker.add("value", path, error.message)
    for path, name in missing:
        if (path, name) not in suggested:  # `sorce:` is one mistake: its hint says it all
            checker.add("missing-key", path, f"missing required key {name!r}", key=True)
    return bad


def _semantics(checker: _Checker, tests: list[Any], config: BridgeConfig, bad: set[KeyPath]) -> None:
    """What the schema cannot say: sources, bind configs, event fields, unique names, coherent expectations."""
    names: dict[str, int] = {}
    sources = {s.id: s for s in config.sources}
    for index, case in enumerate(tests):
        if not isinstance(case, dict):
            continue
        here: KeyPath = ("tests", index)
        name = case.get("name")
        if isinstance(name, str):
            if name in names:
                first = checker.positions.at((*here[:1], names[name], "name"))
                checker.add("duplicate-name", (*here, "name"), f"a case named {name!r} is already at line "
                            f"{first.line}", "case names must be unique within a file")
            else:
                names[name] = index
        source_id = case.get("source")
        source = sources.get(source_id) if isinstance(source_id, str) else None
        if isinstance(source_id, str) and source_id and source is None:
            hint = unknown_key_hint(source_id, list(sources))
            checker.add("unknown-source", (*here, "source"),
                        f"no source {source_id!r} in {config.path.name}", hint.replace("allowed:", "sources:"))
        expect = case.get("expect")
        if isinstance(expect, dict):
            _expectation(checker, (*here, "expect"), expect)
        if source is None:
            continue
        bind_config = case.get("config", {})
        if isinstance(bind_config, dict) and (*here, "config") not in bad:
            validator = Draft202012Validator(BindValidator(source.id, source.bind_schema).advertised,
                                             format_checker=Draft202012Validator.FORMAT_CHECKER)
            for violation in violations(validator, bind_config):
                checker.add("bind-config", (*here, "config"), f"breaks the bind_schema of {source.id}: {violation}")
        event = case.get("event", {})
        if isinstance(event, dict):
            known = list(event_fields(source.kind))
            for key in event:
                if key not in known:
                    checker.add("event-field", (*here, "event", key), f"{source.kind} events have no field {key!r}",
                                unknown_key_hint(key, known), key=True)


def _expectation(checker: _Checker, here: KeyPath, expect: dict[str, Any]) -> None:
    if "error" in expect or "error_contains" in expect:
        for key in ("payload", "payload_contains"):
            if key in expect:
                checker.add("value", (*here, key), f"a case cannot expect both an error and a {key}", key=True)
        if expect.get("when") is False:
            checker.add("value", (*here, "when"), "a case cannot expect both an error and when: false",
                        "a filtered event is never rendered", key=True)
    elif expect.get("when") is False:
        for key in ("payload", "payload_contains"):
            if key in expect:
                checker.add("value", (*here, key), f"a case that expects when: false has no {key}",
                            "the binding skips a filtered event; nothing is rendered", key=True)


def _case(result: TestFile, positions: Positions, index: int, raw: dict[str, Any]) -> Case:
    return Case(
        file=result.display,
        index=index,
        line=positions.at(("tests", index)).line,
        name=raw["name"],
        source=raw["source"],
        config=raw.get("config", {}),
        binding=raw.get("binding", {}),
        event=raw.get("event", {}),
        expect=raw.get("expect"),
    )

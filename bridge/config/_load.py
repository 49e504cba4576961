"""Checking bridge.yaml: reading, ``${VAR}`` substitution, JSON Schema validation, then the semantic checks
the schema cannot express. Every problem is collected; nothing stops at the first one.

This module reads the file, maps JSON Schema errors to problems and runs every step in order (:func:`analyze`);
the substitution is in ``bridge.config._envsubst``, the semantic checks in ``bridge.config._checks``.
``_build`` turns a document that passed into the frozen dataclasses.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bridge import sources
from bridge._redact import CREDENTIAL_KEYS, is_secret_key, redact_value
from bridge.config._analysis import Analysis
from bridge.config._checks import Semantics, as_mapping
from bridge.config._envsubst import substitute
from bridge.config._yamllimits import read_capped
from bridge.config.diagnostics import Problem, did_you_mean, json_type, unknown_key_hint
from bridge.config.schemas import bridge_validator
from bridge.config.yamlpos import KeyPath, decode_text, load_yaml

_TYPE_NAMES = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "true or false", "null": "null"}


# ---------------------------------------------------------------------------------------------------------
# reading


def read(path: Path, display: str) -> Analysis:
    """Read and parse bridge.yaml; the result has ``data`` unless the file is unreadable or not a mapping."""
    result = Analysis(Path(os.path.abspath(path)), display)
    try:
        raw = read_capped(path)
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
        kind = _TYPE_NAMES.get(json_type(document.data), "a scalar")
        result.add("type", (), f"the top level must be a mapping, not {kind}",
                   "start with 'version: 1' and a 'sources:' mapping")
    else:
        result.data = document.data
    return result


# ---------------------------------------------------------------------------------------------------------
# JSON Schema


def _is_secret(path: KeyPath) -> bool:
    return bool(path) and isinstance(path[-1], str) and is_secret_key(path[-1])


def _describe(value: Any, path: KeyPath = ()) -> str:
    """``value`` as a diagnostic shows it: never a secret (DESIGN.md §1), credentials in URLs masked."""
    key = path[-1] if path else None
    if _is_secret(path):
        return _TYPE_NAMES[json_type(value)]
    if isinstance(key, str) and key in CREDENTIAL_KEYS:
        value = redact_value(key, value)
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (int, float)):
        text = str(value)
        return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"
    return _TYPE_NAMES[json_type(value)]


def _type_message(expected: Any, instance: Any, path: KeyPath) -> str:
    names = [expected] if isinstance(expected, str) else list(expected)
    wanted = " or ".join(_TYPE_NAMES.get(n, n) for n in names if n != "null" or len(names) == 1)
    if "null" in names and len(names) > 1:
        wanted += " or null"
    return f"expected {wanted}, got {_describe(instance, path)}"


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
            result.add("type", path, _type_message(value, instance, path))
        elif kind == "enum":
            options = [o for o in value if isinstance(o, str)]
            shown = ", ".join("null" if o is None else str(o) for o in value)
            hint = did_you_mean(instance, options) if isinstance(instance, str) else None
            secret = _is_secret(path)
            message = "not one of the allowed values" if secret else f"{_describe(instance)} is not one of: {shown}"
            result.add("value", path, message, None if secret else hint)
        elif kind == "const":
            hint = "this bridge reads version: 1" if path == ("version",) else None
            result.add("value", path, f"must be {_describe(value, path)}, got {_describe(instance, path)}", hint)
        elif kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
            words = {"minimum": "at least", "exclusiveMinimum": "more than", "maximum": "at most",
                     "exclusiveMaximum": "less than"}[kind]
            result.add("value", path, f"must be {words} {value}, got {_describe(instance, path)}")
        elif kind == "minLength":
            result.add("value", path, "must not be empty" if value == 1 else f"must be at least {value} characters")
        elif kind == "maxLength":
            result.add("value", path, f"must be at most {value} characters")
        elif kind in ("minItems", "minProperties"):
            noun = "item" if kind == "minItems" else "entry"
            result.add("value", path, f"must have at least {value} {noun}{'' if value == 1 else 's'}")
        elif kind == "uniqueItems":
            twice = next((v for i, v in enumerate(instance) if v in instance[:i]), None)
            result.add("value", path, f"{_describe(twice, path)} is listed more than once")
        elif kind == "pattern":
            result.add("value", path, f"{_describe(instance, path)} does not match {value}")
        else:
            hidden = _is_secret(path) or path[-1:] in {(k,) for k in CREDENTIAL_KEYS}  # the message quotes it
            result.add("value", path, f"not allowed ({kind})" if hidden else error.message)


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
    known = list(as_mapping(schema).get("properties", {}))
    reserved = _reserved_options(path)
    for key in instance:
        if key in known:
            continue
        if key in reserved:
            result.add("unknown-key", (*path, key), f"not allowed in {path[-1]}", reserved[key], key=True)
            continue
        hint = unknown_key_hint(key, known)
        if hint and hint.startswith("did you mean"):
            suggested.add((path, hint.split("'")[1]))
        result.add("unknown-key", (*path, key), "unknown key", hint, key=True)


def _reserved_options(path: KeyPath) -> Mapping[str, str]:
    """The keys a kind's free-form option mapping at ``path`` (``sources.<id>.<kind>.client_options``) may not hold."""
    if len(path) != 4 or path[0] != "sources" or not isinstance(path[2], str) or not isinstance(path[3], str):
        return {}
    spec = sources.REGISTRY.get(path[2])
    return spec.reserved_options.get(path[3], {}) if spec is not None else {}


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
    Semantics(result, failed, missing).run()
    # A typo such as `topcis:` is one mistake: keep its "did you mean 'topics'?", drop "missing topics".
    dropped = {id(p) for p, parent, names in missing if any((parent, n) in suggested for n in names)}
    kept = [p for p in result.problems if id(p) not in dropped]
    unique: dict[Problem, None] = dict.fromkeys(kept)
    result.problems = sorted(unique, key=lambda p: (p.file != display, p.file or "", p.line, p.col))
    return result

"""A fast "valid" for the JSON Schemas payloads are usually checked against, ahead of the full validator.

``jsonschema``'s Draft 2020-12 validator costs ~15-20 µs for a three-property object: more than everything else the
bridge does for an event. Most ``payload_schema``s use a small subset of the vocabulary (types, properties,
required, bounds, enums), which compiles here into nested Python checks of ~1 µs. A compiled check answers True
only when the full validator would accept the instance too; False means "not sure", and the caller runs the
full validator, which decides and words the errors. A schema using anything outside the subset (``format``,
``pattern``, ``$ref``, combinators, ...) compiles to None: the full validator alone checks it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Check = Callable[[Any], bool]

_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
                          "$comment"})
_SCALARS = (str, int, float, bool, type(None))


class _Unsupported(Exception):
    pass


def compile_check(schema: Any) -> Check | None:
    """A check that is True only for instances Draft 2020-12 accepts under ``schema``; None when ``schema`` uses
    a keyword outside the subset."""
    try:
        return _compile(schema)
    except _Unsupported:
        return None


def _compile(schema: Any) -> Check:
    if schema is True:
        return lambda _: True
    if schema is False or not isinstance(schema, dict):
        raise _Unsupported
    checks: list[Check] = []
    for keyword, value in schema.items():
        if keyword in _ANNOTATIONS:
            continue
        make = _KEYWORDS.get(keyword)
        if make is None:
            raise _Unsupported
        checks.append(make(value, schema))
    checks = [c for c in checks if c is not _ALWAYS]
    if not checks:
        return lambda _: True
    if len(checks) == 1:
        return checks[0]
    return lambda instance: all(check(instance) for check in checks)


def _always(_: Any) -> bool:
    return True


_ALWAYS: Check = _always


def _never(_: Any) -> bool:
    return False


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


_TYPES: dict[str, Check] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: type(v) is int or (type(v) is float and v.is_integer()),
    "number": _is_number,
    "boolean": lambda v: type(v) is bool,
    "null": lambda v: v is None,
}


def _type(value: Any, _: dict[str, Any]) -> Check:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or any(n not in _TYPES for n in names):
        raise _Unsupported
    tests = [_TYPES[n] for n in names]
    if len(tests) == 1:
        return tests[0]
    return lambda v: any(test(v) for test in tests)


def _properties(value: Any, _: dict[str, Any]) -> Check:
    if not isinstance(value, dict):
        raise _Unsupported
    subs = [(name, _compile(sub)) for name, sub in value.items()]

    def check(v: Any) -> bool:
        if not isinstance(v, dict):
            return True
        return all(name not in v or sub(v[name]) for name, sub in subs)

    return check


def _required(value: Any, _: dict[str, Any]) -> Check:
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise _Unsupported
    names = tuple(value)
    return lambda v: not isinstance(v, dict) or all(n in v for n in names)


def _additional(value: Any, schema: dict[str, Any]) -> Check:
    if "patternProperties" in schema:
        raise _Unsupported
    known = frozenset(schema.get("properties") or ())
    if value is True:
        return _ALWAYS
    sub = _never if value is False else _compile(value)
    return lambda v: not isinstance(v, dict) or all(k in known or sub(item) for k, item in v.items())


def _items(value: Any, schema: dict[str, Any]) -> Check:
    if "prefixItems" in schema:
        raise _Unsupported
    sub = _compile(value)
    return lambda v: not isinstance(v, list) or all(sub(item) for item in v)


def _same(a: Any, b: Any) -> bool:
    """JSON equality for scalars (True is not 1); anything else is "not sure" (False)."""
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    return type(a) is type(b) and type(a) in (str, bool, type(None)) and a == b


def _enum(value: Any, _: dict[str, Any]) -> Check:
    if not isinstance(value, list) or not all(isinstance(e, _SCALARS) for e in value):
        raise _Unsupported
    options = tuple(value)
    return lambda v: any(_same(v, e) for e in options)


def _const(value: Any, _: dict[str, Any]) -> Check:
    if not isinstance(value, _SCALARS):
        raise _Unsupported
    return lambda v: _same(v, value)


def _bound(test: Callable[[Any, Any], bool], applies: Check, size: Callable[[Any], Any] | None = None) -> Any:
    def make(value: Any, _: dict[str, Any]) -> Check:
        if not _is_number(value):
            raise _Unsupported
        if size is None:
            return lambda v: not applies(v) or test(v, value)
        return lambda v: not applies(v) or test(size(v), value)

    return make


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_list(v: Any) -> bool:
    return isinstance(v, list)


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


_KEYWORDS: dict[str, Callable[[Any, dict[str, Any]], Check]] = {
    "type": _type,
    "properties": _properties,
    "required": _required,
    "additionalProperties": _additional,
    "items": _items,
    "enum": _enum,
    "const": _const,
    "minimum": _bound(lambda v, b: v >= b, _is_number),
    "maximum": _bound(lambda v, b: v <= b, _is_number),
    "exclusiveMinimum": _bound(lambda v, b: v > b, _is_number),
    "exclusiveMaximum": _bound(lambda v, b: v < b, _is_number),
    "minLength": _bound(lambda n, b: n >= b, _is_str, len),
    "maxLength": _bound(lambda n, b: n <= b, _is_str, len),
    "minItems": _bound(lambda n, b: n >= b, _is_list, len),
    "maxItems": _bound(lambda n, b: n <= b, _is_list, len),
    "minProperties": _bound(lambda n, b: n >= b, _is_dict, len),
    "maxProperties": _bound(lambda n, b: n <= b, _is_dict, len),
}

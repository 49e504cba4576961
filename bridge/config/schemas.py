"""JSON Schemas: bridge.yaml's own schema (bundled from ``schemas/``), schema files users reference, and the
validators of bind configs and rendered payloads.

Validators are built once per schema (the engine checks every bind, the dispatcher every event) and report
every violation at once, each by its JSON path (``$.items[0].sku``).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import jsonschema

from bridge import sources
from bridge._fastschema import compile_check
from bridge._redact import REDACTED, is_secret_key, redact
from bridge.config._yamllimits import TOO_DEEP, TOO_LARGE, read_capped
from bridge.config.diagnostics import did_you_mean
from bridge.config.yamlpos import Positions, load_yaml
from bridge.errors import BindConfigError, PayloadSchemaError

__all__ = [
    "SCHEMA_DIR",
    "BindValidator",
    "Finding",
    "PayloadValidator",
    "SchemaFileError",
    "bridge_schema",
    "bridge_validator",
    "check_user_schema",
    "json_path",
    "kind_schema",
    "load_schema_file",
    "resolve_pointer",
    "violations",
]


def _schema_dir() -> Path:
    """``bridge/_schemas`` in an installed wheel (the build maps the project's ``schemas/`` there, see
    pyproject.toml), else ``schemas/`` at the project root: a checkout or an editable install, where the package
    directory is the source one and has no copy."""
    package_dir = Path(__file__).resolve().parent.parent  # bridge/, this module being bridge/config/schemas.py
    installed = package_dir / "_schemas"
    return installed if installed.is_dir() else package_dir.parent / "schemas"


SCHEMA_DIR = _schema_dir()
"""Where bridge.schema.json and the per-kind source schemas live."""

_Validator = jsonschema.Draft202012Validator
_FORMATS = _Validator.FORMAT_CHECKER

CONDITION_PROPERTY: dict[str, Any] = {
    "type": "string",
    "description": "iii convention: a function called with the rendered payload before each delivery (in the "
    "bound function's namespace); the binding skips the event when it returns false or raises; a call the engine "
    "link cuts is retried.",
}


# ---------------------------------------------------------------------------------------------------------
# paths and messages


_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def json_path(parts: Iterable[str | int]) -> str:
    """``$``, ``$.a.b``, ``$.items[0]``, ``$['odd key']``: where a violation is, as users read it."""
    text = "$"
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            text += f".{part}"
        else:
            text += f"[{part!r}]"
    return text


def _unknown_properties(error: Any) -> tuple[list[str], list[str]]:
    """(unexpected keys, allowed keys) for an additionalProperties: false violation."""
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    known = schema.get("properties", {})
    patterns = [re.compile(p) for p in schema.get("patternProperties", {})]
    instance = error.instance if isinstance(error.instance, Mapping) else {}
    extra = [k for k in instance if k not in known and not any(p.search(k) for p in patterns)]
    return extra, sorted(known)


def violations(validator: Any, instance: Any) -> list[str]:
    """Every violation of ``instance``, one ``$.path: message`` each, in schema order."""
    out: list[str] = []
    for error in validator.iter_errors(instance):
        where = list(error.absolute_path)
        if error.validator == "additionalProperties" and error.validator_value is False:
            extra, allowed = _unknown_properties(error)
            names = ", ".join(allowed) if allowed else "none"
            out.extend(f"{json_path(where)}: unknown property {k!r} (allowed: {names})" for k in extra)
        elif error.validator == "required":
            missing = [k for k in error.validator_value if k not in error.instance]
            out.extend(f"{json_path(where)}: missing required property {k!r}" for k in missing)
        else:
            out.append(f"{json_path(where)}: {_safe_message(error)}")
    return out


def _mask_write_only(instance: Any, schema: Any) -> Any:
    """``instance`` with the values of properties its schema marks ``writeOnly`` masked."""
    properties = schema.get("properties") if isinstance(schema, Mapping) else None
    if not isinstance(instance, dict) or not isinstance(properties, Mapping):
        return instance
    return {k: REDACTED if isinstance(properties.get(k), Mapping) and properties[k].get("writeOnly") is True
            else v for k, v in instance.items()}


def _safe_message(error: Any) -> str:
    """``error.message`` without the value when it is a secret (a secret-named key, ``writeOnly: true``) or a
    whole object or list (which may hold one): bind configs and payloads carry credentials."""
    instance = error.instance
    key = error.absolute_path[-1] if error.absolute_path else None
    secret = (isinstance(key, str) and is_secret_key(key)) or (
        isinstance(error.schema, Mapping) and error.schema.get("writeOnly") is True)
    if not secret and not isinstance(instance, (dict, list)):
        return str(error.message)
    shown = "the value"
    if not secret:
        masked = redact(_mask_write_only(instance, error.schema))
        shown = repr(masked) if len(repr(masked)) <= 80 else "the object" if isinstance(instance, dict) else "the list"
    message = str(error.message).replace(repr(instance), shown)
    if secret and isinstance(instance, str) and instance and instance in message:
        return f"{shown} breaks {error.validator!r}"  # the message quoted it some other way
    return message


# ---------------------------------------------------------------------------------------------------------
# defaults


def _with_defaults(schema: Any, value: Any) -> Any:
    """A copy of ``value`` with the ``default`` of every absent property filled in, nested objects too."""
    if not isinstance(value, dict):
        return copy.deepcopy(value)
    out = {k: copy.deepcopy(v) for k, v in value.items()}
    properties = schema.get("properties") if isinstance(schema, Mapping) else None
    if not isinstance(properties, Mapping):
        return out
    for name, sub in properties.items():
        if not isinstance(sub, Mapping):
            continue
        if name in out:
            out[name] = _with_defaults(sub, out[name])
        elif "default" in sub:
            out[name] = _with_defaults(sub, copy.deepcopy(sub["default"]))
    return out


# ---------------------------------------------------------------------------------------------------------
# validators


class BindValidator:
    """Checks bind configs against a source's ``bind_schema`` and applies its defaults.

    ``advertised`` is what the bridge sends as the trigger type's ``trigger_request_format``: the
    bind_schema with the always-allowed ``condition_function_id``, or, with no bind_schema, an object that
    allows only that.
    """

    def __init__(self, trigger_type: str, bind_schema: dict[str, Any] | None) -> None:
        self.trigger_type = trigger_type
        if bind_schema is None:
            advertised: dict[str, Any] = {
                "type": "object",
                "properties": {"condition_function_id": dict(CONDITION_PROPERTY)},
                "additionalProperties": False,
            }
        else:
            advertised = copy.deepcopy(bind_schema)
            properties = dict(advertised.get("properties") or {})
            properties.setdefault("condition_function_id", dict(CONDITION_PROPERTY))
            advertised["properties"] = properties
        self.advertised = advertised
        self._validator = _Validator(advertised, format_checker=_FORMATS)

    def check(self, config: Any) -> dict[str, Any]:
        """The bind config with defaults applied (a new dict); BindConfigError lists every violation."""
        if config is None:
            config = {}
        if not self._validator.is_valid(config):
            found = "; ".join(violations(self._validator, config))
            raise BindConfigError(f"bind config rejected by trigger type {self.trigger_type!r}: {found}")
        result = _with_defaults(self.advertised, config)
        assert isinstance(result, dict)  # is_valid() passed `type: object`
        return result


class PayloadValidator:
    """Checks rendered payloads against a source's ``payload_schema``."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self._validator = _Validator(schema, format_checker=_FORMATS)
        self._fast = compile_check(schema)  # a quick yes for the common subset; the validator decides the rest

    def check(self, payload: Any) -> None:
        """PayloadSchemaError, listing every violation, when ``payload`` breaks the schema."""
        if self._fast is not None and self._fast(payload):
            return
        if not self._validator.is_valid(payload):
            found = "; ".join(violations(self._validator, payload))
            raise PayloadSchemaError(f"payload rejected by payload_schema: {found}")


# ---------------------------------------------------------------------------------------------------------
# users' schemas (bind_schema, payload_schema)

_KEYWORDS = frozenset({
    "$schema", "$id", "$ref", "$anchor", "$dynamicRef", "$dynamicAnchor", "$vocabulary", "$comment",
    "$defs", "definitions", "dependencies", "allOf", "anyOf", "oneOf", "not", "if", "then", "else",
    "dependentSchemas", "prefixItems", "items", "contains", "properties", "patternProperties",
    "additionalProperties", "propertyNames", "unevaluatedItems", "unevaluatedProperties", "type",
    "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems", "maxContains",
    "minContains", "maxProperties", "minProperties", "required", "dependentRequired", "format",
    "contentEncoding", "contentMediaType", "contentSchema", "title", "description", "default",
    "deprecated", "readOnly", "writeOnly", "examples"
})
_SUBSCHEMA = frozenset({
    "additionalProperties", "propertyNames", "items", "contains", "not", "if", "then", "else",
    "unevaluatedItems", "unevaluatedProperties", "contentSchema"
})
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_META = _Validator(_Validator.META_SCHEMA, format_checker=_FORMATS)  # `regex` format: patterns compile
_TYPES = ["array", "boolean", "integer", "null", "number", "object", "string"]

SchemaPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Finding:
    """Something wrong with a user's schema: where inside it, a diagnostics code, message, hint, severity."""

    path: SchemaPath
    code: str
    message: str
    hint: str | None = None
    severity: Literal["error", "warning"] = "error"


def _walk_schema(node: Any, path: SchemaPath) -> Iterator[Finding]:
    """Unknown keywords (a typo such as `requried` silently checks nothing) and references to other files."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        here = (*path, key)
        if key == "$ref" and isinstance(value, str) and not value.startswith("#"):
            yield Finding(here, "schema-ref", f"{value!r}: a schema may only reference its own parts (#/...)",
                          "use $defs for shared parts; only a whole schema can come from a file")
        elif key not in _KEYWORDS and not key.startswith("x-"):
            yield Finding(here, "schema-keyword", f"unknown JSON Schema keyword {key!r} (validation ignores it)",
                          did_you_mean(key, _KEYWORDS), "warning")
        if key in _SUBSCHEMA:
            yield from _walk_schema(value, here)
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                yield from _walk_schema(sub, (*here, name))
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for index, sub in enumerate(value):
                yield from _walk_schema(sub, (*here, index))


def _dangling_refs(root: Any, node: Any, path: SchemaPath) -> Iterator[Finding]:
    """``#/...`` references that point nowhere (validation would fail on every event otherwise)."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from _dangling_refs(root, item, (*path, index))
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#/"):
            try:
                resolve_pointer(root, value[1:])
            except SchemaFileError:
                yield Finding((*path, key), "schema-ref", f"{value!r} points to nothing in this schema")
        else:
            yield from _dangling_refs(root, value, (*path, key))


def _uncompilable_patterns(node: Any, path: SchemaPath) -> Iterator[Finding]:
    """``pattern``s (and ``patternProperties`` names) that Python's ``re`` refuses with something other than
    ``re.error`` (``a{99999999999999999999}``), which no regex check expects."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from _uncompilable_patterns(item, (*path, index))
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        texts = [((*path, key), value)] if key == "pattern" and isinstance(value, str) else []
        if key == "patternProperties" and isinstance(value, dict):
            texts += [((*path, key, name), name) for name in value]
        for where, text in texts:
            try:
                re.compile(text)
            except re.error:
                pass  # the meta-schema reports these
            except (OverflowError, RecursionError, MemoryError) as exc:
                yield Finding(where, "bind-schema-invalid", f"not a usable regular expression: {exc}")
        yield from _uncompilable_patterns(value, (*path, key))


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _unique_texts(value: Any, allowed: frozenset[str] | None = None) -> bool:
    return (type(value) is list and all(type(v) is str and (allowed is None or v in allowed) for v in value)
            and len(set(value)) == len(value))


_SIMPLE_TYPES = frozenset(_TYPES)
# What a keyword's value must be for the 2020-12 meta-schema to accept it, for the keywords most schemas use
# (every one here only constrains its own value's shape). A schema of these alone, each well shaped, is valid.
_PLAIN_SHAPES: dict[str, Callable[[Any], bool]] = {
    "type": lambda v: v in _SIMPLE_TYPES if type(v) is str else bool(v) and _unique_texts(v, _SIMPLE_TYPES),
    "required": _unique_texts,
    "enum": lambda v: type(v) is list,
    "const": lambda v: True,
    "default": lambda v: True,
    "examples": lambda v: type(v) is list,
    "title": lambda v: type(v) is str,
    "description": lambda v: type(v) is str,
    "$comment": lambda v: type(v) is str,
    "deprecated": lambda v: type(v) is bool,
    "readOnly": lambda v: type(v) is bool,
    "writeOnly": lambda v: type(v) is bool,
    "uniqueItems": lambda v: type(v) is bool,
    "minimum": _is_number,
    "maximum": _is_number,
    "exclusiveMinimum": _is_number,
    "exclusiveMaximum": _is_number,
    "multipleOf": lambda v: _is_number(v) and v > 0,
    "minLength": _is_count,
    "maxLength": _is_count,
    "minItems": _is_count,
    "maxItems": _is_count,
    "minProperties": _is_count,
    "maxProperties": _is_count,
}
_PLAIN_SUBSCHEMAS = frozenset({"items", "additionalProperties", "not"})


def _plainly_valid(schema: Any, depth: int = 0) -> bool:
    """True only when the 2020-12 meta-schema surely accepts ``schema``: it uses only plain keywords, each well
    shaped (no ``$ref``, ``pattern``, ``format`` or combinator). False means "not sure": the meta-schema decides
    (and words the errors). The full check costs about 0.5 ms a schema, most of `bridge validate`'s time for
    every source that has schemas; this one a few µs."""
    if type(schema) is bool:
        return True
    if type(schema) is not dict or depth > 32:
        return False
    for key, value in schema.items():
        shape = _PLAIN_SHAPES.get(key)
        if shape is not None:
            if not shape(value):
                return False
        elif key in _PLAIN_SUBSCHEMAS:
            if not _plainly_valid(value, depth + 1):
                return False
        elif key == "properties":
            if type(value) is not dict or not all(
                type(name) is str and _plainly_valid(v, depth + 1) for name, v in value.items()
            ):
                return False
        else:
            return False
    return True


def check_user_schema(schema: Any, *, must_be_object: bool) -> list[Finding]:
    """Every reason ``schema`` is not a usable 2020-12 schema (errors), and unknown keywords (warnings)."""
    found: list[Finding] = list(_uncompilable_patterns(schema, ()))
    if found:  # the meta-schema's own regex check would crash on these
        return found
    for error in () if _plainly_valid(schema) else _META.iter_errors(schema):
        path = tuple(error.absolute_path)
        if path[-1:] == ("type",) and isinstance(error.instance, str):
            found.append(Finding(path, "bind-schema-invalid", f"{error.instance!r} is not a JSON Schema type",
                                 did_you_mean(error.instance, _TYPES) or "types: " + ", ".join(_TYPES)))
        else:
            found.append(Finding(path, "bind-schema-invalid", error.message))
    # Whether a schema describes an object is only worth saying once it is a valid schema at all.
    is_object = isinstance(schema, dict) and schema.get("type") in ("object", ["object"])
    if must_be_object and isinstance(schema, dict) and not found and not is_object:
        found.append(Finding((), "bind-schema-invalid", "a bind_schema must describe an object",
                             "add type: object (a bind config is a mapping of options)"))
    found.extend(_walk_schema(schema, ()))
    found.extend(_dangling_refs(schema, schema, ()))
    return found


_LIMITS = (TOO_DEEP, TOO_LARGE)


class SchemaFileError(Exception):
    """A referenced schema file is missing, unreadable or not JSON; ``line``/``col`` are 1-based, 0 = none."""

    def __init__(self, message: str, line: int = 0, col: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.col = col


def load_schema_file(path: Path) -> tuple[Any, Positions | None]:
    """The JSON document at ``path`` (``.yaml``/``.yml``: YAML) and, when known, where each of its parts is."""
    try:
        text = read_capped(path).decode("utf-8")
    except FileNotFoundError:
        raise SchemaFileError("no such file") from None
    except IsADirectoryError:
        raise SchemaFileError("is a directory, not a schema file") from None
    except UnicodeDecodeError as exc:
        raise SchemaFileError(f"not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise SchemaFileError(f"cannot read it: {exc.strerror or exc}") from None
    # JSON is (nearly always) YAML: the YAML reader gives the positions of problems inside the file.
    document, problems = load_yaml(text)
    positions = document.positions if document is not None and not problems else None
    if path.suffix.lower() in (".yaml", ".yml"):
        if document is None or problems or document.data is None:
            first = problems[0] if problems else None
            reason = first.message if first else "the file is empty"
            raise SchemaFileError(f"not valid YAML: {reason}", first.line if first else 0, first.col if first else 0)
        return document.data, positions
    refused = next((p for p in problems if p.message in _LIMITS), None)
    if refused is not None:  # too deep or too large for the checks after this one, though JSON might parse it
        raise SchemaFileError(refused.message, refused.line, refused.col)
    try:
        return json.loads(text), positions
    except json.JSONDecodeError as exc:
        raise SchemaFileError(f"not valid JSON: {exc.msg}", exc.lineno, exc.colno) from None
    except (ValueError, RecursionError):  # an integer beyond int()'s limit; nesting beyond the stack
        raise SchemaFileError("not valid JSON: a number is too large or the nesting too deep") from None


def resolve_pointer(document: Any, fragment: str) -> tuple[Any, SchemaPath]:
    """The part of ``document`` the JSON Pointer ``fragment`` (``/$defs/order``) names, and its path."""
    path: list[str | int] = []
    node = document
    for raw in fragment.split("/")[1:] if fragment else []:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            path.append(int(part))
        else:
            raise SchemaFileError(f"#{fragment} does not exist in the file")
    # percent-encoding in pointers (`%24defs`) is rare in hand-written schemas; it is not decoded here
    return node, tuple(path)


# ---------------------------------------------------------------------------------------------------------
# bridge.yaml's own schema


def _rebase_refs(node: Any, own: str) -> Any:
    """Rewrite the local ``$ref``s of a kind's schema so that it can live under the bundle's ``$defs``: inside it,
    ``#/x`` becomes ``#/$defs/<own>/x`` (it pointed into that schema)."""
    if isinstance(node, list):
        return [_rebase_refs(item, own) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = f"#/$defs/{own}{value[1:]}"
        else:
            out[key] = _rebase_refs(value, own)
    return out


def _read_json(name: str) -> dict[str, Any]:
    data = json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _bundle() -> dict[str, Any]:
    return _bundle_of(tuple(sources.REGISTRY))


@cache
def _bundle_of(kinds: tuple[str, ...]) -> dict[str, Any]:
    """bridge.schema.json with a ``<kind>:`` property per registered kind in a source (after its description),
    each kind's schema (:meth:`KindSpec.schema`) under ``$defs/source-<kind>``."""
    root = _read_json("bridge.schema.json")
    defs = root.setdefault("$defs", {})
    source = defs["source"]
    properties: dict[str, Any] = {}
    for name, value in source["properties"].items():
        properties[name] = value
        if name == "description":
            properties.update({kind: {"$ref": f"#/$defs/source-{kind}"} for kind in kinds})
    source["properties"] = properties
    for kind in kinds:
        part = _rebase_refs(sources.REGISTRY[kind].schema(), f"source-{kind}")
        part.pop("$schema", None)
        part.pop("$id", None)
        defs[f"source-{kind}"] = part
    return root


def bridge_schema() -> dict[str, Any]:
    """The JSON Schema of bridge.yaml, every registered kind's source schema bundled in (a fresh copy)."""
    return copy.deepcopy(_bundle())


def kind_schema(kind: str) -> dict[str, Any]:
    """The schema file of one built-in source kind's block (``kafka:``, ``postgres:``, ``file:``) in ``schemas/``."""
    return _read_json(f"source-{kind}.json")


def bridge_validator() -> Any:
    """A validator of whole bridge.yaml documents with the kinds registered now (built once per set of kinds)."""
    return _validator_of(tuple(sources.REGISTRY))


@cache
def _validator_of(kinds: tuple[str, ...]) -> Any:
    return _Validator(_bundle_of(kinds))

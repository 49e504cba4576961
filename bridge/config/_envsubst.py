"""``${VAR}`` substitution in bridge.yaml (DESIGN.md §1): every string value's ``${VAR}`` and
``${VAR:default}`` references are replaced from the environment and ``$${`` is unescaped, before the
JSON Schema checks see the document. A value that is exactly one reference is read as a YAML scalar, except
where bridge.yaml's schema wants a string: a password ``0123`` stays the string "0123" (a schema that also
allows null still reads ``null``, ``~`` and the empty text as null).

Part of the checks of ``bridge.config._load``, which runs :func:`substitute` after reading the file.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml

from bridge.config._yamllimits import TOO_LARGE, has_surrogate, is_huge_int
from bridge.config.schemas import bridge_schema
from bridge.config.yamlpos import KeyPath

if TYPE_CHECKING:
    from bridge.config._analysis import Analysis

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_RESOLVER = yaml.resolver.Resolver()
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_TYPED_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float")}


_NULL = "tag:yaml.org,2002:null"


def _as_scalar(text: str, wanted: frozenset[str]) -> Any:
    """``text`` read as a plain YAML scalar: "9092" → 9092, "false" → False, "" → None; else the text.
    Where the schema wants a string (``wanted``), the text stays as it is (null only when null is allowed)."""
    tag = _RESOLVER.resolve(yaml.ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
    if "string" in wanted:
        return None if tag == _NULL and "null" in wanted else text
    if tag not in _TYPED_TAGS:
        return text
    try:
        value = _CONSTRUCTOR.yaml_constructors[tag](_CONSTRUCTOR, yaml.ScalarNode(tag, text))
    except ValueError:  # an integer beyond the limit of int()
        raise _EnvError("value", TOO_LARGE, "") from None
    if is_huge_int(value):
        raise _EnvError("value", TOO_LARGE, "")
    return value


@functools.cache
def _schema() -> dict[str, Any]:
    return bridge_schema()


def _resolve(node: Any) -> Any:
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
        target: Any = _schema()
        for part in node["$ref"][2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        node = target
    return node


def _wanted_types(path: KeyPath) -> frozenset[str]:
    """The JSON types bridge.yaml's schema allows at ``path`` (empty when any, or when the path is unknown)."""
    node: Any = _schema()
    for part in path:
        node = _resolve(node)
        if not isinstance(node, dict):
            return frozenset()
        if isinstance(part, int):
            node = node.get("items")
        else:
            properties = node.get("properties")
            if isinstance(properties, dict) and part in properties:
                node = properties[part]
            else:
                node = node.get("additionalProperties")
    node = _resolve(node)
    kind = node.get("type") if isinstance(node, dict) else None
    return frozenset([kind] if isinstance(kind, str) else kind if isinstance(kind, list) else [])


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
            if has_surrogate(text):  # a value that is not UTF-8 (os.environ keeps its bytes as surrogates)
                raise _EnvError("value", "the substituted value is not UTF-8 text", "")
            whole = refs == 1 and value.startswith("${") and value.endswith("}") and value.find("}") == len(value) - 1
            return _as_scalar(text, _wanted_types(path)) if whole else text
        except _EnvError as exc:
            result.add(exc.code, path, exc.message, exc.hint or None)
            failed.add(path)
            return value

    assert result.data is not None
    result.data = walk(result.data, ())
    return failed

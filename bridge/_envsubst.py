"""``${VAR}`` substitution in bridge.yaml (DESIGN.md §1): every string value's ``${VAR}`` and
``${VAR:default}`` references are replaced from the environment and ``$${`` is unescaped, before the
JSON Schema checks see the document. A value that is exactly one reference is read as a YAML scalar.

Part of the checks of ``bridge._configload``, which runs :func:`substitute` after reading the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml

from bridge.yamlpos import KeyPath

if TYPE_CHECKING:
    from bridge._configload import Analysis

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

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

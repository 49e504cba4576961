"""bridge.config.schemas: bind-config and payload validators, users' schemas, and bridge.yaml's own bundled schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from bridge.config.schemas import (
    BindValidator,
    PayloadValidator,
    SchemaFileError,
    bridge_schema,
    bridge_validator,
    check_user_schema,
    json_path,
    kind_schema,
    load_schema_file,
    resolve_pointer,
)
from bridge.errors import BindConfigError, PayloadSchemaError
from bridge.sources import REGISTRY

ORDERS_BIND: dict[str, Any] = {
    "type": "object",
    "properties": {"min_total": {"type": "number", "default": 0}},
    "additionalProperties": False,
}


# --- BindValidator ------------------------------------------------------------------------------------------


def test_bind_message_lists_every_violation_by_json_path() -> None:
    validator = BindValidator("orders.placed", ORDERS_BIND)
    with pytest.raises(BindConfigError) as caught:
        validator.check({"min_total": "abc", "foo": 1})
    assert str(caught.value) == (
        "bind config rejected by trigger type 'orders.placed': $.min_total: 'abc' is not of type 'number'; "
        "$: unknown property 'foo' (allowed: condition_function_id, min_total)"
    )


def test_bind_defaults_are_applied_to_a_new_dict() -> None:
    validator = BindValidator("orders.placed", ORDERS_BIND)
    given = {"condition_function_id": "fn::check"}
    assert validator.check(given) == {"condition_function_id": "fn::check", "min_total": 0}
    assert given == {"condition_function_id": "fn::check"}
    assert validator.check(None) == {"min_total": 0}
    assert validator.check({"min_total": 5}) == {"min_total": 5}


def test_bind_defaults_apply_to_nested_objects() -> None:
    schema = {
        "type": "object",
        "properties": {
            "limits": {
                "type": "object",
                "properties": {"low": {"type": "integer", "default": 1}, "high": {"type": "integer", "default": 9}},
                "default": {},
            },
            "tags": {"type": "array", "default": ["a"]},
            "filter": {"type": "object", "properties": {"on": {"type": "boolean", "default": True}}},
        },
    }
    validator = BindValidator("t", schema)
    assert validator.check({}) == {"limits": {"low": 1, "high": 9}, "tags": ["a"]}
    assert validator.check({"limits": {"high": 3}, "filter": {}}) == {
        "limits": {"high": 3, "low": 1}, "tags": ["a"], "filter": {"on": True},
    }
    first = validator.check({})
    first["tags"].append("b")
    assert validator.check({})["tags"] == ["a"]  # defaults are copied, never shared


def test_bind_without_schema_allows_only_condition_function_id() -> None:
    validator = BindValidator("signups", None)
    assert validator.advertised == {
        "type": "object",
        "properties": {"condition_function_id": validator.advertised["properties"]["condition_function_id"]},
        "additionalProperties": False,
    }
    assert validator.advertised["properties"]["condition_function_id"]["type"] == "string"
    assert validator.check(None) == {}
    assert validator.check({"condition_function_id": "x"}) == {"condition_function_id": "x"}
    with pytest.raises(BindConfigError) as caught:
        validator.check({"x": 1})
    assert str(caught.value) == (
        "bind config rejected by trigger type 'signups': $: unknown property 'x' (allowed: condition_function_id)"
    )
    with pytest.raises(BindConfigError) as caught:
        validator.check([1])
    assert str(caught.value) == "bind config rejected by trigger type 'signups': $: [1] is not of type 'object'"


def test_bind_advertised_adds_condition_function_id_without_touching_the_source_schema() -> None:
    validator = BindValidator("orders.placed", ORDERS_BIND)
    assert list(validator.advertised["properties"]) == ["min_total", "condition_function_id"]
    assert "condition_function_id" not in ORDERS_BIND["properties"]
    with pytest.raises(BindConfigError, match=r"\$\.condition_function_id: 5 is not of type 'string'"):
        validator.check({"condition_function_id": 5})


def test_bind_required_and_nested_paths() -> None:
    schema = {
        "type": "object",
        "required": ["region"],
        "properties": {
            "region": {"enum": ["eu", "us"]},
            "items": {"type": "array", "items": {"type": "object", "properties": {"my key": {"type": "integer"}}}},
        },
    }
    validator = BindValidator("t", schema)
    with pytest.raises(BindConfigError) as caught:
        validator.check({"items": [{"my key": 1}, {"my key": "x"}]})
    assert str(caught.value) == (
        "bind config rejected by trigger type 't': $: missing required property 'region'; "
        "$.items[1]['my key']: 'x' is not of type 'integer'"
    )


# --- PayloadValidator ---------------------------------------------------------------------------------------


def test_payload_message_lists_every_violation() -> None:
    validator = PayloadValidator({
        "type": "object",
        "required": ["order_id"],
        "properties": {
            "order_id": {"type": "string"}, "total": {"type": "number", "minimum": 0}, "items": {"type": "array"},
        },
        "additionalProperties": False,
    })
    validator.check({"order_id": "o1", "total": 3})
    with pytest.raises(PayloadSchemaError) as caught:
        validator.check({"total": -1, "items": {}, "extra": True})
    assert str(caught.value) == (
        "payload rejected by payload_schema: $: missing required property 'order_id'; "
        "$.total: -1 is less than the minimum of 0; $.items: {} is not of type 'array'; "
        "$: unknown property 'extra' (allowed: items, order_id, total)"
    )
    assert caught.value.code == "payload_schema_violation"


def test_payload_formats_are_checked() -> None:
    validator = PayloadValidator({"type": "string", "format": "ipv4"})
    validator.check("127.0.0.1")
    with pytest.raises(PayloadSchemaError, match=r"\$: 'nope' is not a 'ipv4'"):
        validator.check("nope")


def test_json_path() -> None:
    assert json_path([]) == "$"
    assert json_path(["a", 0, "b_c"]) == "$.a[0].b_c"
    assert json_path(["odd key", "x-y"]) == "$['odd key']['x-y']"


# --- users' schemas -----------------------------------------------------------------------------------------


def test_check_user_schema_reports_types_refs_and_unknown_keywords() -> None:
    found = check_user_schema(
        {"type": "objekt", "requried": ["a"], "properties": {"a": {"$ref": "other.json"}, "b": {"type": "strng"}}},
        must_be_object=True,
    )
    assert [(f.path, f.code, f.message, f.hint, f.severity) for f in found] == [
        (("properties", "b", "type"), "bind-schema-invalid", "'strng' is not a JSON Schema type",
         "did you mean 'string'?", "error"),
        (("type",), "bind-schema-invalid", "'objekt' is not a JSON Schema type", "did you mean 'object'?", "error"),
        (("requried",), "schema-keyword", "unknown JSON Schema keyword 'requried' (validation ignores it)",
         "did you mean 'required'?", "warning"),
        (("properties", "a", "$ref"), "schema-ref",
         "'other.json': a schema may only reference its own parts (#/...)",
         "use $defs for shared parts; only a whole schema can come from a file", "error"),
    ]


def test_check_user_schema_bind_must_be_an_object() -> None:
    assert check_user_schema({"type": "object", "x-ui": 1}, must_be_object=True) == []
    found = check_user_schema({"type": "string"}, must_be_object=True)
    assert [(f.path, f.message) for f in found] == [((), "a bind_schema must describe an object")]
    assert check_user_schema({"type": "string"}, must_be_object=False) == []


def test_load_schema_file_json_yaml_and_errors(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{\n  "type": "object"\n}\n')
    data, positions = load_schema_file(tmp_path / "a.json")
    assert data == {"type": "object"}
    assert positions is not None and positions.at(("type",)).line == 2
    (tmp_path / "b.yaml").write_text("type: string\n")
    assert load_schema_file(tmp_path / "b.yaml")[0] == {"type": "string"}
    (tmp_path / "bad.json").write_text('{\n  "type": "object",\n}\n')
    with pytest.raises(SchemaFileError) as caught:
        load_schema_file(tmp_path / "bad.json")
    assert (caught.value.message, caught.value.line, caught.value.col) == (
        "not valid JSON: Expecting property name enclosed in double quotes", 3, 1,
    )
    with pytest.raises(SchemaFileError, match="no such file"):
        load_schema_file(tmp_path / "missing.json")
    with pytest.raises(SchemaFileError, match="is a directory"):
        load_schema_file(tmp_path)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SchemaFileError, match="not UTF-8 text"):
        load_schema_file(tmp_path / "bin.json")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{\n  "default": ' + "9" * 5000 + "\n}\n",
         ("the number is too large (more than 1,000 digits)", 2, 14)),
        ('{"a":\n' + "[" * 5000 + "]" * 5000 + "}\n",
         ("the document is nested deeper than 64 levels here", 2, 64)),
        ('{\n\t"default": ' + "9" * 5000 + "\n}\n",  # a tab: YAML refuses it before it sees the number
         ("not valid JSON: a number is too large or the nesting too deep", 0, 0)),
        ('{\n\t"a": ' + "[" * 5000 + "]" * 5000 + "\n}\n",
         ("not valid JSON: a number is too large or the nesting too deep", 0, 0)),
    ],
)
def test_load_schema_file_refuses_what_the_checks_cannot_handle(
    tmp_path: Path, text: str, expected: tuple[str, int, int]
) -> None:
    (tmp_path / "s.json").write_text(text)
    with pytest.raises(SchemaFileError) as caught:
        load_schema_file(tmp_path / "s.json")
    assert (caught.value.message, caught.value.line, caught.value.col) == expected


def test_resolve_pointer() -> None:
    doc = {"$defs": {"a/b": {"type": "string"}, "list": [{"x": 1}]}}
    assert resolve_pointer(doc, "") == (doc, ())
    assert resolve_pointer(doc, "/$defs/a~1b") == ({"type": "string"}, ("$defs", "a/b"))
    assert resolve_pointer(doc, "/$defs/list/0") == ({"x": 1}, ("$defs", "list", 0))
    with pytest.raises(SchemaFileError, match="#/nope does not exist"):
        resolve_pointer(doc, "/nope")


# --- bridge.yaml's schema -----------------------------------------------------------------------------------


def test_bundled_schema_is_valid_and_self_contained() -> None:
    schema = bridge_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    text = json.dumps(schema)
    assert '.json"' not in text.replace('"$schema": "https://json-schema.org/draft/2020-12/schema"', "")
    for kind in REGISTRY:
        assert schema["$defs"][f"source-{kind}"]["title"] == kind_schema(kind)["title"]
    # every $ref of the bundle resolves inside it
    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(schema):
        assert ref.startswith("#/")
        node: Any = schema
        for part in ref[2:].split("/"):
            node = node[part]
        assert isinstance(node, dict)


def _properties(node: Any, where: str = "$") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        for name, sub in (node.get("properties") or {}).items():
            found.append((f"{where}.{name}", sub))
        for key, value in node.items():
            found.extend(_properties(value, f"{where}/{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(_properties(value, f"{where}[{i}]"))
    return found


def test_every_property_has_a_description() -> None:
    schema = bridge_schema()
    for where, sub in _properties(schema):
        if "description" in sub:
            continue
        target = sub.get("$ref", "")
        assert target.startswith("#/"), f"{where} has no description"
        node: Any = schema
        for part in target[2:].split("/"):
            node = node[part]
        assert "description" in node, f"{where} has no description"


def test_bridge_validator_is_built_once() -> None:
    assert bridge_validator() is bridge_validator()


def test_check_user_schema_reports_patterns_re_cannot_compile() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "a{99999999999999999999}"}},
              "patternProperties": {"b{99999999999999999999}": {}}}
    assert [(f.path, f.code, f.message) for f in check_user_schema(schema, must_be_object=True)] == [
        (("properties", "a", "pattern"), "bind-schema-invalid",
         "not a usable regular expression: the repetition number is too large"),
        (("patternProperties", "b{99999999999999999999}"), "bind-schema-invalid",
         "not a usable regular expression: the repetition number is too large"),
    ]


def test_bind_rejections_never_show_a_secret() -> None:
    validator = BindValidator("t", {
        "type": "object", "additionalProperties": False, "not": {"required": ["bad"]},
        "properties": {"api_key": {"type": "string", "writeOnly": True, "minLength": 20},
                       "password": {"type": "string", "pattern": "^x"}, "n": {"type": "integer"}},
    })
    with pytest.raises(BindConfigError) as caught:
        validator.check({"api_key": "hunter2", "password": "hunter3", "n": "5", "bad": 1})
    assert str(caught.value) == (
        "bind config rejected by trigger type 't': "
        "$: unknown property 'bad' (allowed: api_key, condition_function_id, n, password); "
        "$: {'api_key': '***', 'password': '***', 'n': '5', 'bad': 1} should not be valid under {'required': ['bad']}; "
        "$.api_key: the value is too short; $.password: the value does not match '^x'; "
        "$.n: '5' is not of type 'integer'"
    )


def test_tests_schema_is_valid_and_every_key_has_a_description_and_a_default_when_optional() -> None:
    from bridge.casetest import tests_schema

    schema = tests_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for where, sub in _properties(schema):
        assert "description" in sub, f"{where} has no description"
    for holder in [schema, schema["$defs"]["case"], schema["$defs"]["case"]["properties"]["binding"]]:
        required = set(holder.get("required", []))
        for name, sub in holder["properties"].items():
            if name != "expect":  # absent on purpose: a case without one waits for `bridge test --update`
                assert name in required or "default" in sub, f"{name} is optional and has no default"
    # expectations have no default on purpose either: an absent one is not checked
    assert not any("default" in sub for sub in schema["$defs"]["case"]["properties"]["expect"]["properties"].values())

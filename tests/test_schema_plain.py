"""The quick meta-schema check of bind and payload schemas (``bridge.config.schemas._plainly_valid``): it may only
ever say "valid" for schemas the 2020-12 meta-schema accepts. Random schemas, many of them subtly wrong, try to
make it say so for one the meta-schema refuses."""

from __future__ import annotations

import random
from typing import Any

import pytest

from bridge.config.schemas import _META, _plainly_valid, check_user_schema

_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2.5, -0.5, 0.0, 3.0, "", "string", "object", "nope", [], ["string"],
    ["string", "string"], ["integer", "null"], ["a", 1], [1, 2], {}, {"type": "string"}, {"type": 3},
    {"minimum": "1"}, float("inf"),
]
_KEYS = ["type", "required", "enum", "const", "default", "examples", "title", "description", "$comment",
         "deprecated", "readOnly", "writeOnly", "uniqueItems", "minimum", "maximum", "exclusiveMinimum",
         "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "minItems", "maxItems", "minProperties",
         "maxProperties", "items", "additionalProperties", "not", "properties", "pattern", "format", "$ref",
         "anyOf", "x-unknown"]


def _random_schema(rng: random.Random, depth: int = 0) -> Any:
    if rng.random() < 0.1:
        return rng.choice([True, False, None, 1, "object", []])
    schema: dict[Any, Any] = {}
    for key in rng.sample(_KEYS, rng.randint(0, 4)):
        if key in ("items", "additionalProperties", "not") and depth < 3:
            schema[key] = _random_schema(rng, depth + 1)
        elif key == "properties" and depth < 3:
            schema[key] = {rng.choice(["a", "b", 1]): _random_schema(rng, depth + 1) for _ in range(rng.randint(0, 3))}
        elif key == "type" and rng.random() < 0.5:
            schema[key] = rng.choice(["object", "string", "integer", "number", "boolean", "null", "array"])
        else:
            schema[key] = rng.choice(_VALUES)
    return schema


def test_plain_says_valid_only_for_what_the_meta_schema_accepts() -> None:
    rng = random.Random(13)
    said_valid = 0
    for _ in range(5000):
        schema = _random_schema(rng)
        if _plainly_valid(schema):
            said_valid += 1
            assert _META.is_valid(schema), schema
    assert said_valid > 500  # the generator reaches the quick path often enough to mean something


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"region": {"type": "string", "enum": ["eu", "us"], "default": "eu"}}},
    {"type": "object", "required": ["id"], "properties": {"id": {"type": "string", "minLength": 1}},
     "additionalProperties": False},
    {"type": ["integer", "null"], "minimum": 0, "maximum": 10, "description": "n"},
    {"type": "array", "items": {"type": "number", "multipleOf": 0.5}, "minItems": 1, "uniqueItems": True},
])
def test_typical_schemas_take_the_quick_path(schema: Any) -> None:
    assert _plainly_valid(schema)


@pytest.mark.parametrize(("schema", "message"), [
    ({"type": "object", "required": ["a", "a"]}, "non-unique"),
    ({"type": "object", "properties": {"a": {"minLength": -1}}}, "-1"),
    ({"type": "strin"}, "not a JSON Schema type"),
    ({"type": "object", "properties": {"a": {"multipleOf": 0}}}, "0"),
])
def test_a_wrong_schema_still_gets_the_meta_schemas_words(schema: Any, message: str) -> None:
    assert not _plainly_valid(schema)
    found = check_user_schema(schema, must_be_object=False)
    assert found and message in found[0].message, found

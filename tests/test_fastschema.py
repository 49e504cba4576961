"""The quick check ahead of jsonschema never says yes to what Draft 2020-12 refuses, and says yes to the usual."""

from __future__ import annotations

import random
from typing import Any

import jsonschema
import pytest

from bridge._fastschema import compile_check
from bridge.config.schemas import PayloadValidator
from bridge.errors import PayloadSchemaError

SCHEMAS: list[Any] = [
    True,
    {},
    {"type": "integer"},
    {"type": "number", "minimum": 0, "exclusiveMaximum": 10},
    {"type": ["string", "null"], "minLength": 2, "maxLength": 4},
    {"type": "boolean"},
    {"enum": [1, "a", None, True]},
    {"enum": [0, False]},
    {"const": 1},
    {"const": False},
    {"type": "array", "items": {"type": "integer", "maximum": 3}, "minItems": 1, "maxItems": 3},
    {"type": "object", "required": ["id", "qty"], "minProperties": 2, "maxProperties": 4,
     "properties": {"id": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                    "tags": {"type": "array", "items": {"enum": ["a", "b"]}}}},
    {"type": "object", "properties": {"id": {"type": "string"}}, "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "string"}}, "additionalProperties": {"type": "number"}},
    {"properties": {"n": {"exclusiveMinimum": 1.5}}, "title": "annotations are ignored", "default": {}},
]

EDGES: list[Any] = [
    None, True, False, 0, 1, -1, 1.0, 1.5, 2.0, 3, 4, 10, 9.99, float("nan"), float("inf"), -0.0, "", "a", "ab",
    "abcd", "abcde", "é" * 3, [], [1], [1, 2, 3], [1, 2, 3, 4], [True], [1.0], ["a"], ["a", "c"], {}, {"id": "x"},
    {"id": 1}, {"id": "x", "qty": 1}, {"id": "x", "qty": 0}, {"id": "x", "qty": 1.0}, {"id": "x", "qty": True},
    {"id": "x", "qty": 2, "tags": ["a", "b"]}, {"id": "x", "qty": 2, "tags": ["c"]}, {"id": "x", "other": 1},
    {"id": "x", "other": "y"}, {"n": 1.5}, {"n": 2}, {"n": True}, {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5},
]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-3, 12)
    if kind == 3:
        return rng.choice([0.0, 1.0, 1.5, 2.5, 3.0, -1.0, 10.0])
    if kind == 4:
        return rng.choice(["", "a", "ab", "abc", "abcd", "abcde", "id", "qty"])
    if kind == 5:
        return rng.choice(EDGES)
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = ["id", "qty", "tags", "n", "other"]
    return {k: _random_value(rng, depth + 1) for k in rng.sample(keys, rng.randrange(len(keys) + 1))}


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_a_quick_yes_is_always_a_yes_of_the_full_validator(schema: Any) -> None:
    check = compile_check(schema)
    assert check is not None, "the subset covers this schema"
    full = jsonschema.Draft202012Validator(schema)
    rng = random.Random(13)
    instances = EDGES + [_random_value(rng) for _ in range(3000)]
    said_yes = 0
    for instance in instances:
        if check(instance):
            said_yes += 1
            assert full.is_valid(instance), (schema, instance)
    assert said_yes > 0


def test_the_usual_payload_gets_its_quick_yes() -> None:
    check = compile_check(SCHEMAS[11])
    assert check is not None
    assert check({"id": "o-1", "qty": 2, "tags": ["a"]})
    assert check({"id": "o-1", "qty": 2.0})  # 2.0 is an integer to JSON Schema


@pytest.mark.parametrize("schema", [
    {"type": "string", "format": "email"},  # formats are asserted by the full validator
    {"type": "string", "pattern": "^a"},
    {"$ref": "#/$defs/x", "$defs": {"x": {}}},
    {"anyOf": [{"type": "string"}]},
    {"type": "object", "properties": {"a": {"not": {}}}},  # unsupported inside, too
    {"type": "object", "patternProperties": {"^a": {}}, "additionalProperties": False},
    {"type": "array", "prefixItems": [{}], "items": False},
    {"enum": [[1]]},
    {"type": "decimal"},
    {"$schema": "http://json-schema.org/draft-07/schema#"},
    False,
])
def test_schemas_outside_the_subset_are_left_to_the_full_validator(schema: Any) -> None:
    assert compile_check(schema) is None


def test_a_payload_the_quick_check_doubts_still_gets_every_violation_listed() -> None:
    validator = PayloadValidator(SCHEMAS[11])
    validator.check({"id": "x", "qty": 3})
    with pytest.raises(PayloadSchemaError) as caught:
        validator.check({"id": 7, "qty": 0})
    text = str(caught.value)
    assert "payload rejected by payload_schema" in text and "$.id" in text and "$.qty" in text, text

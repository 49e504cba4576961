"""bridge.templates: native values, string rendering, filters, errors, sandbox, `when`, references."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from bridge.errors import EventError, RenderError
from bridge.templates import (
    CompiledTree,
    TemplateCompileError,
    TemplateSyntaxProblem,
    compile_tree,
    compile_when,
    make_context,
)


def _event() -> dict[str, Any]:
    return {
        "id": "kafka:orders:0:42",
        "source": "orders.placed",
        "topic": "orders",
        "partition": 0,
        "offset": 42,
        "key": "o-1",
        "value": {
            "total": 12.5,
            "count": 3,
            "zip": "02139",
            "two": "2",
            "paid": True,
            "note": None,
            "customer": {"id": 7, "name": "Zoë <b>&'"},
            "items": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 2}],
            "raw": b"\x00\xff",
        },
        "headers": {"trace": "t-1"},
        "timestamp": 1795530181123,
    }


def _ctx(event: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> dict[str, Any]:
    return make_context(
        _event() if event is None else event,
        {"min_total": 10} if config is None else config,
        {"id": "b-1", "function_id": "orders::on_placed", "namespace": None, "metadata": {}},
        {"id": "orders.placed", "kind": "kafka"},
    )


def _render(tree: Any, **kw: Any) -> Any:
    return compile_tree(tree, root=("payload",)).render(_ctx(**kw))


def _one(source: str, **kw: Any) -> Any:
    """Render one template as the `x` field of a payload."""
    return _render({"x": source}, **kw)["x"]


def _render_error(tree: Any, **kw: Any) -> str:
    with pytest.raises(RenderError) as info:
        _render(tree, **kw)
    return str(info.value)


# --- native values ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ event.value.count }}", 3),
        ("{{ event.value.total }}", 12.5),
        ("{{ event.value.paid }}", True),
        ("{{ event.value.note }}", None),
        ("{{ event.value.customer }}", {"id": 7, "name": "Zoë <b>&'"}),
        ("{{ event.value.items }}", [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 2}]),
        ("{{ event.value.zip }}", "02139"),
        ("{{ event.value.two }}", "2"),
        ("{{ 2 }}", 2),
        ("{{ '2' }}", "2"),
        ("{{ event.value.count * 2 + 1 }}", 7),
        ("{{ event.value.total > 10 }}", True),
        ("  {{ event.value.count }}\n", 3),
        ("{{- event.value.count -}}", 3),
        ("{{ event.value.count }}{# a comment #}", 3),
        ("{{ (1, 'a') }}", [1, "a"]),
        ("{{ event.value.items | map(attribute='sku') }}", ["a", "b"]),
        ("{{ event.value.customer.keys() }}", ["id", "name"]),
        ("{{ {'k': event.key, 'n': [event.offset, none]} }}", {"k": "o-1", "n": [42, None]}),
        ("{{ event.value.customer.name | safe }}", "Zoë <b>&'"),
        ("{{ range(3) | list }}", [0, 1, 2]),
    ],
)
def test_a_lone_expression_keeps_its_native_value(source: str, expected: Any) -> None:
    value = _one(source)
    assert value == expected
    assert type(value) is type(expected)


def test_a_lookup_compiles_only_when_a_render_needs_jinja(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bridge validate` and a start skip Jinja's code generation for `{{ event.a.b }}` leaves; the first render
    that misses a key compiles it (once) and fails as an uncompiled lookup would."""
    from bridge import templates

    compiled: list[object] = []
    real = templates._ENV.from_string

    def counting(source: Any, *args: Any, **kwargs: Any) -> Any:
        compiled.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(templates._ENV, "from_string", counting)
    tree = compile_tree({"x": "{{ event.value.count }}", "y": "{{ event.value.count + 1 }}"}, root=("payload",))
    assert len(compiled) == 1  # the sum, not the lookup
    assert tree.render(_ctx()) == {"x": 3, "y": 4}
    assert len(compiled) == 1
    event = _event()
    del event["value"]["count"]
    for _ in range(2):
        with pytest.raises(RenderError, match=r"payload\.x: .*count"):
            tree.render(_ctx(event))
    assert len(compiled) == 2


def test_native_values_inside_a_tree_keep_their_types() -> None:
    tree = {
        "order": {"id": "{{ event.key }}", "total": "{{ event.value.total }}"},
        "lines": ["{{ event.value.items[0] }}", "{{ event.value.count }}", "{{ event.value.paid }}"],
        "nothing": "{{ event.value.note }}",
    }
    assert _render(tree) == {
        "order": {"id": "o-1", "total": 12.5},
        "lines": [{"sku": "a", "qty": 1}, 3, True],
        "nothing": None,
    }


def test_two_expression_blocks_render_to_a_string() -> None:
    assert _one("{{ event.value.count }}{{ event.value.count }}") == "33"
    assert _one("{{ event.value.count }} {{ event.value.count }}") == "3 3"


def test_mixed_strings_render_to_strings() -> None:
    assert _one("order-{{ event.key }}") == "order-o-1"
    assert _one("{{ event.value.total }} EUR") == "12.5 EUR"
    assert _one("{% if event.value.paid %}paid{% else %}open{% endif %}") == "paid"
    assert _one("{% for i in event.value.items %}{{ i.sku }};{% endfor %}") == "a;b;"
    assert _one("{% set ns = namespace(n=0) %}{% for i in event.value.items %}{% set ns.n = ns.n + i.qty %}"
                "{% endfor %}{{ ns.n }}") == "3"
    assert _one("line {{ event.offset }}\n") == "line 42\n"  # a YAML block scalar keeps its newline
    assert _one("{{ event.value.customer.name }}!") == "Zoë <b>&'!"  # autoescape is off


def test_non_template_leaves_pass_through() -> None:
    tree = {"n": 1, "f": 1.5, "b": False, "z": None, "s": "plain { text }", "l": [1, {"k": "v"}], "{{ k }}": 0}
    compiled = compile_tree(tree)
    first = compiled.render(_ctx())
    assert first == tree
    assert first is not tree
    first["l"][1]["k"] = "changed"
    assert compiled.render(_ctx())["l"][1]["k"] == "v"
    assert compile_tree(5).render(_ctx()) == 5
    assert compile_tree("just text").render(_ctx()) == "just text"


def test_dict_keys_are_literal() -> None:
    assert _render({"{{ event.key }}": "{{ event.key }}"}) == {"{{ event.key }}": "o-1"}


def test_a_rendered_payload_never_aliases_the_event() -> None:
    event = _event()
    payload = _render({"v": "{{ event.value.customer }}", "s": "static", "l": [1]}, event=event)
    payload["v"]["id"] = 99
    assert event["value"]["customer"]["id"] == 7


def test_dict_keys_win_over_dict_methods() -> None:
    assert _one("{{ event.value.items | length }}") == 2
    assert _one("{{ event.headers.trace }}") == "t-1"


def test_a_whole_tree_that_is_one_template() -> None:
    assert compile_tree("{{ event.value.customer }}").render(_ctx()) == {"id": 7, "name": "Zoë <b>&'"}


# --- values that are not JSON -------------------------------------------------------------------------------


def test_a_value_that_is_not_json_is_a_render_error_naming_the_path() -> None:
    assert _render_error({"a": "{{ event.value.raw }}"}) == (
        "payload.a: the value is a bytes, which is not JSON-serialisable; use |b64encode"
    )
    assert _render_error({"a": ["x", "{{ event.value }}"]}) == (
        "payload.a[1].raw: the value is a bytes, which is not JSON-serialisable; use |b64encode"
    )
    assert _render_error({"a": "{{ [1, {'k': [event.value.raw]}] }}"}) == (
        "payload.a[1].k[0]: the value is a bytes, which is not JSON-serialisable; use |b64encode"
    )
    assert _render_error({"a": "{{ {1: 2} }}"}) == (
        "payload.a: the object has the int key 1; JSON object keys are strings"
    )
    odd_numbers = {"nan": float("nan"), "inf": float("-inf")}
    assert _render_error({"a": "{{ config.nan }}"}, config=odd_numbers) == (
        "payload.a: the value is nan, which JSON cannot represent"
    )
    assert _render_error({"a": "{{ [config.inf] }}"}, config=odd_numbers) == (
        "payload.a[0]: the value is -inf, which JSON cannot represent"
    )
    assert _render_error({"a": "{{ event.value.count is odd and event.value.items.pop }}"}) == (
        "payload.a: access to attribute 'pop' of 'list' object is unsafe."
    )
    assert _render_error({"a": "{{ event.key.upper }}"}) == (
        "payload.a: the value is a builtin_function_or_method, which is not JSON-serialisable"
    )


def test_generators_become_lists() -> None:
    assert _one("{{ [3, 1, 3] | unique }}") == [3, 1]
    assert _one("{{ [1, 2, 3] | select('odd') }}") == [1, 3]


# --- filters ------------------------------------------------------------------------------------------------


def test_tojson_is_compact_ordered_unescaped() -> None:
    assert _one("{{ event.value.customer | tojson }}") == '{"id":7,"name":"Zoë <b>&\'"}'
    assert _one("{{ {'b': 1, 'a': [true, none]} | tojson }}") == '{"b":1,"a":[true,null]}'
    assert _one("{{ {'b': 1} | tojson(2) }}") == '{\n  "b": 1\n}'
    assert _one("{{ (1, 2) | tojson }}") == "[1,2]"
    assert _one("{{ [1, 2, 3] | select('odd') | tojson }}") == "[1,3]"
    assert _one("{{ 'é' | tojson }}") == '"é"'


def test_tojson_errors() -> None:
    assert _render_error({"a": "{{ event.value | tojson }}"}) == (
        "payload.a: tojson: a bytes value is not JSON-serialisable"
    )
    assert _render_error({"a": "{{ config.nan | tojson }}"}, config={"nan": float("nan")}) == (
        "payload.a: tojson: Out of range float values are not JSON compliant"
    )
    assert _render_error({"a": "{{ [event.value.missing] | tojson }}"}) == (
        "payload.a: 'dict object' has no attribute 'missing'"
    )


def test_fromjson() -> None:
    event = _event()
    event["value"] = '{"a": [1, 2.5, "x"], "b": null}'
    assert _one("{{ event.value | fromjson }}", event=event) == {"a": [1, 2.5, "x"], "b": None}
    assert _one("{{ (event.value | fromjson).a[1] }}", event=event) == 2.5
    assert _one("{{ '\"2\"' | fromjson }}") == "2"
    assert _render_error({"a": "{{ '{nope' | fromjson }}"}) == (
        "payload.a: fromjson: invalid JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)"
    )
    assert _render_error({"a": "{{ 5 | fromjson }}"}) == "payload.a: fromjson expects JSON text, got int"


def test_b64encode() -> None:
    assert _one("{{ 'hello' | b64encode }}") == "aGVsbG8="
    assert _one("{{ 'Zoë' | b64encode }}") == "Wm/Dqw=="
    assert _one("{{ '' | b64encode }}") == ""
    assert _one("{{ event.value.raw | b64encode }}") == "AP8="
    assert _render_error({"a": "{{ 5 | b64encode }}"}) == (
        "payload.a: b64encode expects text or bytes, got int (use |string first)"
    )


def test_b64decode() -> None:
    assert _one("{{ 'aGVsbG8=' | b64decode }}") == "hello"
    assert _one("{{ 'aGVsbG8' | b64decode }}") == "hello"  # padding may be missing
    assert _one("{{ ' aGVs\\nbG8= ' | b64decode }}") == "hello"  # whitespace is ignored
    assert _one("{{ 'Wm/Dqw==' | b64decode }}") == "Zoë"
    assert _one("{{ 'Wm_Dqw' | b64decode }}") == "Zoë"  # URL-safe alphabet
    assert _one("{{ 'Zoë' | b64encode | b64decode }}") == "Zoë"
    assert _one("{{ 'AP8=' | b64decode(none) | sha256 }}") == (
        "06eb7d6a69ee19e5fbdf749018d3d2abfa04bcbd1365db312eb86dc7169389b8"
    )
    assert _render_error({"a": "{{ 'AP8=' | b64decode }}"}) == (
        "payload.a: b64decode: the decoded bytes are not valid utf-8; b64decode(none) gives the raw bytes"
    )
    assert _render_error({"a": "{{ 'AP8=' | b64decode(none) }}"}) == (
        "payload.a: the value is a bytes, which is not JSON-serialisable; use |b64encode"
    )
    assert _render_error({"a": "{{ 'a!b=' | b64decode }}"}).startswith("payload.a: b64decode: invalid base64: ")
    assert _render_error({"a": "{{ 5 | b64decode }}"}) == "payload.a: b64decode expects base64 text, got int"


def test_sha256() -> None:
    assert _one("{{ 'abc' | sha256 }}") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert _one("{{ '' | sha256 }}") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert _one("{{ event.value.count | string | sha256 }}") == (
        "4e07408562bedb8b60ce05c1decfe3ad16b72230967de01f640b7e4729b49fce"
    )
    assert _render_error({"a": "{{ 3 | sha256 }}"}) == (
        "payload.a: sha256 expects text or bytes, got int (use |string first)"
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ event.timestamp | datetime }}", "2026-11-24T14:23:01.123Z"),
        ("{{ 0 | datetime }}", "1970-01-01T00:00:00.000Z"),
        ("{{ -1 | datetime }}", "1969-12-31T23:59:59.999Z"),
        ("{{ 1500.9 | datetime }}", "1970-01-01T00:00:01.500Z"),
        ("{{ '2026-11-24T14:23:01.123456Z' | datetime }}", "2026-11-24T14:23:01.123Z"),
        ("{{ '2026-11-24T15:23:01+01:00' | datetime }}", "2026-11-24T14:23:01.000Z"),
        ("{{ '2026-11-24T14:23:01' | datetime }}", "2026-11-24T14:23:01.000Z"),
        ("{{ '2026-11-24 14:23' | datetime }}", "2026-11-24T14:23:00.000Z"),
        ("{{ '2026-11-24' | datetime }}", "2026-11-24T00:00:00.000Z"),
        ("{{ '1795530181123' | int | datetime }}", "2026-11-24T14:23:01.123Z"),
    ],
)
def test_datetime(source: str, expected: str) -> None:
    assert _one(source) == expected


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ '1795530181123' | datetime }}", "datetime: '1795530181123' is not an ISO-8601 date-time"),
        ("{{ 'soon' | datetime }}", "datetime: 'soon' is not an ISO-8601 date-time"),
        ("{{ true | datetime }}", "datetime expects epoch milliseconds or an ISO-8601 string, got bool"),
        ("{{ none | datetime }}", "datetime expects epoch milliseconds or an ISO-8601 string, got NoneType"),
        ("{{ (10 ** 20) | datetime }}", "datetime: 100000000000000000000 is out of range"),
        ("{{ config.inf | datetime }}", "datetime: inf is not a time"),
    ],
)
def test_datetime_errors(source: str, message: str) -> None:
    assert _render_error({"a": source}, config={"inf": float("inf")}) == f"payload.a: {message}"


# --- undefined ----------------------------------------------------------------------------------------------


def test_undefined_values_are_render_errors_naming_the_path() -> None:
    assert _render_error({"customer": {"id": "{{ event.value.totl }}"}}) == (
        "payload.customer.id: 'dict object' has no attribute 'totl'"
    )
    assert _render_error({"l": ["ok", "x{{ event.value.customer.age }}"]}) == (
        "payload.l[1]: 'dict object' has no attribute 'age'"
    )
    assert _render_error({"a": "{{ evnt.key }}"}) == "payload.a: 'evnt' is undefined"
    assert _render_error({"a": "{{ [1, event.nope] }}"}) == "payload.a[1]: 'dict object' has no attribute 'nope'"
    assert _render_error({"a": "{{ event.value.items[5] }}"}) == "payload.a: list object has no element 5"
    with pytest.raises(RenderError, match=r"^'dict object' has no attribute 'nope'$"):
        compile_tree("{{ event.nope }}").render(_ctx())


class _Mapping(Mapping[str, Any]):
    """A mapping that is not a dict: the direct lookup leaves it to Jinja."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@pytest.mark.parametrize(
    "expression",
    [
        "event.value.count",
        "event.value.customer",
        "event['value']['customer']['name']",
        "event.value.items[1].sku",
        "event.value.items.0.qty",
        "event.value.items[-1]",
        "event.value.items[5]",
        "event.value.nope",
        "event.value.customer.keys",
        "event.value.note",
        "event.nested.inner",
        "event.nested.gone",
        "event.pair[1]",
        "config.min_total",
        "binding.function_id",
        "nope.x",
        "event",
    ],
)
def test_direct_lookups_agree_with_jinja(expression: str) -> None:
    """A template that is only a path is looked up without Jinja; the same path inside a conditional expression
    runs through Jinja. Values and errors must be the same."""
    event = {**_event(), "nested": _Mapping({"inner": {"x": 1}}), "pair": ("a", "b")}

    def outcome(source: str) -> Any:
        try:
            return _one(source, event=event)
        except RenderError as exc:
            return f"error: {exc}"

    direct = outcome("{{ " + expression + " }}")
    through_jinja = outcome("{{ " + expression + " if true else none }}")
    assert direct == through_jinja


def test_a_direct_lookup_copies_what_it_returns() -> None:
    event = _event()
    value = _one("{{ event.value.items }}", event=event)
    value[0]["sku"] = "changed"
    assert event["value"]["items"][0]["sku"] == "a"


def test_defined_tests_and_default_still_work() -> None:
    assert _one("{{ event.value.nope is defined }}") is False
    assert _one("{{ event.value.nope | default('d') }}") == "d"
    assert _one("{{ event.value.nope | default(none) }}") is None


def test_other_runtime_errors_name_their_type() -> None:
    assert _render_error({"a": "{{ 1 / 0 }}"}) == "payload.a: ZeroDivisionError: division by zero"
    assert _render_error({"a": "{{ event.key + 1 }}"}) == (
        'payload.a: TypeError: can only concatenate str (not "int") to str'
    )


def test_render_error_is_an_event_error() -> None:
    with pytest.raises(EventError) as info:
        _render({"a": "{{ nope }}"})
    assert info.value.code == "render_error"


# --- null payload -------------------------------------------------------------------------------------------


def test_a_payload_that_renders_null_is_an_error_unless_allowed() -> None:
    compiled = compile_tree("{{ event.value.note }}", root=("payload",))
    with pytest.raises(RenderError) as info:
        compiled.render(_ctx())
    assert str(info.value) == "payload rendered null; the SDK cannot send a null payload"
    assert compiled.render(_ctx(), allow_null=True) is None
    with pytest.raises(RenderError, match=r"^payload rendered null; the SDK cannot send a null payload$"):
        compile_tree(None).render(_ctx())
    assert compile_tree(None).render(_ctx(), allow_null=True) is None
    assert _render({"a": "{{ none }}"}) == {"a": None}


# --- compile errors -----------------------------------------------------------------------------------------


def test_a_syntax_error_reports_its_line_inside_the_template() -> None:
    with pytest.raises(TemplateCompileError) as info:
        compile_tree("first line\nsecond {{ event.key }}\nthird {{ event.key + }}\n")
    assert info.value.problems == [TemplateSyntaxProblem((), 3, "unexpected 'end of print statement'")]
    assert str(info.value) == "<template>: line 3: unexpected 'end of print statement'"


def test_every_problem_of_a_tree_is_reported_at_once() -> None:
    tree = {
        "ok": "{{ event.key }}",
        "a": "one\n{{ event.key }}\n{{ event.key | nofilter }}",
        "b": ["{% if %}", "fine", "\n\n  {{ event.key | nope }}  "],
        "c": {"d": "{% for x in event.value.items %}{{ x }}", "e": "{{ event.key is nosuchtest }}"},
    }
    with pytest.raises(TemplateCompileError) as info:
        compile_tree(tree, root=("payload",))
    assert info.value.problems == [
        TemplateSyntaxProblem(("payload", "a"), 3, "No filter named 'nofilter'."),
        TemplateSyntaxProblem(("payload", "b", 0), 1, "Expected an expression, got 'end of statement block'"),
        TemplateSyntaxProblem(("payload", "b", 2), 3, "No filter named 'nope'."),
        TemplateSyntaxProblem(
            ("payload", "c", "d"),
            1,
            "Unexpected end of template. Jinja was looking for the following tags: 'endfor' or 'else'. "
            "The innermost block that needs to be closed is 'for'.",
        ),
        TemplateSyntaxProblem(("payload", "c", "e"), 1, "No test named 'nosuchtest'."),
    ]
    assert str(info.value).splitlines()[:3] == [
        "payload.a: line 3: No filter named 'nofilter'.",
        "payload.b[0]: line 1: Expected an expression, got 'end of statement block'",
        "payload.b[2]: line 3: No filter named 'nope'.",
    ]


def test_problems_are_frozen() -> None:
    problem = TemplateSyntaxProblem(("a",), 1, "m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        problem.line = 2  # type: ignore[misc]


# --- sandbox ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ ''.__class__.__mro__ }}", "access to attribute '__class__' of 'str' object is unsafe."),
        (
            "x{{ ''.__class__.__mro__[1].__subclasses__() }}",
            "access to attribute '__class__' of 'str' object is unsafe.",
        ),
        ("{{ config.__class__ }}", "access to attribute '__class__' of 'dict' object is unsafe."),
        ("{{ event['__class__'] }}", "access to attribute '__class__' of 'dict' object is unsafe."),
        ("{{ event.value.items.append(1) }}", "access to attribute 'append' of 'list' object is unsafe."),
        ("{{ event.value.customer.update({'id': 0}) }}", "access to attribute 'update' of 'dict' object is unsafe."),
        ("{{ range.__globals__ }}", "access to attribute '__globals__' of 'function' object is unsafe."),
    ],
)
def test_the_sandbox_blocks_internals_and_mutation(source: str, message: str) -> None:
    event = _event()
    assert _render_error({"a": source}, event=event) == f"payload.a: {message}"
    assert event == _event()


# --- when ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ event.value.total >= config.min_total }}", True),
        ("{{ event.value.count >= config.min_total }}", False),
        ("{{ true }}", True),
        ("{{ false }}", False),
        ("{{ 1 }}", True),
        ("{{ 0 }}", False),
        ("{{ 0.0 }}", False),
        ("{{ none }}", False),
        ("{{ [] }}", False),
        ("{{ [0] }}", True),
        ("{{ {} }}", False),
        ("{{ [1, 2] | select('odd') }}", True),
        ("{{ [2] | select('odd') }}", False),
        ("{{ '' }}", False),
        ("{{ 'false' }}", False),
        ("{{ ' False ' }}", False),
        ("{{ '0' }}", False),
        ("{{ 'no' }}", False),
        ("{{ 'OFF' }}", False),
        ("{{ 'none' }}", False),
        ("{{ 'Null' }}", False),
        ("{{ 'yes' }}", True),
        ("{{ 'true' }}", True),
        ("{{ '00' }}", True),
        ("{{ event.value.paid }}", True),
        ("{{ event.value.note }}", False),
        ("  {{ false }}  ", False),
        ("{% if event.value.paid %}yes{% else %}no{% endif %}", True),
        ("{% if event.value.note %}yes{% else %}no{% endif %}", False),
        ("{{ event.value.paid }} ", True),
        ("{{ false }} ", False),
        ("{{ 1 }}{{ 0 }}", True),
    ],
)
def test_when_truthiness(source: str, expected: bool) -> None:
    assert compile_when(source).evaluate(_ctx()) is expected


def test_when_errors() -> None:
    with pytest.raises(RenderError) as info:
        compile_when("{{ event.value.totl > 1 }}").evaluate(_ctx())
    assert str(info.value) == "when: 'dict object' has no attribute 'totl'"
    with pytest.raises(TemplateCompileError) as compile_info:
        compile_when("{{ event.value.total > }}")
    assert compile_info.value.problems == [
        TemplateSyntaxProblem((), 1, "unexpected 'end of print statement'")
    ]
    with pytest.raises(TemplateCompileError) as compile_info:
        compile_when("event.value.total > 10")
    assert compile_info.value.problems == [
        TemplateSyntaxProblem(
            (),
            1,
            "'event.value.total > 10' is not a template; write the condition like "
            "'{{ event.value.total > 10 }}'",
        )
    ]
    with pytest.raises(TemplateCompileError) as compile_info:
        compile_when(True)  # type: ignore[arg-type]
    assert compile_info.value.problems == [
        TemplateSyntaxProblem((), 1, "a condition is a template string, not bool")
    ]


# --- references ---------------------------------------------------------------------------------------------


def test_uses_and_event_fields() -> None:
    compiled = compile_tree(
        {
            "id": "{{ event.key }}",
            "total": "{{ event['value'].total }}",
            "who": "{{ binding.function_id }}-{{ source.id }}",
            "loop": "{% for h in event.headers %}{{ h }}{% endfor %}{% set n = 1 %}{{ n }}{{ range(2) | list }}",
            "static": "no templates",
            "typo": "{{ evnt.key | default('') }}",
        }
    )
    assert compiled.uses() == {"event", "binding", "source", "evnt"}
    assert compiled.event_fields() == {"key", "value", "headers"}
    when = compile_when("{{ event.value.total >= config.min_total }}")
    assert when.uses() == {"event", "config"}
    assert when.event_fields() == {"value"}
    static = compile_tree({"a": 1})
    assert static.uses() == set()
    assert static.event_fields() == set()


def test_make_context() -> None:
    assert make_context({"id": "e"}, {"c": 1}, {"id": "b"}, {"id": "s", "kind": "file"}) == {
        "event": {"id": "e"},
        "config": {"c": 1},
        "binding": {"id": "b"},
        "source": {"id": "s", "kind": "file"},
    }


def test_compile_tree_returns_a_compiled_tree() -> None:
    assert isinstance(compile_tree({"a": "{{ event.key }}"}), CompiledTree)

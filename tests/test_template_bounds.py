"""Bounded templates (DESIGN.md §2): template bombs are render errors found quickly, compiling never evaluates a
capped operation, and every failure inside a render or a compile is the template's error, never an escape."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from bridge.cli import main
from bridge.errors import RenderError
from bridge.templates import TemplateCompileError, compile_tree, compile_when, make_context

# "Did not hang": every bomb below takes seconds to hours, or gigabytes, without its bound. Measured in CPU time
# (what the render budget counts too): wall time on a loaded machine says nothing about the bound.
BOUND_S = 2.0


def _deep(levels: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(levels):
        node["a"] = {}
        node = node["a"]
    return root


def _render(source: str, value: Any = None) -> Any:
    context = make_context({"id": "e1", "source": "s", "value": value}, {}, {"id": "b"}, {"id": "s"})
    return compile_tree({"v": source}, root=("payload",)).render(context)


RENDER_BOMBS: dict[str, tuple[str, Any]] = {
    "power of an event value": ("{{ event.value.n * 10 ** event.value.exp }}", {"n": 1, "exp": 3_000_000}),
    "power of constants": ("{{ 10 ** (10 ** 8) }}", None),
    "huge base, small exponent": ("{{ (10 ** 4000) ** 9000 }}", None),
    "string repeat": ("{{ 'x' * 10 ** 9 }}", None),
    "list repeat": ("{{ [1] * 10 ** 9 }}", None),
    "doubling by +": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}{{ ns.s | length }}", None),
    "doubling by ~": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                      "{% endfor %}{{ ns.s | length }}", None),
    "doubling by a captured block": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s %}"
                                     "{{ ns.s }}{{ ns.s }}{% endset %}{% endfor %}", None),
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", None),
    "output loop": ("{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}", None),
    "range": ("{{ range(10 ** 12) | list | length }}", None),
    "center filter": ("{{ 'x' | center(1000000000) }}", None),
    "indent filter": ("{{ ('\n' * 100000) | indent(100000) }}", None),
    "wordwrap filter": ("{{ ('a ' * 500000) | wordwrap(1, wrapstring='-' * 100) }}", None),
    "join filter": ("{{ range(100000) | join('x' * 1000000) }}", None),
    "format filter": ("{{ '%999999999d' | format(1) }}", None),
    "% operator": ("{{ '%999999999d' % 1 }}", None),
    "% operator with *": ("{{ '%*d' % (999999999, 1) }}", None),
    "tojson indent": ("{{ event.value | tojson(indent=1000000) }}", list(range(1000))),
    "replace filter": ("{{ ('x' * 1000000) | replace('x', 'yyyyyyy') }}", None),
    "batch filter": ("{{ [1] | batch(10 ** 9, 0) | list }}", None),
    "slice filter": ("{{ [1] | slice(10 ** 8) | list }}", None),
    "str.ljust": ("{{ 'x'.ljust(10 ** 9) }}", None),
    "str.format width": ("{{ '{:999999999}'.format(1) }}", None),
    "str.format nested width": ("{{ '{:{}}'.format(1, 999999999) }}", None),
    "str.join": ("{{ ('x' * 1000000).join(range(100000)) }}", None),
    "str.replace": ("{{ ('x' * 1000000).replace('', 'yy') }}", None),
    "str.expandtabs": ("{{ ('\t' * 1000000).expandtabs(1000) }}", None),
    "int.to_bytes": ("{{ (1).to_bytes(10 ** 9, 'big') }}", None),
    "deep event value": ("{{ event.value }}", _deep(5000)),
    "exponential macro calls": ("{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}"
                                "{% endmacro %}{{ f(0) }}", None),
    "chain of big powers": ("{{ " + " + ".join(["(3 ** 214) ** 10000 * 0"] * 20) + " }}", None),
    "loop of big products": ("{% set x = (2 ** 170) ** 10000 %}{% for i in range(1000) %}{{ (x * x) % 10 }}"
                             "{% endfor %}", None),
    "recursive macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", None),
    "big integer to text": ("{{ (10 ** 5000) | string }}", None),
}


@pytest.mark.parametrize("source,value", list(RENDER_BOMBS.values()), ids=list(RENDER_BOMBS))
def test_a_template_bomb_is_a_render_error_in_bounded_time(source: str, value: Any) -> None:
    started = time.thread_time()
    with pytest.raises(RenderError) as caught:
        _render(source, value)
    assert time.thread_time() - started < BOUND_S, "the render did not stay bounded"
    assert str(caught.value).startswith("payload.v: "), caught.value


def test_data_as_deep_as_strict_decoding_allows_renders_as_a_lone_expression() -> None:
    assert _render("{{ event.value }}", _deep(512)) == {"v": _deep(512)}


def test_lipsum_is_not_offered() -> None:
    with pytest.raises(RenderError, match="'lipsum' is undefined"):
        _render("{{ lipsum(10 ** 6) }}")


@pytest.mark.parametrize(
    "source,expected",
    [
        ("{{ 2 ** 10 }}", 1024),
        ("{{ 2 ** 10000 > 0 }}", True),
        ("{{ 'ab' * 3 }}", "ababab"),
        ("{{ [1, 2] * 2 }}", [1, 2, 1, 2]),
        ("{{ 'a' + 'b' }}", "ab"),
        ("{{ 7 % 3 }}", 1),
        ("{{ '%05d' % 42 }}", "00042"),
        ("{{ '%*d' % (4, 7) }}", "   7"),
        ("{{ '{:>5}'.format(1) }}", "    1"),
        ("{{ 'x' | center(5) }}", "  x  "),
        ("{{ [1, 2, 3] | join(',') }}", "1,2,3"),
        ("{{ 'a-b' | replace('-', '+') }}", "a+b"),
        ("{{ 'a b c' | wordwrap(1) }}", "a\nb\nc"),
        ("{{ range(3) | batch(2) | list }}", [[0, 1], [2]]),
        ("{% for i in range(1000) %}{% endfor %}done", "done"),
        ("{% for x in [1, 2, 3] if x > 1 %}{{ loop.index }}/{{ loop.length }}{% if loop.last %}!{% endif %}"
         "{% else %}none{% endfor %}", "1/22/2!"),
        ("{% for x in [[1, [2]]] recursive %}{{ x }}{% if x is iterable %}[{{ loop(x) }}]{% endif %}{% endfor %}",
         "[1, [2]][1[2][2]]"),
        ("{{ 'x' ~ 1 }}", "x1"),
        ("{{ {'a': [1]} | tojson(indent=2) }}", '{\n  "a": [\n    1\n  ]\n}'),
    ],
)
def test_what_stays_under_the_bounds_renders_as_before(source: str, expected: Any) -> None:
    assert _render(source) == {"v": expected}


def test_a_when_condition_is_bounded_too() -> None:
    when = compile_when("{{ 'x' * 10 ** 9 }}")
    with pytest.raises(RenderError, match=r"when: .*over the template limit"):
        when.evaluate(make_context({"id": "e"}, {}, {}, {}))


COMPILE_BOMBS: dict[str, str] = {
    "70 nested parentheses": "{{ " + "(" * 70 + "1" + ")" * 70 + " }}",
    "100 nested ifs": "{% if true %}" * 100 + "x" + "{% endif %}" * 100,
    "200-step attribute chain": "{{ event" + ".a" * 200 + " }}",
    "deeply nested lists": "{{ " + "[" * 400 + "]" * 400 + " }}",
}


@pytest.mark.parametrize("source", list(COMPILE_BOMBS.values()), ids=list(COMPILE_BOMBS))
def test_a_template_too_deep_to_compile_is_a_template_problem_with_a_line(source: str) -> None:
    started = time.thread_time()
    with pytest.raises(TemplateCompileError) as caught:
        compile_tree({"v": source}, root=("payload",))
    assert time.thread_time() - started < BOUND_S
    [problem] = caught.value.problems
    assert problem.path == ("payload", "v") and problem.line == 1
    assert "nested too deeply" in problem.message


@pytest.mark.parametrize("source", ["{{ 10 ** (10 ** 8) }}", "{{ 'x' * (10 ** 10) }}", "{{ 'x' | center(10 ** 9) }}",
                                    "{{ 'x' | center(1000000000) }}", "{{ '%999999999d' % 1 }}"])
def test_compiling_never_evaluates_a_capped_operation(source: str) -> None:
    started = time.thread_time()
    compile_tree({"v": source})
    assert time.thread_time() - started < 1.0


VALIDATE_CONFIG = """\
version: 1
engine:
  url: ws://127.0.0.1:1
sources:
  inbox:
    description: test
    file:
      path: ./inbox
    payload:
      big: "{{ 10 ** (10 ** 8) }}"
      deep: "{{ event%s }}"
"""


def test_bridge_validate_answers_in_bounded_time_with_a_diagnostic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "inbox").mkdir()
    config = tmp_path / "bridge.yaml"
    config.write_text(VALIDATE_CONFIG % (".a" * 200))
    started = time.process_time()
    code = main(["validate", "-c", str(config)])
    assert time.process_time() - started < 5.0
    out = capsys.readouterr()
    text = out.out + out.err
    assert code != 0
    assert "internal error" not in text
    assert "bridge.yaml:11:" in text and "nested too deeply" in text, text


def test_the_time_budget_counts_cpu_time_so_a_paused_render_is_no_render_error() -> None:
    """A render the machine pauses (a busy host, a stop signal) has done no work meanwhile: the budget is this
    thread's CPU time, so only a render that really computes for TIME_BUDGET_S is stopped."""
    from jinja2.runtime import Context

    from bridge import templates

    context = Context(templates._ENV, {}, "t", {})
    templates._spend(context)
    time.sleep(templates.TIME_BUDGET_S + 0.2)  # paused, not computing
    templates._spend(context)  # no LimitError
    deadline = time.thread_time() + templates.TIME_BUDGET_S + 0.2
    while time.thread_time() < deadline:  # computing
        pass
    with pytest.raises(templates.LimitError):
        templates._spend(context)

"""`bridge test`: every expectation kind passing and failing, exit codes, the output formats, the examples."""

from __future__ import annotations

import io
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from bridge._caserun import contains, same
from bridge.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

BRIDGE_YAML = """\
version: 1
sources:
  orders.placed:
    kafka:
      bootstrap_servers: 127.0.0.1:9092
      topics: [orders]
    bind_schema:
      type: object
      properties:
        min_total: {type: number, default: 10}
      additionalProperties: false
    when: "{{ event.value.total >= config.min_total }}"
    payload:
      order_id: "{{ event.key }}"
      total: "{{ event.value.total }}"
      min: "{{ config.min_total }}"
      fn: "{{ binding.function_id }}"
    payload_schema:
      type: object
      properties:
        total: {type: number, maximum: 1000}
  signups:
    postgres:
      dsn: postgresql://127.0.0.1:5432/postgres
      channels: [user_signup]
"""


def _bridge(tmp_path: Path, cases: str, *args: str, name: str = "bridge.test.yaml") -> tuple[int, str, str]:
    """Write bridge.yaml and a test file into tmp_path, run `bridge test` in process: (exit, stdout, stderr)."""
    config = tmp_path / "bridge.yaml"
    if not config.exists():
        config.write_text(BRIDGE_YAML)
    (tmp_path / name).write_text(cases)
    return _run(["test", "-c", str(config), *args])


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", out)
        mp.setattr("sys.stderr", err)
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


EVENT = "{key: o-1, value: {total: 50}}"

PASSING = f"""\
tests:
  - name: when passes
    source: orders.placed
    event: {EVENT}
    expect: {{when: true}}
  - name: when filters
    source: orders.placed
    config: {{min_total: 100}}
    event: {EVENT}
    expect: {{when: false}}
  - name: exact payload, bind defaults applied
    source: orders.placed
    binding: {{function_id: billing::on-order}}
    event: {EVENT}
    expect:
      payload: {{order_id: o-1, total: 50.0, min: 10, fn: billing::on-order}}
  - name: payload part
    source: orders.placed
    event: {EVENT}
    expect: {{payload_contains: {{total: 50}}}}
  - name: schema error
    source: orders.placed
    event: {{key: o-2, value: {{total: 5000}}}}
    expect: {{when: true, error: payload_schema_violation, error_contains: "$.total: 5000 is greater"}}
  - name: render error
    source: orders.placed
    event: {{key: o-3, value: {{}}}}
    expect: {{error: render_error}}
  - name: no payload template sends the whole event, id and source filled in
    source: signups
    event: {{channel: user_signup, payload: {{id: 1}}}}
    expect:
      payload: {{id: "pg:user_signup:0:0", source: signups, channel: user_signup, payload: {{id: 1}}}}
"""


def test_every_expectation_kind_passes(tmp_path: Path) -> None:
    code, out, err = _bridge(tmp_path, PASSING)
    assert (code, err) == (0, "")
    assert out == (
        "PASS when passes\nPASS when filters\nPASS exact payload, bind defaults applied\nPASS payload part\n"
        "PASS schema error\nPASS render error\nPASS no payload template sends the whole event, id and source "
        "filled in\n7 passed, 0 failed\n"
    )


FAILING = f"""\
tests:
  - name: when
    source: orders.placed
    config: {{min_total: 100}}
    event: {EVENT}
    expect: {{when: true}}
  - name: payload
    source: orders.placed
    event: {EVENT}
    expect: {{payload: {{order_id: o-2, total: 50, min: 10, fn: bridge::test}}}}
  - name: payload_contains
    source: orders.placed
    event: {EVENT}
    expect: {{payload_contains: {{total: 51, order_id: o-1}}}}
  - name: error code
    source: orders.placed
    event: {{key: o-2, value: {{total: 5000}}}}
    expect: {{error: render_error}}
  - name: error expected, payload got
    source: orders.placed
    event: {EVENT}
    expect: {{error: payload_schema_violation}}
  - name: payload expected, filtered
    source: orders.placed
    config: {{min_total: 100}}
    event: {EVENT}
    expect: {{payload_contains: {{total: 50}}}}
  - name: payload expected, error got
    source: orders.placed
    event: {{key: o-3, value: {{}}}}
    expect: {{when: true}}
  - name: true is not 1
    source: signups
    event: {{payload: true}}
    expect: {{payload_contains: {{payload: 1}}}}
"""


def test_every_expectation_kind_fails_with_a_readable_diff(tmp_path: Path) -> None:
    code, out, _ = _bridge(tmp_path, FAILING)
    assert code == 1
    assert out == """\
FAIL when
    when: expected true, got false
FAIL payload
    payload differs (- expected, + actual):
    --- expected
    +++ actual
    @@ -1,6 +1,6 @@
     {
       "fn": "bridge::test",
       "min": 10,
    -  "order_id": "o-2",
    +  "order_id": "o-1",
       "total": 50
     }
FAIL payload_contains
    payload_contains: the payload does not contain the expected part (- expected, + actual):
    --- expected
    +++ actual
    @@ -1,4 +1,4 @@
     {
       "order_id": "o-1",
    -  "total": 51
    +  "total": 50
     }
FAIL error code
    error: expected render_error, got payload_schema_violation: payload rejected by payload_schema: $.total: \
5000 is greater than the maximum of 1000
FAIL error expected, payload got
    error: expected payload_schema_violation, got a payload:
    {
      "fn": "bridge::test",
      "min": 10,
      "order_id": "o-1",
      "total": 50
    }
FAIL payload expected, filtered
    payload_contains: expected a payload, got no payload: when is false, so the binding skips this event
FAIL payload expected, error got
    when: expected true, got no answer (the filter failed: when: 'dict object' has no attribute 'total')
FAIL true is not 1
    payload_contains: the payload does not contain the expected part (- expected, + actual):
    --- expected
    +++ actual
    @@ -1,3 +1,3 @@
     {
    -  "payload": 1
    +  "payload": true
     }
0 passed, 8 failed
"""


def test_an_unexpected_error_fails_a_case_that_only_checks_when(tmp_path: Path) -> None:
    cases = ("tests:\n  - {name: e, source: orders.placed, event: {key: k, value: {total: 5000}}, "
             "expect: {when: true}}\n")
    code, out, _ = _bridge(tmp_path, cases)
    assert code == 1
    assert out.splitlines()[:2] == [
        "FAIL e",
        "    unexpected payload_schema_violation: payload rejected by payload_schema: $.total: 5000 is greater than "
        "the maximum of 1000",
    ]


def test_json_values_compare_as_json() -> None:
    assert same({"a": 1, "b": [1.0]}, {"b": [1], "a": 1.0})
    assert not same(True, 1) and not same(1, True) and not same(0, False) and not same(None, 0)
    assert not same([1, 2], [2, 1]) and not same({"a": 1}, {"a": 1, "b": 2}) and not same("1", 1)
    assert contains({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"c": 2}})
    assert not contains({"a": [1, 2]}, {"a": [1]})  # a list must be equal, not a part
    assert not contains({"a": 1}, {"b": None})  # an absent key is not a null


BROKEN = """\
tests:
  - name: one
    sorce: orders.placed
    event: {key: o-1}
  - name: one
    source: orders.placd
    config: {min_total: -1}
  - name: two
    source: orders.placed
    config: {min_total: abc, extra: 1}
    event: {topik: orders, key: k}
    expect: {when: false, payload: {}, eror: x}
  - name: three
    source: orders.placed
    expect: {error: render_eror, payload_contains: {}}
  - name: four
    source: signups
    binding: {function_id: 5}
    config: {condition_function_id: fn::c, x: 1}
    expect: {}
extra: 1
"""


def test_a_broken_test_file_gets_every_problem_at_once_with_line_and_col(tmp_path: Path) -> None:
    code, out, err = _bridge(tmp_path, BROKEN)
    assert code == 1
    f = tmp_path / "bridge.test.yaml"
    assert out == f"""\
{f}:3:5: error[unknown-key] tests[0].sorce: unknown key; did you mean 'source'?
{f}:5:11: error[duplicate-name] tests[1].name: a case named 'one' is already at line 2; case names must be \
unique within a file
{f}:6:13: error[unknown-source] tests[1].source: no source 'orders.placd' in bridge.yaml; did you mean \
'orders.placed'?
{f}:10:13: error[bind-config] tests[2].config: breaks the bind_schema of orders.placed: $.min_total: 'abc' is \
not of type 'number'
{f}:10:13: error[bind-config] tests[2].config: breaks the bind_schema of orders.placed: $: unknown property \
'extra' (allowed: condition_function_id, min_total)
{f}:11:13: error[event-field] tests[2].event.topik: kafka events have no field 'topik'; did you mean 'topic'?
{f}:12:27: error[value] tests[2].expect.payload: a case that expects when: false has no payload; the binding \
skips a filtered event; nothing is rendered
{f}:12:40: error[unknown-key] tests[2].expect.eror: unknown key; did you mean 'error'?
{f}:15:21: error[value] tests[3].expect.error: 'render_eror' is not one of: render_error, \
payload_schema_violation; did you mean 'render_error'?
{f}:15:34: error[value] tests[3].expect.payload_contains: a case cannot expect both an error and a \
payload_contains
{f}:18:28: error[type] tests[4].binding.function_id: expected a string, got a number
{f}:19:13: error[bind-config] tests[4].config: breaks the bind_schema of signups: $: unknown property 'x' \
(allowed: condition_function_id)
{f}:20:13: error[value] tests[4].expect: must have at least one entry; expect any of: when, payload, \
payload_contains, error, error_contains
{f}:21:1: error[unknown-key] extra: unknown key; allowed: tests
"""
    assert err == "bridge: 14 errors in the test file(s); no test was run\n"


@pytest.mark.parametrize(("text", "expected"), [
    ("", "1:1: error[type] : the file is empty; start with 'tests:' and a list of cases"),
    ("tests: {a: 1}\n", "1:8: error[type] tests: expected a list, got a mapping"),
    ("tests:\n  - name: x\n    name: y\n    source: signups\n",
     "3:5: error[duplicate-key] tests[0].name: duplicate key; first defined at 2:5; a key may appear once per "
     "mapping"),
    ("tests: [\n", None),
])
def test_malformed_test_files(tmp_path: Path, text: str, expected: str | None) -> None:
    code, out, _ = _bridge(tmp_path, text)
    assert code == 1
    first = out.splitlines()[0]
    assert first.startswith(f"{tmp_path / 'bridge.test.yaml'}:")
    if expected is None:
        assert "error[yaml-syntax]" in first
    else:
        assert first.split(":", 1)[1] == expected.replace("] : ", "] ")


def test_exit_codes_for_files_that_cannot_be_read(tmp_path: Path) -> None:
    (tmp_path / "bridge.yaml").write_text(BRIDGE_YAML)
    code, _, err = _run(["test", "-c", str(tmp_path / "bridge.yaml")])
    assert code == 2
    assert err.startswith(f"bridge: no test file: {tmp_path / 'bridge.test.yaml'} does not exist")
    code, out, _ = _run(["test", "-c", str(tmp_path / "bridge.yaml"), str(tmp_path / "nope.yaml")])
    assert (code, out) == (2, f"{tmp_path / 'nope.yaml'}: error[file-unreadable] no such file\n")
    code, out, _ = _run(["test", "-c", str(tmp_path / "missing.yaml")])
    assert code == 2 and "error[file-unreadable]" in out
    code, _, _ = _run(["test", "-c", str(tmp_path / "bridge.yaml"), "--format", "xml"])
    assert code == 2


def test_an_invalid_bridge_yaml_runs_no_test(tmp_path: Path) -> None:
    (tmp_path / "bridge.yaml").write_text(BRIDGE_YAML.replace("topics:", "topik:"))
    code, out, err = _bridge(tmp_path, PASSING)
    assert code == 1
    assert "error[unknown-key] sources.orders.placed.kafka.topik: unknown key; did you mean 'topics'?" in out
    assert "PASS" not in out
    assert err == f"bridge: {tmp_path / 'bridge.yaml'} is invalid; no test was run\n"


def test_named_files_replace_the_default_and_each_is_checked(tmp_path: Path) -> None:
    _bridge(tmp_path, "tests: [{name: default, source: signups, expect: {when: true}}]\n")
    (tmp_path / "more.yaml").write_text("tests: [{name: more, source: signups, expect: {when: false}}]\n")
    (tmp_path / "again.yaml").write_text("tests: [{name: more, source: signups, expect: {when: true}}]\n")
    code, out, _ = _run(["test", "-c", str(tmp_path / "bridge.yaml"), str(tmp_path / "more.yaml"),
                         str(tmp_path / "again.yaml")])
    assert code == 1
    assert out == "FAIL more\n    when: expected false, got true\nPASS more\n1 passed, 1 failed\n"
    code, out, _ = _run(["test", "-c", str(tmp_path / "bridge.yaml")])
    assert (code, out) == (0, "PASS default\n1 passed, 0 failed\n")


def test_a_condition_function_is_not_called_and_the_output_says_so(tmp_path: Path) -> None:
    cases = ("tests: [{name: c, source: signups, config: {condition_function_id: fraud::check}, "
             "expect: {when: true}}]\n")
    code, out, _ = _bridge(tmp_path, cases)
    assert code == 0
    assert out == ("PASS c\n    note: condition fraud::check is not called by `bridge test`; at run time the binding "
                   "gets the event only if it does not return false\n1 passed, 0 failed\n")


# --- formats ------------------------------------------------------------------------------------------------


def test_junit_output_is_xml_that_a_parser_reads(tmp_path: Path) -> None:
    cases = PASSING + FAILING.split("\n", 1)[1] + (
        "  - name: \"odd <chars> & \\x01\"\n    source: signups\n"
        "    event: {payload: \"\\x01\\x0b\"}\n    expect: {payload_contains: {payload: x}}\n"
    )
    code, out, err = _bridge(tmp_path, cases, "--format", "junit")
    assert (code, err) == (1, "")
    root = ET.fromstring(out)
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures")) == ("16", "9")
    [suite] = root.findall("testsuite")
    assert suite.get("name") == str(tmp_path / "bridge.test.yaml")
    cases_xml = suite.findall("testcase")
    assert len(cases_xml) == 16
    assert cases_xml[0].get("classname") == "orders.placed" and cases_xml[0].find("failure") is None
    when_case = cases_xml[7]
    failure = when_case.find("failure")
    assert when_case.get("name") == "when" and failure is not None
    assert failure.get("message") == "when: expected true, got false"
    odd = cases_xml[-1]
    assert odd.get("name") == "odd <chars> & \\u0001"
    odd_failure = odd.find("failure")
    assert odd_failure is not None and '"\\u0001\\u000b"' in (odd_failure.text or "")
    assert float(suite.get("time") or "x") >= 0


def test_json_output_is_one_object_per_case(tmp_path: Path) -> None:
    code, out, _ = _bridge(tmp_path, PASSING + FAILING.split("\n", 1)[1], "--format", "json")
    assert code == 1
    results: list[dict[str, Any]] = json.loads(out)
    assert len(results) == 15
    first = results[2]
    assert first == {
        "file": str(tmp_path / "bridge.test.yaml"), "line": 11, "name": "exact payload, bind defaults applied",
        "source": "orders.placed", "passed": True, "when": True,
        "payload": {"order_id": "o-1", "total": 50, "min": 10, "fn": "billing::on-order"},
        "error": None, "failures": [], "notes": [],
    }
    schema_error = results[4]
    assert schema_error["error"]["code"] == "payload_schema_violation" and schema_error["payload"] is None
    assert [r["passed"] for r in results].count(False) == 8


def test_problems_go_to_stderr_with_json_and_junit(tmp_path: Path) -> None:
    code, out, err = _bridge(tmp_path, BROKEN, "--format", "junit")
    assert (code, out) == (1, "")
    assert "error[unknown-key] tests[0].sorce" in err


# --- the examples ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("example", sorted(p.parent.name for p in EXAMPLES.glob("*/bridge.yaml")))
def test_every_example_has_passing_tests(example: str) -> None:
    assert (EXAMPLES / example / "bridge.test.yaml").is_file()
    code, out, _ = _run(["test", "-c", str(EXAMPLES / example / "bridge.yaml")])
    assert code == 0, out
    assert out.splitlines()[-1].endswith(" passed, 0 failed")
    assert "FAIL" not in out


@pytest.mark.parametrize("example", sorted(p.parent.name for p in EXAMPLES.glob("*/bridge.yaml")))
def test_every_example_tests_its_filter_both_ways_its_payload_and_its_schema(example: str) -> None:
    code, out, _ = _run(["test", "-c", str(EXAMPLES / example / "bridge.yaml"), "--format", "json"])
    assert code == 0
    results = json.loads(out)
    config_text = (EXAMPLES / example / "bridge.yaml").read_text()
    whens = {r["when"] for r in results}
    assert whens >= ({True, False} if "\n    when:" in config_text else {True})
    assert any(r["payload"] is not None for r in results)
    if "payload_schema:" in config_text:
        assert any((r["error"] or {}).get("code") == "payload_schema_violation" for r in results)


def test_a_template_change_that_breaks_an_example_fails(tmp_path: Path) -> None:
    example = tmp_path / "kafka-orders"
    shutil.copytree(EXAMPLES / "kafka-orders", example)
    config = example / "bridge.yaml"
    config.write_text(config.read_text().replace('order_id: "{{ event.key }}"', 'order_id: "{{ event.topic }}"'))
    code, out, _ = _run(["test", "-c", str(config)])
    assert code == 1
    assert "FAIL an order above the binding's minimum reaches the function" in out
    assert '-  "order_id": "o-1001",\n    +  "order_id": "orders",' in out


def test_bridge_schema_tests_prints_the_test_file_schema() -> None:
    code, out, _ = _run(["schema", "--tests"])
    assert code == 0
    schema = json.loads(out)
    assert schema["title"] == "iii-bridge test cases (bridge.test.yaml)"
    assert schema["$defs"]["case"]["properties"]["expect"]["properties"]["error"]["enum"] == [
        "render_error", "payload_schema_violation"]


def test_the_readme_example_file_passes_against_the_kafka_example(tmp_path: Path) -> None:
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme.split("## Testing your bridge.yaml", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "readme.test.yaml").write_text(example)
    code, out, _ = _run(["test", "-c", str(EXAMPLES / "kafka-orders" / "bridge.yaml"),
                         str(tmp_path / "readme.test.yaml")])
    assert (code, out.splitlines()[-1]) == (0, "4 passed, 0 failed"), out


def test_a_lone_surrogate_in_a_payload_is_printed_as_an_escape_in_every_format(tmp_path: Path) -> None:
    (tmp_path / "bridge.yaml").write_text(
        "version: 1\nsources:\n  s:\n    postgres: {dsn: 'postgresql://127.0.0.1/x', channels: [c]}\n"
        "    payload: {v: \"{{ event.payload | fromjson }}\", w: \"{{ event.payload | fromjson | int }}\"}\n")
    cases = ("tests:\n  - {name: s, source: s, event: {payload: '\"\\ud800\"'}, expect: {payload: {v: x}}}\n"
             "  - {name: t, source: s, event: {payload: '\"\\ud800\"'}, expect: {error: render_error}}\n")
    for fmt in ("text", "json", "junit"):
        code, out, err = _bridge(tmp_path, cases, "--format", fmt)
        assert (code, err) == (1, ""), (fmt, out, err)
        assert "\\ud800" in out
        out.encode("utf-8")  # printable as it is


def test_cases_follow_live_delivery_a_filtered_event_is_not_rendered_and_a_null_payload_is_an_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "bridge.yaml").write_text(
        "version: 1\nsources:\n  s:\n    postgres: {dsn: 'postgresql://127.0.0.1/x', channels: [c]}\n"
        "    when: \"{{ event.payload != 'skip' }}\"\n"
        "    payload: \"{{ none if event.payload == 'null' else event.payload.missing }}\"\n")
    cases = ("tests:\n"
             "  - {name: filtered, source: s, event: {payload: skip}, expect: {when: false}}\n"
             "  - {name: nothing, source: s, event: {payload: 'null'}, expect: {when: true, error: render_error, "
             "error_contains: payload rendered null}}\n"
             "  - {name: broken, source: s, event: {payload: x}, expect: {when: true, error: render_error}}\n")
    code, out, _ = _bridge(tmp_path, cases)
    assert (code, out) == (0, "PASS filtered\nPASS nothing\nPASS broken\n3 passed, 0 failed\n")

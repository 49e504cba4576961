"""`bridge test --update`: records what the source produces into cases without `expect`, touches nothing else."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml

from bridge.cli import main

BRIDGE_YAML = """\
version: 1
sources:
  orders.placed:
    kafka: {bootstrap_servers: 127.0.0.1:9092, topics: [orders]}
    bind_schema:
      type: object
      properties: {min_total: {type: number, default: 10}}
    when: "{{ event.value.total >= config.min_total }}"
    payload:
      order_id: "{{ event.key }}"
      total: "{{ event.value.total }}"
      min: "{{ config.min_total }}"
      fn: "{{ binding.function_id }}"
    payload_schema: {type: object, properties: {total: {maximum: 1000}}}
  signups:
    postgres: {dsn: "postgresql://127.0.0.1:5432/postgres", channels: [user_signup]}
"""

CASES = """\
# orders: a comment that must stay
tests:
  - name: kept as written   # its expectation is wrong on purpose: --update must not fix it
    source: orders.placed
    event: {key: o-1, value: {total: 50}}
    expect: {when: false}

  - name: new payload
    source: orders.placed
    binding:
      function_id: billing::on-order
    event:
      key: o-2
      value:
        total: 60   # trailing comment
    # a comment between cases
  - name: new filtered
    source: orders.placed
    config: {min_total: 100}
    event: {key: o-3, value: {total: 5}}
  - {name: flow style, source: signups}
  - name: new schema error
    source: orders.placed
    event:
      key: |
        o-4
      value: {total: 5000}
  - name: last, no newline at the end
    source: signups"""


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", out)
        mp.setattr("sys.stderr", err)
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "bridge.yaml").write_text(BRIDGE_YAML)
    tests = tmp_path / "bridge.test.yaml"
    tests.write_text(CASES)
    return tmp_path / "bridge.yaml", tests


def test_update_records_only_cases_without_expect_and_keeps_everything_else(files: tuple[Path, Path]) -> None:
    config, tests = files
    code, out, _ = _run("test", "-c", str(config), "--update")
    updated = tests.read_text()
    added = [line for line in updated.splitlines() if line not in CASES.splitlines()]
    # every original line is still there, in order: remove the added ones and the file is what it was
    remaining = [line for line in updated.splitlines() if line not in added]
    assert remaining == CASES.splitlines()
    assert added == [
        "    expect:",
        "      when: true",
        "      payload:",
        "        order_id: o-2",
        "        total: 60",
        "        min: 10",
        "        fn: billing::on-order",
        "    expect:",
        "      when: false",
        "    expect:",
        "      when: true",
        "      error: payload_schema_violation",
        "    expect:",
        "      when: true",
        "      payload:",
        "        id: render:signups",  # an event without a channel: `bridge render`'s id for it
        "        source: signups",
    ]
    assert yaml.safe_load(updated)["tests"][0]["expect"] == {"when": False}  # wrong, and left wrong
    assert "flow style" in out and "add its expect by hand" in out
    assert "recorded the expectation of 4 case(s): new payload, new filtered, new schema error, last" in out
    # the kept case still fails, the flow-style one has no expectation: exit 1, and the rest pass
    assert code == 1
    assert out.splitlines()[-1] == "4 passed, 2 failed"
    assert "FAIL kept as written" in out and "FAIL flow style" in out


def test_update_twice_changes_nothing_more(files: tuple[Path, Path]) -> None:
    config, tests = files
    _run("test", "-c", str(config), "--update")
    first = tests.read_text()
    code, out, _ = _run("test", "-c", str(config), "--update")
    assert tests.read_text() == first
    assert "recorded" not in out
    assert code == 1


def test_update_writes_nothing_when_the_file_has_errors(files: tuple[Path, Path]) -> None:
    config, tests = files
    broken = CASES.replace("    source: signups", "    source: nope")
    tests.write_text(broken)
    code, out, _ = _run("test", "-c", str(config), "--update")
    assert code == 1 and "error[unknown-source]" in out
    assert tests.read_text() == broken


def test_without_update_a_case_without_expect_fails_and_the_file_is_untouched(files: tuple[Path, Path]) -> None:
    config, tests = files
    code, out, _ = _run("test", "-c", str(config))
    assert code == 1
    assert "FAIL new payload\n    no expectation yet; `bridge test --update` records what the source produces\n" in out
    assert tests.read_text() == CASES

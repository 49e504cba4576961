"""bridge.config (and its helpers yamlpos, diagnostics): loading, every problem class with its exact text,
${VAR} substitution, merging, path resolution, schema defaults, redaction."""

from __future__ import annotations

import dataclasses
import inspect
import io
import logging
import textwrap
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiokafka  # the real consumer signature, for client_options
import pytest

from bridge import logs
from bridge.config import (
    DEFAULT_DEAD_LETTER_FILE,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_STATE_DIR,
    DeadLetterConfig,
    DeliveryConfig,
    EngineConfig,
    ObservabilityConfig,
    RetryConfig,
    check_config,
    load_config,
    redact,
    redact_dsn,
)
from bridge.config.diagnostics import Problem, format_path, summary
from bridge.config.schemas import bridge_schema
from bridge.config.yamlpos import decode_text, load_yaml
from bridge.errors import ConfigError
from bridge.sources.file.spec import FileSourceConfig
from bridge.sources.kafka.spec import CLIENT_OPTION_DEFAULTS, MANAGED_CLIENT_OPTIONS, KafkaSecurity, KafkaSourceConfig
from bridge.sources.postgres.spec import PostgresSourceConfig

Check = Callable[..., list[str]]


@pytest.fixture
def check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Check:
    """Write bridge.yaml into a fresh directory (the cwd) and return every problem as its text line."""
    monkeypatch.chdir(tmp_path)

    def run(text: str, env: Mapping[str, str] | None = None) -> list[str]:
        Path("bridge.yaml").write_text(textwrap.dedent(text))
        _, problems = check_config(Path("bridge.yaml"), env=env or {})
        return [p.format_text() for p in problems]

    return run


FAKE_PEM = "-----BEGIN CERTIFICATE-----\nnot checked beyond this line\n-----END CERTIFICATE-----\n"


def _load(tmp_path: Path, text: str, env: Mapping[str, str] | None = None) -> Any:
    path = tmp_path / "bridge.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path, env=env or {})


# --- yamlpos ------------------------------------------------------------------------------------------------

_DEEP = "the document is nested deeper than 64 levels here; flatten this part of the file"
_LARGE = "the number is too large (more than 1,000 digits)"



def test_positions_of_keys_and_values() -> None:
    doc, problems = load_yaml("a:\n  b: [x, {c: 1}]\n  d: |\n    one\n    two\n")
    assert problems == [] and doc is not None
    assert doc.data == {"a": {"b": ["x", {"c": 1}], "d": "one\ntwo\n"}}
    pos = doc.positions
    assert (pos.key(("a", "b")).line, pos.key(("a", "b")).col) == (2, 3)  # type: ignore[union-attr]
    assert (pos.at(("a", "b")).line, pos.at(("a", "b")).col) == (2, 6)
    assert (pos.at(("a", "b", 1, "c")).line, pos.at(("a", "b", 1, "c")).col) == (2, 14)
    assert pos.key_at(("a", "b", 1, "c")).col == 11
    assert pos.at(("a", "missing", "deeper")) == pos.at(("a",))  # nearest ancestor
    assert pos.in_text(("a", "d"), 2) == (5, 5, True)  # a `|` block maps line for line
    assert pos.in_text(("a", "b", 0), 1) == (2, 7, True)


def test_duplicate_keys_name_both_positions() -> None:
    doc, problems = load_yaml("a: 1\nb:\n  c: 1\n  c: 2\na: 3\n", "f.yaml")
    assert doc is not None and doc.data == {"a": 1, "b": {"c": 1}}
    assert [p.format_text() for p in problems] == [
        "f.yaml:4:3: error[duplicate-key] b.c: duplicate key; first defined at 3:3; a key may appear once per mapping",
        "f.yaml:5:1: error[duplicate-key] a: duplicate key; first defined at 1:1; a key may appear once per mapping",
    ]


def test_merge_keys_local_keys_win_then_earlier_mappings() -> None:
    doc, problems = load_yaml(
        "one: &one {a: 1, b: 1}\ntwo: &two {b: 2, c: 2}\nboth:\n  <<: [*one, *two]\n  c: 3\n"
    )
    assert problems == [] and doc is not None
    assert doc.data["both"] == {"a": 1, "b": 1, "c": 3}
    assert doc.positions.at(("both", "a")).line == 1  # where the merged value is written
    assert doc.positions.at(("both", "c")).line == 5
    assert doc.positions.at(("both",)).line == 4


def test_aliases_and_plain_keys() -> None:
    doc, problems = load_yaml("base: &b [1, 2]\ncopy: *b\non: yes\n1: x\nwhen: 2024-01-01\n")
    assert problems == [] and doc is not None
    assert doc.data == {"base": [1, 2], "copy": [1, 2], "on": True, "1": "x", "when": "2024-01-01"}
    doc.data["copy"].append(3)
    assert doc.data["base"] == [1, 2]  # an alias is a copy, not shared state


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a:\n\tb: 1\n",
         "f:2:1: error[yaml-syntax] a tab character here is not allowed; indent YAML with spaces, never tabs"),
        ("a: [1, 2\n",
         "f:2:1: error[yaml-syntax] while parsing a flow sequence, expected ',' or ']', but got '<stream end>'"),
        ("a: 1\n---\nb: 2\n",
         "f:2:1: error[yaml-syntax] expected a single document in the stream, but found another document; "
         "bridge.yaml holds one document; remove the extra '---'"),
        ("a: b: c\n",
         "f:1:5: error[yaml-syntax] mapping values are not allowed here; quote a value that contains ': '"),
        ("a: 1\nb: \x00\x01\x02\n",
         "f:2:4: error[yaml-syntax] control character U+0000 is not allowed in YAML; is it a binary file?"),
        ("a: &x [*x]\n", "f:1:4: error[yaml-syntax] a[0]: recursive alias: this value contains itself"),
        ("a: !!binary aGk=\n",
         "f:1:4: error[yaml-syntax] a: unsupported tag !!binary; only plain mappings, lists, strings, numbers, "
         "booleans and null are allowed"),
        ("a: !!python/name:os.system x\n",
         "f:1:4: error[yaml-syntax] a: unsupported tag !!python/name:os.system; "
         "only plain mappings, lists, strings, numbers, booleans and null are allowed"),
        ("? [a, b]\n: 1\n", "f:1:3: error[yaml-syntax] a key must be a plain string, not a list or mapping"),
        ("a: {<<: 1}\n", "f:1:9: error[yaml-syntax] a: a merge key (<<) takes a mapping or a list of mappings; "
         "write <<: *anchor, where the anchor names a mapping"),
        ("a: " + "[" * 600 + "]" * 600 + "\n", f"f:1:68: error[yaml-syntax] {_DEEP}"),  # the 65th [
        ("a: " + "[" * 100_000 + "\n", f"f:1:68: error[yaml-syntax] {_DEEP}"),
        ("a: " + "{b: " * 70 + "1" + "}" * 70 + "\n", f"f:1:257: error[yaml-syntax] {_DEEP}"),
        ("".join("  " * i + "k:\n" for i in range(100)), f"f:65:129: error[yaml-syntax] {_DEEP}"),
        ("a: " + "9" * 1001 + "\n", f"f:1:4: error[value] a: {_LARGE}"),
        ("a: [-0x" + "f" * 1000 + "]\n", f"f:1:5: error[value] a[0]: {_LARGE}"),
        ("a: " + "9" * 5000 + "\n", f"f:1:4: error[value] a: {_LARGE}"),  # beyond what int() reads at all
    ],
)
def test_yaml_problems(text: str, expected: str) -> None:
    _, problems = load_yaml(text, "f")
    assert [p.format_text() for p in problems] == [expected]


_NOT_TEXT = ("holds a lone surrogate escape (\\ud800-\\udfff), which is not a character; "
             "write the character itself, or \\U0001F600 for one beyond \\uFFFF")


def test_lone_surrogates_are_refused_and_pairs_joined() -> None:
    doc, problems = load_yaml('a: "\\ud83d\\ude00"\nb: "x\\ud800"\n"\\udc80": 1\n', "f")
    assert [p.format_text() for p in problems] == [
        f"f:2:4: error[value] b: the text {_NOT_TEXT}",
        f"f:3:1: error[yaml-syntax] the key {_NOT_TEXT}",
    ]
    assert doc is not None and doc.data == {"a": "\U0001f600", "b": None}


def test_an_environment_value_that_is_not_utf8_is_refused(check: Check) -> None:
    # os.environ keeps the bytes of a value that is not UTF-8 as lone surrogates
    assert check("version: 1\nsources: {s: {file: {path: .}, description: '${D}'}}\n", env={"D": "caf\udce9"}) == [
        "bridge.yaml:2:45: error[value] sources.s.description: the substituted value is not UTF-8 text",
    ]


def test_limits_leave_real_documents_alone() -> None:
    doc, problems = load_yaml("a: " + "[" * 63 + "]" * 63 + "\nb: " + "9" * 1000 + "\n", "f")
    assert problems == [] and doc is not None
    assert doc.data["b"] == int("9" * 1000)


def test_nesting_through_aliases_is_blamed_on_the_alias() -> None:
    lines = ["a0: &a0 [x]", *(f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, 70))]
    doc, problems = load_yaml("\n".join(lines) + "\n", "f")
    assert doc is None
    assert [p.format_text() for p in problems] == [f"f:64:1: error[yaml-syntax] a63: {_DEEP}"]


def test_alias_bomb_is_stopped() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    doc, problems = load_yaml("\n".join(lines) + "\n", "f")
    assert doc is None
    assert [p.message for p in problems] == ["the document expands to more than 100000 values (an alias bomb?)"]


def test_decode_text() -> None:
    assert decode_text("é: 1\n".encode()) == ("é: 1\n", [])
    assert decode_text(b"\xef\xbb\xbfa: 1\n") == ("a: 1\n", [])
    assert decode_text("a: 1\n".encode("utf-16")) == ("a: 1\n", [])
    text, problems = decode_text(b"a: 1\nb: caf\xe9\n", "f")
    assert text is None
    assert [p.format_text() for p in problems] == [
        "f:2:7: error[yaml-syntax] the file is not UTF-8 text (byte 0xe9 cannot be decoded); is it a binary file?"
    ]


# --- diagnostics --------------------------------------------------------------------------------------------


def test_problem_text_and_json() -> None:
    problem = Problem("unknown-key", "sources.orders.kafka.topik", "unknown key", "did you mean 'topics'?",
                      14, 7, "bridge.yaml")
    assert problem.format_text() == (
        "bridge.yaml:14:7: error[unknown-key] sources.orders.kafka.topik: unknown key; did you mean 'topics'?"
    )
    assert problem.to_json() == {
        "file": "bridge.yaml", "line": 14, "col": 7, "severity": "error", "code": "unknown-key",
        "path": "sources.orders.kafka.topik", "message": "unknown key", "hint": "did you mean 'topics'?",
    }
    warning = Problem("path-missing", "a", "gone", severity="warning", file="x.yaml")
    assert warning.format_text() == "x.yaml: warning[path-missing] a: gone"
    assert Problem("type", "", "the file is empty", line=1, col=1).format_text() == "1:1: error[type] the file is empty"
    assert summary([problem, warning, problem]) == "2 errors, 1 warning"
    assert summary([warning]) == "1 warning"
    assert summary([]) == "no problems"
    assert format_path(["sources", "a.b", "topics", 0]) == "sources.a.b.topics[0]"


# --- ${VAR} -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("${PORT:9092}", {}, 9092),
        ("${PORT:9092}", {"PORT": "1"}, 1),
        ("'${PORT:9092}'", {}, 9092),  # quoting does not matter: one reference is read as a YAML scalar
        ("${DEBUG:false}", {}, False),
        ("${RATIO:1.5}", {}, 1.5),
        ("${X:null}", {}, None),
        ("${X:}", {}, None),
        ("${A}", {"A": ""}, None),  # set but empty is used (not the default); empty reads as null
        ("${A:default}", {"A": ""}, None),
        ("${URL:ws://127.0.0.1:49134}", {}, "ws://127.0.0.1:49134"),  # the default runs to the `}`
        ("${A:[1, 2]}", {}, "[1, 2]"),  # a value never changes the document's structure
        ("${A}", {"A": "{a: 1}"}, "{a: 1}"),
        ("${D:2024-01-01}", {}, "2024-01-01"),
        ("port-${PORT:1}", {}, "port-1"),  # not exactly one reference: a string
        ("${A}${B}", {"A": "1", "B": "2"}, "12"),
        ("'${A} '", {"A": "1"}, "1 "),
        ("$${A}", {"A": "x"}, "${A}"),
        ("cost $5 and $$", {}, "cost $5 and $$"),
        ("${A}", {"A": "${B}", "B": "no"}, "${B}"),  # substituted text is not substituted again
        ("'{{ event.id }}-${A:x}'", {}, "{{ event.id }}-x"),
    ],
)
def test_env_substitution(tmp_path: Path, written: str, env: dict[str, str], expected: Any) -> None:
    config = _load(tmp_path, f"""\
        version: 1
        sources:
          s:
            file: {{path: .}}
            payload:
              v: {written}
        """, env)
    assert config.sources[0].payload == {"v": expected}


def test_env_defaults_to_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_TEST_URL", "wss://engine.example:443")
    path = tmp_path / "bridge.yaml"
    path.write_text("version: 1\nengine: {url: '${BRIDGE_TEST_URL}'}\nsources: {s: {file: {path: .}}}\n")
    assert load_config(path).engine.url == "wss://engine.example:443"


def test_env_problems(check: Check) -> None:
    assert check("""\
        version: 1
        defaults:
          max_in_flight: ${MAX}
        sources:
          s:
            file: {path: "${DIR"}
            description: "${1BAD}"
        """) == [
        "bridge.yaml:3:18: error[env-undefined] defaults.max_in_flight: environment variable MAX is not set; "
        "set it, or give a default: ${MAX:value}",
        "bridge.yaml:6:18: error[env-syntax] sources.s.file.path: unterminated ${ reference; "
        "write $${ for a literal ${",
        "bridge.yaml:7:18: error[env-syntax] sources.s.description: invalid variable name '1BAD' in ${...}; "
        "names are letters, digits and _; write $${ for a literal ${",
    ]


# --- every problem class, exact text ------------------------------------------------------------------------


def test_several_problems_are_reported_at_once(check: Check, tmp_path: Path) -> None:
    Path("notadir.txt").write_text("x")
    assert check("""\
        version: 2
        engine:
          url: http://x
          worker_nam: w
        observability:
          log_format: jsn
          extra: 1
        defaults:
          delivery:
            timeout_ms: -5
            retry:
              max_attempts: zero
        sources:
          orders:
            kafka:
              topics: [orders, orders]
            max_in_flight: 0
          files:
            file:
              path: notadir.txt
          nokind:
            description: 5
        """) == [
        "bridge.yaml:1:10: error[value] version: must be 1, got 2; this bridge reads version: 1",
        "bridge.yaml:3:8: error[value] engine.url: 'http://x' does not match ^wss?://",
        "bridge.yaml:4:3: error[unknown-key] engine.worker_nam: unknown key; did you mean 'worker_name'?",
        "bridge.yaml:6:15: error[value] observability.log_format: 'jsn' is not one of: text, json; "
        "did you mean 'json'?",
        "bridge.yaml:7:3: error[unknown-key] observability.extra: unknown key; allowed: listen, log_format",
        "bridge.yaml:10:17: error[value] defaults.delivery.timeout_ms: must be at least 1, got -5",
        "bridge.yaml:12:21: error[type] defaults.delivery.retry.max_attempts: expected an integer, got 'zero'",
        "bridge.yaml:15:5: error[missing-key] sources.orders.kafka: missing required key 'bootstrap_servers'",
        "bridge.yaml:16:15: error[value] sources.orders.kafka.topics: 'orders' is listed more than once",
        "bridge.yaml:17:20: error[value] sources.orders.max_in_flight: must be at least 1, got 0",
        f"bridge.yaml:20:13: error[path-not-dir] sources.files.file.path: {tmp_path / 'notadir.txt'} "
        "is not a directory",
        "bridge.yaml:21:3: error[source-kind] sources.nokind: no source kind; "
        "set exactly one of: kafka, postgres, file",
        "bridge.yaml:22:18: error[type] sources.nokind.description: expected a string, got 5",
    ]


def test_whole_file_problems(check: Check, tmp_path: Path) -> None:
    assert check("") == [
        "bridge.yaml:1:1: error[type] the file is empty; start with 'version: 1' and a 'sources:' mapping"
    ]
    assert check("# only a comment\n") == [
        "bridge.yaml:1:1: error[type] the file is empty; start with 'version: 1' and a 'sources:' mapping"
    ]
    assert check("- version: 1\n") == [
        "bridge.yaml:1:1: error[type] the top level must be a mapping, not a list; "
        "start with 'version: 1' and a 'sources:' mapping"
    ]
    assert check("{}\n") == [
        "bridge.yaml:1:1: error[missing-key] missing required key 'version'",
        "bridge.yaml:1:1: error[missing-key] missing required key 'sources'",
    ]
    assert check("version: 1\nsources: {}\n") == ["bridge.yaml:2:10: error[value] sources: must have at least 1 entry"]
    assert check("version: 1\nsources:\n  a:\n  b: []\n") == [
        "bridge.yaml:3:5: error[type] sources.a: expected a mapping, got null",
        "bridge.yaml:4:6: error[type] sources.b: expected a mapping, got a list",
    ]
    _, problems = check_config(tmp_path / "nope.yaml")
    assert [p.format_text() for p in problems] == [f"{tmp_path / 'nope.yaml'}: error[file-unreadable] no such file"]
    _, problems = check_config(tmp_path)
    assert [p.code for p in problems] == ["file-unreadable"]


def test_type_messages(check: Check) -> None:
    assert check("""\
        version: 1
        engine: {url: 5, worker_name: [a], reconcile_interval_ms: 1.5}
        observability: [x]
        sources:
          s:
            file: {path: ., recursive: "yes", include: "*.json"}
        """) == [
        "bridge.yaml:2:15: error[type] engine.url: expected a string, got 5",
        "bridge.yaml:2:31: error[type] engine.worker_name: expected a string or null, got a list",
        "bridge.yaml:2:59: error[type] engine.reconcile_interval_ms: expected an integer, got 1.5",
        "bridge.yaml:3:16: error[type] observability: expected a mapping, got a list",
        "bridge.yaml:6:32: error[type] sources.s.file.recursive: expected true or false, got 'yes'",
        "bridge.yaml:6:48: error[type] sources.s.file.include: expected a list, got '*.json'",
    ]


def test_a_typo_is_one_problem(check: Check) -> None:
    """`topcis:` and `kafak:` get their "did you mean", not also "missing topics" / "no source kind"."""
    assert check("""\
        version: 1
        sources:
          a:
            kafka:
              bootstrap_servers: k:9092
              topcis: [orders]
          b:
            kafak: {}
          c:
            file: {pth: .}
        """) == [
        "bridge.yaml:6:7: error[unknown-key] sources.a.kafka.topcis: unknown key; did you mean 'topics'?",
        "bridge.yaml:8:5: error[unknown-key] sources.b.kafak: unknown key; did you mean 'kafka'?",
        "bridge.yaml:10:12: error[unknown-key] sources.c.file.pth: unknown key; did you mean 'path'?",
    ]


def test_source_kind_and_id(check: Check) -> None:
    assert check("""\
        version: 1
        sources:
          "bad id!":
            file: {path: .}
          two:
            file: {path: .}
            postgres: {dsn: x, channels: [c]}
          .hidden:
            description: nothing
        """) == [
        "bridge.yaml:3:3: error[source-id] sources.bad id!: 'bad id!' is not a valid trigger type id; "
        "use letters, digits and _ . : -, starting with a letter or digit",
        "bridge.yaml:7:5: error[source-kind] sources.two.postgres: a source has exactly one kind; "
        "found file and postgres; split it into one source per kind",
        "bridge.yaml:8:3: error[source-id] sources..hidden: '.hidden' is not a valid trigger type id; "
        "use letters, digits and _ . : -, starting with a letter or digit",
        "bridge.yaml:8:3: error[source-kind] sources..hidden: no source kind; "
        "set exactly one of: kafka, postgres, file",
    ]


def test_kafka_rules(check: Check) -> None:
    assert check("""\
        version: 1
        sources:
          neither:
            kafka: {bootstrap_servers: k}
          both:
            kafka:
              bootstrap_servers: k
              topics: [a]
              topic_pattern: "a.*"
          regex:
            kafka: {bootstrap_servers: k, topic_pattern: "orders(", topics: []}
          names:
            kafka:
              bootstrap_servers: k
              topics: ["has space"]
              client_options:
                sesion_timeout_ms: 1
                group_id: g
                zzz: 1
                max_poll_records: 0
        """) == [
        "bridge.yaml:4:5: error[missing-key] sources.neither.kafka: missing topics (or topic_pattern); "
        "name the topics to consume: topics: [orders]",
        "bridge.yaml:9:7: error[value] sources.both.kafka.topic_pattern: set either topics or topic_pattern, not both",
        "bridge.yaml:11:50: error[value] sources.regex.kafka.topic_pattern: not a valid regular expression: "
        "missing ), unterminated subpattern at position 6",
        "bridge.yaml:15:16: error[value] sources.names.kafka.topics[0]: 'has space' does not match "
        "^[A-Za-z0-9._-]{1,249}$",
        "bridge.yaml:17:9: error[unknown-key] sources.names.kafka.client_options.sesion_timeout_ms: unknown key; "
        "did you mean 'session_timeout_ms'?",
        "bridge.yaml:18:9: error[unknown-key] sources.names.kafka.client_options.group_id: not allowed in "
        "client_options; set kafka.group_id instead",
        "bridge.yaml:19:9: error[unknown-key] sources.names.kafka.client_options.zzz: unknown key; "
        "21 keys are allowed here; `bridge schema` lists them",
        "bridge.yaml:20:27: error[value] sources.names.kafka.client_options.max_poll_records: must be at least 1, "
        "got 0",
    ]


def test_kafka_security_rules(check: Check, tmp_path: Path) -> None:
    Path("ca.pem").write_text(FAKE_PEM)
    Path("certs").mkdir()
    assert check("""\
        version: 1
        sources:
          plain:
            kafka:
              bootstrap_servers: k
              topics: [a]
              security: {username: u, sasl_mechanism: PLAIN, ca_file: ca.pem}
          sasl:
            kafka:
              bootstrap_servers: k
              topics: [a]
              security:
                protocol: SASL_SSL
                sasl_mechanism: SCRAM-SHA-1
                ca_file: ca.pem
                cert_file: certs
          tls:
            kafka:
              bootstrap_servers: k
              topics: [a]
              security: {protocol: SSL, ca_file: missing.pem, key_file: ca.pem}
        """) == [
        "bridge.yaml:7:18: error[value] sources.plain.kafka.security.username: only used with protocol "
        "SASL_PLAINTEXT or SASL_SSL; protocol is PLAINTEXT",
        "bridge.yaml:7:31: error[value] sources.plain.kafka.security.sasl_mechanism: only used with protocol "
        "SASL_PLAINTEXT or SASL_SSL; protocol is PLAINTEXT",
        "bridge.yaml:7:54: error[value] sources.plain.kafka.security.ca_file: only used with protocol SSL or "
        "SASL_SSL; protocol is PLAINTEXT",
        "bridge.yaml:12:7: error[missing-key] sources.sasl.kafka.security: protocol SASL_SSL needs username",
        "bridge.yaml:12:7: error[missing-key] sources.sasl.kafka.security: protocol SASL_SSL needs password",
        "bridge.yaml:12:7: error[missing-key] sources.sasl.kafka.security: cert_file and key_file go together; "
        "key_file is missing",
        "bridge.yaml:14:25: error[value] sources.sasl.kafka.security.sasl_mechanism: 'SCRAM-SHA-1' is not one of: "
        "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, null; did you mean 'SCRAM-SHA-512'?",
        f"bridge.yaml:16:20: error[file-missing] sources.sasl.kafka.security.cert_file: {tmp_path / 'certs'} "
        "is a directory, not a file",
        "bridge.yaml:21:7: error[missing-key] sources.tls.kafka.security: cert_file and key_file go together; "
        "cert_file is missing",
        f"bridge.yaml:21:42: error[file-missing] sources.tls.kafka.security.ca_file: no such file: "
        f"{tmp_path / 'missing.pem'}",
        f"bridge.yaml:21:65: error[value] sources.tls.kafka.security.key_file: {tmp_path / 'ca.pem'} holds no PEM "
        "private key (no -----BEGIN PRIVATE KEY----- line)",
    ]


def test_postgres_rules(check: Check) -> None:
    assert check("""\
        version: 1
        sources:
          outbox:
            postgres: {dsn: x, mode: outbox}
          listen:
            postgres: {dsn: x, outbox_table: t}
          badname:
            postgres: {dsn: x, mode: outbox, outbox_table: "drop table x;"}
          qualified:
            postgres: {dsn: x, mode: outbox, outbox_table: app.bridge_outbox, channels: [a]}
        """) == [
        "bridge.yaml:4:5: error[missing-key] sources.outbox.postgres: mode: outbox needs outbox_table; "
        "bridge sql SOURCE prints the table's DDL",
        "bridge.yaml:6:5: error[missing-key] sources.listen.postgres: mode: listen needs at least one channel in "
        "channels",
        "bridge.yaml:6:24: error[value] sources.listen.postgres.outbox_table: only used with mode: outbox",
        "bridge.yaml:8:52: error[value] sources.badname.postgres.outbox_table: 'drop table x;' is not a plain SQL "
        "table name; letters, digits and _, optionally schema-qualified: app.bridge_outbox",
    ]


def test_file_rules(check: Check, tmp_path: Path) -> None:
    assert check("""\
        version: 1
        sources:
          missing:
            file: {path: ./inbox}
          move:
            file: {path: ., after_delivery: move}
          keep:
            file: {path: ., move_to: done, changes: [created, renamed]}
        """) == [
        f"bridge.yaml:4:18: warning[path-missing] sources.missing.file.path: {tmp_path / 'inbox'} does not exist; "
        "it will be created when the bridge starts",
        "bridge.yaml:6:5: error[missing-key] sources.move.file: after_delivery: move needs move_to",
        "bridge.yaml:8:21: error[value] sources.keep.file.move_to: only used with after_delivery: move",
        "bridge.yaml:8:55: error[value] sources.keep.file.changes[1]: 'renamed' is not one of: created, modified, "
        "deleted",
    ]


def test_delivery_rules(check: Check) -> None:
    assert check("""\
        version: 1
        defaults:
          delivery:
            mode: enqueue
            dead_letter: {file: a.jsonl, kafka_topic: dlq}
            retry: {initial_backoff_ms: 500, max_backoff_ms: 100}
        sources:
          inherits:
            file: {path: .}
          own:
            file: {path: .}
            delivery:
              mode: sync
              queue: q
              dead_letter: {kafka_topic: dlq}
          pg:
            postgres: {dsn: x, channels: [c]}
            delivery: {queue: q, dead_letter: {postgres_table: "x y"}}
        """) == [
        "bridge.yaml:3:3: error[missing-key] defaults.delivery: mode: enqueue needs a queue",
        "bridge.yaml:4:11: warning[enqueue-observe] defaults.delivery.mode: enqueue has no equivalent for "
        "observers: on an engine with observe.v1 (iii 0.25 and later) the bridge delivers to its observers with "
        "sync instead; keep it for an engine before 0.25, choose sync or void for a newer one",
        "bridge.yaml:5:5: error[value] defaults.delivery.dead_letter: set exactly one of file, kafka_topic, "
        "postgres_table (found file and kafka_topic)",
        "bridge.yaml:6:54: error[value] defaults.delivery.retry.max_backoff_ms: max_backoff_ms (100) is less than "
        "initial_backoff_ms (500)",
        "bridge.yaml:8:3: error[value] sources.inherits: the default dead_letter: a kafka_topic dead letter needs a "
        "kafka source (it is written with the source's connection); give this source its own delivery.dead_letter",
        "bridge.yaml:14:7: error[value] sources.own.delivery.queue: only used with mode: enqueue",
        "bridge.yaml:15:21: error[value] sources.own.delivery.dead_letter.kafka_topic: a kafka_topic dead letter "
        "needs a kafka source (it is written with the source's connection)",
        "bridge.yaml:18:56: error[value] sources.pg.delivery.dead_letter.postgres_table: 'x y' is not a plain SQL "
        "table name",
    ]


def test_schema_problems(check: Check) -> None:
    Path("schemas").mkdir()
    Path("schemas/bad.json").write_text('{\n  "type": "object",\n}\n')
    Path("schemas/wrong.json").write_text('{\n  "type": "object",\n  "properties": {"n": {"type": "numbr"}},\n'
                                          '  "requird": ["n"]\n}\n')
    Path("schemas/list.json").write_text("[1]\n")
    Path("schemas/defs.json").write_text('{"$defs": {"order": {"type": "object"}}}\n')
    assert check("""\
        version: 1
        sources:
          a:
            file: {path: .}
            bind_schema: {$ref: schemas/missing.json}
            payload_schema: {$ref: schemas/bad.json}
          b:
            file: {path: .}
            bind_schema: {$ref: schemas/wrong.json}
            payload_schema: {$ref: schemas/list.json}
          c:
            file: {path: .}
            bind_schema: {$ref: "schemas/defs.json#/$defs/nope"}
            payload_schema: {$ref: "schemas/defs.json#/$defs/order"}
          d:
            file: {path: .}
            bind_schema:
              type: string
              properties:
                x: {$ref: other.json}
            payload_schema: {type: objekt}
          e:
            file: {path: .}
            bind_schema: [1]
        """) == [
        "bridge.yaml:5:25: error[schema-ref] sources.a.bind_schema.$ref: cannot load schemas/missing.json: "
        "no such file",
        "bridge.yaml:6:28: error[schema-ref] sources.a.payload_schema.$ref: cannot load schemas/bad.json: not valid "
        "JSON: Expecting property name enclosed in double quotes (line 3, column 1)",
        "bridge.yaml:10:28: error[bind-schema-invalid] sources.b.payload_schema.$ref: schemas/list.json must be a JSON "
        "object (a schema)",
        "bridge.yaml:13:25: error[schema-ref] sources.c.bind_schema.$ref: cannot load schemas/defs.json: "
        "#/$defs/nope does not exist in the file",
        "bridge.yaml:17:5: error[bind-schema-invalid] sources.d.bind_schema: a bind_schema must describe an object; "
        "add type: object (a bind config is a mapping of options)",
        "bridge.yaml:20:19: error[schema-ref] sources.d.bind_schema.properties.x.$ref: 'other.json': a schema may "
        "only reference its own parts (#/...); use $defs for shared parts; only a whole schema can come from a file",
        "bridge.yaml:21:28: error[bind-schema-invalid] sources.d.payload_schema.type: 'objekt' is not a JSON Schema "
        "type; did you mean 'object'?",
        "bridge.yaml:24:18: error[type] sources.e.bind_schema: expected a mapping or null, got a list",
        "schemas/wrong.json:3:32: error[bind-schema-invalid] properties.n.type: 'numbr' is not a JSON Schema type; "
        "did you mean 'number'?",
        "schemas/wrong.json:4:3: warning[schema-keyword] requird: unknown JSON Schema keyword 'requird' (validation "
        "ignores it); did you mean 'required'?",
    ]


def test_template_problems(check: Check) -> None:
    assert check("""\
        version: 1
        sources:
          s:
            file: {path: .}
            when: "{{ event.size > }}"
            payload:
              flow: "{{ event.name | nofilter }}"
              items: ["ok", "{{ x }"]
              block: |
                first {{ event.name }}
                {% if event.size %}
                {{ event.size }
                {% endif %}
        """) == [
        "bridge.yaml:5:11: error[template-syntax] sources.s.when: unexpected 'end of print statement'",
        "bridge.yaml:7:13: error[template-syntax] sources.s.payload.flow: No filter named 'nofilter'.",
        "bridge.yaml:8:21: error[template-syntax] sources.s.payload.items[1]: unexpected '}'",
        "bridge.yaml:12:9: error[template-syntax] sources.s.payload.block: unexpected '}'",
    ]


# --- building the dataclasses -------------------------------------------------------------------------------


FULL = """\
    version: 1
    engine:
      url: ${III_URL:ws://127.0.0.1:49134}
      worker_name: w1
      reconcile_interval_ms: 5000
    state_dir: ../state
    observability: {listen: "127.0.0.1:9464", log_format: json}
    defaults:
      delivery:
        mode: sync
        timeout_ms: 1000
        retry: {max_attempts: 3, multiplier: 3}
        dead_letter: {file: dl/all.jsonl}
      max_in_flight: 8
    sources:
      orders.placed:
        description: Orders
        kafka:
          bootstrap_servers: ${KAFKA:k1:9092,k2:9092}
          topics: [orders, returns]
          security:
            protocol: SASL_SSL
            sasl_mechanism: SCRAM-SHA-512
            username: bridge
            password: ${KAFKA_PASSWORD}
            ca_file: certs/ca.pem
          client_options: {session_timeout_ms: 3000}
        delivery:
          timeout_ms: 2000
          retry: {initial_backoff_ms: 50}
        max_in_flight: 2
        bind_schema: {$ref: schemas/bind.json}
        when: "{{ config.on }}"
        payload: {id: "{{ event.key }}", n: 1}
      signups:
        postgres:
          dsn: postgresql://app:secret@db/app
          mode: outbox
          outbox_table: app.outbox
        delivery:
          mode: enqueue
          queue: signups
          dead_letter: {postgres_table: app.dead}
      inbox:
        file:
          path: ./inbox
          include: ["*.json"]
          after_delivery: move
          move_to: /absolute/done
        delivery:
          dead_letter: {file: /var/dl.jsonl}
    """


@pytest.fixture
def full(tmp_path: Path) -> Any:
    base = tmp_path / "conf"
    (base / "schemas").mkdir(parents=True)
    (base / "certs").mkdir()
    (base / "certs" / "ca.pem").write_text(FAKE_PEM)
    (base / "schemas" / "bind.json").write_text('{"type": "object", "properties": {"on": {"default": true}}}')
    return _load(base, FULL, {"KAFKA_PASSWORD": "s3cret"})


def test_build_engine_state_and_defaults(full: Any, tmp_path: Path) -> None:
    base = tmp_path / "conf"
    assert full.path == base / "bridge.yaml"
    assert full.version == 1
    assert full.engine == EngineConfig("ws://127.0.0.1:49134", "w1", None, 5000)
    assert full.state_dir == tmp_path / "state"
    assert full.observability == ObservabilityConfig("127.0.0.1:9464", "json")
    assert full.defaults == DeliveryConfig(
        mode="sync", queue=None, timeout_ms=1000, retry=RetryConfig(max_attempts=3, multiplier=3.0),
        dead_letter=DeadLetterConfig(file=tmp_path / "state" / "dl" / "all.jsonl"),
    )
    assert isinstance(full.defaults.retry.multiplier, float)
    assert full.default_max_in_flight == 8
    assert [s.id for s in full.sources] == ["orders.placed", "signups", "inbox"]
    assert [s.line for s in full.sources] == [16, 35, 44]


def test_build_merges_delivery_over_defaults(full: Any, tmp_path: Path) -> None:
    orders, signups, inbox = full.sources
    assert orders.delivery == DeliveryConfig(
        mode="sync", timeout_ms=2000,
        retry=RetryConfig(max_attempts=3, initial_backoff_ms=50, multiplier=3.0),  # nested keys merge too
        dead_letter=DeadLetterConfig(file=tmp_path / "state" / "dl" / "all.jsonl"),
    )
    assert orders.max_in_flight == 2 and signups.max_in_flight == 8
    # dead_letter names one destination, so a source's own replaces the default one as a whole
    assert signups.delivery.dead_letter == DeadLetterConfig(postgres_table="app.dead")
    assert (signups.delivery.mode, signups.delivery.queue, signups.delivery.timeout_ms) == ("enqueue", "signups", 1000)
    assert inbox.delivery.dead_letter == DeadLetterConfig(file=Path("/var/dl.jsonl"))


def test_build_kinds(full: Any, tmp_path: Path) -> None:
    orders, signups, inbox = full.sources
    base = tmp_path / "conf"
    assert orders.kind == "kafka" and orders.description == "Orders"
    assert orders.kind_config == KafkaSourceConfig(
        bootstrap_servers="k1:9092,k2:9092", topics=("orders", "returns"), group_id="iii-bridge.orders.placed",
        security=KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", "bridge", "s3cret", base / "certs" / "ca.pem"),
        client_options={"session_timeout_ms": 3000},
    )
    assert orders.bind_schema == {"type": "object", "properties": {"on": {"default": True}}}
    assert orders.payload_schema is None
    assert orders.when == "{{ config.on }}"
    assert orders.payload == {"id": "{{ event.key }}", "n": 1}
    assert signups.kind_config == PostgresSourceConfig(
        dsn="postgresql://app:secret@db/app", mode="outbox", outbox_table="app.outbox",
    )
    assert signups.description == "" and signups.payload is None and signups.bind_schema is None
    assert inbox.kind_config == FileSourceConfig(
        path=base / "inbox", include=("*.json",), after_delivery="move", move_to=Path("/absolute/done"),
    )
    assert full.source("inbox") is inbox
    with pytest.raises(KeyError):
        full.source("nope")


def test_build_minimal_config_uses_dataclass_defaults(tmp_path: Path) -> None:
    config = _load(tmp_path, "version: 1\nsources: {s: {kafka: {bootstrap_servers: k, topic_pattern: 'a.*'}}}\n")
    assert config.engine == EngineConfig()
    assert config.observability == ObservabilityConfig()
    assert config.state_dir == tmp_path / DEFAULT_STATE_DIR
    assert config.default_max_in_flight == DEFAULT_MAX_IN_FLIGHT
    dead_letter = DeadLetterConfig(file=tmp_path / DEFAULT_STATE_DIR / DEFAULT_DEAD_LETTER_FILE)
    assert config.defaults == DeliveryConfig(dead_letter=dead_letter)
    source = config.sources[0]
    assert source.delivery == config.defaults and source.max_in_flight == DEFAULT_MAX_IN_FLIGHT
    assert source.kind_config == KafkaSourceConfig(bootstrap_servers="k", topic_pattern="a.*", group_id="iii-bridge.s")
    assert source.bind_schema is None and source.when is None and source.payload is None


def test_relative_paths_follow_the_config_file_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "bridge.yaml").write_text(
        "version: 1\nstate_dir: ~/bridge-state\nsources: {s: {file: {path: in}}}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_config(Path("etc/bridge.yaml"))
    assert config.path == tmp_path / "etc" / "bridge.yaml"
    assert config.state_dir == tmp_path / "home" / "bridge-state"
    assert config.sources[0].kind_config.path == tmp_path / "etc" / "in"  # type: ignore[union-attr]


def test_load_config_raises_every_error_and_passes_warnings(tmp_path: Path) -> None:
    config = _load(tmp_path, "version: 1\nsources: {s: {file: {path: missing-dir}}}\n")
    assert config.sources[0].id == "s"
    (tmp_path / "bridge.yaml").write_text("version: 1\nsources: {s: {file: {path: missing-dir}}, t: {}}\nx: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "bridge.yaml")
    assert [p.code for p in caught.value.problems] == ["source-kind", "unknown-key"]
    assert str(caught.value).splitlines() == [p.format_text() for p in caught.value.problems]


# --- the schema and the dataclasses agree -------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _dataclass_defaults(cls: type) -> dict[str, Any]:
    found = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            found[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            found[f.name] = _plain(f.default_factory())
    return found


@pytest.mark.parametrize(
    ("cls", "pointer", "loader_only"),
    [
        (EngineConfig, "engine", set()),
        (ObservabilityConfig, "observability", set()),
        (DeliveryConfig, "delivery", set()),
        (RetryConfig, "retry", set()),
        (DeadLetterConfig, "dead_letter", set()),
        (KafkaSourceConfig, "source-kafka", set()),
        (KafkaSecurity, "source-kafka/$defs/security", set()),
        (PostgresSourceConfig, "source-postgres", set()),
        (FileSourceConfig, "source-file", set()),
    ],
)
def test_schema_defaults_equal_dataclass_defaults(cls: type, pointer: str, loader_only: set[str]) -> None:
    node: Any = bridge_schema()["$defs"]
    for part in pointer.split("/"):
        node = node[part]
    properties = node["properties"]
    assert set(properties) == {f.name for f in dataclasses.fields(cls)} - loader_only
    defaults = _dataclass_defaults(cls)
    for name, sub in properties.items():
        if "$ref" in sub:  # a nested object: its own parametrized case checks its defaults
            continue
        if "default" in sub:
            assert name in defaults, f"{cls.__name__}.{name} has a schema default but none in the dataclass"
            assert sub["default"] == defaults[name], f"{cls.__name__}.{name}"
            assert type(sub["default"]) is type(defaults[name]), f"{cls.__name__}.{name}"
        else:
            assert name not in defaults or name in ("file", "kafka_topic", "postgres_table"), (
                f"{cls.__name__}.{name} has a dataclass default the schema does not state"
            )


def test_schema_top_level_defaults_equal_the_loader_constants() -> None:
    schema = bridge_schema()
    assert schema["properties"]["state_dir"]["default"] == DEFAULT_STATE_DIR
    assert schema["$defs"]["defaults"]["properties"]["max_in_flight"]["default"] == DEFAULT_MAX_IN_FLIGHT
    assert schema["$defs"]["dead_letter"]["default"] == {"file": DEFAULT_DEAD_LETTER_FILE}


def test_client_options_are_the_consumer_arguments_the_bridge_does_not_set() -> None:
    signature = inspect.signature(aiokafka.AIOKafkaConsumer.__init__)
    arguments = {name: p.default for name, p in signature.parameters.items() if name not in ("self", "topics")}
    allowed = bridge_schema()["$defs"]["source-kafka"]["$defs"]["client_options"]["properties"]
    assert set(allowed) | set(MANAGED_CLIENT_OPTIONS) == set(arguments)
    assert not set(allowed) & set(MANAGED_CLIENT_OPTIONS)
    for name, sub in allowed.items():
        if "default" in sub:  # the client's default, or the one the bridge sets instead
            assert sub["default"] == CLIENT_OPTION_DEFAULTS.get(name, arguments[name]), name
    assert set(CLIENT_OPTION_DEFAULTS) <= set(allowed)


# --- redaction ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://app:s3cret@db:5432/app", "postgresql://app:***@db:5432/app"),
        ("postgresql://app:p@ss@db/app?sslmode=require", "postgresql://app:***@db/app?sslmode=require"),
        ("postgresql://app@db/app", "postgresql://app@db/app"),
        ("postgresql://db/app?user=app&password=s3cret", "postgresql://db/app?user=app&password=***"),
        ("host=db user=app password=s3cret dbname=app", "host=db user=app password=*** dbname=app"),
        ("host=db password='with space' dbname=app", "host=db password=*** dbname=app"),
        ("sslpassword=x", "sslpassword=***"),
        ("ws://127.0.0.1:49134", "ws://127.0.0.1:49134"),
        ("https://u:tok@example.com/x", "https://u:***@example.com/x"),
        # unencoded # ? / @ in the password: the credentials run to the LAST @ of the URL
        ("postgresql://app:p#ss@db/app", "postgresql://app:***@db/app"),
        ("postgresql://app:p?ss@db/app", "postgresql://app:***@db/app"),
        ("postgresql://app:p/ss@db/app", "postgresql://app:***@db/app"),
        ("postgresql://app:a@b#c?d/e@db:5432/app?sslmode=require", "postgresql://app:***@db:5432/app?sslmode=require"),
        ("ws://:tok#x@127.0.0.1:49134", "ws://:***@127.0.0.1:49134"),
        ("cannot connect to 'postgresql://app:p#ss@db/app': refused",
         "cannot connect to 'postgresql://app:***@db/app': refused"),
        ("sasl_ssl://u:p#1@k1:9092,sasl_ssl://u:p/2@k2:9092", "sasl_ssl://u:***@k1:9092,sasl_ssl://u:***@k2:9092"),
        ("a://x b://u:p@h", "a://x b://u:***@h"),
        ("mailto: ops@example.com", "mailto: ops@example.com"),
        ("x://", "x://"),
        ("://u:p@h", "://u:p@h"),  # no scheme, no URL
        ("wss://engine/?token=abc&x=1", "wss://engine/?token=***&x=1"),
        ("wss://engine/?api_key=abc", "wss://engine/?api_key=***"),
        ("tokens and secrets", "tokens and secrets"),
    ],
)
def test_redact_dsn(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


def test_redact_dsn_is_linear() -> None:
    started = time.thread_time()  # CPU time: a loaded machine stretches wall time, not this
    for text in ("x" * 200_000, "a://" * 50_000, "password=" * 20_000, "a://u:p@" * 20_000):
        redact_dsn(text)
    assert time.thread_time() - started < 2.0


def test_redact_bootstrap_servers_and_sasl_fields() -> None:
    assert redact({"bootstrap_servers": "u:p#w@k1:9092,k2:9092", "sasl_plain_username": "u",
                   "sasl_mechanism": "PLAIN"}) == {
        "bootstrap_servers": "u:***@k1:9092,k2:9092", "sasl_plain_username": "***", "sasl_mechanism": "PLAIN"}


def test_the_log_redaction_never_shows_a_password() -> None:
    secret = "p#ss?w/rd"
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("bridge").level)
    stream = io.StringIO()
    try:
        for fmt in ("text", "json"):
            logs.configure(fmt, logging.INFO, stream)
            logging.getLogger("bridge.test").warning("cannot connect to postgresql://app:%s@db/app", secret)
            logging.getLogger("bridge.test").warning("config %s", {"password": secret, "dsn": f"x://a:{secret}@h"})
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("bridge").setLevel(saved[2])
    text = stream.getvalue()
    assert text.count("postgresql://app:***@db/app") == 2
    assert secret not in text and "ss?w" not in text


def test_redact_structures_and_config(full: Any) -> None:
    assert redact({"security": {"username": "u", "password": "p", "sasl_plain_password": "q"},
                   "api_token": "t", "client_secret": None, "dsn": "postgresql://a:b@h/d", "n": [1, "x://u:p@h"]}) == {
        "security": {"username": "u", "password": "***", "sasl_plain_password": "***"},
        "api_token": "***", "client_secret": None, "dsn": "postgresql://a:***@h/d", "n": [1, "x://u:***@h"],
    }
    shown = redact(full)
    assert shown.sources[0].kind_config.security.password == "***"
    assert shown.sources[0].kind_config.security.username == "bridge"
    assert shown.sources[1].kind_config.dsn == "postgresql://app:***@db/app"
    assert "s3cret" not in repr(shown) and "secret@" not in repr(shown)
    assert full.sources[0].kind_config.security.password == "s3cret"  # the original is untouched
    assert redact(full.engine) is full.engine  # nothing secret: the same object


def test_directories_that_are_files(check: Check, tmp_path: Path) -> None:
    Path("state").write_text("x")
    Path("done").write_text("x")
    assert check("""\
        version: 1
        state_dir: state
        sources:
          s:
            file: {path: ., after_delivery: move, move_to: done}
        """) == [
        f"bridge.yaml:2:12: error[path-not-dir] state_dir: {tmp_path / 'state'} is not a directory",
        f"bridge.yaml:5:52: error[path-not-dir] sources.s.file.move_to: {tmp_path / 'done'} is not a directory",
    ]


# --- secrets (DESIGN §1) ------------------------------------------------------------------------------------


def test_a_lone_reference_keeps_its_text_where_the_schema_wants_a_string(tmp_path: Path) -> None:
    config = _load(tmp_path, """\
        version: 1
        engine: {url: '${URL:ws://h:1}', worker_name: '${W}', namespace: '${NS:null}'}
        defaults: {max_in_flight: '${MAX:8}'}
        sources:
          s:
            description: '${D}'
            kafka:
              bootstrap_servers: k
              topics: ['${TOPIC}']
              commit_interval_ms: ${COMMIT:500}
              security: {protocol: SASL_PLAINTEXT, sasl_mechanism: PLAIN, username: '${U}',
                         password: '${KAFKA_PASSWORD}'}
            payload: {port: '${PORT:9092}'}
        """, {"W": "007", "D": "true", "TOPIC": "2024", "U": "1e3", "KAFKA_PASSWORD": "0123"})
    assert (config.engine.worker_name, config.engine.namespace, config.default_max_in_flight) == ("007", None, 8)
    source = config.sources[0]
    assert (source.description, source.kind_config.topics, source.kind_config.commit_interval_ms) == (
        "true", ("2024",), 500)
    assert (source.kind_config.security.username, source.kind_config.security.password) == ("1e3", "0123")
    assert source.payload == {"port": 9092}  # no schema there: read as YAML


def test_diagnostics_never_show_a_secret(check: Check) -> None:
    problems = check("""\
        version: 1
        engine: {url: '${III_URL}'}
        sources:
          s:
            kafka:
              bootstrap_servers: 7
              topics: [t]
              security: {protocol: SASL_PLAINTEXT, sasl_mechanism: PLAIN, username: u, password: 12345678}
          p:
            postgres: {dsn: ['postgresql://app:hunter5@db/app'], channels: [c]}
        """, env={"III_URL": "http://bridge:hu#nt?er/2@engine:49134"})
    assert problems == [
        "bridge.yaml:2:15: error[value] engine.url: 'http://bridge:***@engine:49134' does not match ^wss?://",
        "bridge.yaml:2:15: warning[url-credentials] engine.url: the URL carries credentials; the iii SDK writes "
        "it into a file under ~/.iii/run that other users of this machine can read; "
        "set III_TOKEN instead (sent as a bearer token)",
        "bridge.yaml:6:26: error[type] sources.s.kafka.bootstrap_servers: expected a string, got 7",
        "bridge.yaml:8:90: error[type] sources.s.kafka.security.password: expected a string or null, "
        "got an integer",
        "bridge.yaml:10:21: error[type] sources.p.postgres.dsn: expected a string, got a list",
    ]
    assert not any(secret in "\n".join(problems) for secret in ("hu#nt", "12345678", "hunter5"))


def test_a_token_in_the_engine_url_is_warned_about(check: Check) -> None:
    assert check("version: 1\nengine: {url: 'wss://e:443/?token=t0k'}\nsources: {s: {file: {path: .}}}\n") == [
        "bridge.yaml:2:15: warning[url-credentials] engine.url: the URL carries credentials; the iii SDK writes "
        "it into a file under ~/.iii/run that other users of this machine can read; "
        "set III_TOKEN instead (sent as a bearer token)",
    ]


def test_a_url_without_credentials_gets_no_warning(check: Check) -> None:
    assert check("version: 1\nengine: {url: 'wss://engine.example:443/x?a=b'}\nsources: {s: {file: {path: .}}}\n") == []


def test_a_template_compiler_crash_is_still_a_template_problem(
    check: Check, monkeypatch: pytest.MonkeyPatch
) -> None:
    # templates.py turns compiler crashes into template problems itself; this is validate's last line of
    # defence should one slip through: simulate one, for one leaf and for `when`.
    import bridge.config._checks as checks

    real = checks.compile_tree

    def crashing(tree: Any, *, root: tuple[str | int, ...] = ()) -> Any:
        if "deep" in str(tree):
            raise RecursionError("maximum recursion depth exceeded")
        return real(tree, root=root)

    def crashing_when(source: str) -> Any:
        raise SyntaxError("too many nested parentheses")

    monkeypatch.setattr(checks, "compile_tree", crashing)
    monkeypatch.setattr(checks, "compile_when", crashing_when)
    assert check("""\
        version: 1
        sources:
          s:
            file: {path: .}
            when: "{{ true }}"
            payload:
              ok: "{{ event.path }}"
              bad: "{{ event.deep }}"
              broken: "{{ event. }}"
        """) == [
        "bridge.yaml:5:11: error[template-syntax] sources.s.when: the template is nested too deeply to compile",
        "bridge.yaml:8:12: error[template-syntax] sources.s.payload.bad: the template is nested too deeply to compile",
        "bridge.yaml:9:15: error[template-syntax] sources.s.payload.broken: expected name or number",
    ]


@pytest.mark.parametrize(
    ("dsn", "warned"),
    [
        ("postgresql://app:p#ss@db/app", True),
        ("postgresql://app:p?ss@db/app", True),
        ("postgresql://app:p/ss@db/app", True),
        ("postgresql://app:p@ss@db/app", True),
        ("postgresql://app:p%23ss@db/app", False),
        ("postgresql://app:secret@db:5432/app", False),
        ("postgresql://db:5432/app?user=a@b", False),  # a port and a query, not a password
        ("host=db password=p#ss", False),
    ],
)
def test_a_dsn_password_with_unencoded_characters_is_a_warning(check: Check, dsn: str, warned: bool) -> None:
    problems = check(f"version: 1\nsources:\n  s:\n    postgres: {{dsn: '{dsn}', channels: [c]}}\n")
    assert problems == ([
        "bridge.yaml:4:21: warning[value] sources.s.postgres.dsn: the password seems to hold an unencoded # ? / "
        "or @, which the database client reads as the end of the host; percent-encode them: %23 %3F %2F %40"
    ] if warned else [])


# --- function_id (observe mode) -----------------------------------------------------------------------------


def test_a_source_may_name_its_observable_function(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config = _load(tmp_path, """\
        version: 1
        sources:
          orders:
            function_id: shop::order-placed
            file: {path: a}
          inbox:
            file: {path: b}
        """)
    assert [s.function_id for s in config.sources] == ["shop::order-placed", None]


def test_function_ids_are_checked_and_unique(check: Check) -> None:
    assert check("""\
        version: 1
        sources:
          a:
            function_id: no spaces::allowed
            file: {path: .}
          b:
            function_id: bridge::c
            file: {path: .}
          c:
            file: {path: .}
          d:
            function_id: shop::d
            file: {path: .}
          e:
            function_id: shop::d
            file: {path: .}
        """) == [
        "bridge.yaml:4:18: error[value] sources.a.function_id: 'no spaces::allowed' does not match "
        "^[^\\s:]+(::[^\\s:]+)+$",
        "bridge.yaml:9:3: error[duplicate-function-id] sources.c: source b is the observable function bridge::c "
        "already (engines with observe.v1); give each source its own function_id",
        "bridge.yaml:15:18: error[duplicate-function-id] sources.e.function_id: source d is the observable function "
        "shop::d already (engines with observe.v1); give each source its own function_id",
    ]

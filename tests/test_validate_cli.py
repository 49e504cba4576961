"""`bridge validate` and `bridge schema`: exit codes, text and JSON output, the config path default, the
broken-file corpus (never a traceback), and every shipped config validates."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]
import pytest

from bridge import cli

ROOT = Path(__file__).resolve().parent.parent
BROKEN = sorted((Path(__file__).resolve().parent / "data" / "broken").glob("*.yaml"))
SHIPPED = [ROOT / "bridge.yaml", *sorted((ROOT / "examples").glob("*/bridge.yaml"))]
LINE = re.compile(r"^\S[^:]*:\d+:\d+: (error|warning)\[[a-z-]+\] ")  # every problem has a real line:col

VALID = "version: 1\nsources:\n  inbox:\n    file: {path: .}\n"
INVALID = "version: 1\nsources:\n  inbox:\n    file: {path: ., recursiv: true}\n    when: 5\n"


@pytest.fixture(autouse=True)
def _no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BRIDGE_CONFIG", raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_valid_config_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bridge.yaml").write_text(VALID)
    code, out, err = run(capsys, "validate", "-c", str(tmp_path / "bridge.yaml"))
    assert (code, out, err) == (0, f"{tmp_path / 'bridge.yaml'}: valid, 1 source\n", "")


def test_warnings_are_printed_and_still_exit_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("bridge.yaml").write_text(VALID.replace("path: .", "path: inbox"))
    code, out, _ = run(capsys, "validate")
    assert code == 0
    assert out.splitlines() == [
        f"bridge.yaml:4:18: warning[path-missing] sources.inbox.file.path: {tmp_path / 'inbox'} does not exist; "
        "it will be created when the bridge starts",
        "bridge.yaml: valid, 1 source, 1 warning",
    ]


def test_invalid_config_lists_every_problem_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("bridge.yaml").write_text(INVALID)
    code, out, err = run(capsys, "validate", "--format", "text")
    assert (code, err) == (1, "")
    assert out.splitlines() == [
        "bridge.yaml:4:21: error[unknown-key] sources.inbox.file.recursiv: unknown key; did you mean 'recursive'?",
        "bridge.yaml:5:11: error[type] sources.inbox.when: expected a string or null, got 5",
        "bridge.yaml: 2 errors",
    ]


def test_json_format(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("bridge.yaml").write_text(INVALID)
    code, out, _ = run(capsys, "validate", "--format", "json")
    assert code == 1
    assert json.loads(out) == [
        {"file": "bridge.yaml", "line": 4, "col": 21, "severity": "error", "code": "unknown-key",
         "path": "sources.inbox.file.recursiv", "message": "unknown key", "hint": "did you mean 'recursive'?"},
        {"file": "bridge.yaml", "line": 5, "col": 11, "severity": "error", "code": "type",
         "path": "sources.inbox.when", "message": "expected a string or null, got 5", "hint": None},
    ]
    Path("bridge.yaml").write_text(VALID)
    code, out, _ = run(capsys, "validate", "--format", "json")
    assert (code, json.loads(out)) == (0, [])


def test_config_path_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other.yaml").write_text(VALID)
    monkeypatch.setenv("BRIDGE_CONFIG", "other.yaml")
    assert run(capsys, "validate")[:2] == (0, "other.yaml: valid, 1 source\n")
    (tmp_path / "bridge.yaml").write_text(INVALID)
    assert run(capsys, "validate", "-c", "bridge.yaml")[0] == 1  # -c wins over $BRIDGE_CONFIG
    monkeypatch.delenv("BRIDGE_CONFIG")
    assert run(capsys, "validate")[0] == 1  # ./bridge.yaml


def test_missing_or_unreadable_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "validate")
    assert code == 2
    assert out.splitlines() == ["bridge.yaml: error[file-unreadable] no such file", "bridge.yaml: 1 error"]
    assert err == "bridge: no config given and no ./bridge.yaml here: pass -c FILE or set BRIDGE_CONFIG\n"
    code, out, err = run(capsys, "validate", "-c", ".", "--format", "json")
    assert (code, err) == (2, "")
    assert [p["code"] for p in json.loads(out)] == ["file-unreadable"]


@pytest.mark.parametrize(
    "argv",
    [[], ["nope"], ["validate", "--format", "xml"], ["validate", "-c"], ["validate", "extra"], ["schema", "x"]],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert "usage: bridge" in err and "Traceback" not in err


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "validate" in out and "schema" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("iii-bridge ")


def test_an_unexpected_error_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("bridge.config.check_config", broken)
    code, out, err = run(capsys, "validate", "-c", str(tmp_path / "x.yaml"))
    assert (code, out) == (2, "")
    assert err == "bridge: internal error: RuntimeError: boom (please report this)\n"

    def leaky(*_args: object, **_kwargs: object) -> None:
        raise ValueError("cannot use postgresql://app:p#ss@db/app (password=s3cret)")

    monkeypatch.setattr("bridge.config.check_config", leaky)
    code, out, err = run(capsys, "validate", "-c", str(tmp_path / "x.yaml"))
    assert err == ("bridge: internal error: ValueError: cannot use postgresql://app:***@db/app (password=***) "
                   "(please report this)\n")


@pytest.mark.parametrize("path", BROKEN, ids=[p.name for p in BROKEN])
def test_broken_corpus_never_tracebacks(
    path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(path.parent)
    code, out, err = run(capsys, "validate", "-c", path.name)
    assert code == 1, out
    assert err == ""
    lines = out.splitlines()
    assert lines[-1].startswith(f"{path.name}: ") and "error" in lines[-1]
    assert lines[:-1] and all(LINE.match(line) for line in lines[:-1]), out
    code, out, _ = run(capsys, "validate", "-c", path.name, "--format", "json")
    assert code == 1
    assert all(p["severity"] in ("error", "warning") for p in json.loads(out))


_DEEP = "the document is nested deeper than 64 levels here; flatten this part of the file"
_LARGE = "the number is too large (more than 1,000 digits)"
_UNUSABLE = "not a usable path: File name too long"
# The corpus files that once crashed validate ("internal error"), with their exact diagnostics.
EXPECTED = {
    "deep-nesting.yaml": [f"2:74: error[yaml-syntax] {_DEEP}"],
    "deep-block-nesting.yaml": [f"67:129: error[yaml-syntax] {_DEEP}"],
    "alias-nesting.yaml": [f"66:7: error[yaml-syntax] sources.s.payload.a60: {_DEEP}"],
    "huge-integers.yaml": [
        f"4:32: error[value] sources.s.file.settle_ms: {_LARGE}",
        f"5:20: error[value] sources.s.max_in_flight: {_LARGE}",
        f"6:18: error[value] sources.s.payload.n: {_LARGE}",
    ],
    "env-huge-default.yaml": [f"3:18: error[value] defaults.max_in_flight: {_LARGE}"],
    "long-paths.yaml": [
        f"2:12: error[value] state_dir: {_UNUSABLE}",
        f"5:18: error[value] sources.s.file.path: {_UNUSABLE}",
        f"5:351: error[value] sources.s.file.move_to: {_UNUSABLE}",
    ],
    "template-bombs.yaml": [
        "5:11: error[template-syntax] sources.s.when: the template is nested too deeply to compile (RecursionError); "
        "simplify it",
        "9:12: error[template-syntax] sources.s.payload.ifs: the template is nested too deeply to compile "
        "(IndentationError); simplify it",
        "10:14: error[template-syntax] sources.s.payload.chain: the template is nested too deeply to compile "
        "(SyntaxError); simplify it",
    ],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_corpus_exact_diagnostics(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(BROKEN[0].parent)
    code, out, err = run(capsys, "validate", "--offline", "-c", name)
    assert (code, err) == (1, "")
    assert out.splitlines()[:-1] == [f"{name}:{line}" for line in EXPECTED[name]]


def test_broken_corpus_is_there() -> None:
    names = {p.name for p in BROKEN}
    assert {"binary-garbage.yaml", "latin1-bytes.yaml", "tabs.yaml", "empty.yaml", "duplicate-keys.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_shipped_configs_validate(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "validate", "--offline", "-c", str(path))
    assert code == 0, out
    problems = out.splitlines()[:-1]
    # watched dirs may not exist yet; enqueue is sync for observers (an engine with observe.v1)
    assert all("warning[path-missing]" in line or "warning[enqueue-observe]" in line for line in problems), out


def test_examples_each_have_a_readme() -> None:
    assert len(SHIPPED) >= 5
    for config in SHIPPED[1:]:
        assert (config.parent / "README.md").read_text().strip()


def test_schema_command_prints_the_bundled_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "schema")
    assert (code, err) == (0, "")
    schema = json.loads(out)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert set(schema["$defs"]) >= {"source-kafka", "source-postgres", "source-file"}
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"version": 1, "sources": {"a": {"file": {"path": "."}}}})
    assert not validator.is_valid({"version": 1, "sources": {"a": {"kafka": {"topik": ["x"]}}}})


def test_the_installed_entry_point(tmp_path: Path) -> None:
    (tmp_path / "bridge.yaml").write_text(INVALID)
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "validate", "-c", str(tmp_path / "bridge.yaml")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 1 and done.stderr == ""
    assert done.stdout.splitlines()[-1].endswith(": 2 errors")


SECRETS = {"III_URL": "ws://bridge:ur#l?pa/ss@127.0.0.1:49134", "KAFKA_BOOTSTRAP": "u:bo@tpass@k1:9092",
           "KAFKA_PASSWORD": "0123", "DATABASE_URL": "postgresql://app:p#ss?w/rd@db:5432/app"}
SECRET_CONFIG = """\
version: 1
engine:
  url: ${III_URL}
sources:
  orders:
    kafka:
      bootstrap_servers: ${KAFKA_BOOTSTRAP}
      topics: [orders]
      security:
        protocol: SASL_PLAINTEXT
        sasl_mechanism: PLAIN
        username: bridge
        password: ${KAFKA_PASSWORD}
    bind_schema:
      type: object
      properties:
        api_key: {type: string, writeOnly: true, default: wo-s3cret, examples: [wo-s3cret-example]}
        region: {type: string, default: eu}
  signups:
    postgres:
      dsn: ${DATABASE_URL}
      channels: [signup]
"""


def test_secrets_never_appear_in_validate_or_docs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    Path("bridge.yaml").write_text(SECRET_CONFIG)
    secrets = ["ur#l", "pa/ss", "bo@tpass", "0123", "p#ss", "w/rd", "wo-s3cret"]
    warning = ("bridge.yaml:3:8: warning[url-credentials] engine.url: the URL carries credentials; the iii SDK "
               "writes it into a file under ~/.iii/run that other users of this machine can read; "
               "set III_TOKEN instead (sent as a bearer token)")
    dsn = ("bridge.yaml:21:12: warning[value] sources.signups.postgres.dsn: the password seems to hold an "
           "unencoded # ? / or @, which the database client reads as the end of the host; "
           "percent-encode them: %23 %3F %2F %40")
    code, out, err = run(capsys, "validate", "--offline")
    assert (code, out.splitlines(), err) == (0, [warning, dsn, "bridge.yaml: valid, 2 sources, 2 warnings"], "")
    code, json_out, _ = run(capsys, "validate", "--offline", "--format", "json")
    code, docs, docs_err = run(capsys, "docs")
    assert code == 0 and "| `api_key` | string | `\"***\"` | no |" in docs
    for text in (out, json_out, docs, docs_err):
        assert not [s for s in secrets if s in text]
    Path("bridge.yaml").write_text(SECRET_CONFIG.replace("password: ${KAFKA_PASSWORD}", "password: [x]"))
    code, out, _ = run(capsys, "validate", "--offline")
    assert code == 1 and "security.password: expected a string or null, got a list" in out
    Path("bridge.yaml").write_text(SECRET_CONFIG.replace("url: ${III_URL}", "url: ${III_URL}x"))
    monkeypatch.setenv("III_URL", "http://bridge:ur#l?pa/ss@127.0.0.1:49134")
    code, out, _ = run(capsys, "validate", "--offline")
    assert "engine.url: 'http://bridge:***@127.0.0.1:49134x' does not match ^wss?://" in out
    assert not [s for s in secrets if s in out]


@pytest.mark.parametrize("password", ["p#ss?w/rd", "p@ss:w", "9ss?w/rd"])
def test_an_unparseable_dsn_is_a_warning_not_an_internal_error(
    password: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Online validate asks the database client to connect; it raises ValueError on such a DSN, quoting part
    # of the password. Nothing is reached: the client refuses the DSN before connecting.
    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:{password}@127.0.0.1:5432/postgres")
    monkeypatch.chdir(tmp_path)
    Path("bridge.yaml").write_text("version: 1\nsources:\n  o:\n    postgres:\n      dsn: ${DATABASE_URL}\n"
                                   "      mode: outbox\n      outbox_table: bridge_outbox\n")
    code, out, err = run(capsys, "validate")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "bridge.yaml:5:12: warning[value] sources.o.postgres.dsn: the password seems to hold an unencoded # ? / "
        "or @, which the database client reads as the end of the host; percent-encode them: %23 %3F %2F %40",
        "bridge.yaml:3:1: warning[outbox-unchecked] sources.o.postgres.outbox_table: not checked: cannot connect "
        "to postgresql://app:***@127.0.0.1:5432/postgres: the client cannot parse the DSN "
        "(percent-encode # ? / @ : in the password)",
        "bridge.yaml: valid, 1 source, 2 warnings",
    ]


def test_docs_of_a_schema_that_refers_to_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("bridge.yaml").write_text("version: 1\nsources:\n  s:\n    file: {path: .}\n"
                                   "    bind_schema: {type: object, properties: {a: {$ref: '#'}}}\n")
    code, out, err = run(capsys, "docs")
    assert (code, err) == (0, "")
    assert "| `a.a.a.a.a.a.a.a.a` |" in out and "| `a.a.a.a.a.a.a.a.a.a` |" not in out


def test_regular_expressions_re_refuses_are_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("bridge.yaml").write_text("version: 1\nsources:\n  s:\n    kafka: {bootstrap_servers: k, "
                                   "topic_pattern: 'a{99999999999999999999}'}\n")
    code, out, _ = run(capsys, "validate", "--offline")
    assert (code, out.splitlines()[0]) == (1, "bridge.yaml:4:50: error[value] sources.s.kafka.topic_pattern: "
                                              "not a valid regular expression: the repetition number is too large")


@pytest.mark.parametrize(
    ("event", "bind_config", "expected"),
    [
        ('{"content": ' + "9" * 5000 + "}", None,
         "bridge: event file event.json holds a number too large or nesting too deep to read\n"),
        ('{"content": ' + "[" * 100_000 + "]" * 100_000 + "}", None,
         "bridge: event file event.json holds a number too large or nesting too deep to read\n"),
        ('{"content": 1}', '{"a": ' + "9" * 5000 + "}",
         "bridge: --config holds a number too large or nesting too deep to read\n"),
        ('{"content": 1}', "[" * 100_000, "bridge: --config holds a number too large or nesting too deep to read\n"),
    ],
)
def test_render_refuses_what_json_cannot_read(
    event: str, bind_config: str | None, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("bridge.yaml").write_text("version: 1\nsources:\n  s:\n    file: {path: ., content: json}\n"
                                   "    payload: {x: '{{ event.content }}'}\n")
    Path("event.json").write_text(event)
    extra = ["--config", bind_config] if bind_config is not None else []
    code, out, err = run(capsys, "render", "s", "--event", "event.json", *extra)
    assert (code, out, err) == (1, "", expected)


def test_render_prints_a_lone_surrogate_as_an_escape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("bridge.yaml").write_text("version: 1\nsources:\n  s:\n    file: {path: ., content: json}\n"
                                   "    payload: {x: '{{ event.content }}', y: 'é'}\n")
    Path("event.json").write_text('{"content": "\\ud800"}')
    code, out, _ = run(capsys, "render", "s", "--event", "event.json")
    assert (code, json.loads(out)) == (0, {"x": "\ud800", "y": "é"})
    assert out.encode() and "\\ud800" in out


def test_an_endless_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run(capsys, "validate", "-c", "/dev/zero")
    assert (code, out.splitlines()) == (2, [
        "/dev/zero: error[file-unreadable] cannot read: larger than 16 MiB, too large for a config",
        "/dev/zero: 1 error",
    ])
    monkeypatch.chdir(tmp_path)
    Path("bridge.yaml").write_text("version: 1\nsources:\n  s:\n    file: {path: .}\n"
                                   "    bind_schema: {$ref: /dev/zero}\n")
    code, out, _ = run(capsys, "validate")
    assert (code, out.splitlines()[0]) == (1, "bridge.yaml:5:25: error[schema-ref] sources.s.bind_schema.$ref: "
                                              "cannot load /dev/zero: cannot read it: larger than 16 MiB, too large "
                                              "for a config")

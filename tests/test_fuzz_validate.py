"""A seeded fuzz test of `bridge validate`: thousands of mutants of the shipped example configs (and their
``$ref``'d schema files) must each end in diagnostics with a real line:col, never in an exception, a hang or
the CLI's "internal error". A failure prints the seed and the mutant; set BRIDGE_FUZZ_SEED to replay others.

Validation runs in-process (a subprocess per mutant would not fit the time budget); a few mutants also go
through the whole command line.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest

from bridge import cli
from bridge.config import check_config
from bridge.docs import render_docs

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*/bridge.yaml"))
SEED = int(os.environ.get("BRIDGE_FUZZ_SEED", "20261206"))
PER_EXAMPLE = 416  # five examples: 2,080 mutants
BOUND_S = 10.0  # per mutant; generous, the machine is shared
ENV = {"III_URL": "ws://127.0.0.1:49134", "KAFKA_PASSWORD": "0123", "NOT_UTF8": "\udcff"}

# ---------------------------------------------------------------------------------------------------------
# values that replace a scalar


def _templates() -> list[str]:
    return [
        "'{{ 10 ** (10 ** 8) }}'",
        "'{{ " + "(" * 70 + "1" + ")" * 70 + " }}'",
        "'" + "{% if true %}" * 100 + "x" + "{% endif %}" * 100 + "'",
        "'{{ event" + ".a" * 200 + " }}'",
        "\"{{ 'a' * 10**9 }}\"",
        "'{{ [1] * 10**9 }}'",
        "'{{ range(10**9) | list }}'",
        "'{{ event.'",
        "'{% for %}'",
        "'{{ event | nosuchfilter }}'",
        "'{{ {} }}'",
        "'{% raw %}'",
    ]


_ODD_VALUES = [
    "[]", "{}", "null", "~", "true", "no", "1", "-1", "0", "1.5", "''", "'text'", "[1, 2]", "{a: 1}", "[[], {}]",
    "9" * 5000, "-" + "9" * 5000, "1e999", "-1e999", ".nan", ".inf", "0x" + "f" * 5000, "1" + "0" * 5000 + ".5",
    "0o777", "0b101", "1_000", "2024-01-01", "2024-01-01T00:00:00Z",
    "[" * 10000 + "]" * 10000, "{a: " * 3000 + "1" + "}" * 3000,
    "\"\\u200f\\u202eevil\"", "\"a\\0b\"", "\"\\ud800\"", "\"\\udfff x\"", "\"\\uFEFF\"", "\"\\x85\\u2028\"",
    "'${'", "'${A'", "'${${A}}'", "'$${A}'", "'${}'", "'${:x}'", "'${A:${B}}'", "'${A:" + "x" * 20_000 + "}'",
    "'${KAFKA_PASSWORD}'", "'${UNSET_VAR}'", "'${NOT_UTF8}'", "\"\\ud83d\\ude00\"",
    "'${A-B}'", "'$'", "'$$'", "'${A:}'", "'${" + "A" * 5000 + "}'",
    "'" + "a" * 300 + "'", "'" + "/".join(["x" * 255] * 20) + "'", "'" + "a/" * 3000 + "'", "'~nosuchuser/x'",
    "'/dev/null'", "'/proc/self'", "'.'", "'..'",
    "'a{99999999999999999999}'", "'(?<=a+)b'", "{$ref: '#'}", "{type: object, properties: {a: {$ref: '#'}}}",
    "{type: object, properties: {a: {type: string, pattern: 'a{99999999999999999999}'}}}",
    "*nosuchanchor", "&a 1", "!!binary aGk=", "!!python/object:os.system x", "|\n  block", ">-\n  folded",
    *_templates(),
]


def _block_nesting(depth: int) -> str:
    return "\n".join("  " * i + "k:" for i in range(depth)) + " 1"


# ---------------------------------------------------------------------------------------------------------
# mutations of a text (lines) and of bytes


@dataclass
class Mutant:
    config: bytes
    schema: bytes | None  # the example's first $ref'd schema file, when mutated
    what: str


def _value_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if ":" in line and not line.lstrip().startswith("#")]


def _replace_value(rng: random.Random, lines: list[str]) -> str:
    candidates = _value_lines(lines)
    i = rng.choice(candidates)
    key, _, _ = lines[i].partition(":")
    value = rng.choice(_ODD_VALUES)
    if value.startswith(("|", ">")):
        indent = len(key) - len(key.lstrip()) + 2
        value = value.replace("\n  ", "\n" + " " * indent)
    lines[i] = f"{key}: {value}"
    return f"line {i + 1} value -> {value[:60]!r}"


_REGEXES = ["'a{99999999999999999999}'", "'('", "'(?<=a+)b'", "'" + "(" * 500 + "a" + ")" * 500 + "'", "'[\\'"]


def _regex_op(rng: random.Random, lines: list[str]) -> str:
    """A bad regular expression where one is compiled: topic_pattern, or a schema's pattern."""
    regex = rng.choice(_REGEXES)
    for i, line in enumerate(lines):
        key = line.strip().partition(":")[0]
        indent = line[: len(line) - len(line.lstrip())]
        if key == "topics":
            lines[i] = f"{indent}topic_pattern: {regex}"
            return f"topic_pattern {regex[:30]}"
        if key == "type" and rng.random() < 0.5:
            lines.insert(i, f"{indent}pattern: {regex}")
            return f"pattern {regex[:30]} at line {i + 1}"
    return "no place for a regex"


def _line_ops(rng: random.Random, lines: list[str]) -> str:
    op = rng.randrange(10)
    if op == 9:
        return _regex_op(rng, lines)
    i = rng.randrange(len(lines))
    j = rng.randrange(len(lines))
    if op == 0:
        del lines[i]
        return f"delete line {i + 1}"
    if op == 1:
        lines.insert(i, lines[i])
        return f"duplicate line {i + 1}"
    if op == 2:
        lines[i], lines[j] = lines[j], lines[i]
        return f"swap lines {i + 1} and {j + 1}"
    if op == 3:
        lines[i] = " " * rng.randrange(1, 5) + lines[i]
        return f"indent line {i + 1}"
    if op == 4:
        lines[i] = lines[i].lstrip()
        return f"dedent line {i + 1}"
    if op == 5:
        mark = rng.choice(["\u200f", "\u202e", "\x00", "\ufeff", "\u0085", "\u2028", "\x7f", "\x1b", "\t", "é"])
        at = rng.randrange(len(lines[i]) + 1)
        lines[i] = lines[i][:at] + mark + lines[i][at:]
        return f"insert {mark!r} in line {i + 1}"
    if op == 6:
        key, colon, rest = lines[i].partition(":")
        if colon:
            lines[i] = key[:-1] + rng.choice("xyz_.-") + colon + rest if key.strip() else lines[i]
        return f"rename key in line {i + 1}"
    if op == 7:
        indent = " " * (len(lines[i]) - len(lines[i].lstrip()))
        lines.insert(i, indent + _block_nesting(rng.choice([50, 400, 2000])).replace("\n", "\n" + indent))
        return f"block nesting at line {i + 1}"
    lines[i] = lines[i] + rng.choice([" #", " &x", " *x", " ?", " ]", " {", " '", ' "', " |", " >", " - x"])
    return f"append junk to line {i + 1}"


def _bytes_ops(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    op = rng.randrange(4)
    at = rng.randrange(len(data) + 1)
    if op == 0:
        junk = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe9", b"\x80\x80", b"\xf4\x90\x80\x80"])
        return data[:at] + junk + data[at:], f"insert {junk!r} at byte {at}"
    if op == 1:
        return b"\xef\xbb\xbf" + data, "BOM"
    if op == 2:
        return data[:at], f"truncate at byte {at}"
    return data.decode().encode("utf-16-le"), "UTF-16 without BOM"


def _mutate_schema(rng: random.Random, text: str) -> str:
    lines = text.splitlines()
    i = rng.randrange(len(lines))
    op = rng.randrange(4)
    if op == 0:
        del lines[i]
    elif op == 1:
        junk = rng.choice(["9" * 5000, "1e999", "[" * 5000, "NaN", '"\\ud800"'])
        lines[i] = lines[i].replace(":", f": {junk},", 1)
    elif op == 2:
        lines.insert(i, lines[i])
    else:
        lines[i] = lines[i].replace('"', "", 1)
    return "\n".join(lines) + "\n"


def mutants(example: Path, seed: int) -> Iterator[Mutant]:
    rng = random.Random(f"{seed}:{example.parent.name}")
    text = example.read_text()
    schema = next(iter(sorted((example.parent / "schemas").glob("*.json"))), None)
    for _ in range(PER_EXAMPLE):
        lines = text.splitlines()
        steps: list[str] = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            if not lines:
                break
            steps.append(_replace_value(rng, lines) if rng.random() < 0.55 and _value_lines(lines)
                         else _line_ops(rng, lines))
        data = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
        if rng.random() < 0.08:
            data, step = _bytes_ops(rng, data)
            steps.append(step)
        mutated_schema = None
        if schema is not None and rng.random() < 0.15:
            mutated_schema = _mutate_schema(rng, schema.read_text()).encode()
            steps.append("schema mutated")
        yield Mutant(data, mutated_schema, "; ".join(steps))


# ---------------------------------------------------------------------------------------------------------
# running


class _Hang(Exception):
    pass


@contextmanager
def _time_bound(seconds: float) -> Iterator[None]:
    def alarm(_signum: int, _frame: FrameType | None) -> None:
        raise _Hang(f"no answer within {seconds:.0f} s")

    # pytest-timeout may be using the same timer for the whole test: hand it back what is left of it.
    outer, _ = signal.getitimer(signal.ITIMER_REAL)
    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001))


def _problem_of(run: Callable[[], str | None]) -> str | None:
    started = time.monotonic()
    try:
        with _time_bound(BOUND_S * 2):
            found = run()
    except Exception as exc:  # any exception escaping validate is the finding
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    took = time.monotonic() - started
    if took > BOUND_S:
        return f"took {took:.1f} s"
    return found


def _validate(path: Path) -> str | None:
    config, problems = check_config(path, env=ENV)
    for p in problems:
        if p.line <= 0 or p.col <= 0:
            return f"no line:col: {p.format_text()[:300]}"
        p.format_text().encode()  # what the CLI prints must be printable (no lone surrogates)
        json.dumps(p.to_json(), ensure_ascii=False).encode()
    if config is not None:
        render_docs(config).encode()
    return None


def _copy_example(example: Path, into: Path) -> Path:
    target = into / example.parent.name
    shutil.copytree(example.parent, target, ignore=shutil.ignore_patterns("*.md", ".bridge"))
    return target / "bridge.yaml"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.parent.name for p in EXAMPLES])
def test_mutants_end_in_diagnostics(example: Path, tmp_path: Path) -> None:
    config = _copy_example(example, tmp_path)
    schema = next(iter(sorted((config.parent / "schemas").glob("*.json"))), None)
    original = schema.read_bytes() if schema else None
    failures: list[str] = []
    count = 0
    for index, mutant in enumerate(mutants(example, SEED)):
        config.write_bytes(mutant.config)
        if schema is not None and original is not None:
            schema.write_bytes(mutant.schema if mutant.schema is not None else original)
        count += 1
        found = _problem_of(lambda: _validate(config))
        if found:
            shown = mutant.config.decode("utf-8", "backslashreplace")
            shown = shown if len(shown) < 1500 else shown[:1500] + "..."
            failures.append(f"mutant {index} ({mutant.what}): {found}\n{shown}")
    assert count == PER_EXAMPLE
    assert not failures, (f"seed {SEED} (BRIDGE_FUZZ_SEED), {len(failures)} of {count} mutants of {example}:\n"
                          + "\n".join(f.partition("\n")[0][:400] for f in failures[:30])
                          + "\n\nthe first one:\n" + failures[0])


def test_enough_mutants() -> None:
    assert len(EXAMPLES) * PER_EXAMPLE >= 2000


@pytest.mark.parametrize("value", [v for v in _ODD_VALUES if len(v) < 30_000][::5])
def test_the_command_line_never_reports_an_internal_error(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, val in ENV.items():
        monkeypatch.setenv(name, val)
    example = ROOT / "examples" / "kafka-orders" / "bridge.yaml"
    config = _copy_example(example, tmp_path)
    event = tmp_path / "event.json"
    event.write_text('{"key": "o-1", "value": {"total": 250, "customer_id": "c", "items": []}, "timestamp": 0}')
    for target in ("      start_from: latest", "      total: \"{{ event.value.total }}\"", "  url: ${III_URL"):
        text = example.read_text()
        line = next(line for line in text.splitlines() if line.startswith(target))
        key = line.partition(":")[0]
        config.write_text(text.replace(line, f"{key}: {value}"))
        for argv in (["validate", "--offline"], ["validate", "--offline", "--format", "json"], ["docs"],
                     ["render", "orders.placed", "--event", str(event)], ["sql", "orders.placed"]):
            with _time_bound(BOUND_S * 2):
                cli.main([argv[0], "-c", str(config), *argv[1:]])
            _, err = capsys.readouterr()
            assert "internal error" not in err and "Traceback" not in err, (argv, value[:80], err)

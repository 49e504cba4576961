"""`bridge deadletters replay` that cannot double-deliver: marks by record identity, refusal without --force, a
lock between concurrent replays, and the live delivery rules (when, payload_schema, condition function) applied
on replay. Dead-letter records are written as the bridge writes them; functions are real iii-sdk functions on
the test engine; concurrent replays are real `python -m bridge` processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.cli import main
from bridge.testing.consumer import Consumer
from bridge.testing.engine import TestEngine

CONFIG = """\
version: 1
engine:
  url: ${III_URL}
state_dir: state
defaults:
  delivery:
    timeout_ms: 5000
    retry: {max_attempts: 2, initial_backoff_ms: 50, jitter: 0}
sources:
  inbox:
    description: test inbox
    file:
      path: ./inbox
      content: json
    bind_schema:
      type: object
      properties:
        min_n: {type: integer, default: 0}
      additionalProperties: false
    when: "{{ event.content.n >= config.min_n }}"
    payload:
      n: "{{ event.content.n }}"
      name: "{{ event.name }}"
    payload_schema:
      type: object
      properties:
        n: {type: integer}
      required: [n]
"""


@pytest.fixture
def config(tmp_path: Path, iii_engine: TestEngine, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("III_URL", iii_engine.url)
    (tmp_path / "inbox").mkdir()
    (tmp_path / "state").mkdir()
    path = tmp_path / "bridge.yaml"
    path.write_text(CONFIG)
    return str(path)


def _record(n: Any, function_id: str = "t::f", **binding_config: Any) -> dict[str, Any]:
    """A dead-letter record as the dispatcher writes it for a failed invocation."""
    name = f"r{n}.json"
    return {
        "source": "inbox",
        "event": {"id": f"file:{name}:1700000000000000000:8", "source": "inbox", "path": f"/x/inbox/{name}",
                  "relative_path": name, "name": name, "change": "created", "size": 8,
                  "mtime": "2023-11-14T22:13:20.000Z", "content": {"n": n}},
        "binding": {"id": f"binding-{n}", "function_id": function_id, "namespace": "default",
                    "config": {"min_n": 0, **binding_config}},
        "payload": {"n": n, "name": name},
        "error": {"code": "invocation_failed", "message": "bug"},
        "attempts": 2,
        "first_attempt_at": "2026-01-01T00:00:01.000Z",
        "last_attempt_at": "2026-01-01T00:00:09.000Z",
    }


def _write(config: str, *records: dict[str, Any], mode: str = "a") -> Path:
    path = Path(config).parent / "state" / "dead-letters.jsonl"
    with open(path, mode, encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    return path


def _run(config: str, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["deadletters", "-c", config, *args])
    return code, capsys.readouterr().out


def test_a_replayed_record_is_refused_unless_forced(
    config: str, consumer: Consumer, capsys: pytest.CaptureFixture[str]
) -> None:
    consumer.function("t::f")
    _write(config, _record(1))
    assert _run(config, capsys, "replay", "1") == (0, "1: replayed to t::f\n")
    assert consumer.calls("t::f") == [{"n": 1, "name": "r1.json"}]
    code, out = _run(config, capsys, "replay", "1")
    assert code == 1
    assert out.startswith("1: already replayed at ") and "not delivered again (--force delivers it again)" in out
    assert _run(config, capsys, "replay", "--all") == (0, "")  # nothing left that was not replayed
    assert len(consumer.calls("t::f")) == 1
    assert _run(config, capsys, "replay", "1", "--force") == (0, "1: replayed to t::f\n")
    assert _run(config, capsys, "replay", "--all", "--force") == (0, "1: replayed to t::f\n")
    assert len(consumer.calls("t::f")) == 3


def test_marks_follow_the_record_not_its_line(
    config: str, consumer: Consumer, capsys: pytest.CaptureFixture[str]
) -> None:
    consumer.function("t::f")
    _write(config, _record(1), _record(2))
    assert _run(config, capsys, "replay", "2")[0] == 0
    # Records appended after the replay are not marked by it; the replayed one stays marked.
    path = _write(config, _record(3), _record(4))
    listing = _run(config, capsys, "list")[1].splitlines()[1:]
    assert ["(replayed)" in line for line in listing] == [False, True, False, False]
    # The file is compacted (record 1 pruned, a torn line repaired into a line of its own): every line moves.
    lines = path.read_text().splitlines()
    path.write_text(lines[1] + "\n" + '{"source": "inbox", "eve\n' + "\n".join(lines[2:]) + "\n")
    listing = _run(config, capsys, "list")[1].splitlines()[1:]
    assert [(line.split()[0], "(replayed)" in line) for line in listing] == [("1", True), ("3", False), ("4", False)]
    code, out = _run(config, capsys, "replay", "--all")
    assert (code, out) == (0, "3: replayed to t::f\n4: replayed to t::f\n")
    assert sorted(p["n"] for p in consumer.calls("t::f")) == [2, 3, 4]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (_record(1, min_n=5), "1: not delivered: filtered by `when`"),
        (_record(7, condition_function_id="t::no"), "1: not delivered: filtered by `when`"),
        (_record(1.5), "1: replay failed: payload_schema_violation"),
    ],
    ids=["when-false", "condition-false", "payload-schema"],
)
def test_replay_applies_when_condition_and_payload_schema(
    config: str, consumer: Consumer, capsys: pytest.CaptureFixture[str], record: dict[str, Any], expected: str
) -> None:
    consumer.function("t::f")
    consumer.function("t::no", lambda payload: False)
    _write(config, record)
    code, out = _run(config, capsys, "replay", "1")
    assert code == 1
    assert out.startswith(expected), out
    assert consumer.calls("t::f") == []
    assert "(replayed)" not in _run(config, capsys, "list")[1]
    assert not (Path(config).parent / "state" / "dead-letters.jsonl.replayed").exists()
    assert len(Path(config).parent.joinpath("state", "dead-letters.jsonl").read_text().splitlines()) == 1


def test_a_replay_that_fails_again_is_reported_and_stays_replayable(
    config: str, consumer: Consumer, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(payload: Any) -> Any:
        raise RuntimeError("still broken")

    consumer.function("t::broken", broken)
    _write(config, _record(1, "t::broken"))
    code, out = _run(config, capsys, "replay", "--all")
    assert code == 1
    assert out.startswith("1: replay failed: invocation_failed") and "still broken" in out
    assert len(consumer.calls("t::broken")) == 2  # the source's retry policy: max_attempts 2
    assert "(replayed)" not in _run(config, capsys, "list")[1]


def test_two_concurrent_replays_deliver_each_record_exactly_once(
    config: str, consumer: Consumer, iii_engine: TestEngine
) -> None:
    def slow(payload: Any) -> Any:
        time.sleep(0.05)
        return {"ok": True}

    consumer.function("t::f", slow)
    _write(config, *(_record(n) for n in range(8)))
    env = {**os.environ, "III_URL": iii_engine.url}
    procs = [
        subprocess.Popen([sys.executable, "-m", "bridge", "deadletters", "-c", config, "replay", "--all"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert sorted(p["n"] for p in consumer.calls("t::f")) == list(range(8))
    delivered = [out.count("replayed to t::f") for out, _ in results]
    assert sum(delivered) == 8, results
    marks = (Path(config).parent / "state" / "dead-letters.jsonl.replayed").read_text().splitlines()
    assert len(marks) == 8


def test_each_mark_is_durable_as_soon_as_its_delivery_succeeded(
    config: str, consumer: Consumer, iii_engine: TestEngine
) -> None:
    """kill -9 while the second record is being delivered: the first one's mark is already on disk, so the next
    replay delivers only the second (the one whose fate the crash left open)."""
    release = threading.Event()

    def second_hangs(payload: Any) -> Any:
        if payload["n"] == 2:
            release.wait(30)
        return {"ok": True}

    consumer.function("t::f", second_hangs)
    _write(config, _record(1), _record(2))
    env = {**os.environ, "III_URL": iii_engine.url}
    proc = subprocess.Popen([sys.executable, "-m", "bridge", "deadletters", "-c", config, "replay", "--all"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        consumer.wait_calls("t::f", 2, timeout=30)
        proc.kill()
        proc.wait(timeout=10)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    marks = [json.loads(line) for line in (Path(config).parent / "state" / "dead-letters.jsonl.replayed")
             .read_text().splitlines()]
    assert [m["event_id"] for m in marks] == [_record(1)["event"]["id"]]
    assert main(["deadletters", "-c", config, "replay", "--all"]) == 0
    assert [p["n"] for p in consumer.calls("t::f")] == [1, 2, 2]


def test_marks_of_earlier_versions_by_line_are_honoured_and_refusing_needs_no_engine(
    config: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(config, _record(1), _record(2))
    path.with_name(path.name + ".replayed").write_text(
        json.dumps({"line": 2, "event_id": _record(2)["event"]["id"], "at": "2026-01-01T00:00:00.000Z"}) + "\n"
    )
    monkeypatch.setenv("III_URL", "ws://127.0.0.1:9")  # nothing listens: a replay that connects would fail
    listing = _run(config, capsys, "list")[1].splitlines()[1:]
    assert ["(replayed)" in line for line in listing] == [False, True]
    code, out = _run(config, capsys, "replay", "2")
    assert (code, out) == (1, "2: already replayed at 2026-01-01T00:00:00.000Z; not delivered again "
                              "(--force delivers it again)\n")

"""Delivery you can trust: retries, dead letters, timeouts, engine outages, the in-flight window, kill -9,
shutdown and replay. Real files, `bridge up` as a real process, real iii-sdk functions via the test engine."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.cli import main
from bridge.testing.consumer import Consumer
from bridge.testing.engine import TestEngine
from tests.support.files import drop, read_jsonl, wait_for
from tests.support.process import BridgeProcess

# Against an engine before 0.25 (trigger mode) and one with observe.v1 (observe mode).
pytestmark = pytest.mark.both_engines

CONFIG = """\
version: 1
engine:
  url: ${{III_URL}}
  reconcile_interval_ms: 2000
state_dir: state
defaults:
  delivery:
    timeout_ms: {timeout_ms}
    retry:
      max_attempts: {max_attempts}
      initial_backoff_ms: {initial_backoff_ms}
      multiplier: 2.0
      jitter: 0
  max_in_flight: {max_in_flight}
sources:
  inbox:
    description: test inbox
    file:
      path: ./inbox
      include: ["*.json"]
      content: json
      settle_ms: 30
    payload_schema:
      type: object
      properties:
        n: {{type: integer}}
      required: [n]
    payload:
      n: "{{{{ event.content.n }}}}"
      name: "{{{{ event.name }}}}"
"""


def _write_config(workdir: Path, **overrides: Any) -> Path:
    values = {"timeout_ms": 5000, "max_attempts": 3, "initial_backoff_ms": 200, "max_in_flight": 64, **overrides}
    (workdir / "inbox").mkdir(exist_ok=True)
    path = workdir / "bridge.yaml"
    path.write_text(CONFIG.format(**values))
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    _write_config(tmp_path)
    return tmp_path


@pytest.fixture
def bridge(workdir: Path, iii_engine: TestEngine) -> Iterator[BridgeProcess]:
    proc = BridgeProcess(workdir / "bridge.yaml", iii_engine.url).start()
    proc.wait_for_log(r"connected to the iii engine")
    yield proc
    proc.kill()


def _dead_letters(workdir: Path, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    path = workdir / "state" / "dead-letters.jsonl"
    return wait_for(lambda: len(read_jsonl(path)) >= n and read_jsonl(path), timeout, f"{n} dead letter(s)")


def _bind(consumer: Consumer, bridge: BridgeProcess, function_id: str, handler: Any = None) -> None:
    consumer.function(function_id, handler)
    consumer.bind("inbox", function_id)
    bridge.wait_for_log(rf"binding \S+ added: inbox → {function_id}")


def test_a_function_failing_twice_gets_the_event_on_attempt_three(
    workdir: Path, bridge: BridgeProcess, consumer: Consumer
) -> None:
    failures = {"left": 2}

    def flaky(payload: Any) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise RuntimeError("not yet")
        return {"ok": True}

    _bind(consumer, bridge, "t::flaky", flaky)
    drop(workdir / "inbox", "a.json", {"n": 1})
    wait_for(lambda: [r for r in consumer.records("t::flaky") if r.outcome == "ok"], 10, "a successful call")
    records = consumer.records("t::flaky")
    assert [r.outcome for r in records] == ["error", "error", "ok"]
    gaps = [b.at - a.at for a, b in itertools.pairwise(records)]
    # initial_backoff_ms 200, multiplier 2, no jitter: at least 0.2 s then 0.4 s (generous upper bounds).
    assert 0.18 <= gaps[0] < 2.0, gaps
    assert 0.38 <= gaps[1] < 3.0, gaps
    time.sleep(0.3)
    assert not (workdir / "state" / "dead-letters.jsonl").exists()


def test_an_always_failing_function_is_dead_lettered_and_others_get_the_event_once(
    workdir: Path, bridge: BridgeProcess, consumer: Consumer
) -> None:
    def broken(payload: Any) -> Any:
        raise RuntimeError("database is down")

    _bind(consumer, bridge, "t::broken", broken)
    _bind(consumer, bridge, "t::fine")
    drop(workdir / "inbox", "a.json", {"n": 1})
    [record] = _dead_letters(workdir, 1)
    assert record["source"] == "inbox"
    assert record["binding"]["function_id"] == "t::broken"
    assert record["binding"]["namespace"] == "default"
    assert record["payload"] == {"n": 1, "name": "a.json"}
    assert record["error"]["code"] == "invocation_failed"
    assert "database is down" in record["error"]["message"]
    assert record["attempts"] == 3
    assert record["first_attempt_at"] < record["last_attempt_at"]
    assert record["event"]["id"].startswith("file:a.json:")
    assert len(consumer.calls("t::broken")) == 3
    assert [c["name"] for c in consumer.calls("t::fine")] == ["a.json"]
    drop(workdir / "inbox", "b.json", {"n": 2})  # the source keeps flowing
    consumer.wait_calls("t::fine", 2)
    _dead_letters(workdir, 2)


def test_render_errors_and_schema_violations_are_dead_lettered_without_retries(
    workdir: Path, bridge: BridgeProcess, consumer: Consumer
) -> None:
    _bind(consumer, bridge, "t::strict")
    drop(workdir / "inbox", "no-n.json", {"m": 1})  # event.content.n is undefined: render error
    drop(workdir / "inbox", "bad-n.json", {"n": "seven"})  # renders, but n must be an integer
    drop(workdir / "inbox", "good.json", {"n": 3})
    consumer.wait_calls("t::strict", 1)
    records = {r["event"]["name"]: r for r in _dead_letters(workdir, 2)}
    assert records["no-n.json"]["error"]["code"] == "render_error"
    assert "payload.n" in records["no-n.json"]["error"]["message"]
    assert records["no-n.json"]["payload"] is None
    assert records["bad-n.json"]["error"]["code"] == "payload_schema_violation"
    assert "$.n" in records["bad-n.json"]["error"]["message"]
    assert all(r["attempts"] == 0 for r in records.values())
    time.sleep(0.3)
    assert [c["name"] for c in consumer.calls("t::strict")] == ["good.json"]


def test_a_slow_function_times_out_is_retried_then_dead_lettered(
    tmp_path: Path, iii_engine: TestEngine, consumer: Consumer
) -> None:
    config = _write_config(tmp_path, timeout_ms=300, max_attempts=2, initial_backoff_ms=50)

    def slow(payload: Any) -> Any:
        time.sleep(1.0)
        return {"ok": True}

    with BridgeProcess(config, iii_engine.url) as proc:
        _bind(consumer, proc, "t::slow", slow)
        drop(tmp_path / "inbox", "a.json", {"n": 1})
        [record] = _dead_letters(tmp_path, 1)
        assert record["error"]["code"] == "TIMEOUT"
        assert record["attempts"] == 2
        assert len(consumer.calls("t::slow")) == 2


def test_no_event_is_lost_while_the_engine_is_away(
    workdir: Path, bridge: BridgeProcess, consumer: Consumer, iii_engine: TestEngine
) -> None:
    _bind(consumer, bridge, "t::steady")
    inbox = workdir / "inbox"
    stop = threading.Event()
    written: list[int] = []

    def producer() -> None:
        i = 0
        while not stop.is_set() and i < 400:
            drop(inbox, f"e{i:04d}.json", {"n": i})
            written.append(i)
            i += 1
            time.sleep(0.01)

    thread = threading.Thread(target=producer)
    thread.start()
    time.sleep(0.5)
    iii_engine.restart(downtime_s=2.0)
    thread.join(timeout=30)
    stop.set()
    wait_for(lambda: {c["n"] for c in consumer.calls("t::steady")} >= set(written), 45, "every file delivered")
    assert not (workdir / "state" / "dead-letters.jsonl").exists()


def test_files_in_flight_at_an_engine_restart_wait_for_a_consumer_that_comes_back_late(
    workdir: Path, bridge: BridgeProcess, iii_engine: TestEngine, make_consumer: Any
) -> None:
    # The bug as a user hit it: the engine restarts while files are in flight, the bridge is back first and
    # reconciles with an engine that lists no binding yet; those files must wait for the consumer's binding to
    # come back, not count as filtered (and be acknowledged) because it was missing at that moment.
    consumer: Consumer = make_consumer(reconnect_initial_delay_ms=8000, reconnect_max_delay_ms=8000)

    def slow(payload: Any) -> Any:
        time.sleep(0.5)
        return {"ok": True}

    _bind(consumer, bridge, "t::late", slow)
    inbox = workdir / "inbox"
    for i in range(20):
        drop(inbox, f"f{i:02d}.json", {"n": i})
    wait_for(lambda: consumer.records("t::late"), 10, "the first calls")
    iii_engine.restart(downtime_s=0.5)
    for i in range(20, 30):
        drop(inbox, f"f{i:02d}.json", {"n": i})
    bridge.wait_for_log(r"reconnected to the iii engine")
    time.sleep(3.0)  # the bridge's reconciliations (interval 2 s) meet an engine without the binding
    wait_for(lambda: {c["n"] for c in consumer.calls("t::late")} == set(range(30)), 60, "every file delivered")
    assert not (workdir / "state" / "dead-letters.jsonl").exists()
    assert "has ended" not in bridge.log()


def test_the_in_flight_window_is_never_exceeded(
    tmp_path: Path, iii_engine: TestEngine, consumer: Consumer
) -> None:
    config = _write_config(tmp_path, max_in_flight=4)
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}

    async def slow(payload: Any) -> Any:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.05)
        with lock:
            state["now"] -= 1
        return {"ok": True}

    for i in range(60):
        drop(tmp_path / "inbox", f"w{i:03d}.json", {"n": i})
    with BridgeProcess(config, iii_engine.url) as proc:
        _bind(consumer, proc, "t::window", slow)
        consumer.wait_calls("t::window", 60, timeout=30)
    assert state["peak"] == 4, state


def test_kill_9_during_retries_loses_no_file_event(
    workdir: Path, iii_engine: TestEngine, consumer: Consumer
) -> None:
    healthy = threading.Event()

    def recovering(payload: Any) -> Any:
        if not healthy.is_set():
            raise RuntimeError("still broken")
        return {"ok": True}

    config = _write_config(workdir, max_attempts=50, initial_backoff_ms=100)
    inbox = workdir / "inbox"
    consumer.function("t::recovering", recovering)
    consumer.bind("inbox", "t::recovering")
    proc = BridgeProcess(config, iii_engine.url).start()
    for i in range(20):
        drop(inbox, f"k{i:02d}.json", {"n": i})
    wait_for(lambda: len({c["n"] for c in consumer.calls("t::recovering")}) == 20, 15, "every file attempted")
    proc.kill()
    healthy.set()
    with BridgeProcess(config, iii_engine.url):
        wait_for(
            lambda: {r.payload["n"] for r in consumer.records("t::recovering") if r.outcome == "ok"} == set(range(20)),
            30,
            "every file delivered after the restart",
        )


def test_sigterm_waits_for_in_flight_deliveries_and_exits_zero(
    workdir: Path, bridge: BridgeProcess, consumer: Consumer, iii_engine: TestEngine
) -> None:
    def slow(payload: Any) -> Any:
        time.sleep(1.5)
        return {"ok": True}

    _bind(consumer, bridge, "t::drain", slow)
    drop(workdir / "inbox", "d.json", {"n": 1})
    consumer.wait_calls("t::drain", 1)
    assert bridge.stop() == 0
    assert consumer.records("t::drain")[0].outcome == "ok"
    # The drained event was acknowledged: a restart does not deliver it again.
    with BridgeProcess(workdir / "bridge.yaml", iii_engine.url):
        time.sleep(1.5)
    assert len(consumer.calls("t::drain")) == 1


def test_a_second_sigterm_exits_at_once(workdir: Path, bridge: BridgeProcess, consumer: Consumer) -> None:
    def stuck(payload: Any) -> Any:
        time.sleep(20)
        return {"ok": True}

    _bind(consumer, bridge, "t::stuck", stuck)
    drop(workdir / "inbox", "s.json", {"n": 1})
    consumer.wait_calls("t::stuck", 1)
    assert bridge.proc is not None
    started = time.monotonic()
    bridge.proc.send_signal(signal.SIGTERM)
    bridge.wait_for_log(r"SIGTERM received")
    bridge.proc.send_signal(signal.SIGTERM)
    bridge.proc.wait(timeout=5)
    assert time.monotonic() - started < 5
    assert "second SIGTERM" in bridge.log()


def test_replay_delivers_dead_letters_to_the_fixed_function(
    workdir: Path,
    bridge: BridgeProcess,
    consumer: Consumer,
    iii_engine: TestEngine,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("III_URL", iii_engine.url)
    fixed = threading.Event()

    def fixable(payload: Any) -> Any:
        if not fixed.is_set():
            raise RuntimeError("bug")
        return {"ok": True}

    _bind(consumer, bridge, "t::fixable", fixable)
    drop(workdir / "inbox", "r1.json", {"n": 1})
    drop(workdir / "inbox", "r2.json", {"n": 2})
    _dead_letters(workdir, 2)
    config = str(workdir / "bridge.yaml")
    assert main(["deadletters", "-c", config, "list"]) == 0
    listing = capsys.readouterr().out
    assert "t::fixable" in listing and "invocation_failed" in listing
    fixed.set()
    before = len(consumer.calls("t::fixable"))
    assert main(["deadletters", "-c", config, "replay", "--all"]) == 0
    out = capsys.readouterr().out
    assert out.count("replayed to t::fixable") == 2, out
    replayed = consumer.calls("t::fixable")[before:]
    assert sorted(p["n"] for p in replayed) == [1, 2]
    assert main(["deadletters", "-c", config, "list"]) == 0
    assert capsys.readouterr().out.count("(replayed)") == 2
    assert main(["deadletters", "-c", config, "replay", "--all"]) == 0  # nothing left to replay
    assert len(consumer.calls("t::fixable")) == before + 2
    assert main(["deadletters", "-c", config, "show", "1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["binding"]["function_id"] == "t::fixable"

"""End to end on the file source: real files, `bridge up` as a real process, the real iii-sdk on both sides."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.testing.consumer import Consumer
from bridge.testing.engine import TestEngine
from tests.support.files import drop as _drop
from tests.support.files import read_jsonl, wait_for
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
    timeout_ms: 5000
    retry:
      max_attempts: 2
      initial_backoff_ms: 50
sources:
  inbox:
    description: Files dropped into the inbox
    file:
      path: ./inbox
      include: ["*.json"]
      content: json
      settle_ms: 50
      max_content_bytes: {max_bytes}
    bind_schema:
      type: object
      properties:
        min_amount: {{type: number, default: 0}}
        label: {{type: string, default: plain}}
      additionalProperties: false
    when: "{{{{ event.content.amount >= config.min_amount }}}}"
    payload:
      name: "{{{{ event.name }}}}"
      amount: "{{{{ event.content.amount }}}}"
      tags: "{{{{ event.content.tags }}}}"
      label: "{{{{ config.label }}}}"
      summary: "{{{{ event.name }}}} costs {{{{ event.content.amount }}}}"
      fixed: 7
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "bridge.yaml").write_text(CONFIG.format(max_bytes=4096))
    return tmp_path


@pytest.fixture
def bridge(workdir: Path, iii_engine: TestEngine) -> Iterator[BridgeProcess]:
    proc = BridgeProcess(workdir / "bridge.yaml", iii_engine.url)
    proc.start()
    proc.wait_for_log(r"connected to the iii engine")
    yield proc
    proc.kill()


def _bind(consumer: Consumer, function_id: str, config: dict[str, Any] | None = None) -> Any:
    consumer.function(function_id)
    return consumer.bind("inbox", function_id, {} if config is None else config)


def _settled(seconds: float = 1.0) -> None:
    time.sleep(seconds)


def test_files_reach_the_function_with_the_templated_payload(
    workdir: Path, bridge: BridgeProcess, consumer: Consumer
) -> None:
    _bind(consumer, "shop::on-file", {"min_amount": 10})
    bridge.wait_for_log(r"binding \S+ added: inbox → shop::on-file")
    _drop(workdir / "inbox", "small.json", {"amount": 5, "tags": ["x"]})
    _drop(workdir / "inbox", "big.json", {"amount": 20, "tags": ["a", "b"]})
    calls = consumer.wait_calls("shop::on-file", 1)
    _settled(0.5)
    calls = consumer.calls("shop::on-file")
    assert len(calls) == 1, calls
    payload = {k: v for k, v in calls[0].items() if k != "_caller_worker_id"}
    assert payload == {
        "name": "big.json",
        "amount": 20,
        "tags": ["a", "b"],
        "label": "plain",
        "summary": "big.json costs 20",
        "fixed": 7,
    }


def test_condition_function_false_skips_the_binding(
    workdir: Path, bridge: BridgeProcess, consumer: Consumer
) -> None:
    consumer.function("shop::is-big", lambda payload: payload["amount"] > 100)
    consumer.function("shop::on-big")
    consumer.bind("inbox", "shop::on-big", {"condition_function_id": "shop::is-big"})
    bridge.wait_for_log(r"binding \S+ added: inbox → shop::on-big")
    _drop(workdir / "inbox", "a.json", {"amount": 50, "tags": []})
    _drop(workdir / "inbox", "b.json", {"amount": 500, "tags": []})
    consumer.wait_calls("shop::is-big", 2)
    calls = consumer.wait_calls("shop::on-big", 1)
    _settled(0.5)
    assert [c["amount"] for c in consumer.calls("shop::on-big")] == [500]
    assert calls[0]["name"] == "b.json"


def test_a_bad_bind_config_is_rejected_with_its_json_path(
    workdir: Path, bridge: BridgeProcess, consumer: Consumer, iii_engine: TestEngine
) -> None:
    consumer.function("shop::bad")
    consumer.bind("inbox", "shop::bad", {"min_amount": "lots", "colour": "red"})
    deadline = time.monotonic() + 10
    while not consumer.registration_errors() and time.monotonic() < deadline:
        time.sleep(0.05)
    errors = consumer.registration_errors()
    assert len(errors) == 1, errors
    message = errors[0]["error"]["message"]
    if iii_engine.features:
        # observe mode: the bind schema is the function's args_format, which the engine checks first
        assert errors[0]["error"]["code"] == "INVALID_ARGS"
        assert "args.min_amount: 'lots' is not of type 'number'" in message
    else:
        assert errors[0]["error"]["code"] == "trigger_registration_failed"
        assert "$.min_amount: 'lots' is not of type 'number'" in message
        bridge.wait_for_log(r"binding \S+ of inbox → shop::bad rejected")
    assert "colour" in message
    _drop(workdir / "inbox", "c.json", {"amount": 50, "tags": []})
    _settled(1.0)
    assert consumer.calls("shop::bad") == []


def test_unbind_stops_delivery(workdir: Path, bridge: BridgeProcess, consumer: Consumer) -> None:
    handle = _bind(consumer, "shop::once")
    bridge.wait_for_log(r"binding \S+ added: inbox → shop::once")
    _drop(workdir / "inbox", "first.json", {"amount": 1, "tags": []})
    consumer.wait_calls("shop::once", 1)
    handle.unregister()
    bridge.wait_for_log(r"binding \S+ removed: inbox → shop::once")
    _drop(workdir / "inbox", "second.json", {"amount": 1, "tags": []})
    _settled(1.0)
    assert [c["name"] for c in consumer.calls("shop::once")] == ["first.json"]


def test_restart_neither_redelivers_nor_misses(
    workdir: Path, iii_engine: TestEngine, consumer: Consumer
) -> None:
    inbox = workdir / "inbox"
    _bind(consumer, "shop::restart")
    with BridgeProcess(workdir / "bridge.yaml", iii_engine.url) as proc:
        proc.wait_for_log(r"binding \S+ added")
        _drop(inbox, "one.json", {"amount": 1, "tags": []})
        _drop(inbox, "two.json", {"amount": 2, "tags": []})
        consumer.wait_calls("shop::restart", 2)
        assert proc.stop() == 0
    _drop(inbox, "three.json", {"amount": 3, "tags": []})  # created while the bridge is down
    _drop(inbox, "one.json", {"amount": 11, "tags": []})  # modified while down
    with BridgeProcess(workdir / "bridge.yaml", iii_engine.url) as proc:
        consumer.wait_calls("shop::restart", 4)
        _settled(1.0)
        assert proc.stop() == 0
    names = sorted((c["name"], c["amount"]) for c in consumer.calls("shop::restart"))
    assert names == [("one.json", 1), ("one.json", 11), ("three.json", 3), ("two.json", 2)]


def test_files_wait_while_nothing_is_bound(workdir: Path, bridge: BridgeProcess, consumer: Consumer) -> None:
    _drop(workdir / "inbox", "early.json", {"amount": 1, "tags": []})
    _settled(0.5)
    _bind(consumer, "shop::late")
    calls = consumer.wait_calls("shop::late", 1)
    assert calls[0]["name"] == "early.json"


def test_a_burst_of_1000_files_is_delivered_completely(
    workdir: Path, bridge: BridgeProcess, consumer: Consumer
) -> None:
    _bind(consumer, "shop::burst")
    bridge.wait_for_log(r"binding \S+ added")
    inbox = workdir / "inbox"
    for i in range(1000):
        _drop(inbox, f"f{i:04d}.json", {"amount": i, "tags": []})
    consumer.wait_calls("shop::burst", 1000, timeout=60)
    _settled(0.5)
    amounts = sorted(c["amount"] for c in consumer.calls("shop::burst"))
    assert amounts == list(range(1000))


def test_bad_files_do_not_crash_the_bridge(workdir: Path, bridge: BridgeProcess, consumer: Consumer) -> None:
    _bind(consumer, "shop::robust")
    bridge.wait_for_log(r"binding \S+ added")
    inbox = workdir / "inbox"
    _drop(inbox, "broken.json", "{not json")
    _drop(inbox, "huge.json", json.dumps({"amount": 1, "tags": ["x" * 5000]}))
    _drop(inbox, "fine.json", {"amount": 3, "tags": []})
    calls = consumer.wait_calls("shop::robust", 1)
    assert calls[0]["name"] == "fine.json"
    log = bridge.wait_for_log(r"huge\.json", timeout=5)
    assert "broken.json" in log
    dead = workdir / "state" / "dead-letters.jsonl"
    deadline = time.monotonic() + 5
    while (not dead.exists() or len(dead.read_text().splitlines()) < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    records = [json.loads(line) for line in dead.read_text().splitlines()]
    assert sorted(r["event"]["name"] for r in records) == ["broken.json", "huge.json"]
    assert all(r["binding"] is None and r["error"]["code"] == "decode_error" for r in records)
    assert bridge.proc is not None and bridge.proc.poll() is None


def test_delivery_resumes_after_an_engine_restart(
    workdir: Path, bridge: BridgeProcess, consumer: Consumer, iii_engine: TestEngine
) -> None:
    _bind(consumer, "shop::survivor")
    bridge.wait_for_log(r"binding \S+ added")
    _drop(workdir / "inbox", "before.json", {"amount": 1, "tags": []})
    consumer.wait_calls("shop::survivor", 1)
    # The answer must reach the bridge first (a restart mid-call may rightly deliver it again): its checkpoint
    # records the file once the delivery is acknowledged.
    checkpoint = workdir / "state" / "file" / "inbox.jsonl"
    wait_for(lambda: any(r["p"] == "before.json" for r in read_jsonl(checkpoint)), 10, "before.json checkpointed")
    iii_engine.restart(downtime_s=1.0)
    bridge.wait_for_log(r"reconnected to the iii engine", timeout=20)
    iii_engine.wait_until(lambda: iii_engine.has_function("shop::survivor"), timeout=20)
    iii_engine.wait_until(lambda: any(not b.parked for b in iii_engine.bindings("inbox")), timeout=20)
    _drop(workdir / "inbox", "after.json", {"amount": 2, "tags": []})
    calls = consumer.wait_calls("shop::survivor", 2, timeout=30)
    _settled(0.5)
    assert [c["name"] for c in consumer.calls("shop::survivor")] == ["before.json", "after.json"], calls


def test_sigterm_exits_zero(workdir: Path, bridge: BridgeProcess) -> None:
    assert bridge.stop() == 0
    assert "bridge stopped" in bridge.log()


def test_an_unreachable_engine_is_reported_and_files_wait_for_it(workdir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"ws://127.0.0.1:{port}"
    with BridgeProcess(workdir / "bridge.yaml", url) as proc:
        proc.wait_for_log(r"the iii engine at \S+ is unreachable", timeout=15)
        _drop(workdir / "inbox", "waiting.json", {"amount": 4, "tags": []})
        with TestEngine(port=port) as engine:
            proc.wait_for_log(r"connected to the iii engine", timeout=20)
            consumer = Consumer(engine.url, engine=engine)
            try:
                consumer.function("shop::patient")
                consumer.bind("inbox", "shop::patient")
                calls = consumer.wait_calls("shop::patient", 1, timeout=20)
                assert calls[0]["name"] == "waiting.json"
            finally:
                consumer.close()
            assert proc.stop() == 0


def test_dry_run_prints_each_rendered_payload_and_changes_nothing(workdir: Path) -> None:
    _drop(workdir / "inbox", "one.json", {"amount": 5, "tags": ["t"]})
    proc = BridgeProcess(workdir / "bridge.yaml", "ws://127.0.0.1:9", extra_args=("--dry-run",))
    with proc:
        _drop(workdir / "inbox", "two.json", {"amount": 6, "tags": []})
        lines = wait_for(lambda: len(proc.stdout().splitlines()) >= 2 and proc.stdout().splitlines(), 15, "2 lines")
        assert proc.stop() == 0
    printed = sorted((json.loads(line) for line in lines), key=lambda r: r["payload"]["name"])
    assert printed == [
        {"function_id": "dry-run::inbox", "payload": {"name": "one.json", "amount": 5, "tags": ["t"], "label": "plain",
                                                      "summary": "one.json costs 5", "fixed": 7}},
        {"function_id": "dry-run::inbox", "payload": {"name": "two.json", "amount": 6, "tags": [], "label": "plain",
                                                      "summary": "two.json costs 6", "fixed": 7}},
    ]
    assert not (workdir / "state").exists()  # no checkpoint, no dead letters: a dry run leaves no state behind
    assert "connecting to the iii engine" not in proc.log()


def test_a_dry_run_beside_a_live_bridge_shows_new_files_and_leaves_them_to_it(
    workdir: Path, iii_engine: TestEngine, consumer: Consumer
) -> None:
    """`bridge up --dry-run` on the live bridge's own config, started first: it takes no lock (the live bridge does
    not stand by), prints the new file's payload, and leaves the file, the lock and the checkpoint to the live
    bridge, which delivers the file once and still moves it."""
    config = workdir / "bridge.yaml"
    config.write_text(CONFIG.format(max_bytes=4096).replace(
        "      settle_ms: 50\n", "      settle_ms: 50\n      after_delivery: move\n      move_to: ./done\n"
    ))
    inbox, state = workdir / "inbox", workdir / "state"
    dry = BridgeProcess(config, "ws://127.0.0.1:9", extra_args=("--dry-run",))
    with dry:
        dry.wait_for_log(r"file source inbox: watching")
        assert "file source inbox: dry run: reading" in dry.log()
        assert list(inbox.iterdir()) == []  # no lock file
        with BridgeProcess(config, iii_engine.url) as live:
            live.wait_for_log(r"file source inbox: watching")  # it holds the lock: no standing by
            assert "standing by" not in live.log()
            _drop(inbox, "new.json", {"amount": 8, "tags": ["n"]})
            # Nothing is bound on the live bridge yet, so the file waits on disk: the dry run reads it before it
            # is moved, whatever the timing.
            lines = wait_for(lambda: dry.stdout().splitlines(), 15, "the dry run's payload line")
            _bind(consumer, "shop::live")
            consumer.wait_calls("shop::live", 1)
            wait_for(lambda: (workdir / "done" / "new.json").exists(), 10, "the live bridge's move")
            _settled(1.0)
            assert live.proc is not None
            assert (inbox / ".iii-bridge.lock").read_text().split()[0] == str(live.proc.pid)
            assert live.stop() == 0
        assert dry.stop() == 0
    assert "standing by" not in dry.log()
    assert [json.loads(line) for line in dry.stdout().splitlines()] == [json.loads(line) for line in lines] == [
        {"function_id": "dry-run::inbox", "payload": {"name": "new.json", "amount": 8, "tags": ["n"],
                                                      "label": "plain", "summary": "new.json costs 8", "fixed": 7}},
    ]
    assert [c["name"] for c in consumer.calls("shop::live")] == ["new.json"]
    assert sorted(p.name for p in inbox.iterdir()) == [".iii-bridge.lock"]
    # The live bridge's checkpoint alone: the version it moved away, nothing of the dry run's.
    assert read_jsonl(state / "file" / "inbox.jsonl") == [{"p": "new.json", "d": True}]
    assert sorted(str(p.relative_to(state)) for p in state.rglob("*") if p.is_file()) == ["file/inbox.jsonl"]


def test_a_dry_run_skips_the_move_to_folder_inside_the_watched_directory(workdir: Path) -> None:
    """A live bridge never treats files in its own ``move_to`` folder as new; neither may its dry run (else every
    file the live bridge moves would show up again in the dry run's output)."""
    config = workdir / "bridge.yaml"
    config.write_text(CONFIG.format(max_bytes=4096).replace(
        "      settle_ms: 50\n", "      settle_ms: 50\n      after_delivery: move\n      move_to: ./inbox/done\n"
    ))
    (workdir / "inbox" / "done").mkdir(parents=True)
    _drop(workdir / "inbox" / "done", "moved-earlier.json", {"amount": 1, "tags": []})
    _drop(workdir / "inbox", "fresh.json", {"amount": 2, "tags": []})
    proc = BridgeProcess(config, "ws://127.0.0.1:9", extra_args=("--dry-run",))
    with proc:
        wait_for(lambda: proc.stdout().splitlines(), 15, "the dry run's payload line")
        _settled(1.0)
        assert proc.stop() == 0
    assert [json.loads(line)["payload"]["name"] for line in proc.stdout().splitlines()] == ["fresh.json"]
    assert (workdir / "inbox" / "fresh.json").exists()  # a dry run moves nothing

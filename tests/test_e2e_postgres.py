"""End to end on the postgres source: `bridge up` as a real process, the real iii-sdk consumer through the test
engine, a real PostgreSQL (a fresh database per test; a throwaway cluster for the server-restart test)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.cli import main
from bridge.testing.consumer import Consumer
from bridge.testing.engine import TestEngine
from tests.support.files import read_jsonl, wait_for
from tests.support.process import BridgeProcess
from tests.support.services import PostgresServer, pg_execute, pg_fetch

# Against an engine before 0.25 (trigger mode) and one with observe.v1 (observe mode).
pytestmark = pytest.mark.both_engines

# Placeholders in the configs below are <dsn> and friends (str.format would need every Jinja brace doubled).
LISTEN_CONFIG = """\
version: 1
engine:
  url: ${III_URL}
  reconcile_interval_ms: 500
state_dir: state
observability:
  listen: 127.0.0.1:0
defaults:
  delivery:
    timeout_ms: 5000
    retry: {max_attempts: 2, initial_backoff_ms: 50}
sources:
  signups:
    description: Sign-ups announced with NOTIFY user_signup
    postgres:
      dsn: <dsn>
      channels: [user_signup]
      payload_format: json
      reconnect_initial_backoff_ms: 100
      reconnect_max_backoff_ms: 1000
    payload:
      user_id: "{{ event.payload.id }}"
      tags: "{{ event.payload.tags }}"
      vip: "{{ event.payload.vip }}"
      note: "{{ event.payload.note }}"
      channel: "{{ event.channel }}"
      greeting: "hello {{ event.payload.name }} on {{ event.channel }}"
      event_id: "{{ event.id }}"
      pid: "{{ event.pid }}"
  pings:
    description: Plain-text pings
    postgres:
      dsn: <dsn>
      channels: [pings]
      payload_format: text
    payload:
      text: "{{ event.payload }}"
      channel: "{{ event.channel }}"
"""

OUTBOX_CONFIG = """\
version: 1
engine:
  url: ${III_URL:ws://127.0.0.1:49134}
  reconcile_interval_ms: 500
state_dir: state
defaults:
  delivery:
    timeout_ms: 5000
    retry: {max_attempts: 2, initial_backoff_ms: 50}
    dead_letter: <dead_letter>
  max_in_flight: <max_in_flight>
sources:
  orders:
    description: Orders from the outbox table
    postgres:
      dsn: <dsn>
      mode: outbox
      outbox_table: bridge_outbox
      poll_interval_ms: 500
      batch_size: 50
      reconnect_initial_backoff_ms: 100
      reconnect_max_backoff_ms: 1000
    payload:
      n: "{{ event.payload.n }}"
      event_id: "{{ event.id }}"
      channel: "{{ event.channel }}"
"""

LISTENER = "iii-bridge listen signups"  # the listening connection's application_name


def _write(path: Path, template: str, **values: Any) -> Path:
    text = template
    for key, value in values.items():
        text = text.replace(f"<{key}>", json.dumps(value))
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------- database


def _notify(dsn: str, channel: str, *payloads: str) -> int:
    """Send each payload on ``channel`` from one session, in order; returns that session's backend pid."""

    async def run() -> int:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            for payload in payloads:
                await conn.execute("SELECT pg_notify($1, $2)", channel, payload)
            pid: int = await conn.fetchval("SELECT pg_backend_pid()")
            return pid
        finally:
            await conn.close()

    return asyncio.run(run())


def _insert_rows(dsn: str, first: int, count: int) -> None:
    # One statement: the outbox trigger (FOR EACH STATEMENT) sends a single wake-up.
    pg_fetch(
        dsn,
        "INSERT INTO bridge_outbox (channel, payload)"
        " SELECT 'orders', jsonb_build_object('n', n) FROM generate_series($1::int, $2::int) AS n",
        first, first + count - 1,
    )


def _outbox_rows(dsn: str) -> int:
    count: int = pg_fetch(dsn, "SELECT count(*) AS n FROM bridge_outbox")[0]["n"]
    return count


def _create_outbox(config: Path, capsys: pytest.CaptureFixture[str], dsn: str) -> None:
    """The DDL exactly as `bridge sql` prints it, run against the database."""
    capsys.readouterr()
    assert main(["sql", "-c", str(config), "orders"]) == 0
    pg_execute(dsn, capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------- helpers


def _scrape(bridge: BridgeProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    match = re.search(r"serving /metrics, /healthz and /readyz on (http://127\.0\.0\.1:\d+)", bridge.log())
    assert match, bridge.log()
    with urllib.request.urlopen(f"{match.group(1)}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _gaps(bridge: BridgeProcess) -> float:
    return _scrape(bridge)[("bridge_postgres_listen_gaps_total", frozenset({("trigger_type", "signups")}))]


def _quiet(seconds: float = 0.5) -> None:
    """Give a duplicate (or a stray late delivery) the time to show up before counting."""
    time.sleep(seconds)


def _ns(consumer: Consumer, function_id: str) -> list[int]:
    return [c["n"] for c in consumer.calls(function_id)]


@pytest.fixture
def listen_config(tmp_path: Path, pg_database: str) -> Path:
    return _write(tmp_path / "bridge.yaml", LISTEN_CONFIG, dsn=pg_database)


def _outbox_config(tmp_path: Path, dsn: str, *, max_in_flight: int = 64, dead_letter: Any = None) -> Path:
    return _write(
        tmp_path / "bridge.yaml",
        OUTBOX_CONFIG,
        dsn=dsn,
        max_in_flight=max_in_flight,
        dead_letter=dead_letter or {"file": "dead-letters.jsonl"},
    )


@pytest.fixture
def listen_bridge(listen_config: Path, iii_engine: TestEngine, consumer: Consumer) -> Iterator[BridgeProcess]:
    """A bridge on LISTEN_CONFIG with ``pg::signup`` and ``pg::ping`` bound and both sources listening."""
    consumer.function("pg::signup")
    consumer.bind("signups", "pg::signup")
    consumer.function("pg::ping")
    consumer.bind("pings", "pg::ping")
    proc = BridgeProcess(listen_config, iii_engine.url).start()
    try:
        proc.wait_for_log(r"binding \S+ added: signups → pg::signup")
        proc.wait_for_log(r"binding \S+ added: pings → pg::ping")
        proc.wait_for_log(r"listening on user_signup at")
        proc.wait_for_log(r"listening on pings at")
        yield proc
    finally:
        proc.kill()


# ------------------------------------------------------------------------------------------------ listen


def test_notify_payloads_reach_the_function_templated_with_native_types(
    listen_bridge: BridgeProcess, listen_config: Path, consumer: Consumer, pg_database: str
) -> None:
    first = {"id": 7, "tags": ["a", "b"], "vip": True, "note": None, "name": "Ada"}
    second = {"id": 8, "tags": [], "vip": False, "note": "hi", "name": "Bob"}
    pid = _notify(pg_database, "user_signup", json.dumps(first), "not json", json.dumps(second))
    _notify(pg_database, "pings", '{"id": 1}', "42", "")
    calls = consumer.wait_calls("pg::signup", 2)
    assert len(calls) == 2, calls
    assert {k: v for k, v in calls[0].items() if k != "event_id"} == {
        "user_id": 7,
        "tags": ["a", "b"],
        "vip": True,
        "note": None,
        "channel": "user_signup",
        "greeting": "hello Ada on user_signup",
        "pid": pid,
    }
    assert re.fullmatch(rf"pg:user_signup:{pid}:\d+", calls[0]["event_id"])
    assert (calls[1]["user_id"], calls[1]["vip"], calls[1]["note"]) == (8, False, "hi")
    assert calls[0]["event_id"] != calls[1]["event_id"]
    # payload_format text: every payload stays the string it was, "42" and the empty payload included.
    pings = consumer.wait_calls("pg::ping", 3)
    assert pings == [
        {"text": '{"id": 1}', "channel": "pings"},
        {"text": "42", "channel": "pings"},
        {"text": "", "channel": "pings"},
    ]
    dead = listen_config.parent / "state" / "dead-letters.jsonl"
    [record] = wait_for(lambda: read_jsonl(dead), 10, "the dead letter of the non-JSON NOTIFY")
    assert record["source"] == "signups"
    assert record["binding"] is None
    assert record["payload"] is None
    assert record["error"]["code"] == "decode_error"
    assert "not JSON" in record["error"]["message"]
    assert record["event"]["payload"] == "not json"
    assert record["event"]["channel"] == "user_signup"
    assert re.fullmatch(rf"pg:user_signup:{pid}:\d+", record["event"]["id"])
    # The stream goes on after the bad payload.
    _notify(pg_database, "user_signup", json.dumps({**first, "id": 9}))
    calls = consumer.wait_calls("pg::signup", 3)
    assert [c["user_id"] for c in calls] == [7, 8, 9]
    _quiet(0.3)
    assert len(read_jsonl(dead)) == 1
    assert listen_bridge.stop() == 0


def test_a_terminated_listener_reconnects_logs_and_counts_the_gap(
    listen_bridge: BridgeProcess, consumer: Consumer, pg_database: str
) -> None:
    assert _gaps(listen_bridge) == 0
    _notify(pg_database, "user_signup", json.dumps({"id": 1, "tags": [], "vip": False, "note": None, "name": "a"}))
    consumer.wait_calls("pg::signup", 1)
    rows = pg_fetch(
        pg_database,
        "SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = $1",
        LISTENER,
    )
    assert [r["killed"] for r in rows] == [True]
    log = listen_bridge.wait_for_log(r"listening on user_signup again; notifications sent between \S+ and \S+ "
                                     r"were lost", timeout=10)
    assert "the listening connection to" in log and "was lost" in log
    assert _gaps(listen_bridge) == 1
    _notify(pg_database, "user_signup", json.dumps({"id": 2, "tags": [], "vip": False, "note": None, "name": "b"}))
    calls = consumer.wait_calls("pg::signup", 2)
    assert [c["user_id"] for c in calls] == [1, 2]
    # The other source's connection was never touched: it counts no gap.
    assert _scrape(listen_bridge)[("bridge_postgres_listen_gaps_total", frozenset({("trigger_type", "pings")}))] == 0


def test_two_listen_replicas_deliver_each_notification_once_and_fail_over(
    listen_config: Path, iii_engine: TestEngine, consumer: Consumer, pg_database: str
) -> None:
    consumer.function("pg::signup")
    consumer.bind("signups", "pg::signup")
    replicas = [BridgeProcess(listen_config, iii_engine.url, log_path=listen_config.with_name(f"replica-{i}.log"))
                for i in range(2)]
    try:
        replicas[0].start()
        replicas[0].wait_for_log(r"listening on user_signup at")
        replicas[1].start()
        replicas[1].wait_for_log(r"another bridge listens on user_signup")
        replicas[0].wait_for_log(r"binding \S+ added: signups → pg::signup")
        # The standby does not provide the trigger type, so it cannot draw the binding away from the listener.
        assert not re.search(r"binding \S+ added: signups", replicas[1].log())

        def signup(i: int) -> str:
            return json.dumps({"id": i, "tags": [], "vip": False, "note": None, "name": f"u{i}"})

        _notify(pg_database, "user_signup", *[signup(i) for i in range(50)])
        consumer.wait_calls("pg::signup", 50)
        _quiet()
        assert sorted(c["user_id"] for c in consumer.calls("pg::signup")) == list(range(50))

        holders = [p for p in replicas if re.search(r"listening on user_signup at", p.log())]
        assert len(holders) == 1, [p.log() for p in replicas]
        [holder] = holders
        [standby] = [p for p in replicas if p is not holder]
        holder.kill()
        killed_at = time.monotonic()
        standby.wait_for_log(r"the replica that listened is gone; this one listens now", timeout=10)
        assert time.monotonic() - killed_at < 5
        standby.wait_for_log(r"binding \S+ added: signups → pg::signup")  # replayed to the new provider
        _notify(pg_database, "user_signup", *[signup(i) for i in range(100, 130)])
        consumer.wait_calls("pg::signup", 80)
        _quiet()
        ids = Counter(c["user_id"] for c in consumer.calls("pg::signup"))
        assert sorted(ids) == [*range(50), *range(100, 130)]
        assert set(ids.values()) == {1}, ids
    finally:
        for proc in replicas:
            if proc.proc is not None:
                proc.kill()


def test_a_function_bound_after_both_listen_replicas_started_gets_notifications_at_once(
    tmp_path: Path, pg_database: str, iii_engine: TestEngine, consumer: Consumer
) -> None:
    config = _write(
        tmp_path / "bridge.yaml",
        LISTEN_CONFIG.replace("reconcile_interval_ms: 500", "reconcile_interval_ms: 30000"),
        dsn=pg_database,
    )
    replicas = [BridgeProcess(config, iii_engine.url, log_path=tmp_path / f"replica-{i}.log") for i in range(2)]
    try:
        replicas[0].start()
        replicas[0].wait_for_log(r"listening on user_signup at")
        replicas[1].start()
        replicas[1].wait_for_log(r"another bridge listens on user_signup")
        _quiet(1.5)  # past the one-off reconcile each bridge runs 1 s after connecting
        consumer.function("pg::late")
        consumer.bind("signups", "pg::late")
        replicas[0].wait_for_log(r"binding \S+ added: signups → pg::late")  # the listening replica provides it
        payload = json.dumps({"id": 1, "tags": [], "vip": False, "note": None, "name": "late"})
        _notify(pg_database, "user_signup", *[payload] * 10)
        consumer.wait_calls("pg::late", 10, timeout=3)
    finally:
        for proc in replicas:
            if proc.proc is not None:
                proc.kill()


# ------------------------------------------------------------------------------------------------ outbox


def test_outbox_rows_inserted_while_the_bridge_is_down_are_delivered_then_deleted(
    tmp_path: Path, pg_database: str, iii_engine: TestEngine, consumer: Consumer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _outbox_config(tmp_path, pg_database)
    _create_outbox(config, capsys, pg_database)
    _insert_rows(pg_database, 0, 20)
    consumer.function("pg::order")
    consumer.bind("orders", "pg::order")
    with BridgeProcess(config, iii_engine.url) as proc:
        consumer.wait_calls("pg::order", 20)
        wait_for(lambda: _outbox_rows(pg_database) == 0, 10, "an empty outbox")
        _insert_rows(pg_database, 20, 5)  # woken by the trigger's NOTIFY while running
        consumer.wait_calls("pg::order", 25)
        wait_for(lambda: _outbox_rows(pg_database) == 0, 10, "an empty outbox")
        _quiet(0.3)
        assert proc.stop() == 0
    calls = consumer.calls("pg::order")
    assert sorted(c["n"] for c in calls) == list(range(25))
    assert all(c["channel"] == "orders" and re.fullmatch(r"pg:bridge_outbox:\d+", c["event_id"]) for c in calls)
    assert len({c["event_id"] for c in calls}) == 25


def test_outbox_kill_9_mid_stream_loses_no_row(
    tmp_path: Path, pg_database: str, iii_engine: TestEngine, consumer: Consumer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _outbox_config(tmp_path, pg_database, max_in_flight=8)
    _create_outbox(config, capsys, pg_database)
    _insert_rows(pg_database, 0, 2000)

    async def slow(payload: Any) -> Any:
        await asyncio.sleep(0.01)  # ~800 rows/s with 8 in flight: the kill lands mid-stream
        return {"ok": True}

    consumer.function("pg::order", slow)
    consumer.bind("orders", "pg::order")
    first = BridgeProcess(config, iii_engine.url).start()
    try:
        consumer.wait_calls("pg::order", 300, timeout=20)
    finally:
        first.kill()
    assert len(set(_ns(consumer, "pg::order"))) < 2000
    assert _outbox_rows(pg_database) > 0
    with BridgeProcess(config, iii_engine.url) as second:
        wait_for(lambda: set(_ns(consumer, "pg::order")) >= set(range(2000)), 30, "every row delivered")
        wait_for(lambda: _outbox_rows(pg_database) == 0, 10, "an empty outbox")
        assert second.stop() == 0
    assert sorted(set(_ns(consumer, "pg::order"))) == list(range(2000))


@pytest.mark.trigger_only("observe mode: the first owner delivers alone; see the README, Replicas")
def test_two_outbox_replicas_share_the_rows_and_deliver_each_once(
    tmp_path: Path, pg_database: str, iii_engine: TestEngine, consumer: Consumer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _outbox_config(tmp_path, pg_database, max_in_flight=16)
    _create_outbox(config, capsys, pg_database)

    async def steady(payload: Any) -> Any:
        await asyncio.sleep(0.002)
        return {"ok": True}

    consumer.function("pg::order", steady)
    consumer.bind("orders", "pg::order")
    replicas = [BridgeProcess(config, iii_engine.url, log_path=tmp_path / f"replica-{i}.log") for i in range(2)]
    try:
        for proc in replicas:
            proc.start()
            proc.wait_for_log(r"binding \S+ added: orders → pg::order")
        _insert_rows(pg_database, 0, 2000)
        consumer.wait_calls("pg::order", 2000, timeout=30)
        wait_for(lambda: _outbox_rows(pg_database) == 0, 10, "an empty outbox")
        _quiet()
        counts = Counter(_ns(consumer, "pg::order"))
        assert sorted(counts) == list(range(2000))
        assert set(counts.values()) == {1}, {n: c for n, c in counts.items() if c > 1}
        # Both replicas did part of the work (the engine tells each caller's worker id to the function).
        callers = Counter(r.payload["_caller_worker_id"] for r in consumer.records("pg::order"))
        assert len(callers) == 2, callers
        for proc in replicas:
            assert proc.stop() == 0
    finally:
        for proc in replicas:
            if proc.proc is not None:
                proc.kill()


def test_an_outbox_row_that_cannot_be_delivered_goes_to_the_dead_letter_table_and_is_removed(
    tmp_path: Path, pg_database: str, iii_engine: TestEngine, consumer: Consumer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _outbox_config(tmp_path, pg_database, dead_letter={"postgres_table": "bridge_dead_letters"})
    _create_outbox(config, capsys, pg_database)

    def broken(payload: Any) -> Any:
        raise RuntimeError("warehouse is closed")

    consumer.function("pg::broken", broken)
    consumer.bind("orders", "pg::broken")
    with BridgeProcess(config, iii_engine.url) as proc:
        proc.wait_for_log(r"binding \S+ added: orders → pg::broken")
        _insert_rows(pg_database, 41, 1)
        row_id = pg_fetch(pg_database, "SELECT id FROM bridge_outbox")[0]["id"]
        wait_for(
            lambda: pg_fetch(pg_database, "SELECT to_regclass('bridge_dead_letters') IS NOT NULL AS ok")[0]["ok"]
            and pg_fetch(pg_database, "SELECT count(*) AS n FROM bridge_dead_letters")[0]["n"] >= 1,
            15,
            "a dead-letter row",
        )
        wait_for(lambda: _outbox_rows(pg_database) == 0, 10, "the outbox row removed")
        assert proc.stop() == 0
    [record] = pg_fetch(
        pg_database,
        "SELECT source, event::text AS event, binding::text AS binding, payload::text AS payload, error_code,"
        " error_message, attempts, first_attempt_at, last_attempt_at FROM bridge_dead_letters",
    )
    assert record["source"] == "orders"
    event = json.loads(record["event"])
    assert event["id"] == f"pg:bridge_outbox:{row_id}"
    assert (event["channel"], event["payload"]) == ("orders", {"n": 41})
    binding = json.loads(record["binding"])
    assert (binding["function_id"], binding["namespace"]) == ("pg::broken", "default")
    assert json.loads(record["payload"]) == {"n": 41, "event_id": f"pg:bridge_outbox:{row_id}", "channel": "orders"}
    assert record["error_code"] == "invocation_failed"
    assert "warehouse is closed" in record["error_message"]
    assert record["attempts"] == 2
    assert record["first_attempt_at"] < record["last_attempt_at"]
    assert len(consumer.calls("pg::broken")) == 2


def test_a_dry_run_prints_the_outbox_rows_and_leaves_them_in_the_table(
    tmp_path: Path, pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _outbox_config(tmp_path, pg_database)
    _create_outbox(config, capsys, pg_database)
    _insert_rows(pg_database, 0, 5)

    def printed() -> list[Any]:
        return [json.loads(line) for line in proc.stdout().splitlines() if line.strip()]

    # No engine: a dry run never connects to one.
    with BridgeProcess(config, "ws://127.0.0.1:1", extra_args=("--dry-run",)) as proc:
        proc.wait_for_log(r"dry run on outbox bridge_outbox .*none is claimed, locked or deleted")
        wait_for(lambda: len(printed()) >= 5, 10, "5 payloads printed")
        _insert_rows(pg_database, 5, 3)  # woken by the trigger's NOTIFY while running
        wait_for(lambda: len(printed()) >= 8, 10, "8 payloads printed")
        _quiet(0.3)
        assert proc.stop() == 0
    lines = printed()
    assert [line["payload"]["n"] for line in lines] == list(range(8))
    assert {line["function_id"] for line in lines} == {"dry-run::orders"}
    assert len({line["payload"]["event_id"] for line in lines}) == 8
    assert _outbox_rows(pg_database) == 8


# ------------------------------------------------------------------------------------------ server restart


@pytest.fixture(scope="module")
def throwaway_pg() -> Iterator[PostgresServer]:
    with PostgresServer(force_throwaway=True) as server:
        yield server


def test_outbox_loses_nothing_across_a_postgres_restart(
    tmp_path: Path, throwaway_pg: PostgresServer, iii_engine: TestEngine, consumer: Consumer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dsn = throwaway_pg.create_database()
    try:
        config = _outbox_config(tmp_path, dsn, max_in_flight=8)
        _create_outbox(config, capsys, dsn)
        _insert_rows(dsn, 0, 2000)

        async def slow(payload: Any) -> Any:
            await asyncio.sleep(0.01)
            return {"ok": True}

        consumer.function("pg::order", slow)
        consumer.bind("orders", "pg::order")
        with BridgeProcess(config, iii_engine.url) as proc:
            consumer.wait_calls("pg::order", 300, timeout=20)
            throwaway_pg.restart_cluster()
            assert len(set(_ns(consumer, "pg::order"))) < 2000
            wait_for(lambda: set(_ns(consumer, "pg::order")) >= set(range(2000)), 30, "every row delivered")
            wait_for(lambda: _outbox_rows(dsn) == 0, 10, "an empty outbox")
            assert proc.stop() == 0
        assert "cannot claim outbox rows" in proc.log() or "could not be deleted and committed" in proc.log()
        assert sorted(set(_ns(consumer, "pg::order"))) == list(range(2000))
    finally:
        throwaway_pg.drop_database(dsn)

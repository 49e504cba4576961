"""End to end: an engine outage, a replica's death and a replica's join lose nothing (DESIGN.md §3 "Bindings across
engine outages" and "Replicas").

`bridge up` runs as real processes against the test engine, a real Kafka-protocol broker, a real PostgreSQL and
real files; the function author is the real iii-sdk (:class:`~bridge.testing.consumer.Consumer`), which re-binds by
itself after an engine restart, in whatever order relative to the bridge. Every test has its own topic, group,
database and directory, and kills every bridge it started.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bridge.bindings import observable_function_id
from bridge.cli import main
from bridge.testing.consumer import Consumer
from bridge.testing.engine import TestEngine
from tests.support.files import drop, read_jsonl, wait_for
from tests.support.process import BridgeProcess
from tests.support.services import committed_offsets, pg_execute, pg_fetch

# Against an engine before 0.25 (trigger mode) and one with observe.v1 (observe mode).
pytestmark = pytest.mark.both_engines

PARTITIONS = 4
RECONCILE_MS = 1000
OUTAGE_S = 3.0
JOIN_S = 30.0  # bound on waits that include a Kafka group join or rebalance (Tansu takes seconds)

# Placeholders are <name> (str.format would need every Jinja brace doubled). `rebind_grace_ms` keeps its default
# (60 s): far longer than any outage here, so nothing may be dropped.
ENGINE = f"""\
version: 1
engine:
  url: ${{III_URL:ws://127.0.0.1:49134}}
  reconcile_interval_ms: {RECONCILE_MS}
state_dir: state
defaults:
  delivery:
    timeout_ms: 5000
    retry: {{max_attempts: 2, initial_backoff_ms: 50, jitter: 0}}
    dead_letter: {{file: dead-letters.jsonl}}
"""

FILE_SOURCES = """\
sources:
  inbox:
    description: Files dropped into the inbox
    file:
      path: ./inbox
      include: ["*.json"]
      content: json
      settle_ms: 50
    payload:
      name: "{{ event.name }}"
      n: "{{ event.content.n }}"
"""

KAFKA_SOURCES = """\
sources:
  orders:
    description: Orders from Kafka
    kafka:
      bootstrap_servers: <bootstrap>
      topics: [<topic>]
      group_id: <group>
      start_from: earliest
      commit_interval_ms: 500
      client_options: {session_timeout_ms: 3000, heartbeat_interval_ms: 500, rebalance_timeout_ms: 3000}
    payload:
      id: "{{ event.id }}"
      partition: "{{ event.partition }}"
      offset: "{{ event.offset }}"
"""

OUTBOX_SOURCES = """\
  max_in_flight: 4
sources:
  orders:
    description: Orders from the outbox table
    postgres:
      dsn: <dsn>
      mode: outbox
      outbox_table: bridge_outbox
      poll_interval_ms: 500
      batch_size: 20
    payload:
      n: "{{ event.payload.n }}"
      event_id: "{{ event.id }}"
"""

LISTEN_SOURCES = """\
sources:
  signups:
    description: Sign-ups announced with NOTIFY user_signup
    postgres:
      dsn: <dsn>
      channels: [user_signup]
      payload_format: json
      reconnect_initial_backoff_ms: <backoff_ms>
      reconnect_max_backoff_ms: <backoff_ms>
    payload:
      n: "{{ event.payload.n }}"
"""


def _write(workdir: Path, sources: str, **values: Any) -> Path:
    text = ENGINE + sources
    for key, value in values.items():
        text = text.replace(f"<{key}>", str(value))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "bridge.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------- helpers


class _Background:
    """Run ``fn`` on a thread of its own (the test goes on meanwhile); :meth:`result` joins and re-raises."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:
            self._error = exc

    def result(self, timeout: float = 60.0) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self._thread.name} did not finish within {timeout} s"
        if self._error is not None:
            raise self._error
        return self._value


def _restart_soon(engine: TestEngine, after_s: float, down_s: float = OUTAGE_S) -> _Background:
    """Restart the engine ``after_s`` from now, down ``down_s`` (it forgets every connection, function, trigger
    type and binding, as a restarted process would). The result is (went down, came back), monotonic."""

    def run() -> tuple[float, float]:
        time.sleep(after_s)
        down = time.monotonic()
        engine.restart(down_s)
        return down, time.monotonic()

    return _Background(run, "engine-restart")


def _mid_stream(consumer: Consumer, function_id: str, outage: tuple[float, float]) -> None:
    """The outage hit a stream: calls arrived both before it and after it."""
    times = [r.at for r in consumer.records(function_id)]
    assert any(t < outage[0] for t in times), "no call before the outage"
    assert any(t > outage[1] for t in times), "no call after the outage"


def _dead_letters(workdir: Path) -> list[dict[str, Any]]:
    return read_jsonl(workdir / "state" / "dead-letters.jsonl")


def _all_delivered(received: Callable[[], set[Any]], wanted: set[Any], workdir: Path, timeout: float = JOIN_S) -> None:
    """Wait until ``received()`` covers ``wanted``; on timeout say what is missing and what was dead-lettered."""
    try:
        wait_for(lambda: received() >= wanted, timeout, "every event delivered")
    except AssertionError:
        missing = sorted(wanted - received(), key=str)
        dead = _dead_letters(workdir)
        errors = sorted({f"{d['error']['code']}: {d['error']['message']}" for d in dead})
        raise AssertionError(
            f"{len(missing)} of {len(wanted)} event(s) never reached the function within {timeout} s (e.g. "
            f"{missing[:5]}); {len(dead)} dead letter(s) {errors[:3]}"
        ) from None


def _registrations(engine: TestEngine, worker: str, trigger_type: str) -> int:
    """How many times ``worker`` advertised ``trigger_type`` (registertriggertype frames it sent; observe mode:
    registerfunction frames of the type's observable function)."""
    if engine.features:
        return sum(1 for f in engine.frames_of("registerfunction", direction="in", worker=worker)
                   if f.get("id") == observable_function_id(trigger_type))
    return sum(1 for f in engine.frames_of("registertriggertype", direction="in", worker=worker)
               if f.get("id") == trigger_type)


def _late_consumer(make_consumer: Callable[..., Consumer]) -> Consumer:
    """A consumer whose SDK reconnects exactly 10 s after a drop: after any bridge (whose backoff tops out below
    that), so the bridge holds stale bindings for seconds until this consumer's replay arrives."""
    consumer: Consumer = make_consumer(reconnect_initial_delay_ms=10_000, reconnect_max_delay_ms=10_000,
                                       reconnect_jitter=0.0)
    return consumer


def _came_back_before(engine: TestEngine, first: str, then: str) -> None:
    """Worker ``first`` made its latest connection before worker ``then`` made its own."""
    names = [w.name for w in engine.workers()]
    last = {name: len(names) - 1 - names[::-1].index(name) for name in (first, then)}
    assert last[first] < last[then], f"{first} should have reconnected before {then}: {names}"


def _bound(proc: BridgeProcess, engine: TestEngine, worker: str, pattern: str, timeout: float = 10.0) -> None:
    """Wait for ``pattern`` (a binding added) in ``proc``'s log; on timeout say whether the engine replayed the binding
    to ``worker`` and whether its SDK answered."""
    try:
        proc.wait_for_log(pattern, timeout=timeout)
    except AssertionError as exc:
        sent = engine.frames_of("registertrigger", direction="out", worker=worker)
        answered = engine.frames_of("triggerregistrationresult", direction="in", worker=worker)
        raise AssertionError(f"{exc}\nthe engine sent {worker} {len(sent)} registertrigger frame(s) and got "
                             f"{len(answered)} triggerregistrationresult frame(s) back") from None


def _reconnected(*procs: BridgeProcess) -> None:
    for proc in procs:
        proc.wait_for_log(r"reconnected to the iii engine", timeout=JOIN_S)


@pytest.fixture
def bridges(iii_engine: TestEngine) -> Iterator[Callable[..., BridgeProcess]]:
    """Factory: ``bridges(config, name=...)`` starts `bridge up` with worker name ``name`` (through III_WORKER_NAME)
    and waits for its engine link; every bridge started is killed after the test."""
    started: list[BridgeProcess] = []

    def start(config: Path, name: str | None = None, *, wait_connected: bool = True) -> BridgeProcess:
        env = {"III_WORKER_NAME": name} if name else {}
        log_path = config.with_name(f"{name or 'bridge'}-{time.monotonic_ns()}.log")
        proc = BridgeProcess(config, iii_engine.url, env=env, log_path=log_path)
        started.append(proc)
        proc.start(wait_ready=wait_connected)
        if wait_connected:
            proc.wait_for_log(r"connected to the iii engine")
        return proc

    yield start
    for proc in started:
        proc.kill()


# ------------------------------------------------------------------------------------------------ Kafka helpers


def _new_topic(bootstrap: str) -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:12]
    topic, group = f"outage-{suffix}", f"bridge-outage-{suffix}"

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
        finally:
            await admin.close()

    asyncio.run(create())
    return topic, group


def _produce(bootstrap: str, topic: str, numbers: range, *, batches: int = 1, pause_s: float = 0.0
             ) -> list[tuple[int, int]]:
    """Produce ``numbers`` (keys spread them over the partitions) in ``batches`` with ``pause_s`` between them;
    returns the (partition, offset) of each."""

    async def run() -> list[tuple[int, int]]:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        placed: list[tuple[int, int]] = []
        try:
            size = -(-len(numbers) // batches)
            for start in range(0, len(numbers), size):
                chunk = numbers[start:start + size]
                futures = [await producer.send(topic, json.dumps({"n": n}).encode(), key=f"k{n}".encode())
                           for n in chunk]
                placed += [(m.partition, m.offset) for m in await asyncio.gather(*futures)]
                if pause_s:
                    await asyncio.sleep(pause_s)
        finally:
            await producer.stop()
        return placed

    return asyncio.run(run())


def _ids(topic: str, placed: list[tuple[int, int]]) -> set[str]:
    return {f"kafka:{topic}:{p}:{o}" for p, o in placed}


def _ends(placed: list[tuple[int, int]]) -> dict[int, int]:
    ends = dict.fromkeys(range(PARTITIONS), 0)
    for partition, offset in placed:
        ends[partition] = max(ends[partition], offset + 1)
    return ends


def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    return asyncio.run(committed_offsets(bootstrap, group, topic, PARTITIONS))


def _received(consumer: Consumer, function_id: str) -> set[str]:
    return {r.payload["id"] for r in consumer.records(function_id)}


def _assigned(proc: BridgeProcess) -> set[int]:
    """The partitions ``proc`` holds according to its log."""
    held: set[int] = set()
    for line in proc.log().splitlines():
        found = re.search(r"partitions (assigned|revoked): (.*)$", line)
        if found is not None:
            parts = {int(p) for p in re.findall(r"/(\d+)", found.group(2))}
            held = held | parts if found.group(1) == "assigned" else held - parts
    return held


# ------------------------------------------------------------------------------------------- Postgres helpers


def _notify(dsn: str, numbers: range) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            for n in numbers:
                await conn.execute("SELECT pg_notify('user_signup', $1)", json.dumps({"n": n}))
        finally:
            await conn.close()

    asyncio.run(run())


# ------------------------------------------------------------------------ 1. an engine restart mid-stream


def test_files_dropped_across_an_engine_restart_are_all_delivered_and_checkpointed(
    tmp_path: Path, iii_engine: TestEngine, make_consumer: Callable[..., Consumer],
    bridges: Callable[..., BridgeProcess],
) -> None:
    """60 files over ~5 s, the engine down for 3 s in the middle, a function slow enough that calls are in flight
    when it goes; the bridge is back first and its binding stays stale until the consumer re-binds."""
    consumer = _late_consumer(make_consumer)
    config = _write(tmp_path, FILE_SOURCES)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    bridge = bridges(config, "outage-files")

    async def slow(payload: Any) -> Any:
        await asyncio.sleep(0.1)
        return {"ok": True}

    consumer.function("shop::on-file", slow)
    consumer.bind("inbox", "shop::on-file")
    bridge.wait_for_log(r"binding \S+ added: inbox → shop::on-file")
    restart = _restart_soon(iii_engine, after_s=1.0)
    for n in range(60):
        drop(inbox, f"f{n:02d}.json", {"n": n})
        time.sleep(0.08)
    outage = restart.result()
    _reconnected(bridge)
    _all_delivered(lambda: {c["n"] for c in consumer.calls("shop::on-file")}, set(range(60)), tmp_path)
    _mid_stream(consumer, "shop::on-file", outage)
    _came_back_before(iii_engine, "outage-files", consumer.worker_name)
    checkpoint = tmp_path / "state" / "file" / "inbox.jsonl"
    versions = {f"f{n:02d}.json": f"{(inbox / f'f{n:02d}.json').stat().st_mtime_ns}:"
                                  f"{(inbox / f'f{n:02d}.json').stat().st_size}" for n in range(60)}

    def recorded() -> dict[str, str]:
        return {r["p"]: r["v"] for r in read_jsonl(checkpoint) if not r.get("d")}

    wait_for(lambda: recorded() == versions, 10, "every file version checkpointed")
    assert _dead_letters(tmp_path) == []
    assert bridge.stop() == 0
    assert not re.search(r"binding .*dropped", bridge.log()), bridge.log()[-3000:]


def test_kafka_messages_produced_across_an_engine_restart_are_all_delivered_and_committed(
    tmp_path: Path, iii_engine: TestEngine, make_consumer: Callable[..., Consumer], kafka_broker: str,
    bridges: Callable[..., BridgeProcess],
) -> None:
    """2,000 messages on 4 partitions produced over ~4 s, the engine down for 3 s in the middle; the bridge is back
    first and holds a stale binding for seconds until the consumer's replay arrives: events wait for it, none is
    dead-lettered, filtered or committed undelivered."""
    topic, group = _new_topic(kafka_broker)
    config = _write(tmp_path, KAFKA_SOURCES, bootstrap=kafka_broker, topic=topic, group=group)
    consumer = _late_consumer(make_consumer)
    bridge = bridges(config, "outage-kafka")

    async def steady(payload: Any) -> Any:
        await asyncio.sleep(0.005)
        return {"ok": True}

    consumer.function("shop::on-order", steady)
    consumer.bind("orders", "shop::on-order")
    wait_for(lambda: _assigned(bridge) == set(range(PARTITIONS)), JOIN_S, "the bridge holding every partition")
    restart = _restart_soon(iii_engine, after_s=1.0)
    placed = _produce(kafka_broker, topic, range(2000), batches=40, pause_s=0.1)
    outage = restart.result()
    _reconnected(bridge)
    wanted = _ids(topic, placed)
    assert {p for p, _ in placed} == set(range(PARTITIONS))
    _all_delivered(lambda: _received(consumer, "shop::on-order"), wanted, tmp_path)
    _mid_stream(consumer, "shop::on-order", outage)
    _came_back_before(iii_engine, "outage-kafka", consumer.worker_name)
    ends = _ends(placed)
    wait_for(lambda: _committed(kafka_broker, group, topic) == ends, 15, f"committed offsets at the end {ends}")
    assert _dead_letters(tmp_path) == []
    assert bridge.stop() == 0
    assert _committed(kafka_broker, group, topic) == ends


def test_outbox_rows_inserted_across_an_engine_restart_are_all_delivered_and_deleted(
    tmp_path: Path, iii_engine: TestEngine, consumer: Consumer, pg_database: str,
    bridges: Callable[..., BridgeProcess], capsys: pytest.CaptureFixture[str],
) -> None:
    """500 rows inserted 25 at a time over ~2 s, the engine down for 3 s in the middle, 4 rows in flight on a slow
    function: every row is delivered and then deleted, none dead-lettered. Here the consumer re-binds first: the
    bridge is frozen (SIGSTOP) once it saw the drop and thawed once the engine holds the consumer's binding again,
    parked for want of a provider."""
    config = _write(tmp_path, OUTBOX_SOURCES, dsn=json.dumps(pg_database))
    capsys.readouterr()
    assert main(["sql", "-c", str(config), "orders"]) == 0
    pg_execute(pg_database, capsys.readouterr().out)

    async def slow(payload: Any) -> Any:
        await asyncio.sleep(0.02)
        return {"ok": True}

    consumer.function("pg::order", slow)
    consumer.bind("orders", "pg::order")
    bridge = bridges(config, "outage-outbox")
    bridge.wait_for_log(r"binding \S+ added: orders → pg::order")
    restart = _restart_soon(iii_engine, after_s=0.8)
    for first in range(0, 500, 25):
        pg_fetch(pg_database, "INSERT INTO bridge_outbox (channel, payload) SELECT 'orders', jsonb_build_object('n', n)"
                         " FROM generate_series($1::int, $2::int) AS n", first, first + 24)
        time.sleep(0.1)
        if first == 250:
            bridge.wait_for_log(r"the iii engine at \S+ is unreachable", timeout=5)
            bridge.freeze()
    outage = restart.result()
    try:
        iii_engine.wait_until(lambda: [b for b in iii_engine.bindings("orders") if b.parked], timeout=10)
    finally:
        bridge.thaw()
    _reconnected(bridge)
    _all_delivered(lambda: {c["n"] for c in consumer.calls("pg::order")}, set(range(500)), tmp_path)
    _mid_stream(consumer, "pg::order", outage)
    _came_back_before(iii_engine, consumer.worker_name, "outage-outbox")
    wait_for(lambda: pg_fetch(pg_database, "SELECT count(*) AS n FROM bridge_outbox")[0]["n"] == 0, 10,
             "an empty outbox")
    assert _dead_letters(tmp_path) == []
    assert bridge.stop() == 0


# ----------------------------------------------------------------------------------------------- 2. failover


@pytest.mark.trigger_only("observe mode: the first owner delivers alone; see the README, Replicas")
def test_killing_the_kafka_replica_that_registered_last_mid_stream_loses_no_offset(
    tmp_path: Path, iii_engine: TestEngine, consumer: Consumer, kafka_broker: str,
    bridges: Callable[..., BridgeProcess],
) -> None:
    """Two replicas share the partitions; the one that registered last is the type's provider (it heard the bind).
    Killed mid-stream, the engine parks the binding; the survivor keeps delivering its partitions, takes the type
    over and, after the rebalance, the dead replica's partitions from their committed offsets."""
    topic, group = _new_topic(kafka_broker)
    config = _write(tmp_path, KAFKA_SOURCES, bootstrap=kafka_broker, topic=topic, group=group)

    async def slow(payload: Any) -> Any:
        await asyncio.sleep(0.03)
        return {"ok": True}

    consumer.function("shop::slow", slow)
    consumer.bind("orders", "shop::slow")
    replicas = {name: bridges(config, name) for name in ("kafka-a", "kafka-b")}
    wait_for(lambda: all(_assigned(p) for p in replicas.values())
             and set().union(*(_assigned(p) for p in replicas.values())) == set(range(PARTITIONS)), 2 * JOIN_S,
             "the partitions split between both replicas")
    placed = _produce(kafka_broker, topic, range(800))
    wait_for(lambda: len(consumer.records("shop::slow")) >= 200, JOIN_S, "200 calls")
    [last] = [f.worker_name for f in iii_engine.frames
              if f.direction == "in" and f.data.get("type") == "registertriggertype"
              and f.data.get("id") == "orders"][-1:]
    assert last in replicas
    replicas.pop(last).kill()
    [survivor] = replicas
    assert len(_received(consumer, "shop::slow")) < 800, "the kill should land mid-stream"
    _all_delivered(lambda: _received(consumer, "shop::slow"), _ids(topic, placed), tmp_path, timeout=2 * JOIN_S)
    ends = _ends(placed)
    wait_for(lambda: _committed(kafka_broker, group, topic) == ends, 15, f"committed offsets at the end {ends}")
    assert [t.worker_name for t in iii_engine.trigger_types() if t.id == "orders"] == [survivor]
    assert _dead_letters(tmp_path) == []


# ----------------------------------------------------------------------------------------------- 3. a replica joins


@pytest.mark.trigger_only("observe mode: the first owner delivers alone; see the README, Replicas")
def test_a_bind_reaches_every_kafka_replica_within_the_reconcile_interval_and_an_unbind_too(
    tmp_path: Path, iii_engine: TestEngine, consumer: Consumer, kafka_broker: str,
    bridges: Callable[..., BridgeProcess],
) -> None:
    """Both replicas run before anything is bound. The bind goes to the provider only; the other mirrors the
    engine's list within reconcile_interval_ms, joins the group and delivers its partitions. The unbind too: after
    reconcile_interval_ms + 5 s no call arrives. Neither replica registers the type again meanwhile (no ping-pong)."""
    bound_s = RECONCILE_MS / 1000 + 5
    topic, group = _new_topic(kafka_broker)
    config = _write(tmp_path, KAFKA_SOURCES, bootstrap=kafka_broker, topic=topic, group=group)
    names = ("join-a", "join-b")
    replicas = {name: bridges(config, name) for name in names}
    for proc in replicas.values():
        proc.wait_for_log(r"no function is bound; joining group")
    time.sleep(RECONCILE_MS / 1000 + 0.5)  # past the first reconcile of both
    before = _produce(kafka_broker, topic, range(200))
    consumer.function("shop::late")
    bound_at = time.monotonic()
    binding = consumer.bind("orders", "shop::late")
    _all_delivered(lambda: _received(consumer, "shop::late"), _ids(topic, before), tmp_path, timeout=bound_s)
    # Both replicas hold the binding (the mirror joined the group because of it) and deliver their partitions.
    wait_for(lambda: all(_assigned(p) for p in replicas.values())
             and set().union(*(_assigned(p) for p in replicas.values())) == set(range(PARTITIONS)), JOIN_S,
             "the partitions split between both replicas")
    seen = len(consumer.records("shop::late"))
    after = _produce(kafka_broker, topic, range(200, 400))
    _all_delivered(lambda: _received(consumer, "shop::late"), _ids(topic, after), tmp_path, timeout=JOIN_S)
    callers = {r.payload["_caller_worker_id"] for r in consumer.records("shop::late")[seen:]}
    assert len(callers) == 2, f"both replicas should deliver: {callers}"
    first_call = min(r.at for r in consumer.records("shop::late"))
    assert first_call - bound_at <= bound_s

    unbound_at = time.monotonic()
    binding.unregister()
    _produce(kafka_broker, topic, range(400, 600))
    time.sleep(max(0.0, unbound_at + bound_s - time.monotonic()))
    quiet_from = len(consumer.records("shop::late"))
    _produce(kafka_broker, topic, range(600, 800))
    time.sleep(2.0)
    late = consumer.records("shop::late")[quiet_from:]
    assert not late, f"{len(late)} call(s) more than {bound_s} s after the unbind, e.g. {late[0].payload}"
    for name in names:
        assert _registrations(iii_engine, name, "orders") == 1, f"{name} registered the type again"
    assert _dead_letters(tmp_path) == []


# ------------------------------------------------------------------------------------ 4. exclusive standbys


def test_a_listen_standby_never_registers_the_type_while_it_is_not_the_active_replica(
    tmp_path: Path, iii_engine: TestEngine, consumer: Consumer, pg_database: str,
    bridges: Callable[..., BridgeProcess],
) -> None:
    """A listens, B stands by. A is killed: B takes over (and may register). A comes back as A2 and stands by. B's
    listening connection is cut while B is frozen, so A2 takes over; thawed, B stands by. Then the engine restarts,
    so every SDK replays what it was given: a standby (A2 before its turn, B after its own) must not register the
    type at any point, or the engine would route the binding to a replica that does not listen."""
    config = _write(tmp_path, LISTEN_SOURCES, dsn=json.dumps(pg_database), backoff_ms=100)
    consumer.function("pg::signup")
    consumer.bind("signups", "pg::signup")
    a = bridges(config, "listen-a")
    a.wait_for_log(r"listening on user_signup at")
    b = bridges(config, "listen-b")
    b.wait_for_log(r"another bridge listens on user_signup")
    _bound(a, iii_engine, "listen-a", r"binding \S+ added: signups → pg::signup")
    _notify(pg_database, range(0, 20))
    consumer.wait_calls("pg::signup", 20)
    time.sleep(RECONCILE_MS / 1000 + 0.5)
    assert _registrations(iii_engine, "listen-b", "signups") == 0

    a.kill()
    b.wait_for_log(r"the replica that listened is gone; this one listens now", timeout=10)
    _bound(b, iii_engine, "listen-b", r"binding \S+ added: signups → pg::signup")
    _notify(pg_database, range(100, 120))
    consumer.wait_calls("pg::signup", 40)

    a2 = bridges(config, "listen-a2")
    a2.wait_for_log(r"another bridge listens on user_signup")
    time.sleep(RECONCILE_MS / 1000 + 0.5)
    assert _registrations(iii_engine, "listen-a2", "signups") == 0
    b_turn = _registrations(iii_engine, "listen-b", "signups")
    assert b_turn >= 1
    b.freeze()  # so that it cannot take the lock straight back
    try:
        killed = pg_fetch(pg_database,
                          "SELECT pg_terminate_backend(pid) AS ok FROM pg_locks WHERE locktype = 'advisory'"
                          " AND granted AND database = (SELECT oid FROM pg_database"
                          " WHERE datname = current_database())")
        assert [r["ok"] for r in killed] == [True]
        a2.wait_for_log(r"the replica that listened is gone; this one listens now", timeout=10)
    finally:
        b.thaw()
    b.wait_for_log(r"another replica took over listening meanwhile", timeout=10)
    _bound(a2, iii_engine, "listen-a2", r"binding \S+ added: signups → pg::signup")

    iii_engine.restart(1.0)
    _reconnected(a2, b)
    iii_engine.wait_until(lambda: [x for x in iii_engine.bindings("signups") if not x.parked], timeout=JOIN_S)
    time.sleep(2 * RECONCILE_MS / 1000 + 0.5)  # two reconcile passes of each replica
    assert _registrations(iii_engine, "listen-b", "signups") == b_turn, "B registered while standing by"
    assert _registrations(iii_engine, "listen-a2", "signups") >= 1
    assert iii_engine.provider("signups") == "listen-a2"
    _notify(pg_database, range(200, 220))
    wait_for(lambda: {c["n"] for c in consumer.calls("pg::signup")} >= {*range(20), *range(100, 120),
                                                                        *range(200, 220)}, 10,
             "every notification sent while a replica listened delivered")


def test_a_file_standby_never_registers_the_type_and_takes_over_when_the_active_replica_dies(
    tmp_path: Path, iii_engine: TestEngine, consumer: Consumer, bridges: Callable[..., BridgeProcess]
) -> None:
    """A watches the inbox, B stands by; A is killed and B takes over (registering is its right now); A comes back
    as A2 and stands by through an engine restart without registering; every file reaches the function."""
    config = _write(tmp_path, FILE_SOURCES)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    consumer.function("shop::on-file")
    consumer.bind("inbox", "shop::on-file")
    a = bridges(config, "file-a")
    _bound(a, iii_engine, "file-a", r"binding \S+ added: inbox → shop::on-file")
    b = bridges(config, "file-b")
    b.wait_for_log(r"another bridge holds \S+; standing by")
    drop(inbox, "one.json", {"n": 1})
    consumer.wait_calls("shop::on-file", 1)
    assert _registrations(iii_engine, "file-b", "inbox") == 0

    a.kill()
    b.wait_for_log(r"this replica is now active", timeout=10)
    _bound(b, iii_engine, "file-b", r"binding \S+ added: inbox → shop::on-file")
    drop(inbox, "two.json", {"n": 2})
    a2 = bridges(config, "file-a2")
    a2.wait_for_log(r"another bridge holds \S+; standing by")
    iii_engine.restart(1.0)
    _reconnected(a2, b)
    iii_engine.wait_until(lambda: [x for x in iii_engine.bindings("inbox") if not x.parked], timeout=JOIN_S)
    drop(inbox, "three.json", {"n": 3})
    wait_for(lambda: {c["n"] for c in consumer.calls("shop::on-file")} >= {1, 2, 3}, 10, "every file delivered")
    time.sleep(2 * RECONCILE_MS / 1000)  # two reconcile passes of each replica
    assert _registrations(iii_engine, "file-a2", "inbox") == 0, "the standby registered the type"
    assert iii_engine.provider("inbox") == "file-b"


# ------------------------------------------------------------------------------- 5. a condition cut in flight


def test_a_condition_call_cut_by_an_engine_restart_is_retried_and_the_event_delivered(
    tmp_path: Path, iii_engine: TestEngine, consumer: Consumer, bridges: Callable[..., BridgeProcess]
) -> None:
    """The condition function is still thinking when the engine goes: the link failure says nothing about the
    condition, so it is asked again once the binding is back, and the event is delivered (not skipped)."""
    config = _write(tmp_path, FILE_SOURCES)
    (tmp_path / "inbox").mkdir()
    bridge = bridges(config, "outage-condition")

    async def is_wanted(payload: Any) -> bool:
        await asyncio.sleep(1.5)
        return True

    consumer.function("shop::is-wanted", is_wanted)
    consumer.function("shop::on-file")
    consumer.bind("inbox", "shop::on-file", {"condition_function_id": "shop::is-wanted"})
    bridge.wait_for_log(r"binding \S+ added: inbox → shop::on-file")
    drop(tmp_path / "inbox", "cut.json", {"n": 1})
    consumer.wait_calls("shop::is-wanted", 1)
    assert consumer.records("shop::is-wanted")[0].outcome == "pending"
    iii_engine.restart(1.0)
    calls = consumer.wait_calls("shop::on-file", 1, timeout=JOIN_S)
    assert [c["name"] for c in calls] == ["cut.json"]
    assert len(consumer.calls("shop::is-wanted")) >= 2, "the condition should have been asked again"
    assert _dead_letters(tmp_path) == []
    assert bridge.stop() == 0


# ------------------------------------------------------------------------------------ 6. one name, two bridges


def test_a_second_bridge_with_the_same_worker_name_exits_1_and_says_why(
    tmp_path: Path, iii_engine: TestEngine, consumer: Consumer, bridges: Callable[..., BridgeProcess]
) -> None:
    name = f"bridge-{uuid.uuid4().hex[:8]}"
    configs = []
    for where in ("one", "two"):
        path = _write(tmp_path / where, FILE_SOURCES)
        (tmp_path / where / "inbox").mkdir()
        path.write_text(path.read_text().replace("  reconcile_interval_ms", f"  worker_name: {name}\n"
                                                                            "  reconcile_interval_ms"))
        configs.append(path)
    first = bridges(configs[0])
    second = bridges(configs[1], wait_connected=False)
    assert second.proc is not None
    assert second.proc.wait(timeout=20) == 1
    log = second.log()
    assert name in log and "engine.worker_name" in log and "III_WORKER_NAME" in log, log[-3000:]
    # The first bridge goes on as if nothing happened.
    consumer.function("shop::on-file")
    consumer.bind("inbox", "shop::on-file")
    first.wait_for_log(r"binding \S+ added: inbox → shop::on-file")
    drop(tmp_path / "one" / "inbox", "still.json", {"n": 1})
    assert [c["name"] for c in consumer.wait_calls("shop::on-file", 1)] == ["still.json"]
    assert first.stop() == 0

"""Postgres → iii function: NOTIFY latency and outbox throughput of `bridge up` against a minimal hand-written
asyncpg + iii-sdk relay, in the same run.

    python bench/postgres_latency.py [--notifications 10000] [--rows 20000] [--interval-ms 2] [--rounds 3]

Every party runs in a process of its own, as in production: the iii test engine (``python -m
bridge.testing.engine``), a consumer worker whose function ``bench::sink`` notes when each call arrives, the two
relays under test (a ``bridge up`` child, and this script in ``--role handwritten``), and this driver, which sends
the NOTIFYs and inserts the outbox rows. Postgres is BRIDGE_TEST_PG_DSN, else the local server on 127.0.0.1:5432,
else a throwaway cluster; a scratch database is created and dropped.

- listen: both relays run at once, each LISTENing on a channel of its own, and the NOTIFYs alternate between the
  two channels, one every ``--interval-ms``. Each relay so gets ``--notifications`` NOTIFYs under the very same
  machine conditions: on a small shared machine, runs made one after the other differ by 10-20 % in latency
  whatever the relay (seen here), which would swamp the difference under test. Each payload carries its send
  time (``time.time()``); the function subtracts it from its own receive time (same machine, same clock). 500
  warm-up NOTIFYs per relay are not counted. At the default pace (500/s in all) a 2-core machine keeps up: the
  whole path (sender, Postgres, relay, engine, consumer) costs about 1 ms of CPU per NOTIFY.
- outbox: ``--rows`` rows wait in the table; the clock starts when the relay is told to go (the bridge: when the
  function is bound, since rows wait while nothing is bound; the hand-written relay: a "go" line) and stops at
  the function's last receive. Throughput needs the machine to itself, so the relays take turns, ``--rounds``
  times each, and the medians are compared.

Both relays render the same payload (``i``, ``t``, ``channel``, ``id``; outbox rows: ``n``, ``channel``), call
synchronously (``trigger_async`` awaited, namespace ``default``) with at most 64 calls in flight, and claim outbox
rows in batches of 100 with ``FOR UPDATE SKIP LOCKED``, deleting them once delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import asyncpg

from bridge.config import load_config
from bridge.sources.postgres.source import outbox_ddl

# The test services and helpers live in the repository's tests/support (not shipped with the package): a
# benchmark runs from a checkout, as `python bench/NAME.py`, so it imports them from there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.process import BridgeProcess
from tests.support.services import PostgresServer, free_port

FUNCTION = "bench::sink"
LISTEN_TYPE = "bench.listen"
OUTBOX_TYPE = "bench.outbox"
BRIDGE_CHANNEL = "bench_bridge"
HAND_CHANNEL = "bench_hand"
TABLE = "bench_outbox"
BATCH = 100
IN_FLIGHT = 64
WARMUP = 500
WAIT_S = 180.0

CONFIG = f"""\
version: 1
engine:
  url: ${{III_URL}}
state_dir: state
defaults:
  delivery:
    mode: sync
    timeout_ms: 30000
  max_in_flight: {IN_FLIGHT}
sources:
  {LISTEN_TYPE}:
    description: benchmark NOTIFYs
    postgres:
      dsn: <dsn>
      channels: [{BRIDGE_CHANNEL}]
      payload_format: json
    payload:
      i: "{{{{ event.payload.i }}}}"
      t: "{{{{ event.payload.t }}}}"
      channel: "{{{{ event.channel }}}}"
      id: "{{{{ event.id }}}}"
  {OUTBOX_TYPE}:
    description: benchmark outbox rows
    postgres:
      dsn: <dsn>
      mode: outbox
      outbox_table: {TABLE}
      batch_size: {BATCH}
      poll_interval_ms: 500
    payload:
      n: "{{{{ event.payload.n }}}}"
      channel: "{{{{ event.channel }}}}"
"""


# ------------------------------------------------------------------------------------------------ consumer


def _consumer(url: str) -> None:
    """``--role consumer``: one function recording (receive time, payload); driven by lines on stdin."""
    from bridge.testing.consumer import Binding, Consumer

    # The SDK logs a deprecation notice per register_trigger; this worker's stderr is the benchmark's output.
    logging.getLogger("iii").setLevel(logging.ERROR)
    lock = threading.Lock()
    got: list[tuple[float, Any]] = []

    async def sink(payload: Any) -> Any:
        now = time.time()
        with lock:
            got.append((now, payload))
        return None

    consumer = Consumer(url, worker_name=f"bench-consumer-{os.getpid()}")
    consumer.function(FUNCTION, sink)
    bindings: list[Binding] = []
    _reply({"ready": True})
    try:
        for line in sys.stdin:
            command, *args = line.split()
            if command == "bind":
                bindings.append(consumer.bind(args[0], FUNCTION))
                _reply({"ok": True})
            elif command == "unbind":  # unbind TRIGGER_TYPE
                for binding in [b for b in bindings if b.trigger_type == args[0]]:
                    binding.unregister()
                    bindings.remove(binding)
                _reply({"ok": True})
            elif command == "reset":
                with lock:
                    got.clear()
                _reply({"ok": True})
            elif command == "wait":  # wait COUNT TIMEOUT_S [CHANNEL]: calls whose payload names that channel
                _reply(_wait(lock, got, int(args[0]), float(args[1]), args[2] if len(args) > 2 else None))
            elif command == "quit":
                break
    finally:
        consumer.close()


def _wait(
    lock: threading.Lock, got: list[tuple[float, Any]], n: int, timeout_s: float, channel: str | None
) -> dict[str, Any]:
    def matching() -> list[tuple[float, Any]]:
        with lock:
            snapshot = list(got)
        if channel is None:
            return snapshot
        return [(at, p) for at, p in snapshot if isinstance(p, dict) and p.get("channel") == channel]

    deadline = time.monotonic() + timeout_s
    while True:
        snapshot = matching()
        if len(snapshot) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    timed = [(at, p) for at, p in snapshot if isinstance(p, dict) and "t" in p and "id" in p]
    # The event id ends with the relay's receive time in ns: it splits the latency into NOTIFY → relay (Postgres
    # and the relay's socket) and relay → function (the relay's own work, the engine, the consumer).
    received = [int(p["id"].rsplit(":", 1)[1]) / 1e9 for _, p in timed]
    keys = {json.dumps([p.get("i"), p.get("n")]) for _, p in snapshot if isinstance(p, dict)}
    return {
        "count": len(snapshot),
        "distinct": len(keys),
        "last": max((at for at, _ in snapshot), default=None),
        "latency_ms": _percentiles([(at - p["t"]) * 1000 for at, p in timed]) if timed else None,
        "to_relay_ms": _percentiles([(r - p["t"]) * 1000 for r, (_, p) in zip(received, timed, strict=True)])
        if timed else None,
        "relay_to_function_ms": _percentiles([(at - r) * 1000 for r, (at, _) in zip(received, timed, strict=True)])
        if timed else None,
    }


def _percentiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98], "max": max(values), "mean": statistics.fmean(values)}


def _reply(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


# ------------------------------------------------------------------------------------------- hand-written


async def _handwritten(url: str, dsn: str) -> None:
    """``--role handwritten``: the relay a developer would write in an afternoon. LISTEN → trigger_async at once;
    on a "go" line, drain the outbox table in batches."""
    from iii import InitOptions, register_worker

    from bridge.testing.consumer import shutdown_client

    iii: Any = register_worker(url, InitOptions(
        worker_name=f"bench-handwritten-{os.getpid()}", otel={"enabled": False}, enable_metrics_reporting=False,
    ))
    slots = asyncio.Semaphore(IN_FLIGHT)
    tasks: set[asyncio.Task[None]] = set()

    async def call(payload: dict[str, Any]) -> None:
        async with slots:
            await iii.trigger_async(
                {"function_id": FUNCTION, "payload": payload, "namespace": "default", "timeout_ms": 30000}
            )

    def on_notify(_conn: Any, pid: int, channel: str, text: str) -> None:
        received_ns = time.time_ns()  # the bridge's event id carries the same figure
        body = json.loads(text)
        event_id = f"pg:{channel}:{pid}:{received_ns}"
        task = asyncio.create_task(call({"i": body["i"], "t": body["t"], "channel": channel, "id": event_id}))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    listener = await asyncpg.connect(dsn)
    worker = await asyncpg.connect(dsn)
    await listener.add_listener(HAND_CHANNEL, on_notify)
    _reply({"ready": True})
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if line.strip() == "go":
                await _drain_outbox(worker, call)
            elif not line or line.strip() == "quit":
                break
    finally:
        await listener.close()
        await worker.close()
        shutdown_client(iii)


async def _drain_outbox(conn: Any, call: Any) -> None:
    while True:
        async with conn.transaction():
            rows = await conn.fetch(
                f"SELECT id, channel, payload::text AS payload FROM {TABLE} ORDER BY id LIMIT $1"
                " FOR UPDATE SKIP LOCKED", BATCH,
            )
            if not rows:
                return
            await asyncio.gather(
                *(call({"n": json.loads(r["payload"])["n"], "channel": r["channel"]}) for r in rows)
            )
            await conn.execute(f"DELETE FROM {TABLE} WHERE id = ANY($1::bigint[])", [r["id"] for r in rows])


# --------------------------------------------------------------------------------------------------- driver


class _Child:
    """A child process speaking one JSON line per command on stdout."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.ask(None, timeout_s=60)  # {"ready": true}

    def ask(self, command: str | None, timeout_s: float = 30.0) -> dict[str, Any]:
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        if command is not None:
            stdin.write(command + "\n")
            stdin.flush()
        line = _readline(stdout, timeout_s)
        if not line:
            raise RuntimeError(f"{self.proc.args!r} exited with {self.proc.poll()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def tell(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.tell("quit")
                self.proc.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _readline(stream: IO[str], timeout_s: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if reader.is_alive():
        raise TimeoutError(f"no answer within {timeout_s} s")
    return result[0]


async def _send_notifications(dsn: str, count: int, interval_s: float, first: int) -> None:
    """``count`` NOTIFYs to each relay, alternating channels, one every ``interval_s``; numbered from ``first``."""
    channels = (BRIDGE_CHANNEL, HAND_CHANNEL)
    conn = await asyncpg.connect(dsn)
    try:
        start = time.perf_counter()
        for k in range(count * len(channels)):
            delay = start + k * interval_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)  # this loop does nothing else; asyncio.sleep would round to whole milliseconds
            payload = json.dumps({"i": first + k // len(channels), "t": time.time()})
            await conn.execute("SELECT pg_notify($1, $2)", channels[k % len(channels)], payload)
    finally:
        await conn.close()


async def _sql(dsn: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        if not args:  # a script (the DDL) or a plain query: execute() runs several statements, fetchval one
            return await conn.fetchval(query, timeout=120) if ";" not in query else await conn.execute(query)
        return await conn.fetchval(query, *args, timeout=120)
    finally:
        await conn.close()


def _insert_rows(dsn: str, rows: int) -> None:
    asyncio.run(_sql(
        dsn,
        f"INSERT INTO {TABLE} (channel, payload) SELECT 'orders', jsonb_build_object('n', n)"
        " FROM generate_series(1, $1::int) AS n",
        rows,
    ))


def _wait_empty(dsn: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while asyncio.run(_sql(dsn, f"SELECT count(*) FROM {TABLE}")) > 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{TABLE} not empty after {timeout_s} s")
        time.sleep(0.05)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuMeter:
    """CPU per event of each process in the path (Postgres' own backends are not counted). There is no
    whole-machine figure: /proc/stat charges CPU by sampling at timer ticks, which a load paced at a steady
    2 ms aliases into nonsense (seen: 22 us and 2,175 us per NOTIFY for similar runs)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start = self._sample()

    def _sample(self) -> dict[str, float]:
        return {name: _cpu_s(pid) for name, pid in self.pids.items()}

    def per_event_us(self, events: int) -> dict[str, float]:
        end = self._sample()
        return {name: (end[name] - self._start[name]) / events * 1e6 for name in end}


_Relays = dict[str, int]  # relay name → its pid


def _measure_listen(
    consumer: _Child, dsn: str, relays: _Relays, shared: dict[str, int], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Latency of each relay over interleaved NOTIFYs; CPU per NOTIFY of each relay, and of the engine and
    consumer for both relays' calls together."""
    interval = args.interval_ms / 1000
    consumer.ask("reset")
    asyncio.run(_send_notifications(dsn, WARMUP, interval, -WARMUP))
    consumer.ask(f"wait {2 * WARMUP} 30", timeout_s=40)
    consumer.ask("reset")
    meter = _CpuMeter({**relays, **shared})
    asyncio.run(_send_notifications(dsn, args.notifications, interval, 0))
    results: dict[str, dict[str, Any]] = {}
    for name, channel in (("bridge", BRIDGE_CHANNEL), ("hand-written", HAND_CHANNEL)):
        result = consumer.ask(f"wait {args.notifications} 60 {channel}", timeout_s=70)
        if result["count"] != args.notifications or result["distinct"] != args.notifications:
            print(f"  warning: {name}: {result['count']} calls, {result['distinct']} distinct, for "
                  f"{args.notifications} NOTIFYs")
        results[name] = result
    cpu = meter.per_event_us(args.notifications)
    for name in results:
        results[name]["cpu_us"] = cpu[name]
    results["shared_cpu_us"] = {name: cpu[name] / 2 for name in shared}  # per NOTIFY of either relay
    return results


def _measure_outbox(consumer: _Child, dsn: str, rows: int, pids: dict[str, int], go: Any) -> dict[str, Any]:
    _insert_rows(dsn, rows)  # they wait: nothing is bound to the bridge's outbox source, the other relay waits
    consumer.ask("reset")
    meter = _CpuMeter(pids)
    started = time.time()
    go()
    result = consumer.ask(f"wait {rows} {WAIT_S}", timeout_s=WAIT_S + 10)
    if result["count"] < rows:
        raise RuntimeError(f"only {result['count']} of {rows} outbox rows arrived within {WAIT_S} s")
    if result["distinct"] != rows:
        print(f"  warning: {result['count']} calls, {result['distinct']} distinct, for {rows} rows")
    cpu_us = meter.per_event_us(rows)
    _wait_empty(dsn)
    return {"rate": rows / (result["last"] - started), "cpu_us": cpu_us}


def _cpu_text(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {us:.0f}" for name, us in cpu.items())


def _report_listen(name: str, listen: dict[str, Any]) -> str:
    lat = listen["latency_ms"]
    return (
        f"  {name:<12} p50 {lat['p50']:5.2f} ms  p90 {lat['p90']:5.2f}  p99 {lat['p99']:5.2f}  max {lat['max']:7.2f};"
        f"  NOTIFY → relay p50 {listen['to_relay_ms']['p50']:.2f}, relay → function p50 "
        f"{listen['relay_to_function_ms']['p50']:.2f} ms;  relay CPU {listen['cpu_us']:.0f} us/NOTIFY"
    )


def _drive(args: argparse.Namespace) -> None:
    port = free_port()
    engine = subprocess.Popen(
        [sys.executable, "-m", "bridge.testing.engine", "--port", str(port)], stdout=subprocess.PIPE, text=True
    )
    server = PostgresServer().start()
    dsn = server.create_database()
    consumer: _Child | None = None
    relay: _Child | None = None
    bridge: BridgeProcess | None = None
    try:
        assert engine.stdout is not None
        engine_url = _readline(engine.stdout, 30).strip()
        with tempfile.TemporaryDirectory(prefix="bench-pg-") as scratch:
            config = Path(scratch) / "bridge.yaml"
            config.write_text(CONFIG.replace("<dsn>", json.dumps(dsn)))
            [outbox] = [s for s in load_config(config, {"III_URL": engine_url}).sources if s.id == OUTBOX_TYPE]
            asyncio.run(_sql(dsn, outbox_ddl(outbox)))
            consumer = _Child([sys.executable, __file__, "--role", "consumer", "--engine", engine_url])
            bridge = BridgeProcess(config, engine_url).start(timeout=60)
            bridge.wait_for_log(rf"listening on {BRIDGE_CHANNEL} at", timeout=30)
            consumer.ask(f"bind {LISTEN_TYPE}")
            bridge.wait_for_log(rf"binding \S+ added: {LISTEN_TYPE} → ", timeout=30)
            relay = _Child([sys.executable, __file__, "--role", "handwritten", "--engine", engine_url, "--dsn", dsn])
            assert bridge.proc is not None
            relays = {"bridge": bridge.proc.pid, "hand-written": relay.proc.pid}
            shared = {"engine": engine.pid, "consumer": consumer.proc.pid, "driver": os.getpid()}
            print(f"{args.notifications} NOTIFYs per relay, interleaved, one every {args.interval_ms} ms; "
                  f"{args.rows} outbox rows x {args.rounds} rounds per relay; {os.cpu_count()} CPUs; load average "
                  f"{os.getloadavg()[0]:.2f} (other work skews the figures)")
            listen = _measure_listen(consumer, dsn, relays, shared, args)
            print("listen (interleaved):")
            for name in relays:
                print(_report_listen(name, listen[name]))
            print(f"  {'':<12} engine, consumer, driver CPU per NOTIFY: {_cpu_text(listen['shared_cpu_us'])} us")
            outbox = _outbox_rounds(consumer, relay, dsn, relays, shared, args)
            _summary(listen, outbox)
            if bridge.stop() != 0:
                raise RuntimeError("the bridge did not exit cleanly; log:\n" + bridge.log()[-4000:])
    finally:
        if bridge is not None:
            bridge.kill()
        for child in (relay, consumer):
            if child is not None:
                child.close()
        engine.send_signal(signal.SIGTERM)
        try:
            engine.wait(timeout=15)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()
        server.drop_database(dsn)
        server.stop()


def _outbox_rounds(
    consumer: _Child, relay: _Child, dsn: str, relays: _Relays, shared: dict[str, int], args: argparse.Namespace
) -> dict[str, list[dict[str, Any]]]:
    """The relays take turns draining ``--rows`` rows, ``--rounds`` times each."""
    starts = {"bridge": lambda: consumer.ask(f"bind {OUTBOX_TYPE}"), "hand-written": lambda: relay.tell("go")}
    outbox: dict[str, list[dict[str, Any]]] = {name: [] for name in relays}
    print("outbox (the relays take turns):")
    for round_no in range(1, args.rounds + 1):
        for name, pid in relays.items():
            outbox[name].append(_measure_outbox(consumer, dsn, args.rows, {"relay": pid, **shared}, starts[name]))
            if name == "bridge":
                consumer.ask(f"unbind {OUTBOX_TYPE}")  # the bridge leaves the next rows to the other relay
        print(f"  round {round_no}: " + "; ".join(
            f"{name} {runs[-1]['rate']:,.0f} rows/s (CPU us per row: {_cpu_text(runs[-1]['cpu_us'])})"
            for name, runs in outbox.items()
        ), flush=True)
    return outbox


def _summary(listen: dict[str, dict[str, Any]], outbox: dict[str, list[dict[str, Any]]]) -> None:
    p50 = {n: float(listen[n]["latency_ms"]["p50"]) for n in outbox}
    p99 = {n: float(listen[n]["latency_ms"]["p99"]) for n in outbox}
    rate = {n: float(statistics.median(r["rate"] for r in runs)) for n, runs in outbox.items()}
    print("summary:")
    for n in outbox:
        print(f"  {n:<12} listen p50 {p50[n]:.2f} ms  p99 {p99[n]:.2f} ms   outbox {rate[n]:,.0f} rows/s (median)")
    # Targets of issue 13: the bridge's latency at most the hand-written relay's (ratio <= 1.0), its outbox rate
    # at least 1.3 times the hand-written one.
    ratios = {
        "listen p50 latency": (p50["bridge"] / p50["hand-written"], "<=", 1.0),
        "listen p99 latency": (p99["bridge"] / p99["hand-written"], "<=", 1.0),
        "outbox rows/s": (rate["bridge"] / rate["hand-written"], ">=", 1.3),
    }
    print("bridge / hand-written: " + ", ".join(f"{k} {v:.2f}" for k, (v, _, _) in ratios.items()))
    checks = [(f"{k} ratio {op} {target}", v <= target if op == "<=" else v >= target)
              for k, (v, op, target) in ratios.items()]
    print("targets: " + ", ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in checks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notifications", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--interval-ms", type=float, default=2.0, help="time between NOTIFYs")
    parser.add_argument("--rounds", type=int, default=3, help="bridge / hand-written pairs (the medians are reported)")
    parser.add_argument("--role", choices=["driver", "consumer", "handwritten"], default="driver",
                        help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "consumer":
        _consumer(args.engine)
    elif args.role == "handwritten":
        asyncio.run(_handwritten(args.engine, args.dsn))
    else:
        _drive(args)


if __name__ == "__main__":
    main()

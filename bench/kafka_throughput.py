"""Kafka → function throughput: the bridge against a minimal hand-written aiokafka + iii-sdk loop, same run.

    python bench/kafka_throughput.py [--messages 200000] [--rounds 2]

Starts a Tansu broker, the iii test engine in a process of its own (in-process it would share the GIL with the
SDK clients it routes for), and a consumer process whose no-op function counts its calls. N small JSON messages
go to a 4-partition topic once; then, alternating (a)(b)(a)(b)..., with a fresh consumer group each time:

(a) the bridge: `bridge up` with a kafka source (ordering partition, default max_in_flight and commit interval),
    the consumer's function bound to it, the default payload (the whole event);
(b) a hand-written loop in its own process: aiokafka fetches, one task per partition invokes the function with
    ``trigger_async`` once per message, the same payload, one call in flight per partition with partitions in
    parallel, and every second commits each partition up to its lowest offset not done (at-least-once).

The rate is events/s at the function from its first call to its N-th (group joins and start-up excluded).
For each process it also prints CPU µs per event (utime+stime from /proc over the same span, also for the
engine, the consumer and the broker) and peak RSS (VmHWM). The target is a bridge/hand-written ratio of at least
0.9. Run it on an otherwise idle machine: with 2 cores, other work shifts single rounds by 10-20 %, so the
summary takes the median of the rounds. ``--profile DIR`` samples each round's process with py-spy
(``pip install py-spy`` into the venv; it slows the rounds down).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from iii import InitOptions, register_worker
from iii.iii_types import RegisterTriggerInput

# The test services and helpers live in the repository's tests/support (not shipped with the package): a
# benchmark runs from a checkout, as `python bench/NAME.py`, so it imports them from there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.services import TansuBroker

PARTITIONS = 4
TRIGGER_TYPE = "bench.orders"
FUNCTION_ID = "bench::sink"
GROUP_TIMINGS = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 500, "rebalance_timeout_ms": 3000}
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_STALL_S = 60.0  # a round fails when the function got no call for this long
_COMMIT_INTERVAL_S = 1.0

BRIDGE_CONFIG = """\
version: 1
engine:
  url: {url}
state_dir: state
sources:
  {trigger_type}:
    description: benchmark topic
    kafka:
      bootstrap_servers: {bootstrap}
      topics: [{topic}]
      group_id: {group}
      start_from: earliest
      client_options: {client_options}
"""


# --------------------------------------------------------------------------------------------- /proc


def _cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces: the fields after it start behind the last ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


# ------------------------------------------------------------------------------------------ children


def _sdk(url: str, name: str) -> Any:
    return register_worker(url, InitOptions(worker_name=name, otel={"enabled": False}, enable_metrics_reporting=False))


def _consumer_main(url: str) -> None:
    """The function author: a no-op function that counts its calls. Commands on stdin: ``reset``, ``stat``."""
    state = {"count": 0, "first": 0.0, "last": 0.0}

    async def sink(payload: Any, metadata: Any = None) -> None:
        now = time.monotonic()
        if state["count"] == 0:
            state["first"] = now
        state["count"] += 1
        state["last"] = now

    iii = _sdk(url, f"bench-consumer-{os.getpid()}")
    try:
        iii.register_function(FUNCTION_ID, sink)
        with warnings.catch_warnings():
            # iii-sdk 0.25 deprecates trigger bindings (a warning and a log line); the bridge still serves them.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            logging.getLogger("iii.iii").setLevel(logging.ERROR)
            iii.register_trigger(RegisterTriggerInput(type=TRIGGER_TYPE, function_id=FUNCTION_ID, config={}))
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() == "reset":
                state.update(count=0, first=0.0, last=0.0)
            print(json.dumps(state), flush=True)
    finally:
        iii.shutdown()


def _event(record: Any) -> dict[str, Any]:
    """The same payload the bridge sends by default: the whole event."""
    timestamp = record.timestamp
    seconds, millis = divmod(timestamp, 1000)
    return {
        "id": f"kafka:{record.topic}:{record.partition}:{record.offset}",
        "source": TRIGGER_TYPE,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": None if record.key is None else record.key.decode(),
        "value": json.loads(record.value),
        "headers": {k: v.decode() for k, v in record.headers},
        "timestamp": timestamp,
        "timestamp_iso": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z",
    }


class _Partition:
    def __init__(self) -> None:
        self.records: deque[Any] = deque()
        self.ready = asyncio.Event()
        self.next_commit: int | None = None  # lowest offset not done (records run one at a time, in order)
        self.committed: int | None = None


async def _handwritten(url: str, bootstrap: str, topic: str, group: str) -> None:
    iii = _sdk(url, f"bench-loop-{os.getpid()}")
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", **GROUP_TIMINGS)
    parts: dict[Any, _Partition] = {}
    workers: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def work(part: _Partition) -> None:
        while True:
            if not part.records:
                part.ready.clear()
                await part.ready.wait()
                continue
            record = part.records[0]
            await iii.trigger_async({"function_id": FUNCTION_ID, "payload": _event(record), "namespace": "default",
                                     "timeout_ms": 30_000})
            part.records.popleft()
            part.next_commit = record.offset + 1

    async def commit() -> None:
        due = {tp: p.next_commit for tp, p in parts.items() if p.next_commit not in (None, p.committed)}
        if due:
            await consumer.commit(due)
            for tp, offset in due.items():
                parts[tp].committed = offset

    async def commit_loop() -> None:
        while True:
            await asyncio.sleep(_COMMIT_INTERVAL_S)
            await commit()

    async def fetch_loop() -> None:
        while True:
            # A short wait: a paused partition is resumed here, soon after its worker drained it.
            batch = await consumer.getmany(timeout_ms=100, max_records=500)
            for tp, records in batch.items():
                part = parts.get(tp)
                if part is None:
                    part = parts[tp] = _Partition()
                    part.next_commit = records[0].offset
                    workers.append(asyncio.create_task(work(part)))
                part.records.extend(records)
                part.ready.set()
            # Back-pressure: a partition with a long queue is not fetched until it drained.
            full = [tp for tp, p in parts.items() if len(p.records) > 1000]
            consumer.pause(*full)
            consumer.resume(*[tp for tp in parts if tp not in full])

    await consumer.start()
    tasks = [asyncio.create_task(fetch_loop()), asyncio.create_task(commit_loop())]
    try:
        await stop.wait()
    finally:
        for task in tasks + workers:
            task.cancel()
        await asyncio.gather(*tasks, *workers, return_exceptions=True)
        with contextlib.suppress(Exception):
            await commit()
        await consumer.stop()
        iii.shutdown()  # shutdown_async must run on the SDK loop; this one joins its thread


# ------------------------------------------------------------------------------------------ orchestra


@dataclass
class RoundResult:
    kind: str
    events: int
    seconds: float
    cpu_us_per_event: float
    peak_rss_mib: float
    others_us_per_event: dict[str, float]  # the engine's, the consumer's and the broker's CPU over the same span

    @property
    def rate(self) -> float:
        return self.events / self.seconds


class _Child:
    """A line-protocol child process (the engine prints its URL; the consumer answers commands)."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._lines: deque[str] = deque()
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self._lines.append(line.strip())
                self._cond.notify_all()

    def line(self, timeout: float = 60.0) -> str:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._lines), timeout):
                raise RuntimeError(f"no answer from {self.proc.args!r} within {timeout} s")
            return self._lines.popleft()

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self.line())
        return answer

    def stop(self) -> None:
        _terminate(self.proc)


def _terminate(proc: subprocess.Popen[Any], grace_s: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _prepare(bootstrap: str, topic: str, messages: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5)
    await producer.start()
    try:
        pending: list[asyncio.Future[Any]] = []
        for n in range(messages):
            value = json.dumps({"n": n, "sku": f"sku-{n % 97}", "qty": n % 5 + 1}).encode()
            pending.append(await producer.send(topic, value, key=f"k{n}".encode(), headers=[("trace", b"t")]))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


def _children_named(name: str) -> list[int]:
    """Pids of this process's children whose command name is ``name``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    head, tail = f.read().rsplit(")", 1)
                if head.split("(", 1)[1] == name and int(tail.split()[1]) == os.getpid():
                    pids.append(int(entry))
    return pids


def _run_round(kind: str, consumer: _Child, messages: int, args: list[str], cwd: Path,
               profile: Path | None, others: dict[str, int]) -> RoundResult:
    consumer.ask("reset")
    log = open(cwd / f"{kind}.log", "ab")  # noqa: SIM115  # closed below, after the process
    proc = subprocess.Popen(args, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    spy: subprocess.Popen[bytes] | None = None
    if profile is not None:
        # Collapsed stacks (one line per stack and its sample count), for flame graphs or a quick sort.
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(proc.pid), "--format", "raw", "--rate", "250",
                                "--nonblocking", "--output", str(profile)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        cpu_first = 0.0
        count_first = seen = 0
        others_first: dict[str, float] = {}
        last_progress = time.monotonic()
        while True:
            time.sleep(0.05)
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} exited with {proc.returncode}; see {cwd / f'{kind}.log'}")
            state = consumer.ask("stat")
            count = state["count"]
            if count and not cpu_first:
                cpu_first, count_first = _cpu_s(proc.pid), count
                others_first = {name: _cpu_s(pid) for name, pid in others.items()}
            if count >= messages:
                counted = max(1, count - count_first)
                cpu_us = (_cpu_s(proc.pid) - cpu_first) * 1e6 / counted
                others_us = {name: (_cpu_s(pid) - others_first[name]) * 1e6 / counted for name, pid in others.items()}
                rss = _peak_rss_kib(proc.pid) / 1024
                break
            if count != seen:
                seen, last_progress = count, time.monotonic()
            elif time.monotonic() - last_progress > _STALL_S:
                raise RuntimeError(f"{kind}: stalled at {count} of {messages} calls")
        state = consumer.ask("stat")
        return RoundResult(kind, state["count"] - 1, state["last"] - state["first"], cpu_us, rss, others_us)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            spy.wait(timeout=30)
        _terminate(proc)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of (a) bridge, (b) hand-written")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    parser.add_argument("--profile", metavar="DIR", type=Path,
                        help="sample each round's process with py-spy (on PATH) into DIR/<kind>-<round>.txt")
    parser.add_argument("--role", choices=["consumer", "handwritten"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "consumer":
        _consumer_main(args.url)
        return
    if args.role == "handwritten":
        asyncio.run(_handwritten(args.url, args.bootstrap, args.topic, args.group))
        return
    if args.profile is not None and shutil.which("py-spy") is None:
        parser.error("--profile needs py-spy on PATH (pip install py-spy)")

    workdir = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    try:
        _bench(args, workdir)
    finally:
        if args.keep:
            print(f"work directory: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _bench(args: argparse.Namespace, workdir: Path) -> None:
    with TansuBroker() as broker:
        engine_args = [sys.executable, "-m", "bridge.testing.engine", "--port", "0"]
        engine = _Child(engine_args)  # no WebSocket compression, as the real engine
        consumer: _Child | None = None
        try:
            url = engine.line()
            consumer = _Child([sys.executable, __file__, "--role", "consumer", "--url", url])
            if consumer.line() != "ready":
                raise RuntimeError("the consumer did not start")
            others = {"engine": engine.proc.pid, "consumer": consumer.proc.pid}
            for pid in _children_named("tansu")[:1]:
                others["broker"] = pid
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            started = time.perf_counter()
            asyncio.run(_prepare(broker.bootstrap, topic, args.messages))
            print(f"produced {args.messages:,} messages to {topic} ({PARTITIONS} partitions) "
                  f"in {time.perf_counter() - started:.1f} s")
            results: list[RoundResult] = []
            for i in range(args.rounds):
                for kind in ("bridge", "handwritten"):
                    group = f"{kind}-{i}-{uuid.uuid4().hex[:8]}"
                    if kind == "bridge":
                        config = workdir / f"bridge-{i}.yaml"
                        config.write_text(BRIDGE_CONFIG.format(
                            url=url, trigger_type=TRIGGER_TYPE, bootstrap=broker.bootstrap, topic=topic,
                            group=group, client_options=json.dumps(GROUP_TIMINGS)))
                        cmd = [sys.executable, "-m", "bridge", "up", "-c", str(config)]
                    else:
                        cmd = [sys.executable, __file__, "--role", "handwritten", "--url", url,
                               "--bootstrap", broker.bootstrap, "--topic", topic, "--group", group]
                    profile = None
                    if args.profile is not None:
                        args.profile.mkdir(parents=True, exist_ok=True)
                        profile = args.profile / f"{kind}-{i}.txt"
                    result = _run_round(kind, consumer, args.messages, cmd, workdir, profile, others)
                    results.append(result)
                    rest = ", ".join(f"{name} {us:.0f}" for name, us in result.others_us_per_event.items())
                    print(f"  ({'a' if kind == 'bridge' else 'b'}) {kind:<11} {result.rate:9,.0f} events/s  "
                          f"CPU {result.cpu_us_per_event:6.0f} µs/event  peak RSS {result.peak_rss_mib:6.1f} MiB  "
                          f"(CPU µs/event elsewhere: {rest})")
            _report(results)
        finally:
            if consumer is not None:
                consumer.stop()
            engine.stop()


def _report(results: list[RoundResult]) -> None:
    bridge = [r for r in results if r.kind == "bridge"]
    hand = [r for r in results if r.kind == "handwritten"]
    bridge_rate = statistics.median(r.rate for r in bridge)
    hand_rate = statistics.median(r.rate for r in hand)
    print(f"bridge       {bridge_rate:9,.0f} events/s (median of {len(bridge)})")
    print(f"hand-written {hand_rate:9,.0f} events/s (median of {len(hand)})")
    print(f"ratio bridge/hand-written: {bridge_rate / hand_rate:.2f} (target >= 0.9)")
    print(f"bridge CPU per event: {statistics.median(r.cpu_us_per_event for r in bridge):.0f} µs "
          f"(hand-written {statistics.median(r.cpu_us_per_event for r in hand):.0f} µs); "
          f"bridge peak RSS {max(r.peak_rss_mib for r in bridge):.1f} MiB")


if __name__ == "__main__":
    main()

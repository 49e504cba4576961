"""Kafka → function throughput: the bridge against what a user would write by hand, in the same run.

    python bench/kafka_throughput.py [--messages 20000] [--rounds 3] [--kinds ...]

Starts a Tansu broker, the iii test engine in a process of its own (no WebSocket compression, as the real engine;
in-process it would share the GIL with the SDK clients it routes for), and a consumer process whose no-op
function counts its calls. N small JSON messages go to a 4-partition topic once; then every kind runs once per
round, in turn (interleaved, so that all see the same machine), each with a fresh consumer group:

- ``bridge-partition`` / ``bridge-none``: `bridge up` with a kafka source, ``ordering: partition`` / ``none``
  (default ``max_in_flight`` 64 and commit interval), the consumer's function bound to it, the default payload;
- ``handwritten-partition`` / ``handwritten-none``: aiokafka on its own loop calling ``trigger_async`` with the same
  ordering and commit rule (bench/_kafka_relays.py);
- ``faststream``: a faststream subscriber with an at-least-once ack policy (``AckPolicy.ACK``) calling
  ``trigger_async`` (``pip install -e '.[bench]'``; left out when faststream is not installed);
- ``limit``: 64 calls in flight made on the SDK's own loop, no Kafka: the engine path's limit here.

The rate is events/s at the function from its first call to its N-th (group joins and start-up excluded). For
each process it also prints CPU µs per event (utime+stime from /proc over the same span, also for the engine,
the consumer and the broker) and peak RSS (VmHWM). The summary takes the median of the rounds of each kind and
prints the ratios against their targets. ``--profile DIR`` samples each round's process with py-spy
(``pip install py-spy`` into the venv; it slows the rounds down).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
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
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from _kafka_relays import GROUP_TIMINGS, TRIGGER_TYPE
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

# The test services and helpers live in the repository's tests/support (not shipped with the package): a
# benchmark runs from a checkout, as `python bench/NAME.py`, so it imports them from there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.services import TansuBroker

PARTITIONS = 4
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_STALL_S = 60.0  # a round fails when the function got no call for this long
_RELAYS = str(Path(__file__).with_name("_kafka_relays.py"))
KINDS = ("bridge-partition", "handwritten-partition", "bridge-none", "handwritten-none", "faststream", "limit")
TARGETS = (  # (numerator, denominator, target): the ratios issue 13 asks for on this machine kind
    ("bridge-partition", "handwritten-partition", 1.2),
    ("bridge-none", "handwritten-none", 1.25),
    ("bridge-none", "limit", 0.85),
    ("bridge-partition", "faststream", 1.8),
    ("bridge-none", "faststream", 1.8),
)

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
      ordering: {ordering}
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
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every kind, interleaved")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    parser.add_argument("--profile", metavar="DIR", type=Path,
                        help="sample each round's process with py-spy (on PATH) into DIR/<kind>-<round>.txt")
    args = parser.parse_args()
    if args.profile is not None and shutil.which("py-spy") is None:
        parser.error("--profile needs py-spy on PATH (pip install py-spy)")
    if "faststream" in args.kinds and importlib.util.find_spec("faststream") is None:
        print("faststream is not installed (pip install -e '.[bench]'): its rounds are left out")
        args.kinds.remove("faststream")

    workdir = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    try:
        _bench(args, workdir)
    finally:
        if args.keep:
            print(f"work directory: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _command(kind: str, i: int, url: str, bootstrap: str, topic: str, messages: int, workdir: Path) -> list[str]:
    group = f"{kind}-{i}-{uuid.uuid4().hex[:8]}"
    if kind.startswith("bridge-"):
        config = workdir / f"{kind}-{i}.yaml"
        config.write_text(BRIDGE_CONFIG.format(
            url=url, trigger_type=TRIGGER_TYPE, bootstrap=bootstrap, topic=topic, group=group,
            ordering=kind.removeprefix("bridge-"), client_options=json.dumps(GROUP_TIMINGS)))
        return [sys.executable, "-m", "bridge", "up", "-c", str(config)]
    if kind == "limit":
        return [sys.executable, _RELAYS, "--role", "limit", "--url", url, "--calls", str(messages + 1)]
    return [sys.executable, _RELAYS, "--role", kind, "--url", url, "--bootstrap", bootstrap, "--topic", topic,
            "--group", group]


def _bench(args: argparse.Namespace, workdir: Path) -> None:
    with TansuBroker() as broker:
        engine_args = [sys.executable, "-m", "bridge.testing.engine", "--port", "0"]
        engine = _Child(engine_args)  # no WebSocket compression, as the real engine
        consumer: _Child | None = None
        try:
            url = engine.line()
            consumer = _Child([sys.executable, _RELAYS, "--role", "consumer", "--url", url])
            if consumer.line() != "ready":
                raise RuntimeError("the consumer did not start")
            others = {"engine": engine.proc.pid, "consumer": consumer.proc.pid}
            for pid in _children_named("tansu")[:1]:
                others["broker"] = pid
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            started = time.perf_counter()
            asyncio.run(_prepare(broker.bootstrap, topic, args.messages))
            print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, load average "
                  f"{os.getloadavg()[0]:.2f}; produced {args.messages:,} messages to {topic} ({PARTITIONS} "
                  f"partitions) in {time.perf_counter() - started:.1f} s")
            results: list[RoundResult] = []
            for i in range(args.rounds):
                for kind in args.kinds:
                    cmd = _command(kind, i, url, broker.bootstrap, topic, args.messages, workdir)
                    profile = None
                    if args.profile is not None:
                        args.profile.mkdir(parents=True, exist_ok=True)
                        profile = args.profile / f"{kind}-{i}.txt"
                    result = _run_round(kind, consumer, args.messages, cmd, workdir, profile, others)
                    results.append(result)
                    rest = ", ".join(f"{name} {us:.0f}" for name, us in result.others_us_per_event.items())
                    print(f"  round {i + 1} {kind:<21} {result.rate:7,.0f} events/s  CPU "
                          f"{result.cpu_us_per_event:5.0f} µs/event  peak RSS {result.peak_rss_mib:6.1f} MiB  "
                          f"(CPU µs/event elsewhere: {rest})", flush=True)
            _report(results)
        finally:
            if consumer is not None:
                consumer.stop()
            engine.stop()


def _report(results: list[RoundResult]) -> None:
    rates: dict[str, float] = {}
    for kind in KINDS:
        mine = [r for r in results if r.kind == kind]
        if not mine:
            continue
        rates[kind] = statistics.median(r.rate for r in mine)
        print(f"{kind:<21} {rates[kind]:7,.0f} events/s (median of {len(mine)}), CPU "
              f"{statistics.median(r.cpu_us_per_event for r in mine):.0f} µs/event, peak RSS "
              f"{max(r.peak_rss_mib for r in mine):.1f} MiB")
    for numerator, denominator, target in TARGETS:
        if numerator in rates and denominator in rates:
            ratio = rates[numerator] / rates[denominator]
            verdict = "met" if ratio >= target else "MISSED"
            print(f"ratio {numerator} / {denominator}: {ratio:.2f} (target >= {target}: {verdict})")


if __name__ == "__main__":
    main()

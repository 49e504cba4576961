"""Peak RSS of `bridge up` working through a 1,000,000-message Kafka backlog, against a 100,000-message one.

    python bench/kafka_backlog_memory.py [--backlog 1000000] [--baseline 100000] [--deliver 60000] [--rounds 2]

Starts a Tansu broker (in-memory), the iii test engine and the kafka benchmark's consumer, fills one 4-partition
topic with ``--backlog`` messages and another with ``--baseline``, then runs `bridge up` (kafka source, ``ordering:
none``, default ``max_in_flight`` and fetch settings, a fresh consumer group each time) on each topic in turn,
``--rounds`` times, until the function got ``--deliver`` calls; the bridge's peak RSS (VmHWM) is read then. With
memory bounded by the in-flight window and the fetch buffers, not by the backlog, both backlogs print the same
peak: targets (issue 13) peak ≤ 150 MB and a ratio ≤ 1.1. Producing the backlog takes a minute or so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _kafka_relays import GROUP_TIMINGS, TRIGGER_TYPE
from kafka_throughput import _RELAYS, BRIDGE_CONFIG, RoundResult, _Child, _prepare, _run_round

# kafka_throughput put the checkout on sys.path: the test services live in tests/support, not in the package.
from tests.support.services import TansuBroker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--baseline", type=int, default=100_000)
    parser.add_argument("--deliver", type=int, default=60_000, help="calls per run before its peak RSS is read")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--client-options", type=json.loads, default={}, metavar="JSON",
                        help="extra kafka.client_options for the bridge, e.g. '{\"fetch_max_bytes\": 4194304}'")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-backlog-"))
    try:
        _bench(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _bench(args: argparse.Namespace, workdir: Path) -> None:
    with TansuBroker() as broker:
        engine = _Child([sys.executable, "-m", "bridge.testing.engine", "--port", "0"])
        consumer: _Child | None = None
        try:
            url = engine.line()
            consumer = _Child([sys.executable, _RELAYS, "--role", "consumer", "--url", url])
            if consumer.line() != "ready":
                raise RuntimeError("the consumer did not start")
            topics = {}
            for size in (args.backlog, args.baseline):
                topic = f"backlog-{size}-{uuid.uuid4().hex[:6]}"
                started = time.perf_counter()
                asyncio.run(_prepare(broker.bootstrap, topic, size))
                print(f"produced {size:,} messages to {topic} in {time.perf_counter() - started:.0f} s", flush=True)
                topics[size] = topic
            print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, load average "
                  f"{os.getloadavg()[0]:.2f}")
            peaks: dict[int, list[RoundResult]] = {size: [] for size in topics}
            for i in range(args.rounds):
                for size, topic in topics.items():
                    config = workdir / f"bridge-{size}-{i}.yaml"
                    config.write_text(BRIDGE_CONFIG.format(
                        url=url, trigger_type=TRIGGER_TYPE, bootstrap=broker.bootstrap, topic=topic,
                        group=f"backlog-{size}-{i}-{uuid.uuid4().hex[:6]}", ordering="none",
                        client_options=json.dumps({**GROUP_TIMINGS, **args.client_options})))
                    cmd = [sys.executable, "-m", "bridge", "up", "-c", str(config)]
                    result = _run_round(f"backlog-{size}", consumer, args.deliver, cmd, workdir, None, {})
                    peaks[size].append(result)
                    print(f"  round {i + 1} backlog {size:>9,}: peak RSS {result.peak_rss_mib:6.1f} MiB after "
                          f"{args.deliver:,} calls ({result.rate:,.0f} events/s)", flush=True)
            big = statistics.median(r.peak_rss_mib for r in peaks[args.backlog])
            small = statistics.median(r.peak_rss_mib for r in peaks[args.baseline])
            mb = big * 1.048576
            print(f"peak RSS, backlog {args.backlog:,}: {big:.1f} MiB ({mb:.0f} MB; target <= 150 MB: "
                  f"{'met' if mb <= 150 else 'MISSED'})")
            print(f"peak RSS, backlog {args.baseline:,}: {small:.1f} MiB")
            print(f"ratio: {big / small:.2f} (target <= 1.1: {'met' if big / small <= 1.1 else 'MISSED'})")
        finally:
            if consumer is not None:
                consumer.stop()
            engine.stop()


if __name__ == "__main__":
    main()

"""The processes bench/kafka_throughput.py measures the bridge against, and its consumer (``--role``).

Each relay is what a user would write without the bridge: its consumer on its own loop (aiokafka's, or
faststream's), calling ``trigger_async`` of an iii SDK client (which runs its own loop on its own thread), with
the same payload the bridge sends by default (the whole event) and an at-least-once commit rule:

- ``handwritten-partition``: one task per partition, one call in flight each; every second, each partition is
  committed up to its lowest offset not done (the bridge's ``ordering: partition``).
- ``handwritten-none``: up to 64 calls in flight across partitions (the bridge's ``max_in_flight`` default);
  every second, each partition is committed up to its lowest offset not done (the bridge's ``ordering: none``).
- ``faststream``: a faststream subscriber with ``AckPolicy.ACK`` (the offset is committed after the handler
  returned: at-least-once), default workers.
- ``limit``: no Kafka: 64 calls in flight made on the SDK's own loop, the fastest a caller can go through the
  engine to the function on this machine (the engine-path limit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import warnings
from collections import deque
from typing import Any

from aiokafka import AIOKafkaConsumer
from iii import InitOptions, register_worker
from iii.iii_types import RegisterTriggerInput

TRIGGER_TYPE = "bench.orders"
FUNCTION_ID = "bench::sink"
GROUP_TIMINGS = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 500, "rebalance_timeout_ms": 3000}
IN_FLIGHT = 64
_COMMIT_INTERVAL_S = 1.0
ROLES = ("consumer", "handwritten-partition", "handwritten-none", "faststream", "limit")


def sdk(url: str, name: str) -> Any:
    return register_worker(url, InitOptions(worker_name=name, otel={"enabled": False}, enable_metrics_reporting=False))


def event(record: Any, value: Any = None) -> dict[str, Any]:
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
        "value": json.loads(record.value) if value is None else value,
        "headers": {k: v.decode() for k, v in record.headers},
        "timestamp": timestamp,
        "timestamp_iso": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z",
    }


def _request(payload: dict[str, Any]) -> dict[str, Any]:
    return {"function_id": FUNCTION_ID, "payload": payload, "namespace": "default", "timeout_ms": 30_000}


async def _until_sigterm() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


# ------------------------------------------------------------------------------------------- consumer


def consumer_main(url: str) -> None:
    """The function author: a no-op function that counts its calls. Commands on stdin: ``reset``, ``stat``."""
    state = {"count": 0, "first": 0.0, "last": 0.0}

    async def sink(payload: Any, metadata: Any = None) -> None:
        now = time.monotonic()
        if state["count"] == 0:
            state["first"] = now
        state["count"] += 1
        state["last"] = now

    iii = sdk(url, f"bench-consumer-{os.getpid()}")
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


# -------------------------------------------------------------------------------- hand-written (aiokafka)


class _Partition:
    def __init__(self, first: int) -> None:
        self.records: deque[Any] = deque()
        self.ready = asyncio.Event()
        self.not_done: set[int] = set()
        self.fetched = first  # one past the highest offset fetched
        self.committed: int | None = None

    def commit_offset(self) -> int:
        """The lowest offset not done yet (everything below it is done)."""
        return min(self.not_done) if self.not_done else self.fetched


async def handwritten(url: str, bootstrap: str, topic: str, group: str, ordering: str) -> None:
    iii = sdk(url, f"bench-loop-{os.getpid()}")
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", **GROUP_TIMINGS)
    parts: dict[Any, _Partition] = {}
    tasks: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def call(part: _Partition, record: Any) -> None:
        try:
            await iii.trigger_async(_request(event(record)))
            part.not_done.discard(record.offset)
        finally:
            slots.release()

    async def work(part: _Partition) -> None:  # ordering partition: one call at a time, in order
        while True:
            if not part.records:
                part.ready.clear()
                await part.ready.wait()
                continue
            record = part.records[0]
            await iii.trigger_async(_request(event(record)))
            part.records.popleft()
            part.not_done.discard(record.offset)

    async def commit() -> None:
        due = {tp: p.commit_offset() for tp, p in parts.items()}
        due = {tp: offset for tp, offset in due.items() if offset != parts[tp].committed}
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
                    part = parts[tp] = _Partition(records[0].offset)
                    if ordering == "partition":
                        tasks.add(asyncio.create_task(work(part)))
                for record in records:
                    part.not_done.add(record.offset)
                part.fetched = records[-1].offset + 1
                if ordering == "partition":
                    part.records.extend(records)
                    part.ready.set()
                    continue
                for record in records:
                    await slots.acquire()  # back-pressure: at most IN_FLIGHT calls
                    task = asyncio.create_task(call(part, record))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            if ordering == "partition":
                # Back-pressure: a partition with a long queue is not fetched until it drained.
                full = [tp for tp, p in parts.items() if len(p.records) > 1000]
                consumer.pause(*full)
                consumer.resume(*[tp for tp in parts if tp not in full])

    await consumer.start()
    loops = [asyncio.create_task(fetch_loop()), asyncio.create_task(commit_loop())]
    try:
        await _until_sigterm()
    finally:
        for task in [*loops, *tasks]:
            task.cancel()
        await asyncio.gather(*loops, *tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await commit()
        await consumer.stop()
        iii.shutdown()  # shutdown_async must run on the SDK loop; this one joins its thread


# --------------------------------------------------------------------------------------------- faststream


async def faststream_relay(url: str, bootstrap: str, topic: str, group: str) -> None:
    from faststream import AckPolicy
    from faststream.kafka import KafkaBroker, KafkaMessage  # KafkaMessage: the message, injected by its annotation

    iii = sdk(url, f"bench-faststream-{os.getpid()}")
    broker = KafkaBroker(bootstrap, logger=None)

    @broker.subscriber(topic, group_id=group, auto_offset_reset="earliest", ack_policy=AckPolicy.ACK,
                       **GROUP_TIMINGS)
    async def handle(body: Any, msg: KafkaMessage) -> None:
        await iii.trigger_async(_request(event(msg.raw_message, body)))

    await broker.start()
    try:
        await _until_sigterm()
    finally:
        await broker.stop()
        iii.shutdown()


# ---------------------------------------------------------------------------------------------- the limit


def limit(url: str, calls: int) -> None:
    """``calls`` calls, 64 in flight, made on the SDK's own loop (no hop): the engine path's limit."""
    iii = sdk(url, f"bench-limit-{os.getpid()}")
    sample = {"topic": "t", "partition": 0, "key": "k1", "headers": {"trace": "t"}, "timestamp": 1_700_000_000_000,
              "timestamp_iso": "2023-11-14T22:13:20.000Z", "source": TRIGGER_TYPE}
    left = [calls]

    async def caller() -> None:
        while left[0] > 0:
            left[0] -= 1
            n = left[0]
            payload = {**sample, "id": f"kafka:t:0:{n}", "offset": n,
                       "value": {"n": n, "sku": f"sku-{n % 97}", "qty": n % 5 + 1}}
            await iii.trigger_async(_request(payload))

    async def blast() -> None:
        await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))

    try:
        asyncio.run_coroutine_threadsafe(blast(), iii._loop).result()
        signal.sigwait({signal.SIGTERM})  # the driver ends the round
    finally:
        iii.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=ROLES, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--bootstrap")
    parser.add_argument("--topic")
    parser.add_argument("--group")
    parser.add_argument("--calls", type=int, default=0)
    args = parser.parse_args()
    if args.role == "consumer":
        consumer_main(args.url)
    elif args.role == "limit":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # taken by sigwait, on any thread
        limit(args.url, args.calls)
    elif args.role == "faststream":
        asyncio.run(faststream_relay(args.url, args.bootstrap, args.topic, args.group))
    else:
        ordering = args.role.removeprefix("handwritten-")
        asyncio.run(handwritten(args.url, args.bootstrap, args.topic, args.group, ordering))


if __name__ == "__main__":
    main()

"""Bridge CPU per event beyond the SDK call, split by stage: decode, when, render, schema, dispatch, ack.

    python bench/cpu_per_event.py [--events 20000] [--rounds 5]

In one process, N Kafka records of the kafka benchmark's shape go the way `bridge up` takes them: the source's
offset track (``take``), decoding into an event, ``SourceRunner.submit`` (window, task), the ``Dispatcher``
(``when``, payload template, ``payload_schema``, the invocation) and the acknowledgement hook (the offset marked
done). The invoker answers at once without leaving the process: the SDK call is what is left out.

Each round runs twice, interleaved: plain (the total CPU per event, ``time.process_time``), then with every stage
wrapped in a timer (the split; the wrappers' own cost is measured and taken off). ``dispatch`` is the total less
the timed stages: the runner, the window, the task, the dispatcher's bookkeeping and the ``Invocation``. The
medians of the rounds are printed; the target (issue 13) is when + render + schema + dispatch + ack ≤ 30 µs.

Code here runs in a tight loop with warm caches; in `bridge up` it interleaves with the SDK, the socket and the
Kafka client, and runs slower (see bench/kafka_throughput.py: the bridge's CPU per event against the limit's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bridge.bindings import Binding, BindingTable
from bridge.config import load_config
from bridge.deadletter import FileDeadLetter
from bridge.dispatch import Dispatcher, Invocation
from bridge.runtime import SourceRunner
from bridge.sources import Outcome
from bridge.sources.kafka import _decode as kafka_decode
from bridge.sources.kafka._offsets import PartitionTrack

CONFIG = """\
version: 1
engine:
  url: ws://127.0.0.1:9
state_dir: state
sources:
  orders:
    description: benchmark topic
    kafka:
      bootstrap_servers: 127.0.0.1:9
      topics: [orders]
    when: "{{ event.value.qty > 0 }}"
    payload:
      order: "{{ event.value.n }}"
      sku: "{{ event.value.sku }}"
      qty: "{{ event.value.qty }}"
      key: "{{ event.key }}"
      at: "{{ event.timestamp_iso }}"
    payload_schema:
      type: object
      required: [order, sku, qty]
      properties:
        order: {type: integer}
        sku: {type: string}
        qty: {type: integer, minimum: 1}
"""

Record = namedtuple("Record", "topic partition offset key value headers timestamp")
STAGES = ("decode", "when", "render", "schema", "ack")


class _Invoker:
    """Stands in for the SDK call: answers at once."""

    connected = True

    async def wait_connected(self) -> None:
        return None

    async def invoke(self, call: Invocation) -> Any:
        return None


def _records(n: int) -> list[Record]:
    return [
        Record("orders", 0, i, f"k{i}".encode(),
               json.dumps({"n": i, "sku": f"sku-{i % 97}", "qty": i % 5 + 1}).encode(), [("trace", b"t")],
               1_700_000_000_000 + i)
        for i in range(n)
    ]


class _Timers:
    """Wraps functions so that each call adds its duration to a stage."""

    def __init__(self) -> None:
        self.ns = dict.fromkeys(STAGES, 0)

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock = time.perf_counter_ns
        totals = self.ns

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[stage] += clock() - start

        return timed


async def _run(config: Any, records: list[Record], scratch: Path, timers: _Timers | None) -> float:
    """CPU seconds for all ``records``."""
    source = config.sources[0]
    table = BindingTable(source.id)
    table.upsert(Binding("b", source.id, "bench::sink", None, {}))
    dispatcher = Dispatcher(source, table, _Invoker(), FileDeadLetter(scratch / "dl.jsonl"))
    runner = SourceRunner(source, dispatcher, table)
    part = PartitionTrack("orders", 0)
    part.add_fetched(records)
    decode = kafka_decode.record_event
    done = part.done
    if timers is not None:
        _instrument(dispatcher, timers)
        decode = timers.wrap("decode", decode)
        done = timers.wrap("ack", done)
    kc = source.kind_config
    outcomes: dict[str, int] = {}

    def acknowledge(offset: int) -> Callable[[Outcome], Any]:
        async def on_done(outcome: Outcome) -> None:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            done(offset)

        return on_done

    started = time.process_time()
    while part.buffer:
        record = part.take()
        event = decode(source.id, kc, record)
        await runner.submit(event, acknowledge(record.offset))
    await runner.drain(60)
    spent = time.process_time() - started
    assert outcomes == {"delivered": len(records)}, outcomes
    return spent


def _instrument(dispatcher: Dispatcher, timers: _Timers) -> None:
    """Time the dispatcher's ``when``, payload template and schema check (each is called through one method)."""
    for attribute, method, stage in (("_when", "evaluate", "when"), ("_payload", "render", "render"),
                                     ("_payload_check", "check", "schema")):
        target = getattr(dispatcher, attribute)
        setattr(dispatcher, attribute, SimpleNamespace(**{method: timers.wrap(stage, getattr(target, method))}))


def _wrapper_cost_ns() -> float:
    """What one timed call costs beyond the call itself."""
    timers = _Timers()
    noop = timers.wrap("ack", lambda: None)
    plain: Callable[[], None] = lambda: None  # noqa: E731
    n = 200_000
    started = time.perf_counter_ns()
    for _ in range(n):
        plain()
    bare = time.perf_counter_ns() - started
    started = time.perf_counter_ns()
    for _ in range(n):
        noop()
    return max(0.0, (time.perf_counter_ns() - started - bare) / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        (scratch / "bridge.yaml").write_text(CONFIG)
        config = load_config(scratch / "bridge.yaml")
        records = _records(args.events)
        overhead_ns = _wrapper_cost_ns()
        totals: list[float] = []
        splits: dict[str, list[float]] = {stage: [] for stage in STAGES}
        for _ in range(args.rounds):
            totals.append(asyncio.run(_run(config, records, scratch, None)) * 1e6 / args.events)
            timers = _Timers()
            asyncio.run(_run(config, records, scratch, timers))
            for stage in STAGES:
                splits[stage].append(max(0.0, timers.ns[stage] / args.events - overhead_ns) / 1000)
    total = statistics.median(totals)
    stage_us = {stage: statistics.median(values) for stage, values in splits.items()}
    dispatch_us = max(0.0, total - sum(stage_us.values()))
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.events:,} events x {args.rounds} rounds, "
          f"medians (timer cost {overhead_ns:.0f} ns per timed call, taken off)")
    print(f"  total CPU per event, SDK call left out: {total:6.1f} µs")
    for stage in ("decode", "when", "render", "schema"):
        print(f"  {stage:<8} {stage_us[stage]:6.1f} µs")
    print(f"  {'dispatch':<8} {dispatch_us:6.1f} µs  (runner, window, task, dispatcher, Invocation: the rest)")
    print(f"  {'ack':<8} {stage_us['ack']:6.1f} µs")
    beyond = total - stage_us["decode"]
    verdict = "met" if beyond <= 30 else "MISSED"
    print(f"when + render + schema + dispatch + ack: {beyond:.1f} µs per event (target <= 30 µs: {verdict}); "
          f"with decode: {total:.1f} µs")


if __name__ == "__main__":
    main()

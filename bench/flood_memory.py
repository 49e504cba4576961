"""Memory under a flood: peak RSS of the runtime path (SourceRunner → Dispatcher → invoker) for N events versus
N/10 events, each in a fresh process, in the same run. A flat memory profile prints a ratio near 1.0; memory
that grows with the backlog would print a ratio near 10.

    python bench/flood_memory.py [--events 100000] [--window 64]

The invoker answers in-process (no engine): what is measured is what the bridge itself holds per event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bridge.bindings import Binding, BindingTable
from bridge.config import DeadLetterConfig, DeliveryConfig
from bridge.deadletter import FileDeadLetter
from bridge.dispatch import Dispatcher, Invocation
from bridge.runtime import SourceRunner
from bridge.sources import Event, Outcome
from bridge.sources.file.spec import FileSourceConfig

# The test services and helpers live in the repository's tests/support (not shipped with the package): a
# benchmark runs from a checkout, as `python bench/NAME.py`, so it imports them from there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.configs import source_config


class _Invoker:
    connected = True

    async def wait_connected(self) -> None:
        return None

    async def invoke(self, call: Invocation) -> Any:
        await asyncio.sleep(0)
        return {"ok": True}


async def _flood(events: int, window: int, scratch: Path) -> float:
    source = source_config(
        "flood",
        FileSourceConfig(path=scratch),
        description="synthetic flood",
        delivery=DeliveryConfig(dead_letter=DeadLetterConfig(file=scratch / "dl.jsonl")),
        max_in_flight=window,
        payload={"n": "{{ event.n }}", "name": "{{ event.name }}", "blob": "{{ event.blob }}"},
    )
    table = BindingTable(source.id)
    table.upsert(Binding("b", source.id, "bench::sink", None, {}))
    runner = SourceRunner(source, Dispatcher(source, table, _Invoker(), FileDeadLetter(scratch / "dl.jsonl")), table)
    done = 0
    finished = asyncio.Event()

    async def on_done(outcome: Outcome) -> None:
        nonlocal done
        done += 1
        if done == events:
            finished.set()

    blob = "x" * 512
    started = time.perf_counter()
    for i in range(events):
        await runner.submit(Event(id=f"e{i}", source="flood", fields={"n": i, "name": f"f{i}", "blob": blob}), on_done)
    await finished.wait()
    return time.perf_counter() - started


def _child(events: int, window: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        elapsed = asyncio.run(_flood(events, window, Path(scratch)))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"events": events, "seconds": elapsed, "peak_rss_kib": peak_kib}))


def _run_child(events: int, window: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--events", str(events), "--window", str(window)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.events, args.window)
        return
    small = _run_child(max(1, args.events // 10), args.window)
    large = _run_child(args.events, args.window)
    for r in (small, large):
        rate = r["events"] / r["seconds"]
        print(f"{r['events']:>8} events: peak RSS {r['peak_rss_kib'] / 1024:7.1f} MiB, {rate:,.0f} events/s")
    ratio = large["peak_rss_kib"] / small["peak_rss_kib"]
    print(f"peak RSS ratio ({args.events} vs {args.events // 10} events): {ratio:.2f}")


if __name__ == "__main__":
    main()

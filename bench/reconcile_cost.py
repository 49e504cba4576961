"""Cost of one reconciliation round of a replica, to choose ``engine.reconcile_interval_ms``.

    python bench/reconcile_cost.py [--bindings 10 1000] [--rounds 50]

Starts the iii test engine in a process of its own, two bridge engine links (replica-b provides the trigger type,
replica-a mirrors it) and a consumer holding N bindings, then times R rounds of replica-a (``engine::triggers::list``
+ ``engine::registered-triggers::list`` + checking and upserting every row) and, separately, R bare
``engine::registered-triggers::list`` calls. Per round it prints the wall time and the CPU of the engine process
(utime+stime from /proc) and of this process (the bridge side; the consumer idles meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bridge.bindings import BindingTable
from bridge.config import EngineConfig
from bridge.config.schemas import BindValidator
from bridge.engine import EngineLink, TriggerTypeSpec
from bridge.testing.consumer import Consumer

TYPE = "orders"
_SCHEMA = {"type": "object", "properties": {"min_total": {"type": "number", "default": 0}}}


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(url: str, engine_pid: int, bindings: int, rounds: int) -> dict[str, float]:
    links = []
    for name in ("replica-a", "replica-b"):
        table = BindingTable(TYPE)
        link = EngineLink(EngineConfig(url=url, worker_name=f"{name}-{bindings}", reconcile_interval_ms=3_600_000))
        spec = TriggerTypeSpec(TYPE, "orders", BindValidator(TYPE, _SCHEMA), None, table)

        async def start(link: EngineLink = link, spec: TriggerTypeSpec = spec) -> None:
            link.start([spec])

        await link.on_loop(start)  # each link runs on its own SDK's loop; this script drives them from its own
        await link.on_loop(link.wait_connected)
        links.append((link, table))
        await asyncio.sleep(0.3)  # replica-b registers last: it is the provider
    (a, a_table), (_b, b_table) = links
    consumer = Consumer(url, worker_name=f"consumer-{bindings}")
    try:
        await asyncio.to_thread(consumer.function, "shop::on-order")
        for i in range(bindings):
            await asyncio.to_thread(consumer.bind, TYPE, "shop::on-order", {"min_total": i})
        while len(b_table) < bindings:
            await asyncio.sleep(0.05)
        await a.on_loop(a.reconcile)
        assert len(a_table) == bindings, (len(a_table), bindings)
        figures: dict[str, float] = {}
        for label, step in (("round", a.reconcile), ("list", lambda: a.list_bindings(TYPE))):
            engine_cpu, own_cpu, wall = _cpu_s(engine_pid), time.process_time(), time.perf_counter()
            for _ in range(rounds):
                await a.on_loop(step)
            figures[f"{label}_wall_ms"] = (time.perf_counter() - wall) * 1000 / rounds
            figures[f"{label}_engine_cpu_ms"] = (_cpu_s(engine_pid) - engine_cpu) * 1000 / rounds
            figures[f"{label}_bridge_cpu_ms"] = (time.process_time() - own_cpu) * 1000 / rounds
        return figures
    finally:
        consumer.close()
        for link, _ in links:
            await link.on_loop(link.close)
            await asyncio.to_thread(link.shutdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bindings", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        engine = subprocess.Popen(
            [sys.executable, "-m", "bridge.testing.engine", "--port", "0"],
            stdout=subprocess.PIPE, text=True, cwd=Path(scratch),
        )
        try:
            assert engine.stdout is not None
            url = engine.stdout.readline().strip()
            print(f"{'bindings':>8} {'what':>6} {'wall ms':>8} {'engine CPU ms':>14} {'bridge CPU ms':>14}")
            for n in args.bindings:
                figures: dict[str, Any] = asyncio.run(_measure(url, engine.pid, n, args.rounds))
                for label in ("round", "list"):
                    print(f"{n:>8} {label:>6} {figures[f'{label}_wall_ms']:>8.2f} "
                          f"{figures[f'{label}_engine_cpu_ms']:>14.2f} {figures[f'{label}_bridge_cpu_ms']:>14.2f}")
        finally:
            engine.terminate()
            engine.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

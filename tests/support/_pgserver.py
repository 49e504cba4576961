"""PostgreSQL for tests: ``BRIDGE_TEST_PG_DSN``, else the local server on 127.0.0.1:5432, else a throwaway
cluster started as the ``postgres`` OS user; a fresh database per test (see :mod:`tests.support.services`)."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bridge.testing._lifecycle import StartStop
from tests.support._servicebase import (
    PORT_ATTEMPTS,
    ExitedEarly,
    ServiceStartError,
    free_port,
    log_tail,
    run_sync,
    terminate,
)

PG_DSN_ENV = "BRIDGE_TEST_PG_DSN"
PG_BIN_ENV = "BRIDGE_TEST_PG_BIN"
_LOCAL_PG_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
# Only databases with this prefix are ever dropped, so a BRIDGE_TEST_PG_DSN pointing at a real server is safe.
_DB_PREFIX = "bridge_test_"


async def _pg_ping(dsn: str, timeout_s: float) -> None:
    conn = await asyncpg.connect(dsn, timeout=timeout_s)
    await conn.close(timeout=timeout_s)


def _pg_answers(dsn: str, timeout_s: float) -> bool:
    try:
        run_sync(_pg_ping(dsn, timeout_s))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):  # TimeoutError is an OSError
        return False
    return True


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def _database_of(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


def _pg_bin_dir() -> Path:
    candidates: list[str] = []
    if os.environ.get(PG_BIN_ENV):
        candidates.append(os.environ[PG_BIN_ENV])
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            candidates.append(out.stdout.strip())
    # Distribution layouts (Debian, Red Hat), newest major version first.
    globbed = glob.glob("/usr/lib/postgresql/*/bin") + glob.glob("/usr/pgsql-*/bin")
    candidates += sorted(globbed, key=lambda p: [int(n) for n in re.findall(r"\d+", p)], reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file() and (Path(candidate) / "postgres").is_file():
            return Path(candidate)
    raise ServiceStartError(
        f"no PostgreSQL server binaries found; set {PG_DSN_ENV} to a running server or {PG_BIN_ENV} "
        "to the directory holding initdb and postgres"
    )


def _as_postgres_user() -> dict[str, Any]:
    # initdb and postgres refuse to run as root; the distribution's postgres account runs them instead.
    if os.geteuid() == 0:
        return {"user": "postgres", "group": "postgres", "extra_groups": []}
    return {}


class PostgresServer(StartStop):
    """A PostgreSQL server to create per-test databases on.

    ``start()`` uses, in order: ``BRIDGE_TEST_PG_DSN``; a server answering on 127.0.0.1:5432; a throwaway
    cluster in a temp dir (always the latter with ``force_throwaway=True``, for tests that stop the server).
    """

    def __init__(self, *, force_throwaway: bool = False, startup_timeout_s: float = 30.0) -> None:
        self.force_throwaway = force_throwaway
        self._startup_timeout_s = startup_timeout_s
        self._dsn: str | None = None
        self._tmpdir: Path | None = None
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        """DSN of the server's ``postgres`` database (or of BRIDGE_TEST_PG_DSN as given)."""
        if self._dsn is None:
            raise RuntimeError("PostgresServer is not started")
        return self._dsn

    @property
    def is_throwaway(self) -> bool:
        """True when this object created the cluster (and may stop and restart it)."""
        return self._tmpdir is not None

    @property
    def cluster_dir(self) -> Path | None:
        """Temp dir of a throwaway cluster (data, socket, postgres.log); None for an external server."""
        return self._tmpdir

    def start(self) -> Self:
        if self._dsn is not None:
            return self
        if not self.force_throwaway:
            env_dsn = os.environ.get(PG_DSN_ENV, "").strip()
            if env_dsn:
                self._dsn = env_dsn
                return self
            if _pg_answers(_LOCAL_PG_DSN, timeout_s=2.0):
                self._dsn = _LOCAL_PG_DSN
                return self
        self._init_cluster()
        try:
            for attempt in range(PORT_ATTEMPTS):
                self._port = free_port()
                try:
                    self.start_cluster()
                    break
                except ExitedEarly:
                    # The free port may have been taken between probe and bind: try a new one.
                    if attempt == PORT_ATTEMPTS - 1:
                        raise
        except BaseException:
            self.stop()
            raise
        self._dsn = f"postgresql://postgres@127.0.0.1:{self._port}/postgres"
        return self

    def _init_cluster(self) -> None:
        bin_dir = _pg_bin_dir()
        self._tmpdir = Path(tempfile.mkdtemp(prefix="bridge-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self._tmpdir, user="postgres", group="postgres")
        flags = ["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"]
        cmd = [str(bin_dir / "initdb"), "-D", str(self._tmpdir / "data"), *flags]
        try:
            subprocess.run(
                cmd, cwd=self._tmpdir, capture_output=True, check=True, timeout=120, **_as_postgres_user()
            )
        except subprocess.CalledProcessError as exc:
            self.stop()
            output = (exc.stdout + exc.stderr).decode("utf-8", errors="replace")[-4000:]
            raise ServiceStartError(f"initdb failed with code {exc.returncode}:\n{output}") from exc
        except BaseException:
            self.stop()
            raise

    def start_cluster(self) -> None:
        """Start the throwaway cluster's postgres process (again) on its port; wait until it answers."""
        tmpdir, port = self._owned()
        if self._proc is not None and self._proc.poll() is None:
            return
        log_path = tmpdir / "postgres.log"
        flags = f"-p {port} -c listen_addresses=127.0.0.1 -c fsync=off".split()
        cmd = [str(_pg_bin_dir() / "postgres"), "-D", str(tmpdir / "data"), "-k", str(tmpdir), *flags]
        with log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                cmd, cwd=tmpdir, stdout=log, stderr=subprocess.STDOUT, **_as_postgres_user()
            )
        dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline and self._proc.poll() is None:
            if _pg_answers(dsn, timeout_s=1.0):
                return
            time.sleep(0.05)
        code = self._proc.poll()
        why = f"exited with code {code}" if code is not None else f"not ready in {self._startup_timeout_s}s"
        self.stop_cluster()
        error = ExitedEarly if code is not None else ServiceStartError
        raise error(f"postgres on port {port} {why}; log tail:\n{log_tail(log_path)}")

    def stop_cluster(self) -> None:
        """Stop the throwaway cluster's postgres process (fast shutdown), keeping its data."""
        self._owned()
        if self._proc is not None:
            terminate(self._proc, signal.SIGINT, grace_s=15.0)
            self._proc = None

    def restart_cluster(self) -> None:
        """Stop and start the throwaway cluster on the same port; data survives, connections do not."""
        self.stop_cluster()
        self.start_cluster()

    def _owned(self) -> tuple[Path, int]:
        if self._tmpdir is None or self._port is None:
            raise RuntimeError("only a throwaway cluster started by this PostgresServer can be stopped")
        return self._tmpdir, self._port

    def stop(self) -> None:
        """Stop and delete a throwaway cluster; an external server is left alone."""
        if self._tmpdir is not None:
            if self._proc is not None:
                terminate(self._proc, signal.SIGINT, grace_s=15.0)
                self._proc = None
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        self._port = None
        self._dsn = None

    def create_database(self) -> str:
        """Create a fresh, uniquely named database and return its DSN."""
        name = f"{_DB_PREFIX}{uuid.uuid4().hex[:16]}"
        run_sync(self._execute(f'CREATE DATABASE "{name}"'))
        return _with_database(self.dsn, name)

    def drop_database(self, dsn: str) -> None:
        """Drop a database made by create_database, disconnecting whoever still uses it."""
        name = _database_of(dsn)
        if not name.startswith(_DB_PREFIX) or not re.fullmatch(r"\w+", name):
            raise ValueError(f"refusing to drop {name!r}: not a database made by create_database()")
        run_sync(self._drop(name))

    async def _execute(self, sql: str) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            await conn.execute(sql, timeout=30)
        finally:
            await conn.close()

    async def _drop(self, name: str) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            deadline = time.monotonic() + 10
            while True:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = $1 AND pid <> pg_backend_pid()",
                    name,
                )
                try:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}"', timeout=30)
                    return
                except asyncpg.ObjectInUseError:
                    # Terminated backends take a moment to exit, or a client reconnected meanwhile.
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
        finally:
            await conn.close()

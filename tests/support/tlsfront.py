"""A Kafka broker behind TLS for tests: the Tansu build cannot serve TLS itself, so ``socat`` listens with TLS on a
loopback port and forwards each connection to a Tansu broker that advertises that TLS port (clients are sent there
after bootstrapping). Certificates are made once per session with the ``openssl`` command line: a CA, a server
certificate for 127.0.0.1, a client certificate (its key also encrypted with :data:`KEY_PASSWORD`) and a second,
unrelated CA (a wrong ``ca_file``).

Modes: ``tls`` (server certificate only) and ``mtls`` (a client certificate signed by the CA is required). An mTLS
front also serves a second port limited to TLS 1.2, forwarding to the same broker: a client without a certificate
meets the refusal as TLS 1.2 words it (a handshake failure) instead of TLS 1.3's "certificate required" alert.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from bridge.testing._lifecycle import StartStop
from tests.support._servicebase import PORT_ATTEMPTS, ExitedEarly, ServiceStartError, free_port, log_tail, port_open
from tests.support.services import TansuBroker

KEY_PASSWORD = "k3y-pa55"

Mode = Literal["tls", "mtls"]


def tls_tools_missing() -> str | None:
    """What is missing to run a TLS front here (None: nothing)."""
    missing = [tool for tool in ("socat", "openssl") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not installed (Debian: apt-get install {' '.join(missing)})" if missing else None


@dataclass(frozen=True)
class Certs:
    """The session's PEM files."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_key_encrypted: Path  # client_key under KEY_PASSWORD
    other_ca: Path  # signed nothing here


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, timeout=30, check=False)
    if done.returncode != 0:
        raise ServiceStartError(f"openssl {' '.join(args)} failed: {done.stderr.decode(errors='replace')[-2000:]}")


def make_certs(directory: Path) -> Certs:
    """Make the CA and certificates in ``directory`` (EC P-256 keys: fast to make, valid for two days)."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                 "-subj", f"/CN=iii-bridge test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=iii-bridge test {name}",
                 cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=directory)
    _openssl("pkey", "-in", "client.key", "-aes256", "-passout", f"pass:{KEY_PASSWORD}", "-out", "client-enc.key",
             cwd=directory)
    return Certs(directory, directory / "ca.pem", directory / "server.pem", directory / "server.key",
                 directory / "client.pem", directory / "client.key", directory / "client-enc.key",
                 directory / "other-ca.pem")


class _Socat:
    """One socat TLS listener on a free loopback port forwarding to ``target_port``; its own process group, so
    that stopping it ends the children it forked per connection too."""

    def __init__(self, certs: Certs, target_port: int, *, client_cert: bool, max_tls12: bool = False) -> None:
        self._certs = certs
        self._target = target_port
        self._client_cert = client_cert
        self._max_tls12 = max_tls12
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = certs.dir / f"socat-{time.monotonic_ns()}.log"

    def start(self, port: int) -> None:
        options = [f"OPENSSL-LISTEN:{port}", "bind=127.0.0.1", "reuseaddr", "fork", f"cert={self._certs.server_cert}",
                   f"key={self._certs.server_key}"]
        options += [f"cafile={self._certs.ca}", "verify=1"] if self._client_cert else ["verify=0"]
        if self._max_tls12:
            options.append("openssl-max-proto-version=TLS1.2")
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(["socat", ",".join(options), f"TCP:127.0.0.1:{self._target}"],
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.port = port
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise ExitedEarly(f"socat on port {port} exited; log:\n{log_tail(self.log_path)}")
            if port_open(port):
                return
            time.sleep(0.02)
        self.stop()
        raise ServiceStartError(f"socat on port {port} not listening within 10 s; log:\n{log_tail(self.log_path)}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


class TlsKafka(StartStop):
    """A Tansu broker reached only through a socat TLS front (see the module docstring)."""

    def __init__(self, certs: Certs, mode: Mode) -> None:
        self.certs = certs
        self.mode = mode
        self._broker: TansuBroker | None = None
        self._fronts: list[_Socat] = []

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:PORT`` of the TLS front (TLS 1.3 or older)."""
        return f"127.0.0.1:{self._fronts[0].port}"

    @property
    def tls12_bootstrap(self) -> str:
        """The mTLS front limited to TLS 1.2 (mode ``mtls`` only; the broker advertises the other one)."""
        assert self.mode == "mtls", "only an mTLS front has a TLS 1.2 port"
        return f"127.0.0.1:{self._fronts[1].port}"

    def start(self) -> Self:
        client_cert = self.mode == "mtls"
        for attempt in range(PORT_ATTEMPTS):
            tls_port = free_port()
            broker = TansuBroker(advertised_port=tls_port)
            try:
                broker.start()
                self._broker = broker
                front = _Socat(self.certs, broker.port, client_cert=client_cert)
                self._fronts.append(front)
                front.start(tls_port)
                if client_cert:
                    tls12 = _Socat(self.certs, broker.port, client_cert=True, max_tls12=True)
                    self._fronts.append(tls12)
                    tls12.start(free_port())
                return self
            except ExitedEarly:
                self.stop()  # a port was taken meanwhile: try new ones
                if attempt == PORT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        for front in self._fronts:
            front.stop()
        self._fronts = []
        if self._broker is not None:
            self._broker.stop()
            self._broker = None


class TlsCertsDir:
    """A temporary directory with :func:`make_certs`' files, removed on exit."""

    def __enter__(self) -> Certs:
        self._dir = Path(tempfile.mkdtemp(prefix="bridge-tls-"))
        try:
            return make_certs(self._dir)
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

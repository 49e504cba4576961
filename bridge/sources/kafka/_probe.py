"""Why a Kafka client could not connect, in words an operator can act on.

When bootstrapping fails, aiokafka says only ``Unable to bootstrap from [...]``: the reason (a TLS alert, a
certificate that failed verification) goes to its debug log at most. Under TLS 1.3 a broker that requires a client
certificate completes the handshake and only then sends its "certificate required" alert, which arrives on the
client's first read; aiokafka then reports ``Connection at HOST:PORT closed``, the same as for a broker that died.
So after a failed connection :func:`explain_connection_failure` makes one connection of its own to each bootstrap
server, with the source's own settings: the TCP connect, the TLS handshake and one ApiVersions request (the
request every Kafka client sends first), and names the step that failed and what to change.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct

from bridge.sources.kafka._conn import KafkaSecurityError, ssl_context
from bridge.sources.kafka.spec import TLS_PROTOCOLS, KafkaSourceConfig

PROBE_TIMEOUT_S = 5.0
_ALERT_WAIT_S = 2.0  # how long the probe listens for an alert after the handshake before it sends a request
_DEFAULT_PORT = 9092
_CLIENT_ID = b"iii-bridge-probe"
# ApiVersions (key 18) version 0, correlation id 1: answered by every broker before anything else.
_API_VERSIONS = struct.pack(">hhih", 18, 0, 1, len(_CLIENT_ID)) + _CLIENT_ID
_REQUEST = struct.pack(">i", len(_API_VERSIONS)) + _API_VERSIONS

_CERT_HINT = "set security.cert_file and key_file"


def bootstrap_hosts(bootstrap_servers: str) -> list[tuple[str, int]]:
    """``host:port`` pairs of a comma-separated bootstrap list (``[v6]:port``, a ``scheme://`` prefix and
    ``user:password@`` too; the credentials are dropped)."""
    hosts: list[tuple[str, int]] = []
    for item in bootstrap_servers.split(","):
        entry = item.strip().rpartition("://")[2].rpartition("@")[2]  # no credentials in what is logged
        if not entry:
            continue
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port_text = rest.lstrip(":")
        elif entry.count(":") == 1:
            host, _, port_text = entry.partition(":")
        else:
            host, port_text = entry, ""
        try:
            port = int(port_text) if port_text else _DEFAULT_PORT
        except ValueError:
            continue
        hosts.append((host, port))
    return hosts


async def explain_connection_failure(kc: KafkaSourceConfig, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """What failed when connecting to the first bootstrap server that fails the probe (``HOST:PORT: reason``), or
    None when every server answers: then the cause is not the connection (or it went away meanwhile)."""
    tls = kc.security.protocol in TLS_PROTOCOLS
    context: ssl.SSLContext | None = None
    if tls:
        try:
            context = ssl_context(kc.security)
        except KafkaSecurityError as exc:
            return str(exc)
    has_cert = kc.security.cert_file is not None
    for host, port in bootstrap_hosts(kc.bootstrap_servers):
        if context is not None:
            reason = await _probe_tls(host, port, context, has_cert, kc.security.ca_file is not None, timeout_s)
        else:
            reason = await _probe_plain(host, port, timeout_s)
        if reason is not None:
            return f"{host}:{port}: {reason}"
    return None


async def _probe_tls(host: str, port: int, context: ssl.SSLContext, has_cert: bool, has_ca: bool,
                     timeout_s: float) -> str | None:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host), timeout_s)
    except ssl.SSLCertVerificationError as exc:
        trust = "security.ca_file" if has_ca else "the system trust store (set security.ca_file to the CA that " \
                                                   "signed the brokers' certificates)"
        return (f"the broker's TLS certificate failed verification (CERTIFICATE_VERIFY_FAILED: "
                f"{exc.verify_message}); it must be signed by a CA in {trust} and name the host {host}")
    except ssl.SSLError as exc:
        return _tls_failure(exc, has_cert)
    except TimeoutError:
        return (f"no TLS handshake within {timeout_s:.0f} s; is this a PLAINTEXT listener? then set "
                f"security.protocol to PLAINTEXT or SASL_PLAINTEXT")
    except OSError as exc:
        return f"cannot connect ({exc.strerror or exc}): check that the broker runs and is reachable"
    try:
        # A broker that refuses the client certificate under TLS 1.3 sends its alert right after the handshake.
        # Listen for it before writing: a request sent to a connection the broker already closed would be answered
        # by a TCP reset, which can drop the alert unread.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(1), min(_ALERT_WAIT_S, timeout_s))
            if reader.at_eof():
                raise asyncio.IncompleteReadError(b"", 4)
        writer.write(_REQUEST)
        await asyncio.wait_for(writer.drain(), timeout_s)
        await asyncio.wait_for(reader.readexactly(4), timeout_s)
    except ssl.SSLError as exc:
        return _tls_failure(exc, has_cert)
    except (asyncio.IncompleteReadError, ConnectionError):
        if has_cert:
            return "the broker closed the connection right after the TLS handshake (did it accept the client " \
                   "certificate?)"
        return f"the broker closed the connection right after the TLS handshake; if it requires a client " \
               f"certificate, {_CERT_HINT}"
    except TimeoutError:
        return None  # the TLS part worked: the broker is merely slow
    except OSError as exc:
        return f"the connection failed after the TLS handshake: {exc.strerror or exc}"
    finally:
        await _close(writer, timeout_s)
    return None


def _tls_failure(exc: ssl.SSLError, has_cert: bool) -> str:
    reason = str(exc.reason or "")
    alert = reason.partition("ALERT_")[2].lower().replace("_", " ")
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED" or (alert and not has_cert and "cert" in alert):
        return f"the broker requires a client certificate (TLS alert \"{alert}\"): {_CERT_HINT}"
    if reason == "SSLV3_ALERT_HANDSHAKE_FAILURE":
        if not has_cert:
            return (f"the broker refused the TLS handshake (TLS alert \"handshake failure\"); under TLS 1.2 that is "
                    f"how a broker that requires a client certificate answers a client without one: {_CERT_HINT}")
        return ("the broker refused the TLS handshake (TLS alert \"handshake failure\"): it rejected the client "
                "certificate, or the two share no TLS version or cipher")
    if alert and has_cert and ("cert" in alert or alert == "unknown ca"):
        return (f"the broker rejected the client certificate (TLS alert \"{alert}\"): it must be signed by a CA the "
                f"broker trusts and be valid now")
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        return f"the broker does not answer in TLS ({reason}); if it is a PLAINTEXT listener, set security.protocol " \
               f"accordingly"
    if alert:
        return f"the TLS connection failed (TLS alert \"{alert}\")"
    return f"the TLS connection failed: {exc}"


async def _probe_plain(host: str, port: int, timeout_s: float) -> str | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except TimeoutError:
        return f"no connection within {timeout_s:.0f} s"
    except OSError as exc:
        return f"cannot connect ({exc.strerror or exc}): check that the broker runs and is reachable"
    try:
        writer.write(_REQUEST)
        await asyncio.wait_for(writer.drain(), timeout_s)
        await asyncio.wait_for(reader.readexactly(4), timeout_s)
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        pass  # no Kafka answer to plain text: does the listener speak TLS?
    except OSError as exc:
        return f"the connection failed: {exc.strerror or exc}"
    else:
        return None
    finally:
        await _close(writer, timeout_s)
    if await _answers_tls(host, port, timeout_s):
        return "the listener speaks TLS: set security.protocol to SSL (or SASL_SSL) and security.ca_file"
    return "the broker closed the connection without a Kafka answer"


async def _answers_tls(host: str, port: int, timeout_s: float) -> bool:
    """Whether ``host:port`` completes a TLS handshake (certificates not checked: only the protocol matters)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=context), timeout_s)
    except ssl.SSLError as exc:
        return bool(exc.reason and "ALERT" in exc.reason)  # the listener sent a TLS alert: it speaks TLS
    except (OSError, TimeoutError):
        return False
    await _close(writer, timeout_s)
    return True


async def _close(writer: asyncio.StreamWriter, timeout_s: float) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), timeout_s)

"""Kafka client settings shared by the source's consumer, its dry-run topic discovery and the dead-letter producer,
and two small helpers of the kafka modules.

Who gets what: every client (consumer, dry-run admin client, dead-letter producer) gets the connection and
security settings (:func:`connection_options`) and the ``client_options`` that mean the same for a producer and an
admin client (:data:`SHARED_CLIENT_OPTIONS`: client id, timeouts, backoff, metadata age, idle connections); the
consumer alone gets the rest of ``client_options`` (fetch sizes, group timeouts...), which are consumer settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Iterable
from typing import Any

from bridge.sources.kafka.spec import (
    CLIENT_OPTION_DEFAULTS,
    SASL_PROTOCOLS,
    TLS_PROTOCOLS,
    KafkaSecurity,
    KafkaSourceConfig,
    KeyPasswordMissing,
    key_is_encrypted,
    key_password_callback,
)

SHARED_CLIENT_OPTIONS = frozenset({
    "client_id", "request_timeout_ms", "retry_backoff_ms", "metadata_max_age_ms", "connections_max_idle_ms",
})
"""``client_options`` that the dead-letter producer and the dry run's admin client take as well."""


class KafkaSecurityError(ValueError):
    """The TLS settings cannot be turned into a TLS context (a file gone, a wrong key password)."""


def ssl_context(security: KafkaSecurity) -> ssl.SSLContext:
    """The TLS context of ``security``: the brokers' certificates are verified (host name included) against
    ``ca_file``, or the system trust store without one; ``cert_file``/``key_file`` are the client certificate.
    An encrypted key without ``key_password`` is an error, never a password prompt."""
    try:
        context = ssl.create_default_context(cafile=security.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise KafkaSecurityError(f"cannot load security.ca_file {security.ca_file}: {exc}") from exc
    if security.cert_file is not None:
        try:
            context.load_cert_chain(security.cert_file, security.key_file,
                                    password=key_password_callback(security.key_password))
        except KeyPasswordMissing as exc:
            raise KafkaSecurityError(f"security.key_file {security.key_file}: {exc}") from exc
        except (OSError, ssl.SSLError) as exc:
            if security.key_password is not None and security.key_file and key_is_encrypted(security.key_file):
                why = "cannot decrypt it with security.key_password"
            else:
                why = str(exc)
            raise KafkaSecurityError(f"cannot load security.cert_file {security.cert_file} with key_file "
                                     f"{security.key_file}: {why}") from exc
    return context


def sasl_options(security: KafkaSecurity) -> dict[str, Any]:
    """aiokafka's SASL arguments for ``security`` (none unless the protocol is a SASL one). They hold secrets."""
    if security.protocol not in SASL_PROTOCOLS:
        return {}
    return {
        "sasl_mechanism": security.sasl_mechanism or "PLAIN",  # bridge validate requires it; PLAIN for code
        "sasl_plain_username": security.username,
        "sasl_plain_password": security.password,
    }


def connection_options(kc: KafkaSourceConfig) -> dict[str, Any]:
    """aiokafka connection and security options shared by the consumer, the dry run's admin client and the
    dead-letter producer. They hold secrets: never log them."""
    security = kc.security
    options: dict[str, Any] = {"bootstrap_servers": kc.bootstrap_servers, "security_protocol": security.protocol}
    if security.protocol in TLS_PROTOCOLS:
        options["ssl_context"] = ssl_context(security)
    options.update(sasl_options(security))
    return options


def shared_options(kc: KafkaSourceConfig) -> dict[str, Any]:
    """The options of the clients besides the consumer: :func:`connection_options` and the
    :data:`SHARED_CLIENT_OPTIONS` of ``client_options``."""
    shared = {name: value for name, value in kc.client_options.items() if name in SHARED_CLIENT_OPTIONS}
    return {**shared, **connection_options(kc)}


def consumer_options(kc: KafkaSourceConfig) -> dict[str, Any]:
    """The consumer's options: the bridge's defaults for some client settings (``CLIENT_OPTION_DEFAULTS``), then
    ``client_options``, then the bridge's own settings, which win. Offsets are only ever committed by hand (and never
    by a dry run); ``start_from`` applies where the group has no offset."""
    return {
        **CLIENT_OPTION_DEFAULTS,
        **kc.client_options,
        **connection_options(kc),
        "group_id": kc.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": kc.start_from,
    }


async def at_most(wait: Awaitable[Any], timeout_s: float) -> None:
    """Await ``wait`` for at most ``timeout_s`` (then give up on it quietly)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wait, timeout_s)


def tp_text(keys: Iterable[tuple[str, int]]) -> str:
    """``topic/partition, ...`` in order, for log lines."""
    return ", ".join(f"{t}/{p}" for t, p in sorted(keys)) or "none"

"""Kafka client settings shared by the source's consumer, its dry-run topic discovery and the dead-letter producer,
and two small helpers of the kafka modules."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterable
from typing import Any

from aiokafka.helpers import create_ssl_context

from bridge.sources.kafka.spec import CLIENT_OPTION_DEFAULTS, KafkaSourceConfig


def connection_options(kc: KafkaSourceConfig) -> dict[str, Any]:
    """aiokafka connection and security options shared by the consumer and the dead-letter producer.
    They hold secrets: never log them."""
    security = kc.security
    options: dict[str, Any] = {"bootstrap_servers": kc.bootstrap_servers, "security_protocol": security.protocol}
    if security.protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=security.ca_file, certfile=security.cert_file, keyfile=security.key_file
        )
    if security.protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        options["sasl_mechanism"] = security.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = security.username
        options["sasl_plain_password"] = security.password
    return options


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

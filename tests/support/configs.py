"""Source configurations for tests and benchmarks, built directly (no bridge.yaml): a source's kind config plus
the runtime-wide fields, with the defaults a loaded bridge.yaml would give where a test does not care."""

from __future__ import annotations

from typing import Any

from bridge.config import DeliveryConfig, SourceConfig
from bridge.sources import REGISTRY

__all__ = ["source_config"]


def source_config(
    source_id: str,
    kind_config: object,
    *,
    description: str = "test",
    delivery: DeliveryConfig | None = None,
    max_in_flight: int = 64,
    payload: Any = None,
) -> SourceConfig:
    """The SourceConfig of a ``source_id`` source of ``kind_config``'s kind: no schemas, no ``when``, and by
    default the whole event as payload and the default delivery settings."""
    kinds = [name for name, spec in REGISTRY.items() if isinstance(kind_config, spec.config_type)]
    if len(kinds) != 1:
        raise TypeError(f"{type(kind_config).__name__} is the config of no registered source kind")
    kind = kinds[0]
    return SourceConfig(
        id=source_id,
        kind=kind,
        description=description,
        kind_config=kind_config,
        delivery=delivery or DeliveryConfig(),
        max_in_flight=max_in_flight,
        bind_schema=None,
        payload_schema=None,
        when=None,
        payload=payload,
    )

"""A document that passed every check → the frozen dataclasses of :mod:`bridge.config.model`; each source's kind
block is built by its kind's spec."""

from __future__ import annotations

from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

from bridge import sources
from bridge.config._analysis import Analysis
from bridge.config._checks import merge_delivery
from bridge.config.model import (
    DEFAULT_DEAD_LETTER_FILE,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_STATE_DIR,
    BridgeConfig,
    DeadLetterConfig,
    DeliveryConfig,
    EngineConfig,
    ObservabilityConfig,
    RetryConfig,
    SourceConfig,
    resolve_path,
)

_FILE, *_OWN_DESTINATIONS = (f.name for f in fields(DeadLetterConfig))


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _delivery(raw: dict[str, Any], state_dir: Path) -> DeliveryConfig:
    retry = _dict(raw.get("retry"))
    for name in ("multiplier", "jitter"):  # YAML reads `2` as an int; the dataclass holds floats
        if name in retry:
            retry[name] = float(retry[name])
    dead = _dict(raw.get("dead_letter")) or {_FILE: DEFAULT_DEAD_LETTER_FILE}
    dead_letter = DeadLetterConfig(
        resolve_path(state_dir, dead[_FILE]) if dead.get(_FILE) else None,
        **{name: dead.get(name) for name in _OWN_DESTINATIONS},
    )
    rest = {k: v for k, v in raw.items() if k not in ("retry", "dead_letter")}
    return DeliveryConfig(**rest, retry=RetryConfig(**retry), dead_letter=dead_letter)


def build(result: Analysis) -> BridgeConfig:
    """The dataclasses of a document that passed every check (so every value has the right type)."""
    data = result.data
    assert data is not None
    base = result.base_dir
    resolve = partial(resolve_path, base)
    state_dir = resolve(data.get("state_dir", DEFAULT_STATE_DIR))
    defaults = _dict(data.get("defaults"))
    default_delivery = _dict(defaults.get("delivery"))
    default_max = defaults.get("max_in_flight", DEFAULT_MAX_IN_FLIGHT)
    built = []
    for sid, raw in data["sources"].items():
        kind = next(k for k in sources.REGISTRY if k in raw)
        key = result.positions.key(("sources", sid))
        built.append(SourceConfig(
            id=sid,
            kind=kind,
            description=raw.get("description", ""),
            kind_config=sources.REGISTRY[kind].build(sid, _dict(raw[kind]), resolve),
            delivery=_delivery(merge_delivery(default_delivery, _dict(raw.get("delivery"))), state_dir),
            max_in_flight=raw.get("max_in_flight", default_max),
            bind_schema=result.schemas.get((sid, "bind_schema")),
            payload_schema=result.schemas.get((sid, "payload_schema")),
            when=raw.get("when"),
            function_id=raw.get("function_id"),
            payload=raw.get("payload"),
            line=key.line if key else 0,
        ))
    return BridgeConfig(
        path=result.path,
        version=data["version"],
        engine=EngineConfig(**_dict(data.get("engine"))),
        state_dir=state_dir,
        observability=ObservabilityConfig(**_dict(data.get("observability"))),
        defaults=_delivery(default_delivery, state_dir),
        default_max_in_flight=default_max,
        sources=tuple(built),
        schema_files=tuple(sorted(result.schema_files)),
    )

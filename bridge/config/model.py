"""The frozen dataclasses of a loaded bridge.yaml: the contract every other module reads. A source kind's own
options are its config dataclass (``bridge/sources/<kind>/spec.py``), held in :attr:`SourceConfig.kind_config`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DeliveryMode = Literal["sync", "void", "enqueue"]

DEFAULT_STATE_DIR = ".bridge"
DEFAULT_MAX_IN_FLIGHT = 64
DEFAULT_DEAD_LETTER_FILE = "dead-letters.jsonl"


def resolve_path(base: Path, value: str) -> Path:
    """``value`` (``~`` expanded) against ``base``, normalised but with symlinks kept as the user named them."""
    return Path(os.path.abspath(base / os.path.expanduser(value)))


@dataclass(frozen=True)
class EngineConfig:
    url: str = "ws://127.0.0.1:49134"
    worker_name: str | None = None
    namespace: str | None = None
    reconcile_interval_ms: int = 2000
    rebind_grace_ms: int = 60000


@dataclass(frozen=True)
class ObservabilityConfig:
    listen: str | None = None
    log_format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 5
    initial_backoff_ms: int = 200
    max_backoff_ms: int = 30000
    multiplier: float = 2.0
    jitter: float = 0.2


@dataclass(frozen=True)
class DeadLetterConfig:
    """Exactly one destination is set. ``file`` is already resolved to an absolute path (against state_dir); each
    other field is the destination a kind writes through its own connection (its ``KindSpec.dead_letter_key``)."""

    file: Path | None = None
    kafka_topic: str | None = None
    postgres_table: str | None = None


@dataclass(frozen=True)
class DeliveryConfig:
    mode: DeliveryMode = "sync"
    queue: str | None = None
    timeout_ms: int = 30000
    retry: RetryConfig = field(default_factory=RetryConfig)
    dead_letter: DeadLetterConfig = field(default_factory=DeadLetterConfig)


@dataclass(frozen=True)
class SourceConfig:
    id: str  # the trigger type id
    kind: str  # a key of bridge.sources.REGISTRY
    description: str
    kind_config: object  # the kind's config dataclass (KindSpec.config_type); kinds narrow it with isinstance
    delivery: DeliveryConfig  # already merged over defaults
    max_in_flight: int
    bind_schema: dict[str, Any] | None  # resolved ($ref loaded); None = only condition_function_id allowed
    payload_schema: dict[str, Any] | None
    when: str | None  # template source text
    payload: Any  # template tree (None = the whole event)
    line: int = 0  # where the source is declared in bridge.yaml (1-based; 0 = unknown)
    function_id: str | None = None  # observe mode: its observable function's id (None: bridge::<id>)


@dataclass(frozen=True)
class BridgeConfig:
    path: Path  # absolute path of bridge.yaml
    version: int
    engine: EngineConfig
    state_dir: Path  # absolute
    observability: ObservabilityConfig
    defaults: DeliveryConfig
    default_max_in_flight: int
    sources: tuple[SourceConfig, ...]
    schema_files: tuple[Path, ...] = ()  # the files its sources' ``{$ref: file}`` schemas load (a reload watches them)

    def source(self, source_id: str) -> SourceConfig:
        for s in self.sources:
            if s.id == source_id:
                return s
        raise KeyError(source_id)


def observable_function_id(trigger_type: str, function_id: str | None = None) -> str:
    """The id of the observable function a source is on an engine with ``observe.v1`` (iii's ``service::name``
    convention): the source's own ``function_id`` when it sets one, else ``bridge::<trigger type>``. Its bindings
    are that function's observers."""
    return function_id or f"bridge::{trigger_type}"

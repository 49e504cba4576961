"""bridge.yaml → frozen dataclasses: env substitution, path resolution, defaults merged.

The dataclasses below are the contract every other module reads. Loading (``load_config``) is below them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DeliveryMode = Literal["sync", "void", "enqueue"]
SourceKind = Literal["kafka", "postgres", "file"]


@dataclass(frozen=True)
class EngineConfig:
    url: str = "ws://127.0.0.1:49134"
    worker_name: str | None = None
    namespace: str | None = None
    reconcile_interval_ms: int = 10000


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
    """Exactly one destination is set. ``file`` is already resolved to an absolute path (against state_dir)."""

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
class KafkaSecurity:
    protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str | None = None  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class KafkaSourceConfig:
    bootstrap_servers: str
    topics: tuple[str, ...] = ()
    topic_pattern: str | None = None
    group_id: str | None = None  # None → "iii-bridge.<trigger type id>" (resolved by the loader)
    start_from: Literal["earliest", "latest"] = "earliest"
    key_format: Literal["text", "json", "bytes"] = "text"
    value_format: Literal["text", "json", "bytes"] = "json"
    ordering: Literal["partition", "key", "none"] = "partition"
    commit_interval_ms: int = 1000
    security: KafkaSecurity = field(default_factory=KafkaSecurity)
    client_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PostgresSourceConfig:
    dsn: str
    channels: tuple[str, ...] = ()
    payload_format: Literal["text", "json"] = "json"
    mode: Literal["listen", "outbox"] = "listen"
    outbox_table: str | None = None
    poll_interval_ms: int = 1000
    batch_size: int = 100
    reconnect_initial_backoff_ms: int = 500
    reconnect_max_backoff_ms: int = 30000


@dataclass(frozen=True)
class FileSourceConfig:
    path: Path  # absolute
    recursive: bool = True
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = (".*", "*.tmp")
    changes: tuple[Literal["created", "modified", "deleted"], ...] = ("created", "modified")
    content: Literal["none", "text", "json", "bytes"] = "text"
    max_content_bytes: int = 1048576
    settle_ms: int = 200
    after_delivery: Literal["keep", "delete", "move"] = "keep"
    move_to: Path | None = None  # absolute


@dataclass(frozen=True)
class SourceConfig:
    id: str  # the trigger type id
    kind: SourceKind
    description: str
    kind_config: KafkaSourceConfig | PostgresSourceConfig | FileSourceConfig
    delivery: DeliveryConfig  # already merged over defaults
    max_in_flight: int
    bind_schema: dict[str, Any] | None  # resolved ($ref loaded); None = only condition_function_id allowed
    payload_schema: dict[str, Any] | None
    when: str | None  # template source text
    payload: Any  # template tree (None = the whole event)
    line: int = 0  # where the source is declared in bridge.yaml (1-based; 0 = unknown)


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

    def source(self, source_id: str) -> SourceConfig:
        for s in self.sources:
            if s.id == source_id:
                return s
        raise KeyError(source_id)

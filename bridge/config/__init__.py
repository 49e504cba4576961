"""bridge.yaml → frozen dataclasses: env substitution, path resolution, defaults merged.

The dataclasses below are the contract every other module reads. Loading (``load_config``) is below them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bridge._redact import REDACTED as REDACTED
from bridge._redact import redact as redact
from bridge._redact import redact_dsn as redact_dsn
from bridge.config._load import Analysis, analyze, merge_delivery
from bridge.config.diagnostics import Problem, has_errors
from bridge.errors import ConfigError

DeliveryMode = Literal["sync", "void", "enqueue"]
SourceKind = Literal["kafka", "postgres", "file"]


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


# ---------------------------------------------------------------------------------------------------------
# loading

DEFAULT_STATE_DIR = ".bridge"
DEFAULT_MAX_IN_FLIGHT = 64
DEFAULT_DEAD_LETTER_FILE = "dead-letters.jsonl"


def check_config(
    path: Path | str, env: Mapping[str, str] | None = None
) -> tuple[BridgeConfig | None, list[Problem]]:
    """Every problem of the config at ``path`` (errors and warnings, in file order), and the config when there
    is no error. ``env`` replaces ``os.environ`` for ``${VAR}`` substitution."""
    result = analyze(Path(path), str(path), os.environ if env is None else env)
    if result.data is None or has_errors(result.problems):
        return None, result.problems
    return _build(result), result.problems


def load_config(path: Path | str, env: Mapping[str, str] | None = None) -> BridgeConfig:
    """The config at ``path``; ConfigError carries every problem when there is an error (warnings pass)."""
    config, problems = check_config(path, env)
    if config is None:
        raise ConfigError([p for p in problems if p.is_error])
    return config


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _path(base: Path, value: str) -> Path:
    """``value`` (``~`` expanded) against ``base``, normalised but with symlinks kept as the user named them."""
    return Path(os.path.abspath(base / os.path.expanduser(value)))


def _delivery(raw: dict[str, Any], state_dir: Path) -> DeliveryConfig:
    retry = _dict(raw.get("retry"))
    for name in ("multiplier", "jitter"):  # YAML reads `2` as an int; the dataclass holds floats
        if name in retry:
            retry[name] = float(retry[name])
    dead = _dict(raw.get("dead_letter")) or {"file": DEFAULT_DEAD_LETTER_FILE}
    dead_letter = DeadLetterConfig(
        file=_path(state_dir, dead["file"]) if dead.get("file") else None,
        kafka_topic=dead.get("kafka_topic"),
        postgres_table=dead.get("postgres_table"),
    )
    rest = {k: v for k, v in raw.items() if k not in ("retry", "dead_letter")}
    return DeliveryConfig(**rest, retry=RetryConfig(**retry), dead_letter=dead_letter)


def _kafka(sid: str, raw: dict[str, Any], base: Path) -> KafkaSourceConfig:
    security = _dict(raw.get("security"))
    for name in ("ca_file", "cert_file", "key_file"):
        if security.get(name):
            security[name] = _path(base, security[name])
    return KafkaSourceConfig(**{
        **raw,
        "topics": tuple(raw.get("topics") or ()),
        "group_id": raw.get("group_id") or f"iii-bridge.{sid}",
        "security": KafkaSecurity(**security),
        "client_options": _dict(raw.get("client_options")),
    })


def _postgres(raw: dict[str, Any]) -> PostgresSourceConfig:
    return PostgresSourceConfig(**{**raw, "channels": tuple(raw.get("channels") or ())})


def _file(raw: dict[str, Any], base: Path) -> FileSourceConfig:
    values = {**raw, "path": _path(base, raw["path"])}
    for name in ("include", "exclude", "changes"):
        if name in raw:
            values[name] = tuple(raw[name])
    if raw.get("move_to"):
        values["move_to"] = _path(base, raw["move_to"])
    return FileSourceConfig(**values)


def _build(result: Analysis) -> BridgeConfig:
    """The dataclasses of a document that passed every check (so every value has the right type)."""
    data = result.data
    assert data is not None
    base = result.base_dir
    state_dir = _path(base, data.get("state_dir", DEFAULT_STATE_DIR))
    defaults = _dict(data.get("defaults"))
    default_delivery = _dict(defaults.get("delivery"))
    default_max = defaults.get("max_in_flight", DEFAULT_MAX_IN_FLIGHT)
    sources = []
    for sid, raw in data["sources"].items():
        kind: SourceKind = next(k for k in ("kafka", "postgres", "file") if k in raw)
        block = _dict(raw[kind])
        kind_config = (
            _kafka(sid, block, base) if kind == "kafka" else _postgres(block) if kind == "postgres"
            else _file(block, base)
        )
        key = result.positions.key(("sources", sid))
        sources.append(SourceConfig(
            id=sid,
            kind=kind,
            description=raw.get("description", ""),
            kind_config=kind_config,
            delivery=_delivery(merge_delivery(default_delivery, _dict(raw.get("delivery"))), state_dir),
            max_in_flight=raw.get("max_in_flight", default_max),
            bind_schema=result.schemas.get((sid, "bind_schema")),
            payload_schema=result.schemas.get((sid, "payload_schema")),
            when=raw.get("when"),
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
        sources=tuple(sources),
    )

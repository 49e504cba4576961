"""bridge.yaml → frozen dataclasses: reading with line:col (``yamlpos``), ``${VAR}`` substitution
(``_envsubst``), JSON Schema and semantic checks (``schemas``, ``_load``, ``_checks``), every problem as a
:class:`~bridge.config.diagnostics.Problem`, and the dataclasses (``model``, built by ``_build``).

No client library is imported here; each source kind's options come from its spec (``bridge.sources``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from bridge._redact import REDACTED as REDACTED
from bridge._redact import redact as redact
from bridge._redact import redact_dsn as redact_dsn
from bridge.config._build import build
from bridge.config._load import analyze
from bridge.config.diagnostics import Problem, has_errors
from bridge.config.model import (
    DEFAULT_DEAD_LETTER_FILE,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_STATE_DIR,
    BridgeConfig,
    DeadLetterConfig,
    DeliveryConfig,
    DeliveryMode,
    EngineConfig,
    ObservabilityConfig,
    RetryConfig,
    SourceConfig,
    resolve_path,
)
from bridge.errors import ConfigError

__all__ = [
    "DEFAULT_DEAD_LETTER_FILE",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_STATE_DIR",
    "REDACTED",
    "BridgeConfig",
    "DeadLetterConfig",
    "DeliveryConfig",
    "DeliveryMode",
    "EngineConfig",
    "ObservabilityConfig",
    "RetryConfig",
    "SourceConfig",
    "check_config",
    "load_config",
    "redact",
    "redact_dsn",
    "resolve_path",
]


def check_config(
    path: Path | str, env: Mapping[str, str] | None = None
) -> tuple[BridgeConfig | None, list[Problem]]:
    """Every problem of the config at ``path`` (errors and warnings, in file order), and the config when there
    is no error. ``env`` replaces ``os.environ`` for ``${VAR}`` substitution."""
    result = analyze(Path(path), str(path), os.environ if env is None else env)
    if result.data is None or has_errors(result.problems):
        return None, result.problems
    return build(result), result.problems


def load_config(path: Path | str, env: Mapping[str, str] | None = None) -> BridgeConfig:
    """The config at ``path``; ConfigError carries every problem when there is an error (warnings pass)."""
    config, problems = check_config(path, env)
    if config is None:
        raise ConfigError([p for p in problems if p.is_error])
    return config

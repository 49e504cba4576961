"""The one exception tree of iii-bridge, grouped by what a caller can do about it.

    BridgeError                      base of everything the bridge raises on purpose
    ├── ConfigError                  bridge.yaml is wrong: fix the file (carries every Problem)
    ├── BindConfigError              a consumer's bind config breaks the source's bind_schema: the binder fixes it
    ├── EventError                   one event cannot be delivered as it is: dead-letter it, never retry
    │   ├── DecodeError              the raw event does not decode in its declared format
    │   ├── RenderError              a template failed to render, or rendered null
    │   └── PayloadSchemaError       the rendered payload breaks payload_schema
    ├── DeliveryError                an invocation failed; may succeed later: retry, then dead-letter
    │   └── EngineUnavailable        the engine link is down
    └── DeadLetterError              writing a dead letter failed: do not acknowledge the event
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.config.diagnostics import Problem


class BridgeError(Exception):
    """Base class of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """bridge.yaml (or a file it references) is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(p.format_text() for p in problems))


class BindConfigError(BridgeError):
    """A bind config does not satisfy the source's bind_schema; the message lists every violation."""


class EventError(BridgeError):
    """One event cannot be delivered as it is; it goes to the dead letter without retries."""

    code = "event_error"


class DecodeError(EventError):
    """The raw event does not decode in its declared format."""

    code = "decode_error"


class RenderError(EventError):
    """A template failed to render or rendered a null payload."""

    code = "render_error"


class PayloadSchemaError(EventError):
    """The rendered payload does not satisfy payload_schema."""

    code = "payload_schema_violation"


class DeliveryError(BridgeError):
    """An invocation failed in a way that may succeed later; ``code`` is the engine's or SDK's error code."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class EngineUnavailable(DeliveryError):
    """The engine link is down; the call was not sent."""

    def __init__(self, message: str = "the iii engine is not connected") -> None:
        super().__init__("engine_unavailable", message)


class DeadLetterError(BridgeError):
    """A dead letter could not be written; the event must stay unacknowledged."""

"""The Source protocol and the explicit registry of source kinds.

A source only speaks its protocol: it turns what arrives into :class:`Event` objects and hands them to the
:class:`Sink` the runtime gives it, together with a hook that acknowledges the event (commit, delete the row,
checkpoint the file) once the event is done. Retries, fan-out, dead letters, back-pressure and shutdown live
in the runtime and dispatcher, once for every kind.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from bridge.errors import EventError

if TYPE_CHECKING:
    from bridge.config import SourceConfig

SHUTDOWN_GRACE_S = 15.0
"""At shutdown, how long in-flight events get to finish. A cancelled source keeps acknowledging (committing,
checkpointing) events that finish within this time; the runtime abandons the rest, unacknowledged."""

Outcome = Literal["delivered", "filtered", "dead_lettered"]
"""How an event ended: every binding succeeded or was filtered; all were filtered; at least one dead-lettered."""

OnDone = Callable[[Outcome], Awaitable[None]]
"""The acknowledgement hook: called once, when the event is done. Not called for an event abandoned at
shutdown (it stays unacknowledged and comes back). If it raises, the event counts as not acknowledged."""


@dataclass(eq=False)
class Event:
    """One event from a source.

    ``fields`` holds the kind's template fields of DESIGN.md §2 (for a file: path, relative_path, name, change,
    size, mtime, content); ``id`` and ``source`` are added when templates see the event. ``error`` is set when
    the raw event could not be decoded: the dispatcher dead-letters such an event with ``binding: null`` and
    then acknowledges it (it counts as done).
    """

    id: str
    source: str
    fields: dict[str, Any] = field(default_factory=dict)
    error: EventError | None = None
    order_key: Any = None  # events with the same non-None key are delivered one at a time, in submit order

    def template_view(self) -> dict[str, Any]:
        """The ``event`` variable templates see."""
        return {"id": self.id, "source": self.source, **self.fields}


class Sink(Protocol):
    """What the runtime hands a source."""

    async def submit(self, event: Event, on_done: OnDone) -> None:
        """Accept an event for delivery. Waits while no binding exists or the in-flight window is full
        (back-pressure), then returns as soon as the event is accepted (delivery runs concurrently)."""
        ...

    def offer(self, event: Event, on_done: OnDone) -> bool:
        """Accept an event only if ``submit`` would not wait (a binding exists, the window has room and no earlier
        submit is waiting); False accepts nothing. Lets a callback hand over an event without a task switch."""
        ...

    def has_bindings(self) -> bool:
        """Whether any function is bound to this source right now."""
        ...

    async def wait_for_bindings(self) -> None:
        """Return once at least one binding exists."""
        ...

    def in_flight(self) -> int:
        """Events accepted and not yet done."""
        ...

    def window_full(self) -> bool:
        """Whether the next submit would wait for a free slot."""
        ...

    def activate(self) -> None:
        """Called by a source of an exclusive kind (see :func:`exclusive`) each time it becomes the active replica
        (it took its lock): from then on this bridge provides the trigger type, so the engine routes every
        binding to it. Sources of other kinds never call it."""
        ...

    def deactivate(self) -> None:
        """Called by a source of an exclusive kind when it stops being the active replica (it lost its lock, or
        the connection that held it): this bridge stops providing and reconciling the trigger type, and does not
        register it again (not even on an engine reconnect) until :meth:`activate`."""
        ...


class Source(Protocol):
    """One configured source. ``run`` produces events until cancelled; cancellation stops intake at once."""

    async def run(self, sink: Sink) -> None: ...


def exclusive(config: SourceConfig) -> bool:
    """Whether replicas of this source take turns (one active, the others standing by behind a lock).

    The engine routes bindings to the replica that registered the trigger type last, so such a source advertises
    its trigger type only once it is active (:meth:`Sink.activate`); a standby stays silent and cannot draw the
    bindings away from the replica that delivers. Kafka and outbox replicas all work at once and advertise at
    start.
    """
    return config.kind == "file" or getattr(config.kind_config, "mode", None) == "listen"


class SourceFactory(Protocol):
    """Builds a source from its config and the bridge's state_dir.

    ``dry_run`` (`bridge up --dry-run`): the source reads as usual but changes nothing anybody else relies on: it
    takes no lock a live replica needs, commits no offsets, deletes or locks no rows and writes no checkpoints
    outside the (scratch) state_dir, so a dry run beside a live bridge neither steals nor loses its events.
    """

    def __call__(self, config: SourceConfig, state_dir: Path, *, dry_run: bool = False) -> Source: ...


def _file_source(config: SourceConfig, state_dir: Path, *, dry_run: bool = False) -> Source:
    from bridge.sources.file.source import FileSource

    return FileSource(config, state_dir, dry_run=dry_run)


def _postgres_source(config: SourceConfig, state_dir: Path, *, dry_run: bool = False) -> Source:
    from bridge.sources.postgres.source import PostgresSource

    return PostgresSource(config, state_dir, dry_run=dry_run)


def _kafka_source(config: SourceConfig, state_dir: Path, *, dry_run: bool = False) -> Source:
    from bridge.sources.kafka.source import KafkaSource

    return KafkaSource(config, state_dir, dry_run=dry_run)


REGISTRY: dict[str, SourceFactory] = {
    "file": _file_source,
    "kafka": _kafka_source,
    "postgres": _postgres_source,
}
"""Source kind → factory. Each kind's client library is imported only in its own module."""

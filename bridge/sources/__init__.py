"""The Source protocol, the kind spec, and the explicit registry of source kinds.

A source only speaks its protocol: it turns what arrives into :class:`Event` objects and hands them to the
:class:`Sink` the runtime gives it, together with a hook that acknowledges the event (commit, delete the row,
checkpoint the file) once the event is done. Retries, fan-out, dead letters, back-pressure and shutdown live
in the runtime and dispatcher, once for every kind.

Everything else a kind brings (its config dataclass and builder, semantic checks, event fields, docs prose,
metrics figures, its own dead-letter destination) is its :class:`KindSpec` in ``bridge/sources/<kind>/spec.py``,
which imports no client library; the modules that do are loaded only when a source or destination is opened.
Adding a kind takes one package, one schema (``schemas/source-<kind>.json``) and one line in :data:`REGISTRY`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from bridge.errors import EventError

if TYPE_CHECKING:
    from bridge.config import BridgeConfig, DeadLetterConfig, SourceConfig
    from bridge.config.diagnostics import Problem, Severity
    from bridge.config.yamlpos import KeyPath
    from bridge.deadletter import DeadLetterSink

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
    raw_key: bytes | None = None  # the key bytes as received (a Kafka record key), for a dead letter to keep

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
        """Called by a source of an exclusive kind (see :meth:`KindSpec.exclusive`) each time it becomes the active
        replica (it took its lock): from then on this bridge provides the trigger type, so the engine routes every
        binding to it. Sources of other kinds never call it."""
        ...

    def deactivate(self) -> None:
        """Called by a source of an exclusive kind when it stops being the active replica (it lost its lock, or
        the connection that held it): this bridge stops providing and reconciling the trigger type, and does not
        register it again (not even on an engine reconnect) until :meth:`activate`."""
        ...


Sample = tuple[tuple[str, ...], float]
"""One value of a figure: its label values (after ``trigger_type``, in the figure's label order) and the value."""


class Source(Protocol):
    """One configured source. ``run`` produces events until cancelled; cancellation stops intake at once."""

    async def run(self, sink: Sink) -> None: ...

    def figures(self) -> Mapping[str, Iterable[Sample]]:
        """The current values of the figures its kind declares (:attr:`KindSpec.figures`), by figure name; read
        at each metrics scrape, on the bridge loop. A kind without figures returns an empty mapping."""
        ...


@dataclass(frozen=True)
class Figure:
    """A metric family a kind's sources report besides the ones every source has (DESIGN.md, Metrics)."""

    name: str  # the Prometheus name; a counter's is without ``_total``
    help: str
    type: Literal["gauge", "counter"]
    labels: tuple[str, ...] = ()  # after ``trigger_type``


class KindChecker(Protocol):
    """What :meth:`KindSpec.check` reports problems through (the config checks of ``bridge.config``)."""

    def add(self, code: str, path: KeyPath, message: str, hint: str | None = None, *, key: bool = False,
            severity: Severity = "error") -> None:
        """A problem at ``path`` (at its key when ``key``)."""
        ...

    def require(self, parent: KeyPath, names: tuple[str, ...], message: str, hint: str | None = None) -> None:
        """A missing key among ``names`` under ``parent`` (dropped when a typo of one of them is reported)."""
        ...

    def directory(self, path: KeyPath, value: str, *, warn_missing: bool) -> None:
        """``value`` (relative to bridge.yaml) must be a directory; a warning if it is missing and ``warn_missing``."""
        ...

    def existing_file(self, path: KeyPath, value: str) -> None:
        """``value`` (relative to bridge.yaml) must be an existing file."""
        ...

    def readable_file(self, path: KeyPath, value: str) -> Path | None:
        """``value`` (relative to bridge.yaml) must be a file this process can read; returns it if so."""
        ...


def is_set(value: Any) -> bool:
    """Whether an optional config value is really given (null, empty lists and empty strings count as absent)."""
    return value is not None and value != [] and value != ""


class KindSpec(ABC):
    """Everything the bridge knows about one source kind, besides its JSON Schema (``schemas/source-<name>.json``).

    Every part is abstract: a kind that leaves one out (a method or one of the attributes below) cannot be
    instantiated, so no tool falls back to another kind's text. Methods that take a ``SourceConfig`` are only called
    with a source of this kind.
    """

    _ATTRIBUTES = ("name", "config_type", "event_fields", "sample_event", "figures", "dead_letter_key",
                   "reserved_options")

    def __new__(cls, *args: Any, **kwargs: Any) -> KindSpec:
        missing = [name for name in cls._ATTRIBUTES if not hasattr(cls, name)]
        if missing:
            raise TypeError(f"Can't instantiate kind spec {cls.__name__} without attribute(s) {', '.join(missing)}")
        return super().__new__(cls)

    name: str
    """The kind's key in bridge.yaml (``kafka:``) and in :data:`REGISTRY`."""

    config_type: type
    """The frozen dataclass :meth:`build` returns (``SourceConfig.kind_config``)."""

    event_fields: tuple[tuple[str, str, str], ...]
    """The ``event`` fields of DESIGN.md §2, ``id`` and ``source`` first: name, type, description."""

    sample_event: dict[str, Any]
    """Plausible values of every event field but ``id`` and ``source`` (an event file for ``bridge render``)."""

    figures: tuple[Figure, ...]
    """The metric families its sources report through :meth:`Source.figures`."""

    dead_letter_key: str | None
    """The ``dead_letter`` key of the kind's own destination (written through the source's connection), if any."""

    reserved_options: Mapping[str, Mapping[str, str]]
    """Free-form option mappings of the kind's block (``client_options``) → keys they may not hold → what to do
    instead."""

    # -- config

    @abstractmethod
    def schema(self) -> dict[str, Any]:
        """The JSON Schema (2020-12) of the kind's block (a fresh copy; built-in kinds read
        ``schemas/source-<name>.json``). Its local ``$ref``s point into itself."""

    @abstractmethod
    def build(self, source_id: str, block: dict[str, Any], resolve: Callable[[str], Path]) -> Any:
        """The :attr:`config_type` of a block that passed every check; ``resolve`` makes a path absolute the way
        bridge.yaml's relative paths are (against its directory)."""

    @abstractmethod
    def check(self, checker: KindChecker, here: KeyPath, block: dict[str, Any]) -> None:
        """The rules the kind's schema cannot express, for the block at ``here`` (values may have any type)."""

    @abstractmethod
    def check_dead_letter(self, checker: KindChecker, path: KeyPath, value: Any) -> None:
        """The rules of a written ``dead_letter.<dead_letter_key>`` value at ``path`` (nothing without a key)."""

    @abstractmethod
    def online_problems(self, config: BridgeConfig, display: str) -> list[Problem]:
        """`bridge validate` without ``--offline``: what only the kind's servers can tell, for every source of
        this kind in ``config`` (empty when there is nothing to ask)."""

    @abstractmethod
    def exclusive(self, source: SourceConfig) -> bool:
        """Whether replicas of this source take turns (one active, the others standing by behind a lock).

        The engine routes bindings to the replica that registered the trigger type last, so such a source
        advertises its trigger type only once it is active (:meth:`Sink.activate`); a standby stays silent and
        cannot draw the bindings away from the replica that delivers."""

    @abstractmethod
    def render_id(self, fields: dict[str, Any]) -> str | None:
        """The ``id`` an event with these fields would have (for `bridge render`); None when a part is missing."""

    @abstractmethod
    def ddl(self, source: SourceConfig) -> str | None:
        """The SQL `bridge sql` prints for this source, or None when it needs none."""

    # -- docs prose (Worker Docs), each a sentence or clause of DESIGN.md §3

    @abstractmethod
    def summary(self, source: SourceConfig, base: Path) -> str:
        """What the source reads, in one line (paths relative to ``base``; no credentials)."""

    @abstractmethod
    def guarantee(self, source: SourceConfig) -> str:
        """The delivery guarantee and what identifies an event for de-duplication."""

    @abstractmethod
    def ordering(self, source: SourceConfig) -> str:
        """In which order events reach the functions."""

    @abstractmethod
    def back_pressure(self, source: SourceConfig) -> str:
        """What happens beyond ``max_in_flight`` (continues "beyond that ...")."""

    @abstractmethod
    def unbound(self, source: SourceConfig) -> str:
        """What happens to events while no function is bound."""

    @abstractmethod
    def outage_wait(self, source: SourceConfig) -> str:
        """Where events wait while the engine is unreachable (continues "... unreachable ...")."""

    @abstractmethod
    def replicas(self, source: SourceConfig) -> tuple[str, str]:
        """For a source that is not :meth:`exclusive`: how replicas share the work ("They share ...") and what a
        departing replica leaves behind. For an exclusive one: which replica is active and how another takes
        over, and an empty string."""

    @abstractmethod
    def dead_letter_place(self, dead: DeadLetterConfig) -> str:
        """Where the kind's own destination puts records ("the Kafka topic ..."); only called when it is set."""

    # -- running

    @abstractmethod
    def open_source(self, source: SourceConfig, state_dir: Path, *, dry_run: bool = False) -> Source:
        """The source (this imports the client library).

        ``dry_run`` (`bridge up --dry-run`): the source reads as usual but changes nothing anybody else relies on:
        it takes no lock a live replica needs, commits no offsets, deletes or locks no rows and writes no
        checkpoints outside the (scratch) state_dir, so a dry run beside a live bridge neither steals nor loses
        its events."""

    @abstractmethod
    def open_dead_letter(self, dead: DeadLetterConfig, source: SourceConfig) -> DeadLetterSink:
        """The kind's own dead-letter destination for ``source`` (DeadLetterError when it cannot be had)."""

    @abstractmethod
    def connection(self, source: SourceConfig) -> str:
        """What identifies the server the source talks to: sources with the same connection and dead-letter
        setting share one destination."""


def spec_of(source: SourceConfig) -> KindSpec:
    """The spec of ``source``'s kind."""
    return REGISTRY[source.kind]


# The kinds' specs import the classes above from this (then partly initialised) module.
from bridge.sources.kafka.spec import SPEC as _KAFKA  # noqa: E402
from bridge.sources.postgres.spec import SPEC as _POSTGRES  # noqa: E402

from bridge.sources.file.spec import SPEC as _FILE  # noqa: E402  # isort: skip

REGISTRY: dict[str, KindSpec] = {
    _KAFKA.name: _KAFKA,
    _POSTGRES.name: _POSTGRES,
    _FILE.name: _FILE,
}
"""Source kind → spec, in the order kinds are documented."""

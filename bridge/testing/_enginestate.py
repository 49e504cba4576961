"""The state of :class:`~bridge.testing.engine.TestEngine`: the frozen records its introspection returns
(re-exported by ``bridge.testing.engine``) and the mutable tables its routing keeps, which a real engine would
lose in a restart.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection

DEFAULT_NS = "default"

TypeKey = tuple[str, str]  # (namespace, trigger type id): what identifies a provider


@dataclass(frozen=True)
class Frame:
    """One recorded frame. ``worker_id`` is the sender of an "in" frame and the recipient of an "out" one."""

    direction: str
    worker_id: str
    worker_name: str | None
    data: dict[str, Any]
    at: float


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    name: str | None
    namespace: str
    connected: bool
    metadata: dict[str, Any] | None


@dataclass(frozen=True)
class BindingInfo:
    """A stored binding. ``parked``: pending, not held by any provider (none was there, its provider left, or
    it rejected the binding: then ``error`` holds the provider's error); a parked binding is not listed by
    ``engine::registered-triggers::list`` and is replayed by the next ``registertriggertype`` of its type.
    ``namespace`` is the target function's; ``provider_namespace`` where its provider was found (None: parked)."""

    id: str
    trigger_type: str
    function_id: str
    config: Any
    metadata: Any
    namespace: str
    worker_id: str
    worker_name: str | None
    parked: bool
    error: dict[str, Any] | None
    trigger_namespace: str | None = None
    home_namespace: str = DEFAULT_NS
    provider_namespace: str | None = None


@dataclass(frozen=True)
class TriggerTypeInfo:
    id: str
    description: str | None
    trigger_request_format: Any
    call_request_format: Any
    worker_id: str
    worker_name: str | None
    namespace: str = DEFAULT_NS


@dataclass(frozen=True)
class FunctionInfo:
    namespace: str
    function_id: str
    worker_id: str
    worker_name: str | None


@dataclass(frozen=True)
class ObserverInfo:
    """An observer (observe.v1). ``legacy``: ``{trigger_type, config}`` when the legacy shim made it of a
    ``registertrigger`` (its id is the trigger's); ``state``: pending, active or error (``error`` says why)."""

    id: str
    namespace: str
    function_id: str
    target: str
    target_namespace: str
    args: dict[str, Any]
    state: str
    error: dict[str, Any] | None
    legacy: dict[str, Any] | None
    worker_id: str
    worker_name: str | None


class Worker:
    """One connection on the main path; a reconnecting SDK is a new Worker with a new id."""

    def __init__(self, ws: ServerConnection, state: State) -> None:
        self.id = str(uuid.uuid4())
        self.reattach_token = str(uuid.uuid4())
        self.ws = ws
        self.state = state
        self.name: str | None = None
        # Fixed by engine::workers::register (or the grace timer); until then registrations wait in `held`.
        self.namespace = DEFAULT_NS
        self.held: deque[dict[str, Any]] | None = deque()
        self.grace: asyncio.TimerHandle | None = None
        self.metadata: dict[str, Any] | None = None
        self.connected = True
        self.close_after_flush = False
        self.outbox: deque[dict[str, Any]] = deque()
        self.wake = asyncio.Event()
        self.functions: dict[str, dict[str, Any]] = {}  # function id -> its registerfunction frame
        self.provides: set[TypeKey] = set()
        self.invocations: set[str] = set()  # invocation ids this worker called or is running


@dataclass
class Binding:
    """A trigger as the engine 0.23 keeps it: ``namespace`` locates the target function, ``trigger_namespace``
    (if named) the provider strictly, ``home_namespace`` is the binder's, ``provider_namespace`` where the
    provider was found."""

    id: str
    trigger_type: str
    function_id: str
    config: Any
    metadata: Any
    namespace: str
    trigger_namespace: str | None
    home_namespace: str
    owner: Worker
    provider_namespace: str = DEFAULT_NS
    error: dict[str, Any] | None = None

    @property
    def provider_key(self) -> TypeKey:
        return (self.provider_namespace, self.trigger_type)


@dataclass
class TriggerType:
    id: str
    namespace: str
    description: str | None
    trigger_request_format: Any
    call_request_format: Any
    provider: Worker


@dataclass
class Invocation:
    caller: Worker
    reply: bool  # False for void calls: the target's result goes nowhere
    target: Worker
    function_id: str
    traceparent: str | None = None  # the caller's, echoed in the reply as the engine does
    baggage: str | None = None


@dataclass
class State:
    """Everything a real engine would lose in a restart."""

    workers: dict[str, Worker] = field(default_factory=dict)
    functions: dict[tuple[str, str], Worker] = field(default_factory=dict)
    worker_names: dict[tuple[str, str], Worker] = field(default_factory=dict)
    trigger_types: dict[TypeKey, TriggerType] = field(default_factory=dict)
    bindings: dict[str, Binding] = field(default_factory=dict)  # live: held by a provider, listed
    pending: dict[str, Binding] = field(default_factory=dict)  # parked or rejected, not listed
    invocations: dict[str, Invocation] = field(default_factory=dict)
    # observe.v1 only: observable functions by (namespace, id), observers by id, one revision counter.
    observables: dict[tuple[str, str], Observable] = field(default_factory=dict)
    observers: dict[str, Observer] = field(default_factory=dict)
    revision: int = 0


Builtin = Callable[[Worker, Any], Any]


@dataclass
class Observable:
    """A function registered with an ``observe`` descriptor (``registerfunction.observe``) on an engine with
    ``observe.v1``: its owner hears its observers (``functionregistered``, ``observeradded``/``removed``)."""

    namespace: str
    function_id: str
    owner: Worker
    delivery: str  # "auto" or "owner"
    args_format: Any
    legacy_trigger_type: str | None
    allow: bool = True

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.function_id)


@dataclass
class Observer:
    """An observer as the engine keeps it. ``worker`` made it: an ``observe`` frame, or (``legacy`` set) a
    ``registertrigger`` the legacy shim mapped onto it. ``state``: pending (no owner yet, or its ack awaited),
    active, or error (``error`` holds why)."""

    id: str
    worker: Worker
    namespace: str  # the source function's
    function_id: str
    args: dict[str, Any]
    filters: Any
    target: str
    target_namespace: str
    capture: list[str] | None
    on: str | None
    deliver: str | None
    metadata: Any
    legacy: dict[str, Any] | None = None
    state: str = "pending"
    error: dict[str, Any] | None = None
    revision: int = 0  # the revision it was offered to the owner with (its ack echoes it)

    @property
    def source_key(self) -> tuple[str, str]:
        return (self.namespace, self.function_id)

    def info(self) -> dict[str, Any]:
        """What its owner sees (never its metadata, policy or worker)."""
        info: dict[str, Any] = {"id": self.id, "args": self.args, "target": self.target}
        if self.filters:
            info["filters"] = self.filters
        if self.capture is not None:
            info["capture"] = self.capture
        if self.on is not None:
            info["on"] = self.on
        if self.legacy is not None:
            info["legacy"] = self.legacy
        return info

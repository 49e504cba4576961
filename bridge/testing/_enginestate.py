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
    """A stored binding. ``parked``: not currently held by a provider (none connected, or it was rejected:
    then ``error`` holds the provider's error and the binding stays disabled until re-registered)."""

    id: str
    trigger_type: str
    function_id: str
    config: Any
    metadata: Any
    namespace: str | None
    worker_id: str
    worker_name: str | None
    parked: bool
    error: dict[str, Any] | None


@dataclass(frozen=True)
class TriggerTypeInfo:
    id: str
    description: str | None
    trigger_request_format: Any
    call_request_format: Any
    worker_id: str
    worker_name: str | None


@dataclass(frozen=True)
class FunctionInfo:
    namespace: str
    function_id: str
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
        self.namespace = DEFAULT_NS
        self.metadata: dict[str, Any] | None = None
        self.connected = True
        self.close_after_flush = False
        self.outbox: deque[dict[str, Any]] = deque()
        self.wake = asyncio.Event()
        self.functions: dict[str, dict[str, Any]] = {}  # function id -> its registerfunction frame
        self.provides: set[str] = set()
        self.bindings: set[str] = set()
        self.inflight: set[str] = set()  # engine invocation ids this worker is running


@dataclass
class Binding:
    id: str
    trigger_type: str
    function_id: str
    config: Any
    metadata: Any
    namespace: str | None
    owner: Worker
    provider: Worker | None = None  # None: parked
    error: dict[str, Any] | None = None


@dataclass
class TriggerType:
    id: str
    description: str | None
    trigger_request_format: Any
    call_request_format: Any
    provider: Worker


@dataclass
class Pending:
    caller: Worker
    caller_invocation_id: str
    target: Worker
    function_id: str


@dataclass
class State:
    """Everything a real engine would lose in a restart."""

    workers: dict[str, Worker] = field(default_factory=dict)
    functions: dict[tuple[str, str], Worker] = field(default_factory=dict)
    trigger_types: dict[str, TriggerType] = field(default_factory=dict)
    bindings: dict[str, Binding] = field(default_factory=dict)
    by_type: dict[str, dict[str, Binding]] = field(default_factory=dict)
    pending: dict[str, Pending] = field(default_factory=dict)


Builtin = Callable[[Worker, Any], Any]

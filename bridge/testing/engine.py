"""A protocol-faithful iii engine for tests: a test utility, never a product feature.

The real engine cannot be installed here, so tests, examples and benchmarks run the real ``iii-sdk`` against
this one. It follows the wire facts in the project's iii protocol notes for an SDK 0.25 client in trigger mode
(``workerregistered`` without ``features``): it stores functions, trigger types and bindings, forwards bindings
to the newest provider of their type (parking them while there is none), routes invocations, cleans up after
a disconnect, and answers a few built-in ``engine::*`` functions.

All routing runs synchronously on the engine's own loop under one lock, so every state change and the frames
it sends happen atomically; outbound frames go through a per-connection queue and writer task, which keeps
them in the order they were decided. Tests read the state and the recorded frames from any thread, and inject
faults with :meth:`TestEngine.disconnect`, :meth:`TestEngine.restart` and :meth:`TestEngine.pause`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any, Self, TypeVar

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

__all__ = ["BindingInfo", "Frame", "FunctionInfo", "TestEngine", "TriggerTypeInfo", "WorkerInfo"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
_DEFAULT_NS = "default"
# What the SDK accepts and sends (64 MiB); the websockets default of 1 MiB would cut large payloads.
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CONFIG_SUMMARY_CHARS = 80


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


class _Worker:
    """One connection on the main path; a reconnecting SDK is a new _Worker with a new id."""

    def __init__(self, ws: ServerConnection, state: _State) -> None:
        self.id = str(uuid.uuid4())
        self.reattach_token = str(uuid.uuid4())
        self.ws = ws
        self.state = state
        self.name: str | None = None
        self.namespace = _DEFAULT_NS
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
class _Binding:
    id: str
    trigger_type: str
    function_id: str
    config: Any
    metadata: Any
    namespace: str | None
    owner: _Worker
    provider: _Worker | None = None  # None: parked
    error: dict[str, Any] | None = None


@dataclass
class _TriggerType:
    id: str
    description: str | None
    trigger_request_format: Any
    call_request_format: Any
    provider: _Worker


@dataclass
class _Pending:
    caller: _Worker
    caller_invocation_id: str
    target: _Worker
    function_id: str


@dataclass
class _State:
    """Everything a real engine would lose in a restart."""

    workers: dict[str, _Worker] = field(default_factory=dict)
    functions: dict[tuple[str, str], _Worker] = field(default_factory=dict)
    trigger_types: dict[str, _TriggerType] = field(default_factory=dict)
    bindings: dict[str, _Binding] = field(default_factory=dict)
    by_type: dict[str, dict[str, _Binding]] = field(default_factory=dict)
    pending: dict[str, _Pending] = field(default_factory=dict)


_Builtin = Callable[[_Worker, Any], Any]


class TestEngine:
    """A WebSocket iii engine on its own loop and daemon thread. Use as a context manager or start()/stop()."""

    __test__ = False

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        queues: tuple[str, ...] = (),
        record_frames: bool = True,
        compression: bool = True,
    ) -> None:
        """``queues``: names iii's queue worker accepts for ``enqueue`` calls (none: every enqueue fails with
        ``enqueue_error``, as on an engine without a queue worker). ``record_frames=False`` for benchmarks.
        ``compression``: offer permessage-deflate, as the real engine does."""
        self._host = host
        self._port = port
        self._queues = frozenset(queues)
        self._record_frames = record_frames
        self._compression = compression
        self._lock = threading.Lock()
        self._state = _State()
        self._seen: list[_Worker] = []
        self._frames: list[tuple[str, _Worker, dict[str, Any], float]] = []
        self._frames_by_type: dict[str, list[tuple[str, _Worker, dict[str, Any], float]]] = {}
        self._errors: list[str] = []
        self._otel_frames = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Server | None = None
        self._handlers: dict[str, Callable[[_Worker, dict[str, Any]], None]] = {
            "registertriggertype": self._on_register_trigger_type,
            "unregistertriggertype": self._on_unregister_trigger_type,
            "registerfunction": self._on_register_function,
            "unregisterfunction": self._on_unregister_function,
            "registertrigger": self._on_register_trigger,
            "unregistertrigger": self._on_unregister_trigger,
            "triggerregistrationresult": self._on_registration_result,
            "invokefunction": self._on_invoke,
            "invocationresult": self._on_result,
            "reattach": self._on_reattach,
            "ping": lambda w, _d: self._send(w, {"type": "pong"}),
        }
        self._builtins: dict[str, _Builtin] = {
            "engine::workers::register": self._fn_register_worker,
            "engine::registered-triggers::list": self._fn_registered_triggers,
            "engine::triggers::list": self._fn_triggers,
            "engine::workers::list": self._fn_workers,
            "engine::functions::list": self._fn_functions,
        }

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"ws://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("the test engine is already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="iii-test-engine", daemon=True)
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._shutdown())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ fault injection

    def disconnect(self, worker: str) -> None:
        """Abruptly close the live connection(s) of a worker, by worker id or worker name. The engine cleans up
        as for any disconnect before this returns; the SDK reconnects by itself."""
        self._call(self._disconnect(worker))

    def restart(self, downtime_s: float = 0.0) -> None:
        """Like a restart of the engine process: drop every connection, stop listening, forget all state,
        stay down ``downtime_s``, then listen again on the same port. Recorded frames are kept."""
        self._call(self._restart(downtime_s), timeout=downtime_s + 30)

    def pause(self) -> None:
        """Drop every connection (cleaned up like ordinary disconnects) and stop accepting new ones."""
        self._call(self._unlisten(forget=False))

    def resume(self) -> None:
        self._call(self._listen())

    # ------------------------------------------------------------------ introspection (any thread)

    @property
    def frames(self) -> list[Frame]:
        with self._lock:
            return [Frame(d, w.id, w.name, data, at) for d, w, data, at in self._frames]

    def frames_of(self, type: str, direction: str | None = None, worker: str | None = None) -> list[dict[str, Any]]:
        """The data of recorded frames of one type; ``worker`` matches a worker id or name."""
        with self._lock:
            return [
                data
                for d, w, data, _at in self._frames_by_type.get(type, ())
                if (direction is None or d == direction) and (worker is None or worker in (w.id, w.name))
            ]

    def clear_frames(self) -> None:
        with self._lock:
            self._frames.clear()
            self._frames_by_type.clear()

    def workers(self) -> list[WorkerInfo]:
        """Every worker connection seen since start (across restarts), oldest first."""
        with self._lock:
            return [WorkerInfo(w.id, w.name, w.namespace, w.connected, w.metadata) for w in self._seen]

    def bindings(self, trigger_type: str | None = None) -> list[BindingInfo]:
        with self._lock:
            found = self._state.bindings.values() if trigger_type is None else self._state.by_type.get(
                trigger_type, {}
            ).values()
            return [
                BindingInfo(
                    b.id, b.trigger_type, b.function_id, b.config, b.metadata, b.namespace, b.owner.id,
                    b.owner.name, b.provider is None, b.error,
                )
                for b in found
            ]

    def trigger_types(self) -> list[TriggerTypeInfo]:
        with self._lock:
            return [
                TriggerTypeInfo(
                    t.id, t.description, t.trigger_request_format, t.call_request_format, t.provider.id,
                    t.provider.name,
                )
                for t in self._state.trigger_types.values()
            ]

    def functions(self) -> list[FunctionInfo]:
        with self._lock:
            return [FunctionInfo(ns, fid, w.id, w.name) for (ns, fid), w in self._state.functions.items()]

    def has_function(self, function_id: str, namespace: str | None = None) -> bool:
        with self._lock:
            return (namespace or _DEFAULT_NS, function_id) in self._state.functions

    def has_binding(self, trigger_id: str) -> bool:
        with self._lock:
            return trigger_id in self._state.bindings

    @property
    def internal_errors(self) -> list[str]:
        """Tracebacks of exceptions the engine hit while handling frames (should stay empty)."""
        with self._lock:
            return list(self._errors)

    @property
    def otel_frames(self) -> int:
        return self._otel_frames

    def wait_until(self, predicate: Callable[[], _T], timeout: float = 10.0, interval: float = 0.005) -> _T:
        """Poll ``predicate`` until it returns something truthy and return that; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                name = getattr(predicate, "__name__", repr(predicate))
                raise AssertionError(f"condition not met within {timeout} s: {name}")
            time.sleep(interval)

    # ------------------------------------------------------------------ server

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the test engine is not started")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("TestEngine methods cannot be called from the engine's own loop")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await serve(
            self._serve_connection,
            self._host,
            self._port,
            process_request=self._check_path,
            max_size=_MAX_MESSAGE_BYTES,
            compression="deflate" if self._compression else None,
        )
        if self._port == 0:
            self._port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self, *, forget: bool) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        with self._lock:
            for w in list(self._state.workers.values()):
                if forget:
                    # A dead engine tells nobody anything: just mark them gone.
                    w.connected = False
                else:
                    self._drop_worker(w)
            if forget:
                self._state = _State()
        # Abrupt, like a crashed process: no close handshake to wait for.
        for conn in list(server.connections):
            conn.transport.abort()
        server.close()
        await asyncio.wait_for(server.wait_closed(), timeout=10)

    async def _restart(self, downtime_s: float) -> None:
        await self._unlisten(forget=True)
        await asyncio.sleep(downtime_s)
        await self._listen()

    async def _shutdown(self) -> None:
        await self._unlisten(forget=True)
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _disconnect(self, key: str) -> None:
        with self._lock:
            targets = [w for w in self._state.workers.values() if key in (w.id, w.name)]
            if not targets:
                raise KeyError(f"no connected worker with id or name {key!r}")
            for w in targets:
                self._drop_worker(w)
        for w in targets:
            w.ws.transport.abort()

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0].rstrip("/")
        if path in ("", "/otel"):
            return None
        return connection.respond(HTTPStatus.NOT_FOUND, "the iii test engine serves / and /otel only\n")

    async def _serve_connection(self, ws: ServerConnection) -> None:
        if ws.request is not None and ws.request.path.partition("?")[0].rstrip("/") == "/otel":
            await self._drain_otel(ws)
            return
        w = _Worker(ws, self._state)
        with self._lock:
            self._state.workers[w.id] = w
            self._seen.append(w)
            # No `features`: the SDK then runs in pre-0.25 (trigger) mode.
            self._send(w, {"type": "workerregistered", "worker_id": w.id, "reattach_token": w.reattach_token})
        writer = asyncio.create_task(self._write(w))
        try:
            async for raw in ws:
                try:
                    data = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(data, dict):
                    self._receive(w, data)
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                self._drop_worker(w)
            if not w.close_after_flush:
                writer.cancel()

    async def _drain_otel(self, ws: ServerConnection) -> None:
        try:
            async for _ in ws:
                self._otel_frames += 1
        except ConnectionClosed:
            pass

    async def _write(self, w: _Worker) -> None:
        ws = w.ws
        try:
            while True:
                await w.wake.wait()
                w.wake.clear()
                while w.outbox:
                    await ws.send(json.dumps(w.outbox.popleft(), separators=(",", ":")))
                if w.close_after_flush:
                    await ws.close()
                    return
        except ConnectionClosed:
            pass

    def _receive(self, w: _Worker, data: dict[str, Any]) -> None:
        with self._lock:
            if not w.connected:
                return  # frames still buffered from a connection the engine already dropped
            self._record("in", w, data)
            handler = self._handlers.get(data.get("type"))  # type: ignore[arg-type]
            if handler is None:
                return  # unknown types are dropped, the connection stays open
            try:
                handler(w, data)
            except Exception:
                self._errors.append(traceback.format_exc())
                _log.exception("test engine failed to handle %s", data.get("type"))

    def _record(self, direction: str, w: _Worker, data: dict[str, Any]) -> None:
        if self._record_frames:
            entry = (direction, w, data, time.monotonic())
            self._frames.append(entry)
            self._frames_by_type.setdefault(str(data.get("type")), []).append(entry)

    def _send(self, w: _Worker, data: dict[str, Any]) -> None:
        if not w.connected:
            return
        self._record("out", w, data)
        w.outbox.append(data)
        w.wake.set()

    # ------------------------------------------------------------------ routing (loop thread, under the lock)

    def _drop_worker(self, w: _Worker) -> None:
        if not w.connected:
            return
        w.connected = False
        st = w.state
        st.workers.pop(w.id, None)
        for eid in sorted(w.inflight):
            pending = st.pending.pop(eid, None)
            if pending is not None:
                self._reply(
                    pending.caller, pending.caller_invocation_id, pending.function_id,
                    error={
                        "code": "invocation_stopped",
                        "message": f"worker {w.id} disconnected while running '{pending.function_id}'",
                    },
                )
        w.inflight.clear()
        for trigger_id in sorted(w.bindings):
            binding = st.bindings.get(trigger_id)
            if binding is not None and binding.owner is w:
                self._remove_binding(binding)
        w.bindings.clear()
        for type_id in sorted(w.provides):
            tt = st.trigger_types.get(type_id)
            if tt is not None and tt.provider is w:
                del st.trigger_types[type_id]
                self._park(type_id, w)
        w.provides.clear()
        for function_id in w.functions:
            key = (w.namespace, function_id)
            if st.functions.get(key) is w:
                del st.functions[key]

    def _park(self, type_id: str, provider: _Worker) -> None:
        for binding in provider.state.by_type.get(type_id, {}).values():
            if binding.provider is provider:
                binding.provider = None

    def _remove_binding(self, binding: _Binding) -> None:
        st = binding.owner.state
        st.bindings.pop(binding.id, None)
        of_type = st.by_type.get(binding.trigger_type)
        if of_type is not None:
            of_type.pop(binding.id, None)
            if not of_type:
                del st.by_type[binding.trigger_type]
        binding.owner.bindings.discard(binding.id)
        if binding.provider is not None:
            frame = {"type": "unregistertrigger", "id": binding.id, "trigger_type": binding.trigger_type}
            self._send(binding.provider, frame)
            binding.provider = None

    def _deliver(self, binding: _Binding, provider: _Worker) -> None:
        frame: dict[str, Any] = {
            "type": "registertrigger",
            "id": binding.id,
            "trigger_type": binding.trigger_type,
            "function_id": binding.function_id,
            "config": binding.config,
        }
        if binding.metadata is not None:
            frame["metadata"] = binding.metadata
        if binding.namespace and binding.namespace != _DEFAULT_NS:
            frame["namespace"] = binding.namespace
        binding.provider = provider
        self._send(provider, frame)

    def _reply(
        self, caller: _Worker, invocation_id: str, function_id: str, *, result: Any = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        frame: dict[str, Any] = {"type": "invocationresult", "invocation_id": invocation_id, "function_id": function_id}
        if error is not None:
            frame["error"] = error
        else:
            frame["result"] = result
        self._send(caller, frame)

    def _on_register_trigger_type(self, w: _Worker, d: dict[str, Any]) -> None:
        type_id = d.get("id")
        if not isinstance(type_id, str):
            return
        st = w.state
        previous = st.trigger_types.get(type_id)
        if previous is not None and previous.provider is not w:
            # The newest provider wins; the older one is told nothing.
            previous.provider.provides.discard(type_id)
        st.trigger_types[type_id] = _TriggerType(
            type_id, d.get("description"), d.get("trigger_request_format"), d.get("call_request_format"), w
        )
        w.provides.add(type_id)
        for binding in st.by_type.get(type_id, {}).values():
            if binding.error is None:  # a binding its provider rejected stays off until re-registered
                self._deliver(binding, w)

    def _on_unregister_trigger_type(self, w: _Worker, d: dict[str, Any]) -> None:
        type_id = d.get("id")
        tt = w.state.trigger_types.get(type_id) if isinstance(type_id, str) else None
        if tt is not None and tt.provider is w:
            del w.state.trigger_types[tt.id]
            w.provides.discard(tt.id)
            self._park(tt.id, w)

    def _on_register_function(self, w: _Worker, d: dict[str, Any]) -> None:
        function_id = d.get("id")
        if isinstance(function_id, str):
            self._claim_function(w, function_id, d)

    def _claim_function(self, w: _Worker, function_id: str, message: dict[str, Any]) -> None:
        key = (w.namespace, function_id)
        owner = w.state.functions.get(key)
        if owner is not None and owner is not w:
            self._send(w, {
                "type": "registrationrejected", "code": "FUNCTION_NAMESPACE_CONFLICT", "namespace": w.namespace,
                "function_id": function_id, "owner_worker_id": owner.id,
            })
            w.functions.pop(function_id, None)
            return
        w.state.functions[key] = w
        w.functions[function_id] = message

    def _on_unregister_function(self, w: _Worker, d: dict[str, Any]) -> None:
        function_id = d.get("id")
        if isinstance(function_id, str) and w.functions.pop(function_id, None) is not None:
            key = (w.namespace, function_id)
            if w.state.functions.get(key) is w:
                del w.state.functions[key]

    def _on_register_trigger(self, w: _Worker, d: dict[str, Any]) -> None:
        trigger_id, type_id, function_id = d.get("id"), d.get("trigger_type"), d.get("function_id")
        if not (isinstance(trigger_id, str) and isinstance(type_id, str) and isinstance(function_id, str)):
            return
        st = w.state
        previous = st.bindings.get(trigger_id)
        if previous is not None:  # an upsert, e.g. the replay after a reconnect
            if previous.trigger_type == type_id:
                self._forget_binding(previous)  # its provider gets the new version as an upsert below
            else:
                self._remove_binding(previous)
        namespace = d.get("namespace")
        binding = _Binding(
            trigger_id, type_id, function_id, d.get("config"), d.get("metadata"),
            namespace if isinstance(namespace, str) else None, w,
        )
        st.bindings[trigger_id] = binding
        st.by_type.setdefault(type_id, {})[trigger_id] = binding
        w.bindings.add(trigger_id)
        tt = st.trigger_types.get(type_id)
        if tt is not None:
            self._deliver(binding, tt.provider)

    def _forget_binding(self, binding: _Binding) -> None:
        """Drop a binding from the tables without telling its provider (it is about to be replaced)."""
        st = binding.owner.state
        st.bindings.pop(binding.id, None)
        st.by_type.get(binding.trigger_type, {}).pop(binding.id, None)
        binding.owner.bindings.discard(binding.id)

    def _on_unregister_trigger(self, w: _Worker, d: dict[str, Any]) -> None:
        trigger_id = d.get("id")
        binding = w.state.bindings.get(trigger_id) if isinstance(trigger_id, str) else None
        if binding is not None:
            self._remove_binding(binding)

    def _on_registration_result(self, w: _Worker, d: dict[str, Any]) -> None:
        trigger_id = d.get("id")
        binding = w.state.bindings.get(trigger_id) if isinstance(trigger_id, str) else None
        # Only the provider holding the binding may report on it.
        if binding is None or binding.provider is not w or not d.get("error"):
            return
        error = d["error"]
        binding.error = error if isinstance(error, dict) else {"code": "UNKNOWN", "message": str(error)}
        binding.provider = None
        self._send(binding.owner, {
            "type": "triggerregistrationresult", "id": binding.id, "trigger_type": binding.trigger_type,
            "function_id": binding.function_id, "error": binding.error,
        })

    def _on_reattach(self, w: _Worker, d: dict[str, Any]) -> None:
        # A reconnecting SDK retires its previous connection before replaying, if the engine still holds it.
        previous = w.state.workers.get(d.get("previous_worker_id"))  # type: ignore[arg-type]
        if previous is not None and previous is not w and previous.reattach_token == d.get("reattach_token"):
            self._drop_worker(previous)
            previous.ws.transport.abort()

    def _on_invoke(self, w: _Worker, d: dict[str, Any]) -> None:
        function_id = d.get("function_id")
        if not isinstance(function_id, str):
            return
        invocation_id = d.get("invocation_id")
        if not isinstance(invocation_id, str):
            invocation_id = None
        action = d.get("action")
        action_type = action.get("type") if isinstance(action, dict) else None
        builtin = self._builtins.get(function_id)
        if builtin is not None:
            self._run_builtin(w, builtin, function_id, d.get("data"), invocation_id)
            return
        namespace = d.get("namespace") or _DEFAULT_NS
        st = w.state
        target = st.functions.get((namespace, function_id))
        payload = d.get("data")
        if isinstance(payload, dict):
            payload = {**payload, "_caller_worker_id": w.id}
        frame: dict[str, Any] = {"type": "invokefunction", "function_id": function_id, "data": payload}
        for key in ("metadata", "traceparent", "baggage"):
            if d.get(key) is not None:
                frame[key] = d[key]
        if action_type == "enqueue":
            self._enqueue(w, action, function_id, invocation_id, target, frame)
            return
        if action_type == "void" or invocation_id is None:
            if target is not None:
                self._send(target, frame)
            return
        if target is None:
            message = f"Function '{function_id}' not found in namespace '{namespace}'"
            self._reply(w, invocation_id, function_id, error={"code": "function_not_found", "message": message})
            return
        engine_id = str(uuid.uuid4())
        st.pending[engine_id] = _Pending(w, invocation_id, target, function_id)
        target.inflight.add(engine_id)
        frame["invocation_id"] = engine_id
        self._send(target, frame)

    def _enqueue(
        self, w: _Worker, action: Any, function_id: str, invocation_id: str | None, target: _Worker | None,
        frame: dict[str, Any],
    ) -> None:
        queue = action.get("queue")
        if queue not in self._queues:
            if invocation_id is not None:
                self._reply(w, invocation_id, function_id, error={
                    "code": "enqueue_error", "message": f"no queue worker accepts queue {queue!r}",
                })
            return
        if invocation_id is not None:
            self._reply(w, invocation_id, function_id, result={"messageReceiptId": str(uuid.uuid4())})
        if target is not None:
            # The queue worker delivers later and keeps the outcome to itself.
            self._send(target, frame)

    def _on_result(self, w: _Worker, d: dict[str, Any]) -> None:
        engine_id = d.get("invocation_id")
        if not isinstance(engine_id, str):
            return
        pending = w.state.pending.get(engine_id)
        if pending is None or pending.target is not w:
            return
        del w.state.pending[engine_id]
        w.inflight.discard(engine_id)
        frame: dict[str, Any] = {
            "type": "invocationresult", "invocation_id": pending.caller_invocation_id,
            "function_id": pending.function_id,
        }
        if d.get("error"):
            frame["error"] = d["error"]
        else:
            frame["result"] = d.get("result")
        for key in ("traceparent", "baggage"):
            if d.get(key) is not None:
                frame[key] = d[key]
        self._send(pending.caller, frame)

    # ------------------------------------------------------------------ built-in functions

    def _run_builtin(
        self, w: _Worker, builtin: _Builtin, function_id: str, data: Any, invocation_id: str | None
    ) -> None:
        try:
            result = builtin(w, data)
        except Exception as exc:
            if invocation_id is not None:
                self._reply(w, invocation_id, function_id, error={"code": "invocation_failed", "message": str(exc)})
            return
        if invocation_id is not None:
            self._reply(w, invocation_id, function_id, result=result)

    def _fn_register_worker(self, w: _Worker, data: Any) -> None:
        if not isinstance(data, dict):
            return
        w.metadata = data
        name = data.get("name")
        w.name = name if isinstance(name, str) else None
        namespace = data.get("namespace") or _DEFAULT_NS
        st = w.state
        if w.name is not None:
            for other in st.workers.values():
                if other is not w and other.name == w.name and other.namespace == namespace:
                    self._send(w, {
                        "type": "registrationrejected", "code": "WORKER_NAMESPACE_CONFLICT",
                        "namespace": namespace, "worker_name": w.name, "owner_worker_id": other.id,
                    })
                    w.close_after_flush = True
                    self._drop_worker(w)
                    return
        if namespace != w.namespace:
            # Functions arrive before this call (the SDK replays them first): move them to the real namespace.
            for function_id in list(w.functions):
                if st.functions.get((w.namespace, function_id)) is w:
                    del st.functions[(w.namespace, function_id)]
            previous, w.namespace = w.functions, namespace
            w.functions = {}
            for function_id, message in previous.items():
                self._claim_function(w, function_id, message)

    def _fn_registered_triggers(self, w: _Worker, data: Any) -> dict[str, Any]:
        filters = data if isinstance(data, dict) else {}
        trigger_type, function_id = filters.get("trigger_type"), filters.get("function_id")
        worker, search = filters.get("worker"), filters.get("search")
        needle = search.lower() if isinstance(search, str) and search else None
        listed = []
        for b in sorted(w.state.bindings.values(), key=lambda b: b.id):
            if b.provider is None:
                continue
            if trigger_type and b.trigger_type != trigger_type:
                continue
            if function_id and b.function_id != function_id:
                continue
            if worker and worker not in (b.owner.id, b.owner.name):
                continue
            haystack = (b.id, b.trigger_type, b.function_id, b.owner.name or "")
            if needle and not any(needle in s.lower() for s in haystack):
                continue
            summary = json.dumps(b.config, separators=(",", ":"), sort_keys=True, default=str)
            if len(summary) > _CONFIG_SUMMARY_CHARS:
                summary = summary[: _CONFIG_SUMMARY_CHARS - 1] + "…"
            listed.append({
                "id": b.id, "trigger_type": b.trigger_type, "function_id": b.function_id,
                "worker_name": b.owner.name, "config": b.config, "config_summary": summary,
            })
        return {"registered_triggers": listed}

    def _fn_triggers(self, w: _Worker, _data: Any) -> dict[str, Any]:
        return {"triggers": [
            {
                "id": t.id, "description": t.description, "trigger_request_format": t.trigger_request_format,
                "call_request_format": t.call_request_format, "worker_id": t.provider.id,
                "worker_name": t.provider.name,
            }
            for t in sorted(w.state.trigger_types.values(), key=lambda t: t.id)
        ]}

    def _fn_workers(self, w: _Worker, _data: Any) -> dict[str, Any]:
        return {"workers": [
            {
                "id": o.id, "name": o.name, "namespace": o.namespace, "functions": sorted(o.functions),
                "trigger_types": sorted(o.provides),
            }
            for o in w.state.workers.values()
        ]}

    def _fn_functions(self, w: _Worker, _data: Any) -> dict[str, Any]:
        return {"functions": [
            {"function_id": fid, "namespace": ns, "worker_id": o.id, "worker_name": o.name}
            for (ns, fid), o in sorted(w.state.functions.items())
        ]}


def main(argv: list[str] | None = None) -> int:
    """``python -m bridge.testing.engine``: serve until interrupted. Benchmarks run the engine in a process of
    its own so that it does not share the GIL with the workers it routes for."""
    parser = argparse.ArgumentParser(prog="python -m bridge.testing.engine", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=49134)
    parser.add_argument("--queue", action="append", default=[], help="a queue name enqueue calls may use")
    parser.add_argument("--no-compression", action="store_true")
    args = parser.parse_args(argv)
    engine = TestEngine(
        args.host, args.port, queues=tuple(args.queue), record_frames=False, compression=not args.no_compression
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    with engine:
        print(engine.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(0.5):  # a timed wait: a bare wait() would defer signals indefinitely
                pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

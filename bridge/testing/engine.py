"""A protocol-faithful iii engine for tests: a test utility, never a product feature.

The real engine cannot be installed here, so tests, examples and benchmarks run the real ``iii-sdk`` against
this one. It follows the engine 0.23 source (``engine/src/`` of the public iii repository) as the project's
iii protocol notes sum it up in "What a test engine must do", for an SDK 0.25 client in trigger mode:

1. WebSocket on ``/`` and ``/otel``; ``workerregistered`` without ``features``; no permessage-deflate.
   ``TestEngine(features=("observe.v1",))`` is an engine 0.25+ instead: it announces the feature and speaks
   observe too (observable functions, observers, the legacy shim of ``register_trigger``: ``_observe.py``).
2. Registrations (``registerfunction``, ``registertriggertype``, ``registertrigger``, their ``unregister*``,
   ``registerservice``) are held until the void ``engine::workers::register`` call fixes the connection's
   namespace (or the grace, 5 s, runs out: then ``default``). ``ping`` gets ``pong``. There is no
   ``unregistertriggertype``: like any unknown frame it is dropped.
3. Providers are keyed by (namespace, trigger type id); a binding finds its provider by its
   ``trigger_namespace`` (strictly), else the binder's home namespace, then ``default``.
4. A ``registertrigger`` is forwarded to that provider (``namespace`` only when not ``default``, no null
   ``metadata``) and is listed from then on; an upsert of an id overwrites, the previous provider is told
   nothing. Nothing provides the type: the binding is parked (pending, not listed).
5. The latest ``registertriggertype`` of a (namespace, id) wins and gets every binding of it replayed, live
   and pending; the older provider is told nothing.
6. A ``triggerregistrationresult`` with ``error`` parks the binding and goes on to its binder.
7. A provider that leaves: its bindings resolve again (a provider in ``default``), else park until the type is
   registered again.
8. ``invokefunction`` goes to the function's (namespace or ``default``, id) owner with ``_caller_worker_id``
   added to object payloads and the caller's ``invocation_id`` (a void call gets a fresh one and no reply);
   unknown functions get ``function_not_found``; frames the engine's serde rejects are dropped (``_wire``).
9. A worker that leaves: its in-flight calls fail with ``invocation_stopped``, its bindings are unbound at
   their providers, and rule 7 applies to the types it provided.
10. A second live worker with the same name in a namespace gets ``registrationrejected``
    (``WORKER_NAMESPACE_CONFLICT``) and a close frame without status: the SDK stops reconnecting.
11. ``engine::registered-triggers::list`` and ``engine::triggers::list`` as the engine builds them
    (``_builtins``); neither is scoped by the caller's namespace.
12. Every frame is recorded; :meth:`TestEngine.disconnect`, :meth:`TestEngine.restart` and
    :meth:`TestEngine.pause` inject outages.

All routing runs synchronously on the engine's own loop under one lock, so every state change and the frames
it sends happen atomically; outbound frames go through a per-connection queue and writer task, which keeps
them in the order they were decided. Tests read the state and the recorded frames from any thread.

This module holds the public face, the lifecycle and the connections; the frame handlers are in
``_routing.py`` and the built-in functions in ``_builtins.py`` (both mixed into TestEngine), the decodable
frames in ``_wire.py``, the state and the records it returns in ``_enginestate.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any, Self, TypeVar, cast

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bridge.testing._builtins import Builtins
from bridge.testing._enginestate import (
    DEFAULT_NS,
    BindingInfo,
    Builtin,
    Frame,
    FunctionInfo,
    ObserverInfo,
    State,
    TriggerTypeInfo,
    Worker,
    WorkerInfo,
)
from bridge.testing._lifecycle import StartStop
from bridge.testing._routing import Router
from bridge.testing._wire import decodes
from bridge.testing.waiting import wait_for

__all__ = ["BindingInfo", "Frame", "FunctionInfo", "ObserverInfo", "TestEngine", "TriggerTypeInfo", "WorkerInfo"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
# What the SDK accepts and sends (64 MiB); the websockets default of 1 MiB would cut large payloads.
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class TestEngine(StartStop, Router, Builtins):
    """A WebSocket iii engine on its own loop and daemon thread. Use as a context manager or start()/stop()."""

    __test__ = False

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        queues: tuple[str, ...] = (),
        record_frames: bool = True,
        registration_grace_s: float = 5.0,
        features: tuple[str, ...] = (),
    ) -> None:
        """``queues``: names iii's queue worker accepts for ``enqueue`` calls (none: every enqueue fails with
        ``enqueue_error``, as on an engine without a queue worker). ``record_frames=False`` for benchmarks.
        ``registration_grace_s``: how long a connection's registrations wait for ``engine::workers::register``
        before they land in ``default`` (the engine's default is 5 s). ``features``: what ``workerregistered``
        announces; none (the default) is an engine before 0.25 and the SDK's trigger mode, ``("observe.v1",)``
        an engine 0.25+ that speaks observe (``_observe.py``) next to trigger types."""
        self._host = host
        self._port = port
        self._queues = frozenset(queues)
        self._record_frames = record_frames
        self._grace_s = registration_grace_s
        self._features = tuple(features)
        self._observe = "observe.v1" in self._features
        self._lock = threading.Lock()
        self._state = State()
        self._seen: list[Worker] = []
        self._frames: list[tuple[str, Worker, dict[str, Any], float]] = []
        self._frames_by_type: dict[str, list[tuple[str, Worker, dict[str, Any], float]]] = {}
        self._errors: list[str] = []
        self._otel_frames = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Server | None = None
        self._handlers: dict[str, Callable[[Worker, dict[str, Any]], None]] = {
            "registertriggertype": self._on_register_trigger_type,
            "registerfunction": self._on_register_function,
            "unregisterfunction": self._on_unregister_function,
            "registertrigger": self._on_register_trigger,
            "unregistertrigger": self._on_unregister_trigger,
            "triggerregistrationresult": self._on_registration_result,
            "invokefunction": self._on_invoke,
            "invocationresult": self._on_result,
            "registerservice": lambda _w, _d: None,
            "reattach": self._on_reattach,
            "ping": lambda w, _d: self._send(w, {"type": "pong"}),
        }
        if self._observe:
            self._handlers.update({
                "observe": self._on_observe,
                "unobserve": self._on_unobserve,
                "observerack": self._on_observer_ack,
                "invocationsobserved": self._on_invocations_observed,
                "localinvocationstats": lambda _w, _d: None,
                "unregistertriggertype": self._on_unregister_trigger_type,
            })
        self._builtins: dict[str, Builtin] = {
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
        """Live bindings (in the order they went live), then parked ones; then (observe.v1) the triggers the
        legacy shim made observers of, parked unless their observer is active."""
        with self._lock:
            st = self._state
            found = [(b, False) for b in st.bindings.values()]
            found += [(b, True) for b in st.pending.values() if b.id not in st.bindings]
            infos = [
                BindingInfo(
                    b.id, b.trigger_type, b.function_id, b.config, b.metadata, b.namespace, b.owner.id,
                    b.owner.name, parked, b.error, b.trigger_namespace, b.home_namespace,
                    None if parked else b.provider_namespace,
                )
                for b, parked in found
                if trigger_type is None or b.trigger_type == trigger_type
            ]
            for o in st.observers.values():
                if o.legacy is None or (trigger_type is not None and o.legacy["trigger_type"] != trigger_type):
                    continue
                parked = o.state != "active"
                infos.append(BindingInfo(
                    o.id, o.legacy["trigger_type"], o.target, o.legacy["config"], o.metadata, o.target_namespace,
                    o.worker.id, o.worker.name, parked, o.error, None, o.worker.namespace,
                    None if parked else o.namespace,
                ))
            return infos

    def provider(self, trigger_type: str) -> str | None:
        """The name of the worker that gets ``trigger_type``'s bindings: its trigger type's provider, else
        (observe.v1) the owner of the observable function that took the type over."""
        with self._lock:
            st = self._state
            for t in st.trigger_types.values():
                if t.id == trigger_type:
                    return t.provider.name
            for o in st.observables.values():
                if o.legacy_trigger_type == trigger_type:
                    return o.owner.name
            return None

    def trigger_types(self) -> list[TriggerTypeInfo]:
        with self._lock:
            return [
                TriggerTypeInfo(
                    t.id, t.description, t.trigger_request_format, t.call_request_format, t.provider.id,
                    t.provider.name, t.namespace,
                )
                for t in self._state.trigger_types.values()
            ]

    def functions(self) -> list[FunctionInfo]:
        with self._lock:
            return [FunctionInfo(ns, fid, w.id, w.name) for (ns, fid), w in self._state.functions.items()]

    def has_function(self, function_id: str, namespace: str | None = None) -> bool:
        with self._lock:
            return (namespace or DEFAULT_NS, function_id) in self._state.functions

    def has_binding(self, trigger_id: str) -> bool:
        """Whether the engine holds this binding, live or parked (or, observe.v1, as an observer of the legacy
        shim)."""
        with self._lock:
            st = self._state
            return trigger_id in st.bindings or trigger_id in st.pending or trigger_id in st.observers

    @property
    def features(self) -> tuple[str, ...]:
        return self._features

    def observers(self, function_id: str | None = None) -> list[ObserverInfo]:
        """The observers the engine holds (observe.v1), oldest first."""
        with self._lock:
            return [
                ObserverInfo(
                    o.id, o.namespace, o.function_id, o.target, o.target_namespace, o.args, o.state, o.error,
                    o.legacy, o.worker.id, o.worker.name,
                )
                for o in self._state.observers.values()
                if function_id is None or o.function_id == function_id
            ]

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
        name = getattr(predicate, "__name__", repr(predicate))
        return wait_for(predicate, timeout, what=f"condition {name}", interval=interval)

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
            compression=None,  # the real engine (axum) does not negotiate permessage-deflate
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
                self._state = State()
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
        w = Worker(ws, self._state)
        with self._lock:
            self._state.workers[w.id] = w
            self._seen.append(w)
            # Without `features` the SDK runs in pre-0.25 (trigger) mode.
            hello: dict[str, Any] = {"type": "workerregistered", "worker_id": w.id, "reattach_token": w.reattach_token}
            if self._features:
                hello["features"] = list(self._features)
            self._send(w, hello)
            w.grace = asyncio.get_running_loop().call_later(self._grace_s, self._grace_over, w)
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

    async def _write(self, w: Worker) -> None:
        ws = w.ws
        try:
            while True:
                await w.wake.wait()
                w.wake.clear()
                while w.outbox:
                    await ws.send(json.dumps(w.outbox.popleft(), separators=(",", ":")))
                if w.close_after_flush:
                    # A close frame without a status code, as the engine sends after a fatal rejection.
                    await ws.close(cast(int, None))
                    return
        except ConnectionClosed:
            pass

    def _receive(self, w: Worker, data: dict[str, Any]) -> None:
        with self._lock:
            if not w.connected:
                return  # frames still buffered from a connection the engine already dropped
            self._record("in", w, data)
            handler = self._handlers.get(data.get("type"))  # type: ignore[arg-type]
            if handler is None or not decodes(data):
                return  # what the engine's serde rejects is dropped, the connection stays open
            if self._held(w, data):
                return
            try:
                handler(w, data)
            except Exception:
                self._errors.append(traceback.format_exc())
                _log.exception("test engine failed to handle %s", data.get("type"))

    def _grace_over(self, w: Worker) -> None:
        with self._lock:
            w.grace = None
            if w.connected and w.held is not None:
                _log.warning("test engine: worker %s sent no engine::workers::register within %.1f s", w.id,
                             self._grace_s)
                try:
                    self._fix_namespace(w, DEFAULT_NS)
                except Exception:
                    self._errors.append(traceback.format_exc())

    def _record(self, direction: str, w: Worker, data: dict[str, Any]) -> None:
        if self._record_frames:
            entry = (direction, w, data, time.monotonic())
            self._frames.append(entry)
            self._frames_by_type.setdefault(str(data.get("type")), []).append(entry)

    def _send(self, w: Worker, data: dict[str, Any]) -> None:
        if not w.connected:
            return
        self._record("out", w, data)
        w.outbox.append(data)
        w.wake.set()


def main(argv: list[str] | None = None) -> int:
    """``python -m bridge.testing.engine``: serve until interrupted. Benchmarks run the engine in a process of
    its own so that it does not share the GIL with the workers it routes for."""
    parser = argparse.ArgumentParser(prog="python -m bridge.testing.engine", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=49134)
    parser.add_argument("--queue", action="append", default=[], help="a queue name enqueue calls may use")
    parser.add_argument("--observe", action="store_true", help="announce observe.v1 (an engine 0.25+)")
    args = parser.parse_args(argv)
    features = ("observe.v1",) if args.observe else ()
    engine = TestEngine(args.host, args.port, queues=tuple(args.queue), record_frames=False, features=features)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    with engine:
        print(engine.url, flush=True)
        print(f"iii-bridge TEST ENGINE at {engine.url}: a stand-in for trying and testing the bridge, not an iii "
              "engine. In production the bridge connects to an iii engine (III_URL).", file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(0.5):  # a timed wait: a bare wait() would defer signals indefinitely
                pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

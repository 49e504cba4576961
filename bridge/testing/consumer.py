"""A real iii-sdk worker that plays the function author in tests: it registers functions, records every call
they get, and binds them to trigger types (a test utility, never a product feature)."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from iii import InitOptions, register_worker
from iii.iii import III
from iii.iii_types import RegisterTriggerInput
from iii_helpers.observability import ReconnectionConfig

from bridge.testing.engine import TestEngine

__all__ = ["Binding", "CallRecord", "Consumer", "shutdown_client"]

Handler = Callable[[Any], Any]
_names = itertools.count(1)
_EMPTY: Any = object()


@dataclass(frozen=True)
class CallRecord:
    """One call a Consumer function received. ``payload`` is exactly what arrived (with the engine's
    ``_caller_worker_id``); ``outcome`` is "pending" while the handler runs, then "ok" or "error"."""

    function_id: str
    payload: Any
    metadata: Any
    at: float
    outcome: str = "pending"
    result: Any = None
    error: str | None = None


class Binding:
    """A binding made with :meth:`Consumer.bind`; ``id`` is the trigger id the SDK generated."""

    def __init__(self, consumer: Consumer, trigger: Any, trigger_id: str | None, trigger_type: str,
                 function_id: str) -> None:
        self.id = trigger_id
        self.trigger_type = trigger_type
        self.function_id = function_id
        self._consumer = consumer
        self._trigger = trigger

    def unregister(self) -> None:
        self._trigger.unregister()
        engine = self._consumer.engine
        if engine is not None and self.id is not None:
            trigger_id = self.id
            engine.wait_until(lambda: not engine.has_binding(trigger_id))


def shutdown_client(client: Any) -> None:
    """``client.shutdown()``, then close the event loop the SDK 0.25 leaves open: garbage-collected open, it
    raises a ResourceWarning, which fails a test run with warnings as errors. Safe to call twice."""
    thread: threading.Thread = client._thread
    loop: asyncio.AbstractEventLoop = client._loop
    if loop.is_closed():
        return  # shut down already
    client.shutdown()
    if not thread.is_alive():
        loop.close()


def _strip_caller(payload: Any) -> Any:
    if isinstance(payload, dict) and "_caller_worker_id" in payload:
        return {k: v for k, v in payload.items() if k != "_caller_worker_id"}
    return payload


class Consumer:
    """A real SDK client (own loop, own non-daemon thread: always close() it). With ``engine`` given (the
    fixtures do), function() and bind() return once the engine has stored the registration, and
    registration_errors() works. ``reconnect_*`` set the SDK's reconnect backoff (a test that needs this consumer
    back after the bridge gives a long delay and no jitter)."""

    __test__ = False

    def __init__(
        self,
        url: str,
        *,
        worker_name: str | None = None,
        namespace: str | None = None,
        engine: TestEngine | None = None,
        invocation_timeout_ms: int = 30_000,
        reconnect_initial_delay_ms: int = 50,
        reconnect_max_delay_ms: int = 500,
        reconnect_jitter: float = 0.3,
        wait_connected: bool = True,
    ) -> None:
        """``wait_connected=False``: return at once instead of waiting for the connection (as ``register_worker``
        does), e.g. for a worker the engine is expected to refuse: ``register_worker`` raises that refusal when it
        comes before the connection is up, and the client it made would be left running."""
        # Unique by default: the engine rejects a second live worker with the same name in a namespace.
        self.worker_name = worker_name or f"test-consumer-{os.getpid()}-{next(_names)}"
        self.namespace = namespace
        self.engine = engine
        self._lock = threading.Lock()
        self._calls: dict[str, list[CallRecord]] = {}
        self._closed = False
        options = InitOptions(
            worker_name=self.worker_name,
            namespace=namespace,
            # Nothing dials <url>/otel; a test consumer has no telemetry to report.
            otel={"enabled": False},
            enable_metrics_reporting=False,
            invocation_timeout_ms=invocation_timeout_ms,
            # Fast reconnects keep reconnect tests short; the SDK default starts at 1 s.
            reconnection_config=ReconnectionConfig(
                initial_delay_ms=reconnect_initial_delay_ms, max_delay_ms=reconnect_max_delay_ms,
                jitter_factor=reconnect_jitter,
            ),
        )
        self.iii: Any = register_worker(url, options) if wait_connected else III(url, options)

    @property
    def worker_id(self) -> str | None:
        """The id of the current connection (changes on every reconnect)."""
        worker_id: str | None = self.iii.worker_id
        return worker_id

    # ------------------------------------------------------------------ functions

    def function(self, function_id: str, handler: Handler | None = None) -> None:
        """Register a function. The default handler returns {"ok": True}; a custom ``handler(payload)`` (sync or
        async) returns the result or raises to fail the call. Every call is recorded."""

        async def invoke(payload: Any, metadata: Any = None) -> Any:
            index = self._record(CallRecord(function_id, payload, metadata, time.monotonic()))
            try:
                if handler is None:
                    result: Any = {"ok": True}
                elif inspect.iscoroutinefunction(handler):
                    result = await handler(payload)
                else:
                    # A thread of its own: a blocking test handler must not stall the SDK loop.
                    result = await asyncio.to_thread(handler, payload)
                    if inspect.isawaitable(result):
                        result = await result
            except Exception as exc:
                self._finish(function_id, index, "error", None, str(exc))
                raise
            self._finish(function_id, index, "ok", result, None)
            return result

        with self._lock:
            self._calls.setdefault(function_id, [])
        self.iii.register_function(function_id, invoke)
        engine = self.engine
        if engine is not None:
            namespace = self.namespace
            engine.wait_until(lambda: engine.has_function(function_id, namespace))

    def _record(self, record: CallRecord) -> int:
        with self._lock:
            calls = self._calls.setdefault(record.function_id, [])
            calls.append(record)
            return len(calls) - 1

    def _finish(self, function_id: str, index: int, outcome: str, result: Any, error: str | None) -> None:
        with self._lock:
            record = self._calls[function_id][index]
            self._calls[function_id][index] = CallRecord(
                function_id, record.payload, record.metadata, record.at, outcome, result, error
            )

    def records(self, function_id: str) -> list[CallRecord]:
        with self._lock:
            return list(self._calls.get(function_id, ()))

    def calls(self, function_id: str) -> list[Any]:
        """Payloads received, in order, without the engine's ``_caller_worker_id`` (see records() for it)."""
        return [_strip_caller(r.payload) for r in self.records(function_id)]

    def wait_calls(self, function_id: str, n: int, timeout: float = 10.0) -> list[Any]:
        """Wait until ``function_id`` got at least ``n`` calls; returns calls()."""
        deadline = time.monotonic() + timeout
        while True:
            payloads = self.calls(function_id)
            if len(payloads) >= n:
                return payloads
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{self.worker_name}: {function_id!r} got {len(payloads)} call(s) within {timeout} s, "
                    f"expected at least {n}: {payloads!r}"
                )
            time.sleep(0.005)

    # ------------------------------------------------------------------ bindings

    def bind(
        self,
        trigger_type: str,
        function_id: str,
        config: Any = _EMPTY,
        metadata: dict[str, Any] | None = None,
        namespace: str | None = None,
        trigger_namespace: str | None = None,
    ) -> Binding:
        """Bind ``function_id`` to a trigger type with the SDK's register_trigger. ``config`` defaults to ``{}``:
        the SDK leaves a None config out of the frame, and the engine drops a ``registertrigger`` without one."""
        if config is _EMPTY:
            config = {}
        request = RegisterTriggerInput(
            type=trigger_type, function_id=function_id, config=config, metadata=metadata, namespace=namespace,
            trigger_namespace=trigger_namespace,
        )
        with self._lock:
            # The SDK keeps the trigger id to itself; its table of triggers is how to learn it.
            before = set(self.iii._triggers)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"register_trigger is deprecated", DeprecationWarning)
                trigger = self.iii.register_trigger(request)
            created = set(self.iii._triggers) - before
        trigger_id = created.pop() if len(created) == 1 else None
        engine = self.engine
        if engine is not None and trigger_id is not None:
            engine.wait_until(lambda: engine.has_binding(trigger_id))
        return Binding(self, trigger, trigger_id, trigger_type, function_id)

    def registration_errors(self) -> list[dict[str, Any]]:
        """The ``triggerregistrationresult`` frames with an ``error`` the engine sent to this consumer."""
        if self.engine is None:
            raise RuntimeError("registration_errors() needs the TestEngine: pass engine= to Consumer")
        frames = self.engine.frames_of("triggerregistrationresult", direction="out", worker=self.worker_name)
        return [f for f in frames if f.get("error")]

    def wait_registration_errors(self, n: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        engine = self.engine
        if engine is None:
            raise RuntimeError("wait_registration_errors() needs the TestEngine: pass engine= to Consumer")

        def enough() -> list[dict[str, Any]]:
            errors = self.registration_errors()
            return errors if len(errors) >= n else []

        return engine.wait_until(enough, timeout=timeout)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            shutdown_client(self.iii)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

"""The engine link: the ONLY module that imports the iii SDK.

The SDK starts its own asyncio loop on its own thread and offers no way to give it another one, so the link
owns that loop and the bridge runs on it (DESIGN §5, "One event loop"): :meth:`EngineLink.run` runs the runtime
there, binding callbacks and connection-state changes arrive on it, and a call made there crosses no thread (most
calls skip ``trigger_async`` too: see :meth:`EngineLink._invoke_direct`). Code on another loop (a replay, a test)
reaches the link through :meth:`EngineLink.on_loop`.

Two ways to offer a source, chosen per connection by the engine's ``workerregistered.features`` (DESIGN §7):
**trigger mode** (no ``observe.v1``: an engine before 0.25) advertises a trigger type whose bindings arrive as
``registertrigger``; **observe mode** (``observe.v1``) registers an owner-delivered observable function
(``bridge::<trigger type id>``, ``args_format`` = the bind schema, ``legacy_trigger_type`` = the trigger type
id) whose observers, made by ``iii.observe`` or by an old ``register_trigger`` through the engine's legacy shim,
become the bindings; deliveries then go through each observer's handle. A reconnect to another engine may
switch the mode. The binding table, dispatch and dead letters do not care which mode a binding came from.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from iii import (
    InitOptions,
    InvocationError,
    ObserveHooks,
    Observer,
    ObserveRejection,
    RegistrationRejectedError,
)
from iii.iii import III, _PendingInvocation
from iii.iii_constants import FunctionRef
from iii.iii_types import RegisterTriggerTypeInput
from iii.triggers import TriggerConfig, TriggerHandler
from iii_helpers.observability import ReconnectionConfig
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from bridge._reconcile import LIST_FUNCTIONS, Reconciler
from bridge._tasks import cancel_and_wait
from bridge.bindings import Binding, BindingTable, observable_function_id
from bridge.config import EngineConfig
from bridge.config.schemas import BindValidator
from bridge.dispatch import Invocation
from bridge.errors import BindConfigError, DeliveryError, EngineUnavailable

log = logging.getLogger("bridge.engine")

# Invocation errors that say the call never reached a live target, as opposed to the target failing.
_LINK_ERRORS = frozenset({"SHUTDOWN", "engine_unavailable"})
# What the SDK raises when the socket fails under a call (it is not an InvocationError with a code).
_LINK_EXCEPTIONS = (ConnectionError, OSError, ConnectionClosed, RegistrationRejectedError)
_WORKER_CONFLICT = "WORKER_NAMESPACE_CONFLICT"
_LIST_TIMEOUT_MS = 10000
# A call whose message is longer takes the SDK's own path (its 16 MiB frame and 64 MiB message limits count bytes;
# a character is at most 4).
_DIRECT_MAX_CHARS = 4 * 1024 * 1024
# JSON as iii-sdk 0.25 writes it: compact, non-ASCII characters as UTF-8. A text that UTF-8 cannot carry (a lone
# surrogate in a string) takes the SDK's path, which escapes it.
_WIRE_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# The SDK's default backoff grows to 30 s; an engine coming back should not wait that long for its bridges.
_RECONNECT = ReconnectionConfig(initial_delay_ms=500, max_delay_ms=5000)
_UNREACHABLE_FIRST_S = 3.0  # how long a first connection may take before the operator is told
_UNREACHABLE_REPEAT_S = 30.0  # then how often it is repeated while the engine stays away
# How often a thread waiting in run() wakes up: a signal delivered to another thread (the SDK's) runs its
# Python handler only once the main thread executes again, which an untimed wait would put off indefinitely.
_WAIT_SLICE_S = 0.2

_OBSERVE_V1 = "observe.v1"
# How often, after a reconnect in observe mode, the link looks whether the engine confirmed the function again
# (its functionregistered carries the current observers; the SDK runs hooks only for the changed ones).
_CONFIRM_POLL_S = 0.05
# The code of a bind config the bridge refuses in on_observer_added: the engine's own for args that do not fit
# args_format, so an observer reads one code whichever of the two checked it.
_REJECTED_ARGS = "INVALID_ARGS"
# A delivery to an observer the SDK has not activated yet (its hook returned a moment ago) waits this long between
# tries, this many times (about 1 s), before it fails like any delivery.
_ACTIVATION_WAIT_S = 0.01
_ACTIVATION_TRIES = 100

T = TypeVar("T")
Mode = Literal["trigger", "observe"]


@dataclass(frozen=True)
class TriggerTypeSpec:
    """What the bridge advertises for one source."""

    id: str
    description: str
    bind: BindValidator
    payload_schema: dict[str, Any] | None
    table: BindingTable
    exclusive: bool = False  # advertised only once its source is the active replica (see activate())
    function_id: str | None = None  # observe mode: the source's own observable function id (None: bridge::<id>)

    @property
    def observable_id(self) -> str:
        """The id of the observable function this source is in observe mode."""
        return observable_function_id(self.id, self.function_id)


class _QuietSdk(logging.Filter):
    """The SDK logs its trigger-API deprecation notice (reads like a fault of the bridge) and a warning per failed
    reconnect attempt (one a second); the engine link says both once, in the operator's terms."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return (
            "is deprecated and will be removed" not in message
            and not message.startswith("Connection failed")
            # a mode switch: the SDK replayed an observable function to an engine without observe; the link
            # says which mode it uses and replaces the function with a trigger type
            and "declares observe hooks or owner delivery" not in message
        )


logging.getLogger("iii.iii").addFilter(_QuietSdk())


class _Handler(TriggerHandler[Any]):
    """Receives bindings on the link's loop (the SDK's, which the bridge runs on): validates at once, so that the
    binder reads why a config is refused, and applies the binding to the table at once."""

    def __init__(self, link: EngineLink, spec: TriggerTypeSpec) -> None:
        self._link = link
        self._spec = spec

    async def register_trigger(self, config: TriggerConfig[Any]) -> None:
        try:
            checked = self._spec.bind.check(config.config)
        except BindConfigError as exc:
            self._link.binding_rejected(self._spec, config.id, config.function_id, str(exc))
            raise
        namespace = config.namespace if config.namespace not in (None, "", "default") else None
        binding = Binding(
            id=config.id,
            trigger_type=self._spec.id,
            function_id=config.function_id,
            namespace=namespace,
            config=checked,
            metadata=config.metadata if isinstance(config.metadata, dict) else None,
        )
        self._link.binding_added(self._spec, binding)

    async def unregister_trigger(self, config: TriggerConfig[Any]) -> None:
        self._link.binding_removed(self._spec, config.id)


class EngineLink:
    """Connects to iii, advertises trigger types, keeps their binding tables, invokes functions.

    Made on any thread but the SDK's, it creates the SDK client at once: the SDK starts its loop (:attr:`loop`) and
    connects in the background. Everything else runs on that loop: :meth:`run` runs the bridge there, and
    :meth:`on_loop` reaches it from another loop.
    """

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._on_fatal: Callable[[str], None] | None = None
        self._specs: dict[str, TriggerTypeSpec] = {}
        self._connected = False
        self._connected_event = asyncio.Event()  # bound to the link's loop when first waited on
        self._ever_connected = False
        self._fatal: str | None = None
        self._link_generation = 0  # bumped at every link change: a grace timer of an older link is void
        self._started = False
        self._shut_down = False
        self._reconcile_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._advertised: set[str] = set()  # trigger types this bridge provides (an exclusive standby: not yet)
        self._mode: Mode | None = None  # of the current (or last) connection; None until an engine said hello
        self._registered: set[str] = set()  # the types registered with the SDK in the current mode
        self._functions: dict[str, FunctionRef] = {}  # observe mode: trigger type -> its observable function
        self._function_ids: dict[str, str] = {}  # observe mode: trigger type -> the id it was registered under
        self._observers: dict[str, Observer] = {}  # observe mode: binding id -> the observer it is
        self._enqueue_warned: set[str] = set()
        self._unsubscribe: Callable[[], None] | None = None
        self._call_ids = _CallIds()
        self._reconciler = Reconciler(
            self._call_engine,
            namespace=config.namespace,
            worker_name=lambda: self.worker_name,
            advertised=lambda type_id: type_id in self._advertised,
            advertise=self._advertise,
        )
        options = InitOptions(
            worker_name=config.worker_name,
            worker_description="iii-bridge: Kafka, Postgres and file events as iii function calls",
            namespace=config.namespace,
            enable_metrics_reporting=False,
            otel={"enabled": False},
            reconnection_config=_RECONNECT,
        )
        log.info("connecting to the iii engine at %s", config.url)
        # III() connects in the background; register_worker() would block for up to 30 s.
        self._client = III(config.url, options)
        self._loop: asyncio.AbstractEventLoop = self._client._loop

    # the loop ------------------------------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The SDK's own loop: the bridge runs on it, and every method below but :meth:`run`, :meth:`on_loop` and
        :meth:`shutdown` must be called on it."""
        return self._loop

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        """Run ``main`` on the link's loop and wait for it on this thread (any but the SDK's); then shut the SDK
        down. Signal handlers of the main thread keep running meanwhile (the wait wakes up regularly)."""
        self._not_on_sdk_thread("run")
        future = asyncio.run_coroutine_threadsafe(main, self._loop)
        try:
            while True:
                try:
                    return future.result(timeout=_WAIT_SLICE_S)
                except TimeoutError:
                    continue
        finally:
            self.shutdown()

    async def on_loop(self, work: Callable[[], Awaitable[T]]) -> T:
        """Await ``work()`` on the link's loop, from any loop: for a replay or a test driving the link from a loop
        of its own (a cross-thread hop per call; the bridge itself runs on the link's loop and needs none)."""
        async def there() -> T:
            return await work()

        if asyncio.get_running_loop() is self._loop:
            return await there()
        if not self._loop.is_running():  # the SDK was shut down: nothing would ever run the work
            raise RuntimeError("the engine link's loop is not running (the link was shut down)")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(there(), self._loop))

    def shutdown(self) -> None:
        """Close the SDK client: its connection, its loop and its thread. From any thread but the SDK's, after
        :meth:`close` ran on the loop (``run`` does this itself once its coroutine ended); idempotent."""
        self._not_on_sdk_thread("shutdown")
        if self._shut_down:
            return
        self._shut_down = True
        if self._unsubscribe is not None:
            self._unsubscribe()  # the SDK's own "disconnected" at shutdown is no outage to report
        client = self._client
        if client._thread.is_alive():
            client.shutdown()
        # iii-sdk 0.25 leaves its stopped loop open (a ResourceWarning when collected): close it.
        if not client._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()
        log.info("disconnected from the iii engine")

    def _not_on_sdk_thread(self, what: str) -> None:
        if threading.current_thread() is self._client._thread:
            raise RuntimeError(f"EngineLink.{what}() waits for the link's loop: call it from another thread")

    def _on_link_loop(self, what: str) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            raise RuntimeError(
                f"EngineLink.{what}() must run on the link's loop (EngineLink.run, or EngineLink.on_loop from another)"
            )

    # lifecycle -----------------------------------------------------------------------------------------------

    def start(self, specs: list[TriggerTypeSpec], *, on_fatal: Callable[[str], None] | None = None) -> None:
        """Advertise every trigger type and follow the connection. ``on_fatal(message)``: the engine refused this
        bridge for good (a worker-name conflict); the SDK does not reconnect, so the caller should stop with an
        error."""
        self._on_link_loop("start")
        self._started = True
        self._on_fatal = on_fatal
        for spec in specs:
            self._specs[spec.id] = spec
            if not spec.exclusive:
                self._advertise(spec)
        # What the engine supports arrives with every connection's `workerregistered`, on this loop; the SDK
        # offers no callback for it, so the link wraps the SDK method that takes it.
        client = self._client
        take_features = client._on_engine_features

        def on_features(features: list[str]) -> None:
            take_features(features)
            self._features_from_sdk(list(features))

        client._on_engine_features = on_features
        if client._registered_on_connection:  # this connection's hello came before start()
            self._features_from_sdk(sorted(client._engine_features))
        # Fired at once with the current state, then on every change, on this loop.
        self._unsubscribe = client.add_connection_state_listener(self._state_from_sdk)
        self._reconcile_task = asyncio.create_task(self._reconcile_loop(), name="engine-reconcile")
        self._spawn(self._report_unreachable(), "engine-unreachable-report")

    async def close(self) -> None:
        """Stop following the engine (reconciliation, reports, state changes); :meth:`shutdown` closes the SDK."""
        await cancel_and_wait(t for t in (self._reconcile_task, *self._background) if t is not None)
        if self._unsubscribe is not None:
            self._unsubscribe()

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def mode(self) -> Mode | None:
        """``trigger`` or ``observe``: how this link offers its sources on the current (or last) connection; None
        before any engine answered."""
        return self._mode

    @property
    def worker_name(self) -> str | None:
        """The worker name this bridge registers under, as the SDK reports it to the engine (``III_WORKER_NAME``
        wins over ``engine.worker_name``; the default is ``hostname:pid``)."""
        return str(self._client._worker_name())

    async def wait_connected(self) -> None:
        await self._connected_event.wait()

    # invocation ----------------------------------------------------------------------------------------------

    async def invoke(self, call: Invocation) -> Any:
        """Invoke a function; raise DeliveryError (EngineUnavailable when the link is down or fails under the
        call)."""
        if not self._connected:
            raise EngineUnavailable()
        if call.binding_id is not None and self._mode == "observe":
            observer = self._observers.get(call.binding_id)
            if observer is not None:
                return await self._deliver_to_observer(observer, call)
            if any(call.binding_id in spec.table for spec in self._specs.values()):
                # one of this link's bindings whose observer is gone (or not confirmed again yet): never a
                # direct call past the observer
                raise DeliveryError("OBSERVER_NOT_ACTIVE", f"binding {call.binding_id} has no active observer")
            # not a binding of this link (a dead letter replayed): a direct call of its function
        try:
            ws = self._client._ws
            if call.mode != "enqueue" and ws is not None and ws.state is State.OPEN \
                    and self._client._fatal_error is None and asyncio.get_running_loop() is self._loop:
                return await self._invoke_direct(ws, call)
            return await self._client.trigger_async(_sdk_request(call))
        except DeliveryError:
            raise  # set by this link when it dropped under the call (EngineUnavailable): already what it is
        except Exception as exc:
            raise _delivery_error(exc) from exc

    async def _invoke_direct(self, ws: Any, call: Invocation) -> Any:
        """The hot path (DESIGN §5): the same ``invokefunction`` the SDK's ``trigger_async`` sends, written as a dict
        and sent on the SDK's open socket, its result awaited through the SDK's own table of pending calls (which
        settles it, or fails it when the link drops). It skips what costs a call most in the SDK and that the bridge
        does not use: the pydantic message, OpenTelemetry propagation (disabled for the bridge's client), a random
        UUID from the OS per call, and ``wait_for``. A message too long for one frame takes the SDK's path (its
        size limit and fragments), as does one with a lone surrogate (the SDK escapes it); so do enqueue calls,
        calls made while the socket is not open (the SDK queues them) and observer deliveries."""
        void = call.mode == "void"
        invocation_id = None if void else self._call_ids.next()
        text = _WIRE_JSON.encode(invoke_message(call, invocation_id))
        if len(text) > _DIRECT_MAX_CHARS or not (text.isascii() or _utf8_encodable(text)):
            return await self._client.trigger_async(_sdk_request(call))
        if invocation_id is None:
            await ws.send(text)
            return None
        future: asyncio.Future[Any] = self._loop.create_future()
        pending = self._client._pending
        pending[invocation_id] = _PendingInvocation(future=future, function_id=call.function_id)
        try:
            await ws.send(text)
            timer = self._loop.call_later(call.timeout_ms / 1000, _time_out, future, call, invocation_id)
            try:
                return await future
            finally:
                timer.cancel()
        finally:
            pending.pop(invocation_id, None)

    async def _deliver_to_observer(self, observer: Observer, call: Invocation) -> Any:
        """Observe mode: a delivery through the observer's handle (the engine routes it to the observer's target
        with the observer's metadata): ``call_async`` for sync, ``emit`` for void; enqueue has no observer
        equivalent and falls back to sync (``bridge validate`` warns)."""
        if call.mode == "void":
            for _ in range(_ACTIVATION_TRIES):
                if observer.emit(call.payload):
                    return None
                if observer in self._active_observers(observer.function_id):
                    return None  # the observer's own filters declined the event
                if not await self._activating(observer):
                    break
            raise DeliveryError("OBSERVER_NOT_ACTIVE", f"observer {observer.id} is no longer active")
        if call.mode == "enqueue" and observer.function_id not in self._enqueue_warned:
            self._enqueue_warned.add(observer.function_id)
            log.warning("delivery mode enqueue has no equivalent for observers (observe mode): %s delivers to its "
                        "observers synchronously", observer.function_id)
        tries = 0
        while True:
            tries += 1
            try:
                return await observer.call_async(call.payload, timeout_ms=call.timeout_ms)
            except DeliveryError:
                raise
            except InvocationError as exc:
                if exc.code == "FILTERS_NOT_MATCHED":
                    return None  # the observer's own filters declined the event: nothing was sent
                if exc.code == "OBSERVER_NOT_ACTIVE" and tries < _ACTIVATION_TRIES and await self._activating(observer):
                    continue
                raise _delivery_error(exc) from exc
            except Exception as exc:
                raise _delivery_error(exc) from exc

    async def _activating(self, observer: Observer) -> bool:
        """The SDK activates an observer just after its on_observer_added hook (which made the binding) returned:
        a delivery that came in between waits a moment instead of failing. False when it is no longer ours."""
        if self._observers.get(observer.id) is not observer:
            return False
        await asyncio.sleep(_ACTIVATION_WAIT_S)
        return True

    def _active_observers(self, function_id: str) -> list[Observer]:
        for ref in self._functions.values():
            if ref.id == function_id:
                return list(ref.observers())
        return []

    async def _call_engine(self, function_id: str, payload: dict[str, Any]) -> Any:
        return await self.invoke(Invocation(function_id, payload, None, _LIST_TIMEOUT_MS))

    async def list_bindings(self, trigger_type: str) -> set[str]:
        """The ids of the engine's live bindings of ``trigger_type``."""
        return {str(r["id"]) for r in await self._reconciler.binding_rows(trigger_type)}

    # SDK → bridge (on the link's loop) -----------------------------------------------------------------------

    def _state_from_sdk(self, state: str) -> None:
        fatal: str | None = None
        if state == "failed":
            # The SDK gives up for good only when the engine refused this worker (it sets the error first).
            fatal = _refusal_text(self._client._fatal_error, self._config.url)
        self._set_state(state == "connected", fatal)

    def _fail_calls_in_flight(self) -> None:
        """The engine cannot answer calls sent on a link that dropped: fail them now instead of at their timeout.
        They are the SDK's pending invocations (all this client's calls are the bridge's)."""
        dropped = EngineUnavailable("the engine link dropped during the call")
        for pending in list(self._client._pending.values()):
            if not pending.future.done():
                pending.future.set_exception(dropped)

    def _set_state(self, connected: bool, fatal: str | None = None) -> None:
        if fatal is not None and self._fatal is None:
            self._fatal = fatal
            log.error("%s", fatal)
            if self._on_fatal is not None:
                self._on_fatal(fatal)
        if connected == self._connected:
            return
        self._connected = connected
        self._link_generation += 1
        if connected:
            self._connected_event.set()
            if self._ever_connected:
                log.info("reconnected to the iii engine; bindings are being replayed")
                if any(spec.table.stale_ids() for spec in self._specs.values()):
                    self._spawn(self._expire_stale(self._link_generation), "engine-rebind-grace")
                    self._spawn(self._revive_observers(self._link_generation), "engine-observers-confirmed")
            else:
                log.info("connected to the iii engine at %s as worker %s", self._config.url, self.worker_name)
            self._ever_connected = True
            self._schedule_reconcile(delay_s=1.0)
        else:
            self._connected_event.clear()
            if self._fatal is None:
                log.warning(
                    "the iii engine at %s is unreachable; retrying in the background (events wait meanwhile)",
                    self._config.url,
                )
            for spec in self._specs.values():
                spec.table.mark_stale()
            self._fail_calls_in_flight()

    async def _expire_stale(self, generation: int) -> None:
        """After the grace period, drop the bindings nobody replayed since the link came back."""
        grace_ms = self._config.rebind_grace_ms
        await asyncio.sleep(grace_ms / 1000)
        if generation != self._link_generation:
            return  # the link dropped again meanwhile: the grace starts over at the next reconnect
        for spec in self._specs.values():
            for binding in spec.table.expire_stale():
                log.warning(
                    "binding %s of %s → %s dropped: the engine did not replay it within %d ms of the reconnect "
                    "(rebind_grace_ms); its events no longer wait for it (binding again restores it)",
                    binding.id, spec.id, binding.function_id, grace_ms,
                    extra={"trigger_type": spec.id, "binding_id": binding.id, "function_id": binding.function_id},
                )

    def binding_added(self, spec: TriggerTypeSpec, binding: Binding) -> None:
        """The engine bound (or replayed) ``binding`` of ``spec``'s type; its config is checked."""
        was_stale = spec.table.is_stale(binding.id)
        change = spec.table.upsert(binding)
        if change != "unchanged":
            log.info(
                "binding %s %s: %s → %s%s (config %s)",
                binding.id,
                change,
                spec.id,
                binding.function_id,
                f" in namespace {binding.namespace}" if binding.namespace else "",
                binding.config,
            )
        elif was_stale:
            log.debug("binding %s of %s replayed", binding.id, spec.id)

    def binding_removed(self, spec: TriggerTypeSpec, binding_id: str) -> None:
        """The engine unbound ``binding_id`` of ``spec``'s type."""
        binding = spec.table.remove(binding_id)
        if binding is not None:
            log.info("binding %s removed: %s → %s", binding_id, spec.id, binding.function_id)

    def binding_rejected(self, spec: TriggerTypeSpec, binding_id: str, function_id: str, message: str) -> None:
        """A binding's config does not fit ``spec``'s bind schema: refused (the binder reads ``message``)."""
        log.warning("binding %s of %s → %s rejected: %s", binding_id, spec.id, function_id, message)

    # advertising and reconciliation --------------------------------------------------------------------------

    def activate(self, trigger_type: str) -> None:
        """The source of ``trigger_type`` became the active replica: provide the type from now on (registering
        last makes the engine route every binding here, replaying the current ones)."""
        spec = self._specs.get(trigger_type)
        if spec is not None:
            self._advertise(spec)
            self._schedule_reconcile(delay_s=1.0)

    def deactivate(self, trigger_type: str, *, reload: str | None = None) -> None:
        """The source of ``trigger_type`` stopped being the active replica: stop providing and reconciling the type,
        and keep the SDK from registering it again on a reconnect (it replays every type it was given).
        ``reload``: it stopped because a reload "changed" or "removed" it (said so instead)."""
        if trigger_type not in self._advertised:
            return
        self._on_link_loop("deactivate")
        self._stop_advertising(trigger_type)
        if reload == "changed":
            log.info("trigger type %s: its source restarts with its new config; the type is registered again once "
                     "it runs", trigger_type)
        elif reload == "removed":
            log.info("trigger type %s: its source was removed from the config; no longer provided", trigger_type)
        else:
            log.info("trigger type %s: this replica is no longer the active one; it stops providing the type",
                     trigger_type)

    def provide(self, spec: TriggerTypeSpec) -> None:
        """A source added or changed by a reload: from now on its type is advertised as ``spec`` (its bind schema,
        its binding table). A type not exclusive is registered (again) at once, and the engine replays every binding
        of it here, each checked against ``spec``'s bind schema (one that no longer fits is rejected with the
        schema's message, as at bind time); an exclusive one waits for its source to :meth:`activate`."""
        self._on_link_loop("provide")
        self._specs[spec.id] = spec
        self._reconciler.forget(spec.id)
        if not spec.exclusive or spec.id in self._advertised:
            self._advertise(spec)
            self._schedule_reconcile(delay_s=1.0)

    def withdraw(self, trigger_type: str) -> None:
        """A source removed by a reload: stop providing, reconciling and re-registering its type. (Engine 0.23 has
        no frame to unregister a type: its bindings stay with the engine, which parks them when this worker
        leaves.)"""
        self._on_link_loop("withdraw")
        self._specs.pop(trigger_type, None)
        self._reconciler.forget(trigger_type)
        if self._stop_advertising(trigger_type):
            log.info("trigger type %s: its source was removed from the config; no longer provided", trigger_type)

    def _stop_advertising(self, trigger_type: str) -> bool:
        """Stop offering ``trigger_type`` (in either mode) and keep the SDK from offering it again on a reconnect;
        False when it was not offered."""
        if trigger_type not in self._advertised:
            return False
        self._advertised.discard(trigger_type)
        self._unregister(trigger_type)
        return True

    def _features_from_sdk(self, features: list[str]) -> None:
        """A connection's ``workerregistered`` said what the engine supports: offer the sources in its mode."""
        mode: Mode = "observe" if _OBSERVE_V1 in features else "trigger"
        if mode == self._mode:
            return
        previous, self._mode = self._mode, mode
        shown = ", ".join(features) if features else "none"
        if mode == "observe":
            log.info("observe mode: the iii engine announces observe.v1 (features: %s); each source is an "
                     "observable function bridge::<trigger type> that iii.observe observers and register_trigger "
                     "binders both reach", shown)
        else:
            log.info("trigger mode: the iii engine does not announce observe.v1 (features: %s; an engine before "
                     "0.25); each source is a trigger type for register_trigger", shown)
        if previous is not None:
            for type_id in sorted(self._registered):
                self._unregister(type_id, previous)
        for type_id in sorted(self._advertised):
            self._register(self._specs[type_id])

    def _advertise(self, spec: TriggerTypeSpec) -> None:
        # On the link's loop, which is the SDK's: the SDK schedules the frame and stores the handler before it
        # runs again, so a binding the engine replays at once always finds the handler.
        self._on_link_loop("advertise")
        if self._mode is not None:
            self._register(spec)
        if spec.id in self._advertised:
            log.debug("registered trigger type %s again", spec.id)
        else:
            self._advertised.add(spec.id)
            log.info("advertised trigger type %s", spec.id)

    def _register(self, spec: TriggerTypeSpec) -> None:
        """Offer ``spec`` in the current mode (again: a trigger type is registered anew, which makes this bridge
        its provider; an observable function is unregistered and registered anew, which claims it if no other
        replica owns it)."""
        if self._mode == "observe":
            self._register_observable(spec)
        else:
            self._register_trigger_type(spec)
        self._registered.add(spec.id)

    def _unregister(self, type_id: str, mode: Mode | None = None) -> None:
        if type_id not in self._registered:
            return
        self._registered.discard(type_id)
        if (mode or self._mode) == "observe":
            ref = self._functions.pop(type_id, None)
            if ref is not None:
                ref.unregister()
            spec = self._specs.get(type_id)
            function_id = self._function_ids.pop(type_id, observable_function_id(type_id))
            for binding_id in [i for i, o in self._observers.items() if o.function_id == function_id]:
                self._observers.pop(binding_id, None)
                if spec is not None:
                    spec.table.remove(binding_id)
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"unregister_trigger_type")
            self._client.unregister_trigger_type(RegisterTriggerTypeInput(id=type_id, description=""))

    def _register_observable(self, spec: TriggerTypeSpec) -> None:
        function_id = self._function_ids[spec.id] = spec.observable_id
        previous = self._functions.pop(spec.id, None)
        if previous is not None:
            previous.unregister()

        async def added(observer: Observer) -> None:
            self._observer_added(spec, observer)

        async def removed(observer: Observer) -> None:
            self._observer_removed(spec, observer)

        async def called(_data: Any) -> Any:
            raise RuntimeError(
                f"{function_id} is an event source of iii-bridge: observe it (iii.observe with args) or bind to "
                f"trigger type {spec.id} (register_trigger with config); calling it delivers nothing"
            )

        hooks = ObserveHooks(
            delivery="owner", args_format=spec.bind.advertised, legacy_trigger_type=spec.id,
            on_observer_added=added, on_observer_removed=removed,
        )
        self._functions[spec.id] = self._client.register_function(
            function_id, called, description=spec.description, request_format={"type": "object"},
            response_format=spec.payload_schema, observe=hooks, local_dispatch=False,
        )

    def _observer_added(self, spec: TriggerTypeSpec, observer: Observer) -> None:
        """An observer of ``spec``'s function (made by iii.observe, or by register_trigger through the legacy
        shim): checked like a bind config, then a binding; raising refuses it with the text trigger mode gives."""
        try:
            checked = spec.bind.check(observer.args)
        except BindConfigError as exc:
            self.binding_rejected(spec, observer.id, observer.target, str(exc))
            raise ObserveRejection(_REJECTED_ARGS, str(exc)) from exc
        self._observers[observer.id] = observer
        # The observer's target namespace and metadata stay with the engine, which routes each delivery to
        # the target and adds the metadata itself.
        self.binding_added(spec, Binding(observer.id, spec.id, observer.target, None, checked))

    def _observer_removed(self, spec: TriggerTypeSpec, observer: Observer) -> None:
        binding_id = observer.id
        if self._observers.get(binding_id) is observer:
            del self._observers[binding_id]
            if spec.table.is_stale(binding_id):
                # Left out of the set an engine sent after a reconnect (a restarted engine knows only the observers
                # that came back so far): stale, not gone; it waits for its observer up to rebind_grace_ms.
                log.debug("binding %s of %s waits for its observer to come back", binding_id, spec.id)
                return
            self.binding_removed(spec, binding_id)

    async def _revive_observers(self, generation: int) -> None:
        """Observe mode, after a reconnect: once the engine confirmed a function again (its functionregistered
        carries the current observers; the SDK runs hooks only for those that changed), its unchanged
        observers are bindings again, not stale ones."""
        deadline = time.monotonic() + self._config.rebind_grace_ms / 1000
        pending = set(self._functions)
        while pending and generation == self._link_generation and time.monotonic() < deadline:
            await asyncio.sleep(_CONFIRM_POLL_S)
            if self._mode != "observe":
                return
            for type_id in list(pending):
                ref = self._functions.get(type_id)
                spec = self._specs.get(type_id)
                state = self._observe_state(type_id)
                if ref is None or spec is None or state is None:
                    pending.discard(type_id)
                    continue
                if state.confirmed_epoch != self._client._connection_epoch:
                    continue
                pending.discard(type_id)
                for observer in ref.observers():
                    binding = spec.table.get(observer.id)
                    if binding is not None and self._observers.get(observer.id) is observer:
                        self.binding_added(spec, binding)

    def _observe_state(self, type_id: str) -> Any | None:
        """The SDK's observe state of ``type_id``'s observable function (whether and when the engine confirmed it);
        None when it is not registered as one."""
        ref = self._functions.get(type_id)
        data = self._client._functions.get(ref.id) if ref is not None else None
        return data.observe if data is not None else None

    def _register_trigger_type(self, spec: TriggerTypeSpec) -> None:
        request = RegisterTriggerTypeInput(
            id=spec.id,
            description=spec.description,
            trigger_request_format=spec.bind.advertised,
            call_request_format=spec.payload_schema,
        )
        with warnings.catch_warnings():
            # iii-sdk 0.25 deprecates the trigger-type API in favour of observe; the bridge keeps using it until
            # engines speak observe (the binding table does not care where a binding came from).
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"register_trigger_type")
            self._client.register_trigger_type(request, _Handler(self, spec))

    def _schedule_reconcile(self, delay_s: float) -> None:
        async def later() -> None:
            await asyncio.sleep(delay_s)
            await self.reconcile()

        self._spawn(later(), "engine-reconcile-once")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)  # keep a reference so the task is not collected early
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("engine link: background task %s failed", task.get_name(), exc_info=task.exception())

    async def _report_unreachable(self) -> None:
        """Say plainly, and again now and then, that the engine does not answer (the SDK retries quietly)."""
        down_since = time.monotonic()
        next_report = down_since + _UNREACHABLE_FIRST_S
        while self._fatal is None:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if self._connected:
                down_since = now
                next_report = now + _UNREACHABLE_FIRST_S
            elif now >= next_report and self._fatal is None:
                log.warning(
                    "the iii engine at %s is unreachable (for %.0f s); retrying in the background, events wait",
                    self._config.url,
                    now - down_since,
                )
                next_report = now + _UNREACHABLE_REPEAT_S

    async def _reconcile_loop(self) -> None:
        interval = self._config.reconcile_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            await self.reconcile()

    async def reconcile(self) -> None:
        """One round of :class:`~bridge._reconcile.Reconciler` (a missed unbind, bindings another replica provides,
        a type whose provider went away); an engine that does not answer skips the round."""
        if not self._connected:
            return
        try:
            if self._mode == "observe":
                await self._reconcile_observe()
            else:
                await self._reconciler.run(list(self._specs.values()))
        except DeliveryError as exc:
            log.debug("reconciliation with the engine skipped: %s", exc)

    async def _reconcile_observe(self) -> None:
        """Observe mode: the engine keeps the first owner of a function id and refuses the others
        (``FUNCTION_NAMESPACE_CONFLICT``); a replica it refused registers the function again once no worker owns
        it (the owner left: its observers wait, pending, for the next owner and come with its
        ``functionregistered``)."""
        refused = [t for t in sorted(self._registered)
                   if (state := self._observe_state(t)) is not None and not state.confirmed]
        if not refused:
            return
        result = await self._call_engine(LIST_FUNCTIONS, {"include_internal": True})
        rows = result.get("functions") if isinstance(result, dict) else None
        owned = {
            (str(r.get("namespace") or "default"), r.get("function_id"))
            for r in (rows if isinstance(rows, list) else []) if isinstance(r, dict)
        }
        namespace = self._config.namespace or "default"
        for type_id in refused:
            function_id = self._specs[type_id].observable_id
            if (namespace, function_id) in owned or type_id not in self._registered:
                continue
            log.info("%s has no owner any more (the replica that owned it left): this replica registers it and takes "
                     "its observers over", function_id)
            self._register(self._specs[type_id])


def _sdk_request(call: Invocation) -> dict[str, Any]:
    """``call`` as a request of the SDK's ``trigger_async``."""
    request: dict[str, Any] = {
        "function_id": call.function_id,
        "payload": call.payload,
        "namespace": call.namespace or "default",
        "timeout_ms": call.timeout_ms,
    }
    if call.metadata:
        request["metadata"] = call.metadata
    if call.mode == "void":
        request["action"] = {"type": "void"}
    elif call.mode == "enqueue":
        request["action"] = {"type": "enqueue", "queue": call.queue}
    return request


def invoke_message(call: Invocation, invocation_id: str | None) -> dict[str, Any]:
    """The ``invokefunction`` message of a sync call (``invocation_id``) or a void one (None), as iii-sdk 0.25 writes
    it for ``trigger_async`` of :func:`_sdk_request` with OpenTelemetry off (a test compares the two)."""
    message: dict[str, Any] = {"type": "invokefunction", "function_id": call.function_id}
    if call.payload is not None:  # the SDK leaves out what is None (a payload of null arrives as no data)
        message["data"] = call.payload
    message["namespace"] = call.namespace or "default"
    if invocation_id is not None:
        message["invocation_id"] = invocation_id
    else:
        message["action"] = {"type": "void"}
    if call.metadata:  # as _sdk_request: no empty metadata
        message["metadata"] = call.metadata
    return message


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _time_out(future: asyncio.Future[Any], call: Invocation, invocation_id: str) -> None:
    """What the SDK raises when a call's ``timeout_ms`` passed without a result."""
    if not future.done():
        future.set_exception(InvocationError(
            code="TIMEOUT", message=f"invocation timed out after {call.timeout_ms}ms", function_id=call.function_id,
            invocation_id=invocation_id,
        ))


class _CallIds:
    """Invocation ids shaped as the SDK's (random UUIDs, version 4) without asking the OS for randomness per call:
    one random UUID per link, its last 48 bits (the node field: version and variant stay as they are) XORed with a
    counter. Unique for the link's life."""

    def __init__(self) -> None:
        self._base = uuid.uuid4().int
        self._count = itertools.count(1)

    def next(self) -> str:
        h = f"{self._base ^ (next(self._count) & 0xFFFF_FFFF_FFFF):032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _delivery_error(exc: Exception) -> DeliveryError:
    """What an exception the SDK raised under a call means for the delivery: EngineUnavailable when the link
    failed (no attempt is spent), else the function's own error code. Anything else the SDK raises (a payload it
    cannot serialise, a bug) is ``client_error``: still a retry or a dead letter, never an event silently left
    unacknowledged."""
    if isinstance(exc, InvocationError):
        if exc.code in _LINK_ERRORS:
            return EngineUnavailable(exc.message)
        return DeliveryError(exc.code, exc.message)
    if isinstance(exc, _LINK_EXCEPTIONS):
        return EngineUnavailable(f"{type(exc).__name__}: {exc}")
    return DeliveryError("client_error", f"{type(exc).__name__}: {exc}")


def _refusal_text(error: object, url: str) -> str:
    """What the operator reads when the engine refuses this bridge for good."""
    if isinstance(error, RegistrationRejectedError) and error.code == _WORKER_CONFLICT:
        return (
            f"the iii engine at {url} refused this bridge: another worker named {error.worker_name!r} is already "
            f"connected in namespace {error.namespace!r} ({_WORKER_CONFLICT}). Each bridge replica needs its own "
            "worker name: set engine.worker_name in bridge.yaml or III_WORKER_NAME in its environment (which wins), "
            "or leave both unset for the unique default hostname:pid"
        )
    if isinstance(error, RegistrationRejectedError):
        return f"the iii engine at {url} refused this bridge ({error.code}): {error}"
    return f"the connection to the iii engine at {url} failed for good; the SDK stopped reconnecting"

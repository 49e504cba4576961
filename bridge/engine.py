"""The engine link: the ONLY module that imports the iii SDK.

The SDK runs its own asyncio loop on its own thread; the bridge runs its own loop. Everything that arrives
from the SDK (binding callbacks, connection-state changes) is handed over to the bridge loop here, and every
invocation is awaited from the bridge loop through ``trigger_async``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from iii import InitOptions, InvocationError
from iii.iii import III
from iii.iii_types import RegisterTriggerTypeInput
from iii.triggers import TriggerConfig, TriggerHandler
from iii_helpers.observability import ReconnectionConfig

from bridge._handover import Handover
from bridge.bindings import Binding, BindingTable
from bridge.config import EngineConfig
from bridge.errors import BindConfigError, DeliveryError, EngineUnavailable
from bridge.schemas import BindValidator

log = logging.getLogger("bridge.engine")

_LIST_BINDINGS = "engine::registered-triggers::list"
# Invocation errors that say the call never reached a live target, as opposed to the target failing.
_LINK_ERRORS = frozenset({"SHUTDOWN", "engine_unavailable"})
# The SDK's default backoff grows to 30 s; an engine coming back should not wait that long for its bridges.
_RECONNECT = ReconnectionConfig(initial_delay_ms=500, max_delay_ms=5000)
_UNREACHABLE_FIRST_S = 3.0  # how long a first connection may take before the operator is told
_UNREACHABLE_REPEAT_S = 30.0  # then how often it is repeated while the engine stays away


@dataclass(frozen=True)
class TriggerTypeSpec:
    """What the bridge advertises for one source."""

    id: str
    description: str
    bind: BindValidator
    payload_schema: dict[str, Any] | None
    table: BindingTable
    exclusive: bool = False  # advertised only once its source is the active replica (see activate())


class _QuietSdk(logging.Filter):
    """The SDK logs its trigger-API deprecation notice (reads like a fault of the bridge) and a warning per failed
    reconnect attempt (one a second); the engine link says both once, in the operator's terms."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "is deprecated and will be removed" not in message and not message.startswith("Connection failed")


logging.getLogger("iii.iii").addFilter(_QuietSdk())


class _Handler(TriggerHandler[Any]):
    """Receives bindings on the SDK loop: validates at once (so the binder reads why), applies on the bridge loop."""

    def __init__(self, link: EngineLink, spec: TriggerTypeSpec) -> None:
        self._link = link
        self._spec = spec

    async def register_trigger(self, config: TriggerConfig[Any]) -> None:
        try:
            checked = self._spec.bind.check(config.config)
        except BindConfigError as exc:
            self._link._post(self._link._rejected, self._spec, config.id, config.function_id, str(exc))
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
        self._link._post(self._link._bound, self._spec, binding)

    async def unregister_trigger(self, config: TriggerConfig[Any]) -> None:
        self._link._post(self._link._unbound, self._spec, config.id)


class EngineLink:
    """Connects to iii, advertises trigger types, keeps their binding tables, invokes functions."""

    def __init__(self, config: EngineConfig, *, on_state: Callable[[bool], None] | None = None) -> None:
        self._config = config
        self._on_state = on_state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: III | None = None
        self._specs: dict[str, TriggerTypeSpec] = {}
        self._connected = False
        self._connected_event: asyncio.Event | None = None
        self._ever_connected = False
        self._handover: Handover | None = None
        # Calls waiting for an answer; failed at once when the link drops (the answer can never come).
        self._waiting: set[asyncio.Future[Any]] = set()
        self._reconcile_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._advertised: set[str] = set()  # trigger types this bridge provides (an exclusive standby: not yet)
        self._unsubscribe: Callable[[], None] | None = None

    # lifecycle -----------------------------------------------------------------------------------------------

    def start(self, specs: list[TriggerTypeSpec]) -> None:
        """Create the SDK client (it connects in the background) and advertise every trigger type."""
        self._loop = asyncio.get_running_loop()
        self._connected_event = asyncio.Event()
        options = InitOptions(
            worker_name=self._config.worker_name,
            worker_description="iii-bridge: Kafka, Postgres and file events as iii function calls",
            namespace=self._config.namespace,
            enable_metrics_reporting=False,
            otel={"enabled": False},
            reconnection_config=_RECONNECT,
        )
        log.info("connecting to the iii engine at %s", self._config.url)
        # III() connects in the background; register_worker() would block this loop for up to 30 s.
        self._client = III(self._config.url, options)
        self._handover = Handover(self._client.trigger_async, self._client._loop, self._loop)
        for spec in specs:
            self._specs[spec.id] = spec
            if not spec.exclusive:
                self._advertise(spec)
        self._unsubscribe = self._client.add_connection_state_listener(self._state_from_sdk)
        self._reconcile_task = asyncio.create_task(self._reconcile_loop(), name="engine-reconcile")
        self._spawn(self._report_unreachable(), "engine-unreachable-report")

    async def close(self) -> None:
        tasks = [t for t in (self._reconcile_task, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._unsubscribe is not None:
            self._unsubscribe()
        client, self._client = self._client, None
        if client is not None:
            # shutdown() joins the SDK thread; keep the bridge loop responsive meanwhile.
            await asyncio.to_thread(client.shutdown)
            # iii-sdk 0.25 leaves its stopped loop open (a ResourceWarning when collected): close it.
            if not client._thread.is_alive() and not client._loop.is_closed():
                client._loop.close()
        log.info("disconnected from the iii engine")

    @property
    def connected(self) -> bool:
        return self._connected

    async def wait_connected(self) -> None:
        assert self._connected_event is not None
        await self._connected_event.wait()

    # invocation ----------------------------------------------------------------------------------------------

    async def invoke(
        self,
        function_id: str,
        payload: Any,
        *,
        namespace: str | None,
        timeout_ms: int,
        mode: str = "sync",
        queue: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Any:
        """Invoke a function; raise DeliveryError (EngineUnavailable when the link is down)."""
        client = self._client
        if client is None or not self._connected:
            raise EngineUnavailable()
        request: dict[str, Any] = {
            "function_id": function_id,
            "payload": payload,
            "namespace": namespace or "default",
            "timeout_ms": timeout_ms,
        }
        if metadata:
            request["metadata"] = metadata
        if mode == "void":
            request["action"] = {"type": "void"}
        elif mode == "enqueue":
            request["action"] = {"type": "enqueue", "queue": queue}
        handover = self._handover
        assert handover is not None
        future = handover.submit(request)
        self._waiting.add(future)
        try:
            return await future
        except InvocationError as exc:
            if exc.code in _LINK_ERRORS:
                raise EngineUnavailable(exc.message) from exc
            raise DeliveryError(exc.code, exc.message) from exc
        except ConnectionError as exc:
            raise EngineUnavailable(str(exc)) from exc
        except Exception as exc:
            # Anything else the SDK raises (a payload it cannot serialise, a bug) must still end in a retry or a
            # dead letter, never in an event that is silently left unacknowledged.
            raise DeliveryError("client_error", f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._waiting.discard(future)

    async def list_bindings(self, trigger_type: str) -> set[str]:
        result = await self.invoke(
            _LIST_BINDINGS, {"trigger_type": trigger_type}, namespace=None, timeout_ms=10000
        )
        rows = result.get("registered_triggers", []) if isinstance(result, dict) else []
        return {str(r["id"]) for r in rows if isinstance(r, dict) and r.get("trigger_type") == trigger_type}

    # SDK → bridge loop ---------------------------------------------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _state_from_sdk(self, state: str) -> None:
        self._post(self._set_state, state == "connected")

    def _set_state(self, connected: bool) -> None:
        if connected == self._connected:
            return
        self._connected = connected
        assert self._connected_event is not None
        if connected:
            self._connected_event.set()
            if self._ever_connected:
                log.info("reconnected to the iii engine; bindings are being replayed")
            else:
                log.info("connected to the iii engine at %s", self._config.url)
            self._ever_connected = True
            self._schedule_reconcile(delay_s=1.0)
        else:
            self._connected_event.clear()
            log.warning(
                "the iii engine at %s is unreachable; retrying in the background (events wait meanwhile)",
                self._config.url,
            )
            for spec in self._specs.values():
                spec.table.mark_stale()
            # In-flight calls would only time out: the engine cannot answer them any more.
            for future in list(self._waiting):
                if not future.done():
                    future.set_exception(EngineUnavailable("the engine link dropped during the call"))
        if self._on_state is not None:
            self._on_state(connected)

    def _bound(self, spec: TriggerTypeSpec, binding: Binding) -> None:
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

    def _unbound(self, spec: TriggerTypeSpec, binding_id: str) -> None:
        binding = spec.table.remove(binding_id)
        if binding is not None:
            log.info("binding %s removed: %s → %s", binding_id, spec.id, binding.function_id)

    def _rejected(self, spec: TriggerTypeSpec, binding_id: str, function_id: str, message: str) -> None:
        log.warning("binding %s of %s → %s rejected: %s", binding_id, spec.id, function_id, message)

    # advertising and reconciliation --------------------------------------------------------------------------

    def activate(self, trigger_type: str) -> None:
        """The source of ``trigger_type`` became the active replica: provide the type from now on (registering
        last makes the engine route every binding here, replaying the current ones)."""
        spec = self._specs.get(trigger_type)
        if spec is not None and self._client is not None:
            self._advertise(spec)

    def _advertise(self, spec: TriggerTypeSpec) -> None:
        assert self._client is not None
        with warnings.catch_warnings():
            # iii-sdk 0.25 deprecates the trigger-type API in favour of observe; the bridge keeps using it until
            # engines speak observe (the binding table does not care where a binding came from).
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"register_trigger_type")
            self._client.register_trigger_type(
                RegisterTriggerTypeInput(
                    id=spec.id,
                    description=spec.description,
                    trigger_request_format=spec.bind.advertised,
                    call_request_format=spec.payload_schema,
                ),
                _Handler(self, spec),
            )
        if spec.id in self._advertised:
            log.debug("registered trigger type %s again", spec.id)
        else:
            self._advertised.add(spec.id)
            log.info("advertised trigger type %s", spec.id)

    def _schedule_reconcile(self, delay_s: float) -> None:
        async def later() -> None:
            await asyncio.sleep(delay_s)
            await self.reconcile()

        self._spawn(later(), "engine-reconcile-once")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)  # keep a reference so the task is not collected early
        task.add_done_callback(self._background.discard)

    async def _report_unreachable(self) -> None:
        """Say plainly, and again now and then, that the engine does not answer (the SDK retries quietly)."""
        down_since = time.monotonic()
        next_report = down_since + _UNREACHABLE_FIRST_S
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if self._connected:
                down_since = now
                next_report = now + _UNREACHABLE_FIRST_S
            elif now >= next_report:
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
        """Align every binding table with the engine's own list (a missed unbind, a binding nobody replayed)."""
        if not self._connected:
            return
        for spec in self._specs.values():
            if spec.id not in self._advertised:
                continue  # a standby: the active replica holds the bindings
            try:
                live = await self.list_bindings(spec.id)
            except DeliveryError as exc:
                log.debug("could not list bindings of %s: %s", spec.id, exc)
                continue
            known = {b.id for b in spec.table.snapshot()}
            for binding in spec.table.reconcile(live):
                log.info(
                    "binding %s of %s → %s dropped: the engine no longer lists it",
                    binding.id,
                    spec.id,
                    binding.function_id,
                )
            if live != known:
                # Either the engine holds bindings this bridge never received (another replica registered the
                # type after us), or bindings vanished from its list (missed unbinds, or parked because the
                # replica the engine routed them to went away). Registering again makes this bridge the
                # provider: the engine replays the complete, current set.
                log.info("re-registering trigger type %s to receive its current bindings", spec.id)
                self._advertise(spec)

"""Clients for the test engine's own tests: a real SDK trigger-type provider, and a raw WebSocket worker for
the frames an SDK will not send (undecodable ones, registrations before ``engine::workers::register``,
hand-picked trigger ids)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from iii import InitOptions, register_worker
from iii.iii_types import RegisterTriggerTypeInput
from iii.triggers import TriggerConfig, TriggerHandler
from iii_helpers.observability import ReconnectionConfig
from websockets.asyncio.client import ClientConnection, connect

from bridge.testing.consumer import shutdown_client
from bridge.testing.engine import TestEngine

ORDERS = "orders.placed"


class Handler(TriggerHandler):  # type: ignore[misc]
    """Rejects a non-numeric ``min_total`` the way a provider validates bind configs (unless ``accept_all``)."""

    def __init__(self, accept_all: bool = False) -> None:
        self.accept_all = accept_all
        self.registered: list[TriggerConfig] = []
        self.unregistered: list[TriggerConfig] = []

    async def register_trigger(self, config: TriggerConfig) -> None:
        value = (config.config or {}).get("min_total", 0)
        if not self.accept_all and not isinstance(value, int | float):
            raise ValueError(f"config.min_total: {value!r} is not a number")
        self.registered.append(config)

    async def unregister_trigger(self, config: TriggerConfig) -> None:
        self.unregistered.append(config)

    def ids(self) -> list[str]:
        return [c.id for c in self.registered]


class Provider:
    """A real SDK client that provides a trigger type (in its namespace), as the bridge does."""

    def __init__(
        self, engine: TestEngine, name: str, reconnect_delay_ms: int = 50, namespace: str | None = None,
        accept_all: bool = False, type_id: str = ORDERS,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.handler = Handler(accept_all)
        self.iii: Any = register_worker(engine.url, InitOptions(
            worker_name=name, namespace=namespace, otel={"enabled": False}, enable_metrics_reporting=False,
            reconnection_config=ReconnectionConfig(initial_delay_ms=reconnect_delay_ms, max_delay_ms=500),
        ))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "register_trigger_type is deprecated", DeprecationWarning)
            self.iii.register_trigger_type(
                RegisterTriggerTypeInput(
                    id=type_id, description="Orders placed",
                    trigger_request_format={"type": "object", "properties": {"min_total": {"type": "number"}}},
                    call_request_format={"type": "object"},
                ),
                self.handler,
            )
        engine.wait_until(lambda: any(t.worker_name == name for t in engine.trigger_types()))

    async def call(self, function_id: str, payload: Any, **extra: Any) -> Any:
        return await self.iii.trigger_async({"function_id": function_id, "payload": payload, **extra})

    async def listed(self, **filters: Any) -> list[dict[str, Any]]:
        answer = await self.call("engine::registered-triggers::list", filters)
        rows: list[dict[str, Any]] = answer["registered_triggers"]
        return rows

    def close(self) -> None:
        shutdown_client(self.iii)


class RawWorker:
    """A hand-driven connection: send any frame, wait for (or rule out) frames of a type."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.worker_id = ""
        self.received: list[dict[str, Any]] = []
        self._unread: list[dict[str, Any]] = []

    async def send(self, **frame: Any) -> None:
        await self.ws.send(json.dumps(frame))

    async def register(self, name: str | None = None, namespace: str | None = None) -> None:
        """The void ``engine::workers::register`` call an SDK makes after connecting."""
        data: dict[str, Any] = {"runtime": "python"}
        if name is not None:
            data["name"] = name
        if namespace is not None:
            data["namespace"] = namespace
        await self.send(type="invokefunction", function_id="engine::workers::register", data=data,
                        action={"type": "void"})

    async def sync(self) -> None:
        """A ping round trip: the engine has handled every frame sent before."""
        await self.send(type="ping")
        await self.recv("pong")

    async def call(self, function_id: str, data: Any, **extra: Any) -> dict[str, Any]:
        invocation_id = str(uuid.uuid4())
        await self.send(type="invokefunction", function_id=function_id, data=data, invocation_id=invocation_id,
                        **extra)
        return await self.recv("invocationresult", lambda f: f["invocation_id"] == invocation_id)

    async def _next(self, timeout: float) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.received.append(frame)
        return frame

    async def recv(
        self, type: str, match: Callable[[dict[str, Any]], bool] = lambda _f: True, timeout: float = 5.0
    ) -> dict[str, Any]:
        for frame in self._unread:
            if frame["type"] == type and match(frame):
                self._unread.remove(frame)
                return frame
        async with asyncio.timeout(timeout):
            while True:
                frame = await self._next(timeout)
                if frame["type"] == type and match(frame):
                    return frame
                self._unread.append(frame)

    async def quiet(self, type: str, within: float = 0.3) -> bool:
        """True when no frame of ``type`` arrives within ``within`` seconds (a ping round trip first)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while True:
                    frame = await self._next(within)
                    if frame["type"] == type:
                        return False
                    self._unread.append(frame)
        return all(f["type"] != type for f in self._unread)


@pytest.fixture
def make_provider(iii_engine: TestEngine) -> Iterator[Callable[..., Provider]]:
    made: list[Provider] = []

    def make(name: str = "bridge-a", **kwargs: Any) -> Provider:
        made.append(Provider(iii_engine, name, **kwargs))
        return made[-1]

    yield make
    for provider in made:
        provider.close()


@pytest.fixture
def provider(make_provider: Callable[..., Provider]) -> Provider:
    return make_provider()


@pytest.fixture
async def raw(iii_engine: TestEngine) -> AsyncIterator[Callable[..., Awaitable[RawWorker]]]:
    """Factory: ``await raw(name=..., namespace=..., register=True)`` -> a connected RawWorker."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            name: str | None = None, namespace: str | None = None, register: bool = True,
            engine: TestEngine | None = None,
        ) -> RawWorker:
            ws = await stack.enter_async_context(connect((engine or iii_engine).url))
            worker = RawWorker(ws)
            worker.worker_id = (await worker.recv("workerregistered"))["worker_id"]
            if register:
                await worker.register(name, namespace)
                await worker.sync()
            return worker

        yield make

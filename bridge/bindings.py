"""The binding table of one trigger type, independent of how a binding arrived.

Bindings come from the engine: ``registertrigger`` frames (trigger mode, replayed after every reconnect) or the
observers of the source's observable function (observe mode); the table does not care which. Every method runs on
the bridge's own event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

from bridge.config.model import observable_function_id as observable_function_id

Change = Literal["added", "updated", "unchanged"]


@dataclass(frozen=True)
class Binding:
    """One function bound to a trigger type with a checked bind config."""

    id: str
    trigger_type: str
    function_id: str
    namespace: str | None  # the target function's namespace; None means the engine's default
    config: dict[str, Any]  # the bind config with bind_schema defaults applied
    metadata: dict[str, Any] | None = None

    @property
    def condition_function_id(self) -> str | None:
        value = self.config.get("condition_function_id")
        return value if isinstance(value, str) and value else None

    def template_view(self) -> dict[str, Any]:
        """The ``binding`` variable templates see."""
        return {
            "id": self.id,
            "function_id": self.function_id,
            "namespace": self.namespace or "default",
            "metadata": self.metadata or {},
        }

    def record_view(self) -> dict[str, Any]:
        """How a dead-letter record names this binding."""
        return {
            "id": self.id,
            "function_id": self.function_id,
            "namespace": self.namespace or "default",
            "config": self.config,
        }


class BindingTable:
    """The bindings of one trigger type.

    A binding ends only when the engine says so (an unbind, or its absence from the engine's list while the
    engine routes the type's bindings to this bridge) or when it stayed stale too long. When the engine link
    drops, every binding turns **stale**, not gone: the engine replays the type's bindings once it is back (and
    consumers re-bind under the same ids as they reconnect), and an upsert clears the mark. Events for a stale
    binding wait for it (:meth:`wait_settled`); the engine link drops what nobody replayed within
    ``engine.rebind_grace_ms`` (:meth:`expire_stale`).

    Every change bumps a receive sequence, so a reconciliation can tell a binding received after it asked the
    engine for its list (which that list may not show yet) from one the list really left out.
    """

    def __init__(self, trigger_type: str) -> None:
        self.trigger_type = trigger_type
        self.expired = 0  # stale bindings dropped after the grace period (metrics)
        self._bindings: dict[str, Binding] = {}
        self._stale: set[str] = set()
        self._received: dict[str, int] = {}  # binding id -> the sequence number of its last upsert
        self._seq = 0
        self._ready = asyncio.Event()  # set while at least one binding is not stale
        self._non_empty = asyncio.Event()
        self._settled = asyncio.Event()  # replaced (after being set) at every change a stale waiter cares about
        self._snapshot: tuple[Binding, ...] = ()

    def __len__(self) -> int:
        return len(self._bindings)

    def __contains__(self, binding_id: object) -> bool:
        return binding_id in self._bindings

    def get(self, binding_id: str) -> Binding | None:
        return self._bindings.get(binding_id)

    @property
    def ready(self) -> bool:
        """Whether an event can start now: some binding exists and is not stale."""
        return len(self._bindings) > len(self._stale)

    def mark(self) -> int:
        """The current receive sequence: bindings upserted later are newer than a list requested now."""
        return self._seq

    def upsert(self, binding: Binding) -> Change:
        self._seq += 1
        self._received[binding.id] = self._seq
        was_stale = binding.id in self._stale
        self._stale.discard(binding.id)
        previous = self._bindings.get(binding.id)
        if previous == binding:
            if was_stale:
                self._changed()
            return "unchanged"
        self._bindings[binding.id] = binding
        self._changed()
        return "added" if previous is None else "updated"

    def remove(self, binding_id: str) -> Binding | None:
        self._stale.discard(binding_id)
        self._received.pop(binding_id, None)
        binding = self._bindings.pop(binding_id, None)
        if binding is not None:
            self._changed()
        return binding

    def mark_stale(self) -> None:
        self._stale = set(self._bindings)
        self._changed()

    def is_stale(self, binding_id: str) -> bool:
        return binding_id in self._stale

    def stale_ids(self) -> set[str]:
        return set(self._stale)

    def expire_stale(self) -> list[Binding]:
        """Drop every binding that is still stale; return them."""
        gone = [self._bindings[bid] for bid in sorted(self._stale) if bid in self._bindings]
        for binding in gone:
            self.remove(binding.id)
        self.expired += len(gone)
        return gone

    def reconcile(self, live_ids: set[str], asked_at: int) -> list[Binding]:
        """Drop every binding the engine's list left out, except stale ones (they wait for their replay or the
        grace period) and those received after the list was asked for (``asked_at``, from :meth:`mark`): the
        list may predate them. Returns what was dropped."""
        gone = [
            b for bid, b in self._bindings.items()
            if bid not in live_ids and bid not in self._stale and self._received.get(bid, 0) <= asked_at
        ]
        for binding in gone:
            self.remove(binding.id)
        return gone

    def snapshot(self) -> tuple[Binding, ...]:
        """The current bindings (stale ones included), in the order they were added (cached until a change)."""
        return self._snapshot

    async def wait_non_empty(self) -> None:
        if not self._bindings:
            await self._non_empty.wait()

    async def wait_ready(self) -> None:
        """Return once some binding exists and is not stale."""
        while not self.ready:
            await self._ready.wait()

    def live(self, binding_id: str) -> Binding | None:
        """The binding if it exists and is not stale (no wait); else None."""
        return None if binding_id in self._stale else self._bindings.get(binding_id)

    async def wait_settled(self, binding_id: str) -> Binding | None:
        """Wait while the binding is stale; return it once it is live again, None once it has ended."""
        while binding_id in self._stale:
            await self._settled.wait()
        return self._bindings.get(binding_id)

    def _changed(self) -> None:
        self._snapshot = tuple(self._bindings.values())
        for event, on in ((self._non_empty, bool(self._bindings)), (self._ready, self.ready)):
            if on:
                event.set()
            else:
                event.clear()
        settled, self._settled = self._settled, asyncio.Event()
        settled.set()

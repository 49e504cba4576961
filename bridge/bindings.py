"""The binding table of one trigger type, independent of how a binding arrived.

Bindings come from the engine today (``registertrigger`` frames, replayed after every reconnect); an observer
adapter could feed the same table later. Every method runs on the bridge's own event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

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
    """The active bindings of one trigger type.

    After the engine link drops, every binding is marked stale: the engine parks them and replays the complete
    set when the trigger type is registered again, which clears the mark. Reconciliation against the engine's
    own list removes whatever it no longer holds (a stale binding nobody replayed, or an unbind this bridge
    missed).
    """

    def __init__(self, trigger_type: str) -> None:
        self.trigger_type = trigger_type
        self._bindings: dict[str, Binding] = {}
        self._stale: set[str] = set()
        self._non_empty = asyncio.Event()
        self._version = 0
        self._snapshot: tuple[Binding, ...] = ()

    def __len__(self) -> int:
        return len(self._bindings)

    def __contains__(self, binding_id: object) -> bool:
        return binding_id in self._bindings

    def get(self, binding_id: str) -> Binding | None:
        return self._bindings.get(binding_id)

    def upsert(self, binding: Binding) -> Change:
        self._stale.discard(binding.id)
        previous = self._bindings.get(binding.id)
        if previous == binding:
            return "unchanged"
        self._bindings[binding.id] = binding
        self._changed()
        return "added" if previous is None else "updated"

    def remove(self, binding_id: str) -> Binding | None:
        self._stale.discard(binding_id)
        binding = self._bindings.pop(binding_id, None)
        if binding is not None:
            self._changed()
        return binding

    def mark_stale(self) -> None:
        self._stale = set(self._bindings)

    def stale_ids(self) -> set[str]:
        return set(self._stale)

    def reconcile(self, live_ids: set[str]) -> list[Binding]:
        """Drop every binding the engine no longer lists; return what was dropped."""
        gone = [b for bid, b in self._bindings.items() if bid not in live_ids]
        for binding in gone:
            self.remove(binding.id)
        return gone

    def snapshot(self) -> tuple[Binding, ...]:
        """The current bindings, in the order they were added (cached until the next change)."""
        return self._snapshot

    async def wait_non_empty(self) -> None:
        if not self._bindings:
            await self._non_empty.wait()

    def _changed(self) -> None:
        self._version += 1
        self._snapshot = tuple(self._bindings.values())
        if self._bindings:
            self._non_empty.set()
        else:
            self._non_empty.clear()

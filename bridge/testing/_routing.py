"""The routing of :class:`~bridge.testing.engine.TestEngine`: the frame handlers, the bookkeeping of bindings,
functions and invocations, and the built-in ``engine::*`` functions.

:class:`Router` is mixed into TestEngine, so the engine's frame dispatch calls these handlers as its own
methods. Everything here runs on the engine's loop thread under its lock (see the engine's module docstring).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from bridge.testing._enginestate import (
    DEFAULT_NS,
    Binding,
    Builtin,
    Pending,
    TriggerType,
    Worker,
)

_CONFIG_SUMMARY_CHARS = 80


class Router:
    """The routing state machine; TestEngine provides the attributes declared here."""

    _queues: frozenset[str]  # the queue names enqueue calls may use
    _builtins: dict[str, Builtin]  # the built-in functions by id (the ``_fn_*`` methods below)
    _send: Callable[[Worker, dict[str, Any]], None]  # records a frame and queues it on the worker's connection

    # ------------------------------------------------------------------ routing (loop thread, under the lock)

    def _drop_worker(self, w: Worker) -> None:
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

    def _park(self, type_id: str, provider: Worker) -> None:
        for binding in provider.state.by_type.get(type_id, {}).values():
            if binding.provider is provider:
                binding.provider = None

    def _remove_binding(self, binding: Binding) -> None:
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

    def _deliver(self, binding: Binding, provider: Worker) -> None:
        frame: dict[str, Any] = {
            "type": "registertrigger",
            "id": binding.id,
            "trigger_type": binding.trigger_type,
            "function_id": binding.function_id,
            "config": binding.config,
        }
        if binding.metadata is not None:
            frame["metadata"] = binding.metadata
        if binding.namespace and binding.namespace != DEFAULT_NS:
            frame["namespace"] = binding.namespace
        binding.provider = provider
        self._send(provider, frame)

    def _reply(
        self, caller: Worker, invocation_id: str, function_id: str, *, result: Any = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        frame: dict[str, Any] = {"type": "invocationresult", "invocation_id": invocation_id, "function_id": function_id}
        if error is not None:
            frame["error"] = error
        else:
            frame["result"] = result
        self._send(caller, frame)

    def _on_register_trigger_type(self, w: Worker, d: dict[str, Any]) -> None:
        type_id = d.get("id")
        if not isinstance(type_id, str):
            return
        st = w.state
        previous = st.trigger_types.get(type_id)
        if previous is not None and previous.provider is not w:
            # The newest provider wins; the older one is told nothing.
            previous.provider.provides.discard(type_id)
        st.trigger_types[type_id] = TriggerType(
            type_id, d.get("description"), d.get("trigger_request_format"), d.get("call_request_format"), w
        )
        w.provides.add(type_id)
        for binding in st.by_type.get(type_id, {}).values():
            if binding.error is None:  # a binding its provider rejected stays off until re-registered
                self._deliver(binding, w)

    def _on_unregister_trigger_type(self, w: Worker, d: dict[str, Any]) -> None:
        type_id = d.get("id")
        tt = w.state.trigger_types.get(type_id) if isinstance(type_id, str) else None
        if tt is not None and tt.provider is w:
            del w.state.trigger_types[tt.id]
            w.provides.discard(tt.id)
            self._park(tt.id, w)

    def _on_register_function(self, w: Worker, d: dict[str, Any]) -> None:
        function_id = d.get("id")
        if isinstance(function_id, str):
            self._claim_function(w, function_id, d)

    def _claim_function(self, w: Worker, function_id: str, message: dict[str, Any]) -> None:
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

    def _on_unregister_function(self, w: Worker, d: dict[str, Any]) -> None:
        function_id = d.get("id")
        if isinstance(function_id, str) and w.functions.pop(function_id, None) is not None:
            key = (w.namespace, function_id)
            if w.state.functions.get(key) is w:
                del w.state.functions[key]

    def _on_register_trigger(self, w: Worker, d: dict[str, Any]) -> None:
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
        binding = Binding(
            trigger_id, type_id, function_id, d.get("config"), d.get("metadata"),
            namespace if isinstance(namespace, str) else None, w,
        )
        st.bindings[trigger_id] = binding
        st.by_type.setdefault(type_id, {})[trigger_id] = binding
        w.bindings.add(trigger_id)
        tt = st.trigger_types.get(type_id)
        if tt is not None:
            self._deliver(binding, tt.provider)

    def _forget_binding(self, binding: Binding) -> None:
        """Drop a binding from the tables without telling its provider (it is about to be replaced)."""
        st = binding.owner.state
        st.bindings.pop(binding.id, None)
        st.by_type.get(binding.trigger_type, {}).pop(binding.id, None)
        binding.owner.bindings.discard(binding.id)

    def _on_unregister_trigger(self, w: Worker, d: dict[str, Any]) -> None:
        trigger_id = d.get("id")
        binding = w.state.bindings.get(trigger_id) if isinstance(trigger_id, str) else None
        if binding is not None:
            self._remove_binding(binding)

    def _on_registration_result(self, w: Worker, d: dict[str, Any]) -> None:
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

    def _on_reattach(self, w: Worker, d: dict[str, Any]) -> None:
        # A reconnecting SDK retires its previous connection before replaying, if the engine still holds it.
        previous = w.state.workers.get(d.get("previous_worker_id"))  # type: ignore[arg-type]
        if previous is not None and previous is not w and previous.reattach_token == d.get("reattach_token"):
            self._drop_worker(previous)
            previous.ws.transport.abort()

    def _on_invoke(self, w: Worker, d: dict[str, Any]) -> None:
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
        namespace = d.get("namespace") or DEFAULT_NS
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
        st.pending[engine_id] = Pending(w, invocation_id, target, function_id)
        target.inflight.add(engine_id)
        frame["invocation_id"] = engine_id
        self._send(target, frame)

    def _enqueue(
        self, w: Worker, action: Any, function_id: str, invocation_id: str | None, target: Worker | None,
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

    def _on_result(self, w: Worker, d: dict[str, Any]) -> None:
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
        self, w: Worker, builtin: Builtin, function_id: str, data: Any, invocation_id: str | None
    ) -> None:
        try:
            result = builtin(w, data)
        except Exception as exc:
            if invocation_id is not None:
                self._reply(w, invocation_id, function_id, error={"code": "invocation_failed", "message": str(exc)})
            return
        if invocation_id is not None:
            self._reply(w, invocation_id, function_id, result=result)

    def _fn_register_worker(self, w: Worker, data: Any) -> None:
        if not isinstance(data, dict):
            return
        w.metadata = data
        name = data.get("name")
        w.name = name if isinstance(name, str) else None
        namespace = data.get("namespace") or DEFAULT_NS
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

    def _fn_registered_triggers(self, w: Worker, data: Any) -> dict[str, Any]:
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

    def _fn_triggers(self, w: Worker, _data: Any) -> dict[str, Any]:
        return {"triggers": [
            {
                "id": t.id, "description": t.description, "trigger_request_format": t.trigger_request_format,
                "call_request_format": t.call_request_format, "worker_id": t.provider.id,
                "worker_name": t.provider.name,
            }
            for t in sorted(w.state.trigger_types.values(), key=lambda t: t.id)
        ]}

    def _fn_workers(self, w: Worker, _data: Any) -> dict[str, Any]:
        return {"workers": [
            {
                "id": o.id, "name": o.name, "namespace": o.namespace, "functions": sorted(o.functions),
                "trigger_types": sorted(o.provides),
            }
            for o in w.state.workers.values()
        ]}

    def _fn_functions(self, w: Worker, _data: Any) -> dict[str, Any]:
        return {"functions": [
            {"function_id": fid, "namespace": ns, "worker_id": o.id, "worker_name": o.name}
            for (ns, fid), o in sorted(w.state.functions.items())
        ]}


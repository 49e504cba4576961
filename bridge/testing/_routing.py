"""The routing of :class:`~bridge.testing.engine.TestEngine`: the frame handlers and the bookkeeping of
connections, functions, trigger types, bindings and invocations, as the engine 0.23 source does it
(``engine/src/engine/mod.rs``, ``engine/src/trigger.rs``).

:class:`Router` is mixed into TestEngine, so the engine's frame dispatch calls these handlers as its own
methods. Everything here runs on the engine's loop thread under its lock (see the engine's module docstring).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from bridge.testing._enginestate import (
    DEFAULT_NS,
    Binding,
    Invocation,
    State,
    TriggerType,
    TypeKey,
    Worker,
)
from bridge.testing._observe import Observing

# Frames whose effect depends on the connection's namespace: held until engine::workers::register fixes it.
_HELD = frozenset({
    "registerfunction", "registerservice", "unregisterfunction", "registertrigger", "unregistertrigger",
    "registertriggertype", "unregistertriggertype", "observe", "unobserve",
})


def _blank(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def _blank_message(field: str) -> str:
    return f"`{field}` is empty: it was named and left blank. Give it a name, or omit it to use `{DEFAULT_NS}`."


class Router(Observing):
    """The routing state machine; TestEngine provides the attributes declared here."""

    _observe: bool  # the engine announces observe.v1 (the observe handlers of the Observing mixin apply)
    _queues: frozenset[str]  # the queue names enqueue calls may use
    _handlers: dict[str, Callable[[Worker, dict[str, Any]], None]]  # frame type -> handler
    _send: Callable[[Worker, dict[str, Any]], None]  # records a frame and queues it on the worker's connection
    _run_builtin: Callable[[Worker, str, Any, str | None], bool]  # True when function_id is a built-in

    # ------------------------------------------------------------------ the namespace hold

    def _held(self, w: Worker, d: dict[str, Any]) -> bool:
        """Queue a registration sent before the connection's namespace is known; True when queued."""
        if w.held is not None and d.get("type") in _HELD:
            w.held.append(d)
            return True
        return False

    def _fix_namespace(self, w: Worker, namespace: str) -> None:
        """Pin the connection to ``namespace`` (once) and apply what it sent before, in arrival order."""
        held, w.held = w.held, None
        if w.grace is not None:
            w.grace.cancel()
            w.grace = None
        if held is None:
            return
        w.namespace = namespace
        for d in held:
            self._handlers[d["type"]](w, d)

    # ------------------------------------------------------------------ disconnects

    def _drop_worker(self, w: Worker) -> None:
        """The engine's cleanup of a closed connection (``cleanup_worker``)."""
        if not w.connected:
            return
        w.connected = False
        if w.grace is not None:
            w.grace.cancel()
            w.grace = None
        w.held = None  # registrations still held die with the connection
        st = w.state
        st.workers.pop(w.id, None)
        for function_id in w.functions:
            if st.functions.get((w.namespace, function_id)) is w:
                del st.functions[(w.namespace, function_id)]
        if self._observe:
            self._observe_worker_dropped(w)
        for invocation_id in sorted(w.invocations):
            call = st.invocations.pop(invocation_id, None)
            if call is None:
                continue
            call.caller.invocations.discard(invocation_id)
            call.target.invocations.discard(invocation_id)
            if call.reply:
                self._reply(call, invocation_id, error={"code": "invocation_stopped", "message": "Invocation stopped"})
        w.invocations.clear()
        # The bindings it made: gone, and their providers told.
        for binding in [b for b in st.bindings.values() if b.owner is w]:
            del st.bindings[binding.id]
            provider = st.trigger_types.get(binding.provider_key)
            if provider is not None:
                self._send_unbind(binding, provider.provider)
        for trigger_id in [i for i, b in st.pending.items() if b.owner is w]:
            del st.pending[trigger_id]
        # The types it provided: their bindings fall back to another provider, else park.
        for key in sorted(w.provides):
            tt = st.trigger_types.get(key)
            if tt is None or tt.provider is not w:
                continue
            del st.trigger_types[key]
            for binding in [b for b in st.bindings.values() if b.provider_key == key]:
                del st.bindings[binding.id]
                if not self._activate(st, binding):
                    st.pending[binding.id] = binding
        w.provides.clear()
        if w.name is not None and st.worker_names.get((w.namespace, w.name)) is w:
            del st.worker_names[(w.namespace, w.name)]

    # ------------------------------------------------------------------ trigger types and bindings

    def _resolve(self, st: State, binding: Binding) -> TypeKey | None:
        """``trigger_namespace`` strictly if named; else the binder's home namespace, then ``default``."""
        if binding.trigger_namespace is not None:
            key = (binding.trigger_namespace, binding.trigger_type)
            return key if key in st.trigger_types else None
        for namespace in (binding.home_namespace, DEFAULT_NS):
            if (namespace, binding.trigger_type) in st.trigger_types:
                return (namespace, binding.trigger_type)
        return None

    def _activate(self, st: State, binding: Binding) -> bool:
        """Send a binding to the provider it resolves to and make it live; False if nothing provides it."""
        key = self._resolve(st, binding)
        if key is None:
            return False
        binding.provider_namespace = key[0]
        binding.error = None
        self._send_bind(binding, st.trigger_types[key].provider)
        st.bindings[binding.id] = binding
        return True

    def _send_bind(self, binding: Binding, provider: Worker) -> None:
        frame: dict[str, Any] = {
            "type": "registertrigger", "id": binding.id, "trigger_type": binding.trigger_type,
            "function_id": binding.function_id, "config": binding.config,
        }
        if binding.metadata is not None:
            frame["metadata"] = binding.metadata
        if binding.namespace != DEFAULT_NS:
            frame["namespace"] = binding.namespace
        if binding.provider_namespace != DEFAULT_NS:
            frame["trigger_namespace"] = binding.provider_namespace
        self._send(provider, frame)

    def _send_unbind(self, binding: Binding, provider: Worker) -> None:
        self._send(provider, {"type": "unregistertrigger", "id": binding.id, "trigger_type": binding.trigger_type})

    def _on_register_trigger_type(self, w: Worker, d: dict[str, Any]) -> None:
        if _blank(d.get("namespace")):
            return  # refused, and no acknowledgement exists to say so
        namespace = d.get("namespace") or w.namespace
        type_id = d["id"]
        key = (namespace, type_id)
        st = w.state
        for trigger_id in [i for i, b in st.pending.items() if not b.owner.connected]:
            del st.pending[trigger_id]
        previous = st.trigger_types.get(key)
        if previous is not None and previous.provider is not w:
            previous.provider.provides.discard(key)  # the latest wins; the older provider is told nothing
        st.trigger_types[key] = TriggerType(
            type_id, namespace, d["description"], d.get("trigger_request_format"), d.get("call_request_format"), w
        )
        w.provides.add(key)
        for binding in [b for b in st.bindings.values() if b.provider_key == key]:
            self._send_bind(binding, w)
        for binding in [b for b in st.pending.values() if b.trigger_type == type_id]:
            if self._resolve(st, binding) == key:
                del st.pending[binding.id]
                self._activate(st, binding)
        if namespace != DEFAULT_NS:
            self._rehome(st, key, w)

    def _rehome(self, st: State, key: TypeKey, provider: Worker) -> None:
        """Claim back bindings of this namespace that fell back to ``default`` before it had a provider."""
        for binding in list(st.bindings.values()):
            if (binding.trigger_type == key[1] and binding.home_namespace == key[0]
                    and binding.trigger_namespace is None and binding.provider_namespace != key[0]):
                old = st.trigger_types.get(binding.provider_key)
                if old is not None:
                    self._send_unbind(binding, old.provider)
                binding.provider_namespace = key[0]
                self._send_bind(binding, provider)

    def _on_register_trigger(self, w: Worker, d: dict[str, Any]) -> None:
        for field in ("namespace", "trigger_namespace"):
            if _blank(d.get(field)):
                self._send(w, {
                    "type": "triggerregistrationresult", "id": d["id"], "trigger_type": d["trigger_type"],
                    "function_id": d["function_id"],
                    "error": {"code": "INVALID_NAMESPACE", "message": _blank_message(field)},
                })
                return
        st = w.state
        binding = Binding(
            d["id"], d["trigger_type"], d["function_id"], d["config"], d.get("metadata"),
            d.get("namespace") or DEFAULT_NS, d.get("trigger_namespace"), w.namespace, w,
        )
        if self._observe and self._shim_trigger(st, binding):
            return  # the legacy shim made it an observer of the function that took the type over
        # An upsert just overwrites: a previous provider of this id is told nothing.
        if self._activate(st, binding):
            st.pending.pop(binding.id, None)
        else:
            st.pending[binding.id] = binding  # as the engine does, a live entry of this id stays live

    def _on_unregister_trigger(self, w: Worker, d: dict[str, Any]) -> None:
        st = w.state
        if self._observe and self._shim_unbind(st, d["id"]):
            return
        binding = st.bindings.pop(d["id"], None)
        st.pending.pop(d["id"], None)
        if binding is not None:
            provider = st.trigger_types.get(binding.provider_key)
            if provider is not None:
                self._send_unbind(binding, provider.provider)

    def _on_registration_result(self, w: Worker, d: dict[str, Any]) -> None:
        st = w.state
        binding = st.bindings.get(d["id"])
        if binding is None or d.get("error") is None:
            return
        provider = st.trigger_types.get(binding.provider_key)
        if provider is None or provider.provider is not w:
            return  # only the binding's provider may report on it
        del st.bindings[binding.id]
        binding.error = d["error"]
        st.pending[binding.id] = binding  # disabled until the type is registered again
        if binding.owner.connected:
            self._send(binding.owner, {
                "type": "triggerregistrationresult", "id": binding.id, "trigger_type": binding.trigger_type,
                "function_id": binding.function_id, "error": binding.error,
            })

    # ------------------------------------------------------------------ functions

    def _on_register_function(self, w: Worker, d: dict[str, Any]) -> None:
        function_id = d["id"]
        key = (w.namespace, function_id)
        owner = w.state.functions.get(key)
        refused_by = None
        if function_id.startswith("engine::") and w.namespace != DEFAULT_NS:
            refused_by = ""  # engine::* is reserved to the engine, which lives in default
        elif owner is not None and owner is not w and owner.connected:
            refused_by = owner.id
        if refused_by is not None:
            self._send(w, {
                "type": "registrationrejected", "code": "FUNCTION_NAMESPACE_CONFLICT", "namespace": w.namespace,
                "function_id": function_id, "owner_worker_id": refused_by,
            })
            return
        w.state.functions[key] = w
        w.functions[function_id] = d
        if self._observe:
            self._observe_function_registered(w, d)

    def _on_unregister_function(self, w: Worker, d: dict[str, Any]) -> None:
        if w.functions.pop(d["id"], None) is not None and w.state.functions.get((w.namespace, d["id"])) is w:
            del w.state.functions[(w.namespace, d["id"])]

    def _on_reattach(self, w: Worker, d: dict[str, Any]) -> None:
        # A reconnecting SDK retires its previous connection before replaying, if the engine still holds it.
        previous = w.state.workers.get(d["previous_worker_id"])
        if previous is not None and previous is not w and previous.reattach_token == d.get("reattach_token"):
            self._drop_worker(previous)
            previous.ws.transport.abort()

    # ------------------------------------------------------------------ invocations

    def _on_invoke(self, w: Worker, d: dict[str, Any]) -> None:
        if self._observe and d.get("activation") is not None:
            routed = self._owner_call(w, d)  # an owner's delivery to one of its observers
            if routed is None:
                return
            d = routed
        function_id, invocation_id, namespace = d["function_id"], d.get("invocation_id"), d.get("namespace")
        action = d.get("action")
        if _blank(namespace):
            if invocation_id is not None:
                self._send(w, {
                    "type": "invocationresult", "invocation_id": invocation_id, "function_id": function_id,
                    "error": {"code": "INVALID_NAMESPACE", "message": _blank_message("namespace")},
                })
            return
        namespace = namespace or DEFAULT_NS
        if action is not None and action["type"] == "enqueue":
            self._enqueue(w, d, namespace, action["queue"])
            return
        reply_id = invocation_id if action is None else None  # void: no reply, whatever the caller sent
        data = d["data"]
        if isinstance(data, dict):
            data = {**data, "_caller_worker_id": w.id}
        if namespace == DEFAULT_NS and self._run_builtin(w, function_id, data, reply_id):
            return
        st = w.state
        target = st.functions.get((namespace, function_id))
        call = Invocation(w, reply_id is not None, target or w, function_id, d.get("traceparent"), d.get("baggage"))
        if target is None:
            if reply_id is not None:
                self._reply(call, reply_id, error={"code": "function_not_found", "message": self._not_found(
                    st, function_id, namespace
                )})
            return
        engine_id = reply_id or str(uuid.uuid4())  # the target sees the caller's id; a void call gets one
        st.invocations[engine_id] = call
        target.invocations.add(engine_id)
        if call.reply:
            w.invocations.add(engine_id)
        frame: dict[str, Any] = {
            "type": "invokefunction", "invocation_id": engine_id, "function_id": function_id, "data": data,
        }
        for key in ("traceparent", "baggage", "metadata", "activation"):
            if d.get(key) is not None:
                frame[key] = d[key]
        self._send(target, frame)

    @staticmethod
    def _not_found(st: State, function_id: str, namespace: str) -> str:
        known = sorted(ns for ns, fid in st.functions if fid == function_id)
        hint = f" It is registered in namespace(s): {', '.join(known)}." if known else ""
        return f"Function {function_id} not found in namespace {namespace}.{hint}"

    def _enqueue(self, w: Worker, d: dict[str, Any], namespace: str, queue: str) -> None:
        invocation_id, function_id = d.get("invocation_id"), d["function_id"]
        call = Invocation(w, True, w, function_id, d.get("traceparent"), d.get("baggage"))
        if queue not in self._queues:
            if invocation_id is not None:
                self._reply(call, invocation_id, error={
                    "code": "enqueue_error", "message": f"No queue provider is installed for queue {queue!r}.",
                })
            return
        if invocation_id is not None:
            self._reply(call, invocation_id, result={"messageReceiptId": str(uuid.uuid4())})
        target = w.state.functions.get((namespace, function_id))
        if target is not None:
            # The queue worker delivers later, as a call of its own whose outcome it keeps to itself.
            data = d["data"]
            self._send(target, {
                "type": "invokefunction", "invocation_id": str(uuid.uuid4()), "function_id": function_id,
                "data": {**data, "_caller_worker_id": w.id} if isinstance(data, dict) else data,
            })

    def _on_result(self, w: Worker, d: dict[str, Any]) -> None:
        invocation_id = d["invocation_id"]
        w.invocations.discard(invocation_id)
        call = w.state.invocations.pop(invocation_id, None)
        if call is None:
            return  # its caller is gone, or it was a void call
        call.caller.invocations.discard(invocation_id)
        call.target.invocations.discard(invocation_id)
        if call.reply:
            if d.get("error") is not None:
                self._reply(call, invocation_id, error=d["error"])
            else:
                self._reply(call, invocation_id, result=d.get("result"))

    def _reply(
        self, call: Invocation, invocation_id: str, *, result: Any = None, error: dict[str, Any] | None = None
    ) -> None:
        frame: dict[str, Any] = {
            "type": "invocationresult", "invocation_id": invocation_id, "function_id": call.function_id,
        }
        if error is not None:
            frame["error"] = error
        elif result is not None:
            frame["result"] = result
        if call.traceparent is not None:
            frame["traceparent"] = call.traceparent
        if call.baggage is not None:
            frame["baggage"] = call.baggage
        self._send(call.caller, frame)

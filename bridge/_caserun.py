"""Running `bridge test` cases: each goes through the steps live delivery takes for one binding
(``bridge._prepare``), then its result is compared with the case's expectation.

A bind config's condition function is the one step that needs the engine: it is not called, and the result
says so.
"""

from __future__ import annotations

import difflib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from bridge._prepare import prepare_payload
from bridge.bindings import Binding
from bridge.casetest import Case
from bridge.config import BridgeConfig, SourceConfig
from bridge.config._yamllimits import has_surrogate
from bridge.config.schemas import BindValidator, PayloadValidator
from bridge.errors import EventError
from bridge.render import event_view
from bridge.templates import CompiledTree, CompiledWhen, compile_tree, compile_when, make_context

__all__ = ["CaseResult", "Runner", "contains", "same"]

_MISSING: Any = object()


@dataclass
class CaseResult:
    """What one case produced and how it compares with its expectation (``failures`` empty: it passed)."""

    case: Case
    when: bool | None = None  # None: the filter did not run to an answer (an error)
    payload: Any = _MISSING  # _MISSING: filtered out, or an error
    error_code: str | None = None
    error_message: str | None = None
    failures: list[str] = field(default_factory=list)  # each a readable block of text
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def has_payload(self) -> bool:
        return self.payload is not _MISSING


class _Compiled:
    """A source's compiled templates and payload check, as a Dispatcher holds them."""

    def __init__(self, source: SourceConfig) -> None:
        self.source = source
        self.when: CompiledWhen | None = compile_when(source.when) if source.when else None
        self.payload: CompiledTree | None = (
            compile_tree(source.payload, root=("payload",)) if source.payload is not None else None
        )
        self.check = PayloadValidator(source.payload_schema) if source.payload_schema else None
        self.binder = BindValidator(source.id, source.bind_schema)


class Runner:
    """Runs cases against one loaded bridge.yaml (every source compiled once)."""

    def __init__(self, config: BridgeConfig) -> None:
        self._config = config
        self._compiled: dict[str, _Compiled] = {}

    def _for(self, source_id: str) -> _Compiled:
        if source_id not in self._compiled:
            self._compiled[source_id] = _Compiled(self._config.source(source_id))
        return self._compiled[source_id]

    def run(self, case: Case) -> CaseResult:
        started = time.perf_counter()
        result = CaseResult(case)
        compiled = self._for(case.source)
        config = compiled.binder.check(case.config)  # checked when the file was read: only defaults apply here
        binding = Binding(id=f"test:{case.index}", trigger_type=case.source,
                          function_id=case.binding.get("function_id", "bridge::test"),
                          namespace=case.binding.get("namespace"), config=config,
                          metadata=case.binding.get("metadata", {}))
        view = event_view(compiled.source, case.event)
        ctx = make_context(view, config, binding.template_view(), {"id": compiled.source.id,
                                                                    "kind": compiled.source.kind})
        try:
            passed, payload = prepare_payload(ctx, view, compiled.when, compiled.payload, compiled.check)
        except EventError as exc:
            result.error_code, result.error_message = exc.code, str(exc)
            result.when = True if compiled.when is None else _when_alone(compiled.when, ctx)
        else:
            result.when = passed
            if passed:
                result.payload = payload
        if binding.condition_function_id:
            result.notes.append(f"condition {binding.condition_function_id} is not called by `bridge test`; at "
                                "run time the binding gets the event only if it does not return false")
        if case.expect is None:
            result.failures.append("no expectation yet; `bridge test --update` records what the source produces")
        else:
            result.failures.extend(_compare(case.expect, result))
        result.seconds = time.perf_counter() - started
        return result


def _when_alone(when: CompiledWhen, ctx: dict[str, Any]) -> bool | None:
    """The filter's answer when the step that failed may have been the payload; None if the filter failed."""
    try:
        return when.evaluate(ctx)
    except EventError:
        return None


# ---------------------------------------------------------------------------------------------------------
# comparing


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers by value (1 == 1.0), but true is not 1 and key order does not matter."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def contains(actual: Any, part: Any) -> bool:
    """Every key of a mapping ``part`` is in ``actual`` with a value containing ``part``'s; else equal."""
    if isinstance(part, dict):
        return isinstance(actual, dict) and all(k in actual and contains(actual[k], v) for k, v in part.items())
    return same(actual, part)


def _projected(actual: Any, part: Any) -> Any:
    """``actual`` cut down to the keys of ``part``: the diff of a payload_contains shows only what it checks."""
    if isinstance(part, dict) and isinstance(actual, dict):
        return {k: _projected(actual[k], v) for k, v in part.items() if k in actual}
    return actual


def pretty(value: Any) -> str:
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    # a lone "\ud800" from the event or a template is printable only as an escape
    return json.dumps(value, indent=2, sort_keys=True, default=str) if has_surrogate(text) else text


def _diff(expected: Any, actual: Any) -> str:
    lines = difflib.unified_diff(pretty(expected).splitlines(), pretty(actual).splitlines(),
                                 "expected", "actual", lineterm="", n=3)
    return "\n".join(lines)


def _outcome(result: CaseResult) -> str:
    if result.error_code is not None:
        return f"{result.error_code}: {result.error_message}"
    if not result.has_payload:
        return "no payload: when is false, so the binding skips this event"
    return "a payload:\n" + pretty(result.payload)


def _compare(expect: dict[str, Any], result: CaseResult) -> list[str]:
    failures = []
    if "when" in expect and expect["when"] != result.when:
        got = "no answer (the filter failed: " + str(result.error_message) + ")" if result.when is None \
            else str(result.when).lower()
        failures.append(f"when: expected {str(expect['when']).lower()}, got {got}")
    wants_error = "error" in expect or "error_contains" in expect
    if wants_error:
        code, part = expect.get("error"), expect.get("error_contains")
        if result.error_code is None:
            failures.append(f"error: expected {code or 'an error'}, got {_outcome(result)}")
        elif code is not None and code != result.error_code:
            failures.append(f"error: expected {code}, got {_outcome(result)}")
        elif part is not None and part not in str(result.error_message):
            failures.append(f"error: expected a message containing {part!r}, got {_outcome(result)}")
    for key in ("payload", "payload_contains"):
        if key not in expect:
            continue
        if not result.has_payload:
            failures.append(f"{key}: expected a payload, got {_outcome(result)}")
        elif key == "payload" and not same(expect[key], result.payload):
            failures.append(f"payload differs (- expected, + actual):\n{_diff(expect[key], result.payload)}")
        elif key == "payload_contains" and not contains(result.payload, expect[key]):
            shown = _projected(result.payload, expect[key])
            failures.append(f"payload_contains: the payload does not contain the expected part "
                            f"(- expected, + actual):\n{_diff(expect[key], shown)}")
    if not wants_error and result.error_code is not None and not failures:
        failures.append(f"unexpected {_outcome(result)}")
    return failures

"""`bridge render`: one event and one bind config through a source's templates, with no server at all.

The steps are the dispatcher's for one binding (bind config checked and defaulted, ``when``, payload, then
``payload_schema``), so what it prints is what a function would receive. The condition function of a bind
config is the one step that needs the engine: it is not called, and the output says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from jsonschema import Draft202012Validator

from bridge.bindings import Binding
from bridge.config import BridgeConfig, SourceConfig
from bridge.config._yamllimits import has_surrogate
from bridge.config.diagnostics import did_you_mean, json_type
from bridge.config.schemas import BindValidator, PayloadValidator, violations
from bridge.errors import BindConfigError, PayloadSchemaError, RenderError
from bridge.sources import spec_of
from bridge.templates import TemplateCompileError, compile_tree, compile_when, make_context

__all__ = ["Rendered", "event_view", "render_event", "run"]

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2

# JSON types as a sentence names them (JSON has one number type; an object is handled before).
_ARTICLED = {"array": "an array", "string": "a string", "boolean": "a boolean", "integer": "a number",
             "number": "a number"}


@dataclass(frozen=True)
class Rendered:
    """What one event becomes for one binding."""

    when: bool | None  # None: the source has no `when`
    payload: Any
    schema_violations: tuple[str, ...] | None  # None: no payload_schema; () : the payload satisfies it
    config: dict[str, Any]  # the bind config with defaults applied


def event_view(source: SourceConfig, fields: dict[str, Any]) -> dict[str, Any]:
    """The ``event`` templates see: ``fields`` with ``source`` and a kind-shaped ``id`` filled in if absent."""
    view = dict(fields)
    view.setdefault("source", source.id)
    if "id" not in view:
        view["id"] = _default_id(source, view)
    return {"id": view.pop("id"), "source": view.pop("source"), **view}


def _default_id(source: SourceConfig, event: dict[str, Any]) -> str:
    return spec_of(source).render_id(event) or f"render:{source.id}"


def render_event(source: SourceConfig, event: dict[str, Any], bind_config: Any) -> Rendered:
    """Render ``event`` (an :func:`event_view`) for a binding with ``bind_config``.

    Raises BindConfigError (the config breaks bind_schema) or RenderError (``when`` or the payload failed).
    """
    config = BindValidator(source.id, source.bind_schema).check(bind_config)
    binding = Binding(id="render", trigger_type=source.id, function_id="bridge::render", namespace=None,
                      config=config)
    ctx = make_context(event, config, binding.template_view(), {"id": source.id, "kind": source.kind})
    when = compile_when(source.when).evaluate(ctx) if source.when else None
    if source.payload is None:
        payload: Any = event
    else:
        payload = compile_tree(source.payload, root=("payload",)).render(ctx)
    found: tuple[str, ...] | None = None
    if source.payload_schema is not None:
        try:
            PayloadValidator(source.payload_schema).check(payload)
            found = ()
        except PayloadSchemaError:
            validator = Draft202012Validator(source.payload_schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
            found = tuple(violations(validator, payload))
    return Rendered(when=when, payload=payload, schema_violations=found, config=config)


# ---------------------------------------------------------------------------------------------------------
# the command


def run(
    config: BridgeConfig,
    source_id: str,
    event_arg: str,
    config_arg: str | None,
    *,
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
) -> int:
    """`bridge render`: the payload on stdout, everything else on stderr; returns the exit code."""

    def fail(message: str, code: int = EXIT_INVALID) -> int:
        print(f"bridge: {message}", file=stderr)
        return code

    try:
        source = config.source(source_id)
    except KeyError:
        names = [s.id for s in config.sources]
        close = did_you_mean(source_id, names)
        hint = f"{close} " if close else ""
        return fail(f"no source {source_id!r} in {config.path.name}; {hint}sources: {', '.join(names)}", EXIT_USAGE)
    label = "the event on stdin" if event_arg == "-" else f"event file {event_arg}"
    try:
        text = stdin.read() if event_arg == "-" else Path(event_arg).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return fail(f"cannot read {label}: {reason}", EXIT_USAGE)
    fields_doc = ", ".join(name for name, _, _ in spec_of(source).event_fields if name not in ("id", "source"))
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        return fail(f"{label} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")
    except (ValueError, RecursionError):  # an integer beyond int()'s limit; nesting beyond the stack
        return fail(f"{label} holds a number too large or nesting too deep to read")
    if not isinstance(fields, dict):
        return fail(f"{label} must be a JSON object of the {source.kind} event fields ({fields_doc}), "
                    f"not {_ARTICLED.get(json_type(fields), json_type(fields))}")
    try:
        bind_config = json.loads(config_arg) if config_arg is not None else {}
    except json.JSONDecodeError as exc:
        return fail(f"--config is not valid JSON: {exc.msg} (column {exc.colno})")
    except (ValueError, RecursionError):
        return fail("--config holds a number too large or nesting too deep to read")
    bind_validator = BindValidator(source.id, source.bind_schema)
    validator = Draft202012Validator(bind_validator.advertised, format_checker=Draft202012Validator.FORMAT_CHECKER)
    found = violations(validator, bind_config)
    if found:
        lines = "\n".join(f"  {v}" for v in found)
        return fail(f"the bind config does not match the bind_schema of {source.id}:\n{lines}")
    event = event_view(source, fields)
    _note_fields(source, event, stderr)
    try:
        result = render_event(source, event, bind_config)
    except (RenderError, TemplateCompileError) as exc:
        return fail(f"render error: {exc}")
    except BindConfigError as exc:  # checked above; kept for a schema the pre-check reads differently
        return fail(str(exc))
    _report(result, stderr)
    text = json.dumps(result.payload, indent=2, ensure_ascii=False)
    if has_surrogate(text):  # a lone "\ud800" from the event or a template: printable only as an escape
        text = json.dumps(result.payload, indent=2)
    print(text, file=stdout)
    return EXIT_INVALID if result.schema_violations else EXIT_OK


def _note_fields(source: SourceConfig, event: dict[str, Any], stderr: TextIO) -> None:
    """Name event fields the templates use but the event lacks, and fields the kind does not have."""
    known = {name for name, _, _ in spec_of(source).event_fields}
    used: set[str] = set()
    try:
        if source.when:
            used |= compile_when(source.when).event_fields()
        if source.payload is not None:
            used |= compile_tree(source.payload).event_fields()
    except TemplateCompileError:
        pass  # a validated config compiles; render reports anything else
    missing = sorted(used - set(event))
    if missing:
        print(f"note: the templates use event field(s) {', '.join(missing)}, which this event lacks", file=stderr)
    unknown = sorted(set(event) - known)
    if unknown:
        print(f"note: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not among the fields of "
              f"{source.kind} events ({', '.join(sorted(known))})", file=stderr)


def _report(result: Rendered, stderr: TextIO) -> None:
    if result.when is None:
        print("when: true (no `when` configured)", file=stderr)
    elif result.when:
        print("when: true", file=stderr)
    else:
        print("when: false (this binding would skip the event; below is the payload it would otherwise get)",
              file=stderr)
    condition = result.config.get("condition_function_id")
    if isinstance(condition, str) and condition:
        print(f"condition: {condition} is not called by `bridge render`; at run time the binding gets the event "
              "only if it does not return false", file=stderr)
    if result.schema_violations is None:
        print("payload_schema: none configured", file=stderr)
    elif not result.schema_violations:
        print("payload_schema: ok", file=stderr)
    else:
        print("payload_schema: violated (at run time this binding's event would be dead-lettered):", file=stderr)
        for line in result.schema_violations:
            print(f"  {line}", file=stderr)

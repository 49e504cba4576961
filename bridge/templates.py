"""The sandboxed Jinja environment and compile/render of template trees (DESIGN.md §2); the extra filters
(tojson, fromjson, b64encode, b64decode, sha256, datetime) are in ``bridge._filters``.

A template tree is any YAML value. A string leaf that is exactly one ``{{ expression }}`` keeps the
expression's native value; any other string leaf containing Jinja syntax renders to a string; everything else
passes through. Everything is compiled once, at load time; rendering never parses.

Deviations from plain Jinja, chosen for JSON events:

- ``a.b`` on a dict looks up the key ``b`` before the dict's methods, so ``event.value.items`` is the
  order's ``items`` list rather than ``dict.items``.
- The environment is the immutable sandbox: templates cannot call ``append``/``update``/``pop`` on the
  event, which is shared by every binding of a fan-out and kept for dead letters.
- ``map``/``select``/dict views returned by a lone expression become lists (Jinja returns generators).
- Renders are bounded (``bridge._bounds``): operators and calls that could build a huge result are checked
  before they run; loop iterations, calls and checked operations share a budget of steps and of time per
  render (STEP_BUDGET, TIME_BUDGET_S); ``lipsum`` is not offered; and any error inside a render is a
  RenderError. The checked operators are intercepted, which also keeps Jinja from
  folding them at compile time, so compiling never evaluates one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError, TemplateSyntaxError, Undefined, nodes
from jinja2.runtime import Context, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import pass_context

from bridge._bounds import (
    BOUNDED_FILTERS,
    CHECKED_BINOPS,
    MAX_OUTPUT,
    LimitError,
    bounded_join,
    bounded_tojson,
    check_binop,
    check_call,
    check_result,
)
from bridge._filters import FILTERS, SEQUENCES, FilterError
from bridge._keypath import format_path
from bridge.errors import RenderError

__all__ = [
    "CompiledTree",
    "CompiledWhen",
    "TemplateCompileError",
    "TemplateSyntaxProblem",
    "compile_tree",
    "compile_when",
    "make_context",
]

Path = tuple[str | int, ...]
_Render = Callable[[dict[str, Any]], Any]
"""Renders a compiled subtree from a scope: the environment's globals overlaid with the context."""

# ---------------------------------------------------------------------------------------------------------
# problems


@dataclass(frozen=True)
class TemplateSyntaxProblem:
    """One template that does not compile: where in the tree, the 1-based line inside the template, why."""

    path: Path
    line: int
    message: str


class TemplateCompileError(Exception):
    """Templates failed to compile; ``problems`` lists every one of them, in tree order."""

    def __init__(self, problems: list[TemplateSyntaxProblem]) -> None:
        self.problems = problems
        super().__init__(
            "\n".join(f"{format_path(p.path) or '<template>'}: line {p.line}: {p.message}" for p in problems)
        )


# ---------------------------------------------------------------------------------------------------------
# the environment (its extra filters are in bridge._filters)


class _BridgeEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = CHECKED_BINOPS

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Event data wins over dict methods (see the module docstring); it is also the fast path, as the
        # sandbox's getattr only reaches the key after a failed attribute lookup.
        if isinstance(obj, dict):
            try:
                return obj[attribute]
            except KeyError:
                pass
        return super().getattr(obj, attribute)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _spend(context)
        check_binop(operator, left, right)
        result = super().call_binop(context, operator, left, right)
        return check_result(operator, result) if operator == "%" else result

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _spend(__context)
        args = check_call(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


STEP_BUDGET = 1_000_000
"""Loop iterations, calls and checked operations one render may run, all together (nested loops multiply)."""
TIME_BUDGET_S = 0.5
"""How much CPU time a render may spend running loops, calls and checked operations after its first one. Each
capped operation is bounded, but a loop (or a recursive macro, or a long chain of big-number operations) can
repeat one; no sensible template comes near this. CPU time of this thread, not wall time: a render paused by a
busy machine must not become a render error (a dead letter without retry)."""
_LOOP_FILTER = "_bridge_loop_budget"


def _spend(context: Context) -> None:
    """Count one step of the render ``context`` belongs to (a macro shares its template's context)."""
    steps = getattr(context, "_bridge_steps", 0) + 1
    context._bridge_steps = steps  # type: ignore[attr-defined]
    if steps == 1:
        context._bridge_started = time.thread_time()  # type: ignore[attr-defined]
        return
    if steps > STEP_BUDGET:
        raise LimitError(f"the template ran over the limit of {STEP_BUDGET} loop iterations and calls")
    if time.thread_time() - context._bridge_started > TIME_BUDGET_S:  # type: ignore[attr-defined]
        raise LimitError(f"the template ran its loops and calls for over {TIME_BUDGET_S:g} s")


@pass_context
def _loop_budget(context: Context, iterable: Any) -> Any:
    """Wraps the iterable of every ``{% for %}``: each iteration is a step of the render."""
    for item in iterable:
        _spend(context)
        yield item


# optimized=False: no constant folding at compile time. Besides the intercepted operators, folding would run
# filters on constants at compile time, and its pass is cubic in the length of an attribute chain.
_ENV = _BridgeEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True, optimized=False)
_ENV.filters.update(BOUNDED_FILTERS)
_ENV.filters.update(FILTERS)
_ENV.filters["tojson"] = bounded_tojson(FILTERS["tojson"])
_ENV.filters[_LOOP_FILTER] = _loop_budget
_ENV.globals.pop("lipsum", None)
_ENV.concat = bounded_join(_ENV.concat)  # type: ignore[method-assign]
_GLOBAL_VALUES = dict(_ENV.globals)
_GLOBALS = frozenset(_GLOBAL_VALUES)
_BOUNDED_JOINS = {"str_join": bounded_join(str_join), "markup_join": bounded_join(markup_join)}


def _bounded_loops(ast: nodes.Template) -> None:
    for loop in ast.find_all(nodes.For):
        loop.iter = nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None, lineno=loop.iter.lineno)


def _compiled(source: nodes.Template) -> Template:
    """The template of a parsed (and bounded) tree, ready to render."""
    template = _ENV.from_string(source)
    # `~` compiles to the runtime's str_join/markup_join, looked up in the template's module namespace.
    template.root_render_func.__globals__.update(_BOUNDED_JOINS)
    # Contexts are made per render from a scope that already holds the globals (CompiledTree.render); the
    # default ChainMap of template and environment globals is slow to copy for every context.
    template.globals = _GLOBAL_VALUES
    return template


def _describe(exc: Exception) -> str:
    if isinstance(exc, (TemplateError, FilterError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _compile_failure(exc: Exception) -> str:
    if isinstance(exc, (RecursionError, MemoryError, SyntaxError)):  # IndentationError is a SyntaxError
        return f"the template is nested too deeply to compile ({type(exc).__name__}); simplify it"
    return f"the template does not compile: {type(exc).__name__}: {exc}"


def _render_error(path: str, message: str) -> RenderError:
    return RenderError(f"{path}: {message}" if path else message)


# ---------------------------------------------------------------------------------------------------------
# native values


class _NotPlain(Exception):
    """A native value is not plain JSON; ``where`` is filled, innermost last, while the error unwinds."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.where: list[str | int] = []


def _plain(value: Any) -> Any:
    """A plain-JSON copy of a lone expression's value (never aliasing the event), or _NotPlain."""
    kind = type(value)  # exact-type checks first: this runs for every value of every rendered payload
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return _finite(value)
    # Plain dicts and lists are copied here rather than in _plain_dict/_plain_list: one stack frame per level
    # of nesting, so data as deep as strict decoding allows (512 levels) fits Python's recursion limit.
    if kind is list:
        items: list[Any] = []
        for index, item in enumerate(value):
            try:
                items.append(_plain(item))
            except _NotPlain as exc:
                exc.where.append(index)
                raise
        return items
    if kind is dict and all(type(key) is str for key in value):
        fields: dict[str, Any] = {}
        for key, item in value.items():
            try:
                fields[key] = _plain(item)
            except _NotPlain as exc:
                exc.where.append(key)
                raise
        return fields
    if kind is dict:
        return _plain_dict(value)
    if kind is tuple:
        return _plain_list(value)
    if isinstance(value, Mapping):
        return _plain_dict(value)
    if isinstance(value, SEQUENCES):
        return _plain_list(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _finite(float(value))
    if isinstance(value, str):  # Markup and other str subclasses
        return str(value)
    if isinstance(value, Undefined):
        try:
            str(value)
        except Exception as exc:
            raise _NotPlain(_describe(exc)) from exc
        raise _NotPlain("the value is undefined")
    hint = "; use |b64encode" if isinstance(value, (bytes, bytearray)) else ""
    raise _NotPlain(f"the value is a {type(value).__name__}, which is not JSON-serialisable{hint}")


def _finite(value: float) -> float:
    if math.isfinite(value):
        return value
    raise _NotPlain(f"the value is {value}, which JSON cannot represent")


def _plain_dict(value: Mapping[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if type(key) is not str:
            if not isinstance(key, str):
                reason = f"the object has the {type(key).__name__} key {key!r}; JSON object keys are strings"
                raise _NotPlain(reason)
            key = str(key)
        try:
            out[key] = _plain(item)
        except _NotPlain as exc:
            exc.where.append(key)
            raise
    return out


def _plain_list(value: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for index, item in enumerate(value):
        try:
            out.append(_plain(item))
        except _NotPlain as exc:
            exc.where.append(index)
            raise
    return out


def _copy_static(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {k: _copy_static(v) for k, v in value.items()}
    if kind is list:
        return [_copy_static(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------
# compiling


def _has_syntax(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


def _lone_expression(ast: nodes.Template) -> nodes.Expr | None:
    """The expression of a template that is exactly one ``{{ }}`` block (whitespace around allowed).

    Decided on the parsed template, so ``{{ a }}{{ b }}`` (two expressions) is not one, whatever its text.
    """
    if len(ast.body) != 1 or not isinstance(ast.body[0], nodes.Output):
        return None
    parts = [n for n in ast.body[0].nodes if not (isinstance(n, nodes.TemplateData) and not n.data.strip())]
    if len(parts) != 1 or isinstance(parts[0], nodes.TemplateData):
        return None
    return parts[0]


class _Refs:
    """What the compiled templates reference, for uses() and event_fields()."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.event_fields: set[str] = set()

    def add(self, ast: nodes.Template) -> None:
        # Not meta.find_undeclared_variables: it runs Jinja's optimizer, cubic in an attribute chain's length.
        names = ast.find_all(nodes.Name)
        loaded: set[str] = set()
        stored: set[str] = set()
        for name in names:
            (loaded if name.ctx == "load" else stored).add(name.name)
        self.names |= loaded - stored - _GLOBALS
        for attr in ast.find_all(nodes.Getattr):
            if _is_event(attr.node):
                self.event_fields.add(attr.attr)
        for item in ast.find_all(nodes.Getitem):
            if _is_event(item.node) and isinstance(item.arg, nodes.Const) and isinstance(item.arg.value, str):
                self.event_fields.add(item.arg.value)


def _is_event(node: nodes.Node) -> bool:
    return isinstance(node, nodes.Name) and node.name == "event"


def _compile_string(
    source: str, path: Path, problems: list[TemplateSyntaxProblem], refs: _Refs
) -> _Render | None:
    """The renderer of one string leaf; None when it does not compile (the problem is recorded)."""
    try:
        ast = _ENV.parse(source)
        expression = _lone_expression(ast)
        refs.add(ast)  # before compiling: the optimizer may rewrite nodes in place
        _bounded_loops(ast)
        if expression is not None:
            # What Environment.compile_expression builds, from the node already parsed: the expression's
            # value lands in the context as `result` instead of being printed, so it keeps its type.
            body = nodes.Template([nodes.Assign(nodes.Name("result", "store"), expression, lineno=1)], lineno=1)
            body.set_environment(_ENV)
            lookup = _lookup_path(expression)
            if lookup is not None and len(lookup[1]) <= _LAZY_STEPS:
                # A short lookup (`event.payload.id`) compiles only when a render needs Jinja (a key missing),
                # which may be never: `bridge validate` and a start skip Jinja's code generation for most
                # payload leaves. Such an expression always compiles (no filter or test to be unknown).
                return _expression_renderer(_LazyTemplate(body).get, path, lookup)
            template = _compiled(body)
        else:
            template = _compiled(ast)
    except TemplateSyntaxError as exc:  # also TemplateAssertionError: an unknown filter or test
        problems.append(TemplateSyntaxProblem(path, exc.lineno, exc.message or str(exc)))
        return None
    except Exception as exc:
        # Jinja's parser and Python's compiler give up on deep nesting in their own ways (RecursionError,
        # MemoryError, a SyntaxError or IndentationError from the generated code): still a template problem.
        problems.append(TemplateSyntaxProblem(path, 1, _compile_failure(exc)))
        return None
    if expression is not None:
        return _expression_renderer(lambda: template, path, _lookup_path(expression))
    label = format_path(path)

    def render_string(scope: dict[str, Any]) -> Any:
        try:
            parts = []
            size = 0
            for part in template.root_render_func(template.new_context(scope, shared=True)):
                size += len(part)
                if size > MAX_OUTPUT:
                    raise LimitError(f"the rendered text is over the template limit of {MAX_OUTPUT} characters")
                parts.append(part)
            return "".join(parts)
        except Exception as exc:  # any failure of a render is the event's render error, never an escape
            raise _render_error(label, _describe(exc)) from exc

    return render_string


def _lookup_path(expression: nodes.Expr) -> tuple[str, tuple[str | int, ...]] | None:
    """``("event", ("payload", "id"))`` for ``event.payload.id`` or ``event["payload"]["id"]``: an expression that
    is a variable followed by constant keys, attributes or indexes (most payload templates); None otherwise."""
    steps: list[str | int] = []
    node: nodes.Node = expression
    while True:
        if isinstance(node, nodes.Getattr):
            steps.append(node.attr)
            node = node.node
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and type(node.arg.value) in (
            str,
            int,
        ):
            steps.append(node.arg.value)
            node = node.node
        elif isinstance(node, nodes.Name) and node.ctx == "load":
            return node.name, tuple(reversed(steps))
        else:
            return None


_MISSING: Any = object()


_LAZY_STEPS = 64  # longer lookups compile at once: Jinja's code generator recurses once per step


class _LazyTemplate:
    """The template of a lone lookup expression, compiled on first use."""

    def __init__(self, body: nodes.Template) -> None:
        self._body: nodes.Template | None = body
        self._template: Template | None = None

    def get(self) -> Template:
        if self._template is None:
            assert self._body is not None
            self._template, self._body = _compiled(self._body), None
        return self._template


def _expression_renderer(
    template_of: Callable[[], Template], path: Path, lookup: tuple[str, tuple[str | int, ...]] | None
) -> _Render:
    """Renders a lone expression to its native value. A ``lookup`` path is first followed directly through plain
    dicts and lists (what the environment's getattr/getitem return for a key that exists, without a Jinja
    context); anything else (a missing key, another type, a filter) runs the compiled template."""
    label = format_path(path)
    name, steps = lookup if lookup is not None else ("", ())

    def evaluate(scope: dict[str, Any]) -> Any:
        if lookup is not None:
            value = scope.get(name, _MISSING)
            for step in steps:
                kind = type(value)
                if kind is dict:
                    value = value.get(step, _MISSING)
                elif kind is list and type(step) is int and 0 <= step < len(value):
                    value = value[step]
                else:
                    value = _MISSING
                if value is _MISSING:
                    break
            else:
                if value is not _MISSING:
                    return value
        try:
            template = template_of()
            context = template.new_context(scope, shared=True)
            for _ in template.root_render_func(context):
                pass
            return context.vars["result"]
        except Exception as exc:
            raise _render_error(label, _describe(exc)) from exc

    def render_expression(scope: dict[str, Any]) -> Any:
        value = evaluate(scope)
        try:
            return _plain(value)
        except _NotPlain as exc:
            raise _render_error(format_path((*path, *reversed(exc.where))), exc.reason) from None
        except Exception as exc:  # too deep for the copy (RecursionError), out of memory: a render error
            raise _render_error(label, _describe(exc)) from exc

    return render_expression


def _compile_node(
    value: Any, path: Path, problems: list[TemplateSyntaxProblem], refs: _Refs
) -> _Render | None:
    """The renderer of a subtree, or None when the subtree holds no template (it is then copied)."""
    if isinstance(value, str):
        return _compile_string(value, path, problems, refs) if _has_syntax(value) else None
    if isinstance(value, dict):
        entries: list[tuple[Any, _Render | None, Any]] = []
        for key, item in value.items():
            part = key if isinstance(key, (str, int)) and not isinstance(key, bool) else str(key)
            entries.append((key, _compile_node(item, (*path, part), problems, refs), item))
        if all(render is None for _, render, _ in entries):
            return None
        fields = [(k, r if r is not None else _static_renderer(v)) for k, r, v in entries]

        def render_dict(scope: dict[str, Any]) -> Any:
            return {key: render(scope) for key, render in fields}

        return render_dict
    if isinstance(value, list):
        compiled = [_compile_node(item, (*path, i), problems, refs) for i, item in enumerate(value)]
        if all(render is None for render in compiled):
            return None
        elements = [r if r is not None else _static_renderer(v) for r, v in zip(compiled, value, strict=True)]

        def render_list(scope: dict[str, Any]) -> Any:
            return [render(scope) for render in elements]

        return render_list
    return None


def _static_renderer(value: Any) -> _Render:
    if isinstance(value, (dict, list)):
        return lambda _scope: _copy_static(value)
    return lambda _scope: value


# ---------------------------------------------------------------------------------------------------------
# public API


class CompiledTree:
    """A compiled template tree. Render it with :func:`make_context`'s result."""

    __slots__ = ("_event_fields", "_label", "_render", "_static", "_uses")

    def __init__(self, render: _Render | None, static: Any, refs: _Refs, root: Path) -> None:
        self._render = render
        self._static = static
        self._uses = frozenset(refs.names)
        self._event_fields = frozenset(refs.event_fields)
        self._label = format_path(root)

    def render(self, context: Mapping[str, Any], *, allow_null: bool = False) -> Any:
        """The rendered tree, a fresh copy each time; RenderError names the failing path and the cause."""
        render = self._render
        value = _copy_static(self._static) if render is None else render({**_GLOBAL_VALUES, **context})
        if value is None and not allow_null:
            raise RenderError(f"{self._label or 'payload'} rendered null; the SDK cannot send a null payload")
        return value

    def uses(self) -> set[str]:
        """The top-level context variables the templates reference, e.g. ``{"event", "config"}``."""
        return set(self._uses)

    def event_fields(self) -> set[str]:
        """First-level attributes of ``event`` the templates reference (best effort, for docs)."""
        return set(self._event_fields)


def compile_tree(tree: Any, *, root: Path = ()) -> CompiledTree:
    """Compile every template in ``tree``; TemplateCompileError lists every problem (paths under ``root``)."""
    problems: list[TemplateSyntaxProblem] = []
    refs = _Refs()
    render = _compile_node(tree, root, problems, refs)
    if problems:
        raise TemplateCompileError(problems)
    return CompiledTree(render, tree, refs, root)


_FALSE_STRINGS = frozenset({"", "false", "0", "no", "off", "none", "null"})


class CompiledWhen:
    """A compiled ``when`` condition."""

    __slots__ = ("_tree",)

    def __init__(self, tree: CompiledTree) -> None:
        self._tree = tree

    def evaluate(self, context: Mapping[str, Any]) -> bool:
        """Whether the binding gets the event. A string result is false when it reads "", false, 0, no,
        off, none or null (any case, whitespace ignored); any other value counts by Python truthiness."""
        try:
            value = self._tree.render(context, allow_null=True)
        except RenderError as exc:
            raise RenderError(f"when: {exc}") from exc.__cause__
        if isinstance(value, str):
            return value.strip().lower() not in _FALSE_STRINGS
        return bool(value)

    def uses(self) -> set[str]:
        """The top-level context variables the condition references."""
        return self._tree.uses()

    def event_fields(self) -> set[str]:
        """First-level attributes of ``event`` the condition references (best effort, for docs)."""
        return self._tree.event_fields()


def compile_when(source: str) -> CompiledWhen:
    """Compile a ``when`` condition. Text without any Jinja syntax is refused: it would be a constant."""
    if not isinstance(source, str):
        message = f"a condition is a template string, not {type(source).__name__}"
        raise TemplateCompileError([TemplateSyntaxProblem((), 1, message)])
    if not _has_syntax(source):
        example = "{{ event.value.total > 10 }}"
        message = f"{source!r} is not a template; write the condition like {example!r}"
        raise TemplateCompileError([TemplateSyntaxProblem((), 1, message)])
    return CompiledWhen(compile_tree(source))


def make_context(
    event: Mapping[str, Any], config: Mapping[str, Any], binding: Mapping[str, Any], source: Mapping[str, Any]
) -> dict[str, Any]:
    """The variables templates see (DESIGN.md §2)."""
    return {"event": event, "config": config, "binding": binding, "source": source}

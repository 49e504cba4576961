"""YAML loading that keeps the line:col of every key and value and rejects what a config should not hold.

PyYAML composes the node graph (SafeLoader); this module turns it into plain Python values (dict, list,
str, int, float, bool, None) plus a map from key paths to positions, so that every later check can point
at the exact spot in the file. What it refuses, as problems rather than exceptions:

- bytes that are not UTF-8 text, control characters (binary files), syntax errors, tab indentation;
- duplicate keys (reported at the second occurrence, naming the first);
- keys that are not scalars, tags other than YAML's core types, recursive aliases, alias "bombs";
- what later checks could not handle (``bridge.config._yamllimits``): nesting deeper than 64 levels (reported where it
  passes the limit, also through aliases), integers of more than 1,000 digits, lone surrogate escapes.

Decisions: keys are always strings, exactly as written (``on:`` and ``1:`` are the keys "on" and "1", as in
JSON). Aliases are allowed and so are merge keys (``<<: *base``, or a list of them): keys written next to
``<<`` win over merged ones, and an earlier mapping in a ``<<`` list wins over a later one. Timestamps stay
strings (JSON has no dates).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from bridge.config._yamllimits import (
    MAX_DEPTH,
    NOT_TEXT,
    NOT_TEXT_HINT,
    TOO_DEEP,
    TOO_DEEP_HINT,
    TOO_LARGE,
    DepthLoader,
    TooDeep,
    has_surrogate,
    is_huge_int,
    join_surrogates,
)
from bridge.config.diagnostics import Problem, format_path

__all__ = ["Position", "Positions", "YamlDocument", "decode_text", "load_yaml"]

KeyPath = tuple[str | int, ...]

_MAX_NODES = 100_000  # far beyond any real config; stops "billion laughs" alias expansion early

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_TAG}{t}" for t in ("str", "null", "bool", "int", "float")}
_TIMESTAMP = f"{_TAG}timestamp"
_MAP = f"{_TAG}map"
_SEQ = f"{_TAG}seq"
_MERGE = f"{_TAG}merge"
_NO_TAGS = "only plain mappings, lists, strings, numbers, booleans and null are allowed"


@dataclass(frozen=True)
class Position:
    """A 1-based line:col. For a block scalar (``|`` or ``>``), ``block_line``/``block_col`` is where its
    content starts (0 otherwise)."""

    line: int
    col: int
    block_line: int = 0
    block_col: int = 0
    literal: bool = False  # a `|` block: its lines are the file's lines, one for one


class Positions:
    """Where each key and value of a document is, by key path (``("sources", "orders", "kafka")``)."""

    def __init__(self) -> None:
        self.keys: dict[KeyPath, Position] = {}
        self.values: dict[KeyPath, Position] = {}

    def key(self, path: KeyPath) -> Position | None:
        return self.keys.get(path)

    def value(self, path: KeyPath) -> Position | None:
        return self.values.get(path)

    def at(self, path: KeyPath) -> Position:
        """The value at ``path``, else its key, else the nearest ancestor that has a position, else 1:1."""
        for end in range(len(path), -1, -1):
            prefix = path[:end]
            found = self.values.get(prefix) or self.keys.get(prefix)
            if found is not None:
                return found
        return Position(1, 1)

    def key_at(self, path: KeyPath) -> Position:
        """The key of ``path`` when it has one (a mapping entry), else as :meth:`at`."""
        return self.keys.get(path) or self.at(path)

    def in_text(self, path: KeyPath, line: int) -> tuple[int, int, bool]:
        """Where line ``line`` (1-based) of the string at ``path`` is: (line, col, exact).

        Exact only for ``|`` blocks; folded and quoted scalars give the string's own position."""
        pos = self.at(path)
        if pos.literal and pos.block_line:
            return pos.block_line + line - 1, pos.block_col, True
        if pos.block_line:
            return pos.block_line, pos.block_col, line == 1
        return pos.line, pos.col, line == 1


@dataclass
class YamlDocument:
    data: Any
    positions: Positions
    invalid: set[KeyPath] = field(default_factory=set)  # values replaced because they were refused


# ---------------------------------------------------------------------------------------------------------
# text


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, col


def decode_text(data: bytes, file: str | None = None) -> tuple[str | None, list[Problem]]:
    """UTF-8 (optionally with a BOM) → text, or a problem pointing at the first byte that is not."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16"), []
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = data[exc.start : exc.start + 1].hex()
        return None, [
            Problem("yaml-syntax", "", f"the file is not UTF-8 text (byte 0x{bad} cannot be decoded)",
                    "is it a binary file?", line, col, file)
        ]


def _block_start(lines: list[str], first: int) -> tuple[int, int]:
    """(line, col) of the first non-blank content line of a block scalar starting at ``first`` (1-based)."""
    for number in range(first, len(lines) + 1):
        text = lines[number - 1]
        if text.strip():
            return number, len(text) - len(text.lstrip(" ")) + 1
    return first, 1


# ---------------------------------------------------------------------------------------------------------
# node graph → values


def _short(tag: str) -> str:
    return "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else tag


class _Abort(Exception):
    """The walk cannot go on (alias bomb); the problem is already recorded."""


class _Walker:
    def __init__(self, text: str, file: str | None) -> None:
        self.file = file
        self.lines = text.splitlines()
        self.positions = Positions()
        self.problems: list[Problem] = []
        self._constructor = yaml.constructor.SafeConstructor()
        self._active: set[int] = set()
        self.invalid: set[KeyPath] = set()
        self._budget = _MAX_NODES

    def problem(self, code: str, path: KeyPath, node: Node, message: str, hint: str | None = None) -> None:
        if code == "yaml-syntax":
            self.invalid.add(path)
        mark = node.start_mark
        self.problems.append(
            Problem(code, format_path(path), message, hint, mark.line + 1, mark.column + 1, self.file)
        )

    def _position(self, node: Node) -> Position:
        mark = node.start_mark
        if isinstance(node, ScalarNode) and node.style in ("|", ">"):
            line, col = _block_start(self.lines, mark.line + 2)
            return Position(mark.line + 1, mark.column + 1, line, col, node.style == "|")
        return Position(mark.line + 1, mark.column + 1)

    def value(self, node: Node, path: KeyPath) -> Any:
        self._budget -= 1
        if self._budget < 0:
            self.problem("yaml-syntax", path, node,
                         f"the document expands to more than {_MAX_NODES} values (an alias bomb?)")
            raise _Abort
        if len(path) > MAX_DEPTH:  # aliases can nest deeper than the text does
            # Blame the entry that holds it (the alias), not the anchor's text far away.
            named = path[: next((i for i, p in enumerate(path) if not isinstance(p, str)), len(path))][:8]
            at = self.positions.keys.get(named) or self._position(node)
            self.problems.append(Problem("yaml-syntax", format_path(named), TOO_DEEP, TOO_DEEP_HINT, at.line,
                                         at.col, self.file))
            raise _Abort
        self.positions.values[path] = self._position(node)
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if id(node) in self._active:
            self.problem("yaml-syntax", path, node, "recursive alias: this value contains itself")
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                if node.tag != _SEQ:
                    self.problem("yaml-syntax", path, node, f"unsupported tag {_short(node.tag)}", _NO_TAGS)
                return [self.value(item, (*path, i)) for i, item in enumerate(node.value)]
            if isinstance(node, MappingNode):
                if node.tag != _MAP:
                    self.problem("yaml-syntax", path, node, f"unsupported tag {_short(node.tag)}", _NO_TAGS)
                return self._mapping(node, path)
        finally:
            self._active.discard(id(node))
        return None  # pragma: no cover - PyYAML has no other node kinds

    def _scalar(self, node: ScalarNode, path: KeyPath) -> Any:
        if node.tag == _TIMESTAMP:
            return node.value
        if node.tag not in _SCALAR_TAGS:
            self.problem("yaml-syntax", path, node, f"unsupported tag {_short(node.tag)}", _NO_TAGS)
            return node.value
        if node.tag == f"{_TAG}str" and has_surrogate(node.value):
            joined = join_surrogates(node.value)
            if joined is None:
                self.problem("value", path, node, f"the text {NOT_TEXT}", NOT_TEXT_HINT)
                self.invalid.add(path)
            return joined
        construct = self._constructor.yaml_constructors[node.tag]
        try:
            value = construct(self._constructor, node)
        except ValueError:  # an integer beyond the limit of int()
            value = None
        if (value is None and node.tag == f"{_TAG}int") or is_huge_int(value):
            self.problem("value", path, node, TOO_LARGE)
            self.invalid.add(path)
            return None
        return value

    def _mapping(self, node: MappingNode, path: KeyPath) -> dict[str, Any]:
        out: dict[str, Any] = {}
        merges: list[Node] = []
        seen: dict[str, Node] = {}
        explicit: list[tuple[str, Node, Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                if "<<" in seen:
                    self._duplicate("<<", path, key_node, seen["<<"])
                seen["<<"] = key_node
                merges.extend(self._merge_sources(value_node, path))
                continue
            if not isinstance(key_node, ScalarNode):
                self.problem("yaml-syntax", path, key_node, "a key must be a plain string, not a list or mapping")
                continue
            key = str(key_node.value)
            if has_surrogate(key):
                joined = join_surrogates(key)
                if joined is None:
                    self.problem("yaml-syntax", path, key_node, f"the key {NOT_TEXT}", NOT_TEXT_HINT)
                    continue
                key = joined
            if key in seen:
                self._duplicate(key, path, key_node, seen[key])
                continue
            seen[key] = key_node
            explicit.append((key, key_node, value_node))
        # Merged mappings first, the earliest last so that it wins; then the keys written here win over all.
        own = self.positions.values[path]
        for source in reversed(merges):
            merged = self.value(source, path)
            if isinstance(merged, dict):
                out.update(merged)
        self.positions.values[path] = own
        for key, key_node, value_node in explicit:
            child = (*path, key)
            self.positions.keys[child] = self._position(key_node)
            out[key] = self.value(value_node, child)
        return out

    def _merge_sources(self, node: Node, path: KeyPath) -> list[Node]:
        items = node.value if isinstance(node, SequenceNode) else [node]
        good: list[Node] = [item for item in items if isinstance(item, MappingNode)]
        if len(good) != len(items):
            self.problem("yaml-syntax", path, node, "a merge key (<<) takes a mapping or a list of mappings",
                         "write <<: *anchor, where the anchor names a mapping")
        return good

    def _duplicate(self, key: str, path: KeyPath, node: Node, first: Node) -> None:
        where = f"{first.start_mark.line + 1}:{first.start_mark.column + 1}"
        self.problem("duplicate-key", (*path, key), node, f"duplicate key; first defined at {where}",
                     "a key may appear once per mapping")


# ---------------------------------------------------------------------------------------------------------
# entry point


def _syntax_problem(exc: yaml.YAMLError, text: str, file: str | None) -> Problem:
    if isinstance(exc, yaml.reader.ReaderError):
        line, col = _line_col(text, exc.position)
        return Problem("yaml-syntax", "", f"control character U+{exc.character:04X} is not allowed in YAML",
                       "is it a binary file?", line, col, file)
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        problem = exc.problem or "invalid YAML"
        hint = None
        if "'\\t'" in problem:
            message = "a tab character here is not allowed"
            hint = "indent YAML with spaces, never tabs"
        else:
            message = f"{exc.context}, {problem}" if exc.context else problem
            if "mapping values are not allowed" in problem:
                hint = "quote a value that contains ': '"
            elif "expected a single document" in message:
                hint = "bridge.yaml holds one document; remove the extra '---'"
        return Problem("yaml-syntax", "", message, hint, line, col, file)
    return Problem("yaml-syntax", "", str(exc) or "invalid YAML", None, 0, 0, file)


def load_yaml(text: str, file: str | None = None) -> tuple[YamlDocument | None, list[Problem]]:
    """Parse ``text``. On a syntax error the document is None; otherwise it may come with problems
    (duplicate keys, tags) and a best-effort value. An empty document has ``data`` None."""
    try:
        loader = DepthLoader(text)
    except yaml.YAMLError as exc:  # the reader checks every character first
        return None, [_syntax_problem(exc, text, file)]
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        return None, [_syntax_problem(exc, text, file)]
    except TooDeep as exc:
        line, col = exc.mark.line + 1, exc.mark.column + 1
        return None, [Problem("yaml-syntax", "", TOO_DEEP, TOO_DEEP_HINT, line, col, file)]
    finally:
        loader.dispose()
    walker = _Walker(text, file)
    if root is None:
        return YamlDocument(None, walker.positions), []
    try:
        data = walker.value(root, ())
    except _Abort:
        return None, walker.problems
    problems = sorted(walker.problems, key=lambda p: (p.line, p.col))
    return YamlDocument(data, walker.positions, walker.invalid), problems


def iter_paths(data: Any, path: KeyPath = ()) -> Iterable[tuple[KeyPath, Any]]:
    """Every (path, value) in a loaded document, parents before children."""
    yield path, data
    if isinstance(data, dict):
        for key, value in data.items():
            yield from iter_paths(value, (*path, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from iter_paths(value, (*path, index))

"""`bridge test --update`: record what the source produces into the cases that have no ``expect`` yet.

The file is edited as text, not re-dumped: an ``expect:`` block is inserted after the last line of each such
case, indented like the case's keys, so comments, order and formatting of everything else stay as they are.
A case written in flow style (``- {name: ..., source: ...}``) cannot take a block and is left alone.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from bridge._caserun import CaseResult

__all__ = ["expectation", "update_text"]


def expectation(result: CaseResult) -> dict[str, Any]:
    """What a case should expect to pass with ``result``."""
    if result.error_code is not None:
        expect: dict[str, Any] = {"error": result.error_code}
        if result.when is not None:
            expect = {"when": result.when, **expect}
        return expect
    if not result.has_payload:
        return {"when": False}
    return {"when": True, "payload": result.payload}


def _case_nodes(text: str) -> list[MappingNode | None]:
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    assert isinstance(root, MappingNode)
    for key, value in root.value:
        if key.value == "tests" and isinstance(value, SequenceNode):
            return [n if isinstance(n, MappingNode) else None for n in value.value]
    return []


def _last_leaf(node: Node) -> Node:
    """The last scalar or flow collection inside ``node``: block collections end where the next token starts,
    after any comment, while these end exactly where they do."""
    while isinstance(node, (MappingNode, SequenceNode)) and not node.flow_style and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(node, MappingNode) else last
    return node


def update_text(text: str, results: Sequence[CaseResult]) -> tuple[str, list[str], list[str]]:
    """``text`` with an ``expect`` block added to every case of ``results`` that has none; the names of the
    cases updated, and of those left alone (flow style)."""
    nodes = _case_nodes(text)
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    inserts: list[tuple[int, list[str]]] = []
    updated: list[str] = []
    skipped: list[str] = []
    for result in results:
        node = nodes[result.case.index] if result.case.index < len(nodes) else None
        if result.case.expect is not None or node is None:
            continue
        if node.flow_style or not node.value:
            skipped.append(result.case.name)
            continue
        indent = " " * node.value[0][0].start_mark.column
        end = _last_leaf(node).end_mark
        after = end.line if end.column == 0 else end.line + 1  # a block scalar ends at the next line's start
        block = yaml.safe_dump({"expect": expectation(result)}, sort_keys=False, allow_unicode=True,
                               default_flow_style=False, width=100)
        inserts.append((after, [indent + line + "\n" for line in block.splitlines()]))
        updated.append(result.case.name)
    for after, new in sorted(inserts, reverse=True):
        lines[after:after] = new
    return "".join(lines), updated, skipped


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old file or the new one, never half of it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

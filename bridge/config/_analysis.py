"""What checking bridge.yaml produces, step by step (:class:`Analysis`); kept apart so that the reading and
schema steps (``_load``) and the semantic checks (``_checks``) both use it without importing each other both ways."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.config.diagnostics import Problem, Severity, format_path
from bridge.config.yamlpos import KeyPath, Positions


@dataclass
class Analysis:
    """What the checks produced: the substituted document (when it is a mapping), problems, resolved schemas."""

    path: Path  # absolute
    display: str  # as the user wrote it
    data: dict[str, Any] | None = None
    positions: Positions = field(default_factory=Positions)
    problems: list[Problem] = field(default_factory=list)
    schemas: dict[tuple[str, str], dict[str, Any] | None] = field(default_factory=dict)
    invalid: set[KeyPath] = field(default_factory=set)  # values the YAML reader refused (e.g. a !tag)
    schema_files: set[Path] = field(default_factory=set)  # the files ``{$ref: file}`` schemas name (absolute)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def add(self, code: str, path: KeyPath, message: str, hint: str | None = None, *, key: bool = False,
            severity: Severity = "error") -> Problem:
        pos = self.positions.key_at(path) if key else self.positions.at(path)
        problem = Problem(code, format_path(path), message, hint, pos.line, pos.col, self.display, severity)
        self.problems.append(problem)
        return problem

"""`bridge test`: the command. Loads bridge.yaml and the test files, reports their problems, runs the cases,
prints the results; ``--update`` records expectations into cases that have none.

Exit codes: 0 every case passed; 1 a case failed, or bridge.yaml or a test file has an error; 2 a file cannot
be read (or there is no test file at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from bridge._caseout import write_json, write_junit, write_text
from bridge._caserun import CaseResult, Runner
from bridge._caseupdate import update_text, write_atomically
from bridge.casetest import TestFile, check_file
from bridge.config import BridgeConfig, check_config

__all__ = ["DEFAULT_TEST_FILE", "run"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DEFAULT_TEST_FILE = "bridge.test.yaml"


def run(config_path: Path, files: Sequence[str], *, output_format: str, update: bool, stdout: TextIO,
        stderr: TextIO) -> int:
    """Run `bridge test`; returns the exit code. Diagnostics go to stdout in text format, else to stderr (so
    that stdout stays one JSON or XML document)."""
    notes = stdout if output_format == "text" else stderr
    config, problems = check_config(config_path)
    for problem in problems:
        if problem.is_error:  # warnings (a watched directory not made yet...) are `bridge validate`'s business
            print(problem.format_text(), file=notes)
    if any(p.code == "file-unreadable" for p in problems):
        return EXIT_USAGE
    if config is None:
        print(f"bridge: {config_path} is invalid; no test was run", file=stderr)
        return EXIT_FAILED
    paths = [(Path(f), f) for f in files]
    if not paths:
        default = config_path.parent / DEFAULT_TEST_FILE
        if not default.is_file():
            print(f"bridge: no test file: {default} does not exist; write cases there (see `bridge schema --tests`) "
                  "or name test files as arguments", file=stderr)
            return EXIT_USAGE
        paths = [(default, str(default))]
    tests = [check_file(path, display, config) for path, display in paths]
    problems_found = [p for t in tests for p in t.problems]
    for problem in problems_found:
        print(problem.format_text(), file=notes)
    if any(t.unreadable for t in tests):
        return EXIT_USAGE
    if any(p.is_error for p in problems_found):
        errors = sum(1 for p in problems_found if p.is_error)
        print(f"bridge: {errors} error{'' if errors == 1 else 's'} in the test file(s); no test was run", file=stderr)
        return EXIT_FAILED
    results = _run_all(config, tests)
    if update:
        code = _update(tests, results, notes)
        if code is not None:
            return code
        results = _run_all(config, [check_file(t.path, t.display, config) for t in tests])
    {"text": write_text, "json": write_json, "junit": write_junit}[output_format](results, stdout)
    return EXIT_OK if all(r.passed for r in results) else EXIT_FAILED


def _run_all(config: BridgeConfig, tests: Sequence[TestFile]) -> list[CaseResult]:
    runner = Runner(config)
    return [runner.run(case) for test in tests for case in test.cases]


def _update(tests: Sequence[TestFile], results: Sequence[CaseResult], notes: TextIO) -> int | None:
    """Write the expectations; an exit code when a file could not be written."""
    for test in tests:
        mine = [r for r in results if r.case.file == test.display]
        if test.text is None or all(r.case.expect is not None for r in mine):
            continue
        text, updated, skipped = update_text(test.text, mine)
        for name in skipped:
            print(f"{test.display}: case {name!r} is written in flow style; add its expect by hand", file=notes)
        if not updated:
            continue
        try:
            write_atomically(test.path, text)
        except OSError as exc:
            print(f"bridge: cannot write {test.display}: {exc.strerror or exc}", file=notes)
            return EXIT_USAGE
        print(f"{test.display}: recorded the expectation of {len(updated)} case(s): {', '.join(updated)}",
              file=notes)
    return None

"""The output formats of `bridge test`: text (PASS/FAIL lines with diffs), JSON, and JUnit XML for CI."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any, TextIO

from bridge._caserun import CaseResult

__all__ = ["write_json", "write_junit", "write_text"]


def _summary(results: Sequence[CaseResult]) -> str:
    failed = sum(1 for r in results if not r.passed)
    return f"{len(results) - failed} passed, {failed} failed"


def _printable(text: str) -> str:
    """``text`` with lone surrogates (an error message may quote one from the event) as ``\\udXXX`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def write_text(results: Sequence[CaseResult], out: TextIO) -> None:
    for result in results:
        print(f"{'PASS' if result.passed else 'FAIL'} {result.case.name}", file=out)
        for block in result.failures:
            for line in block.splitlines():
                print(_printable(f"    {line}"), file=out)
        for note in result.notes:
            print(f"    note: {note}", file=out)
    print(_summary(results), file=out)


def _as_json(result: CaseResult) -> dict[str, Any]:
    return {
        "file": result.case.file,
        "line": result.case.line,
        "name": result.case.name,
        "source": result.case.source,
        "passed": result.passed,
        "when": result.when,
        "payload": result.payload if result.has_payload else None,
        "error": None if result.error_code is None else {"code": result.error_code, "message": result.error_message},
        "failures": result.failures,
        "notes": result.notes,
    }


def write_json(results: Sequence[CaseResult], out: TextIO) -> None:
    """A JSON list with one object per case."""
    print(json.dumps([_as_json(r) for r in results], indent=2, default=str), file=out)


# XML 1.0 cannot hold these characters at all, not even escaped; a payload may carry them.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    return _NOT_XML.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def write_junit(results: Sequence[CaseResult], out: TextIO) -> None:
    """JUnit XML: one <testsuite> per test file, one <testcase> per case (classname: the source id)."""
    root = ET.Element("testsuites", name="bridge test", tests=str(len(results)),
                      failures=str(sum(1 for r in results if not r.passed)))
    files: dict[str, list[CaseResult]] = {}
    for result in results:
        files.setdefault(result.case.file, []).append(result)
    for file, cases in files.items():
        suite = ET.SubElement(root, "testsuite", name=_xml_text(file), tests=str(len(cases)),
                              failures=str(sum(1 for r in cases if not r.passed)), errors="0", skipped="0",
                              time=f"{sum(r.seconds for r in cases):.6f}")
        for result in cases:
            case = ET.SubElement(suite, "testcase", name=_xml_text(result.case.name),
                                 classname=_xml_text(result.case.source), file=_xml_text(file),
                                 line=str(result.case.line), time=f"{result.seconds:.6f}")
            if not result.passed:
                failure = ET.SubElement(case, "failure", message=_xml_text(result.failures[0].splitlines()[0]),
                                        type="mismatch")
                failure.text = _xml_text("\n\n".join(result.failures))
            if result.notes:
                ET.SubElement(case, "system-out").text = _xml_text("\n".join(result.notes))
    ET.indent(root)
    out.write('<?xml version="1.0" encoding="UTF-8"?>\n')
    out.write(ET.tostring(root, encoding="unicode"))
    out.write("\n")

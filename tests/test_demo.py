"""`make demo` as the README walks through it, with each part a real process: the bundled test engine
(`python -m bridge.testing.engine`), examples/demo/worker.py, and `bridge up` on a copy of the default
bridge.yaml. A file dropped into ./inbox is printed by the worker; an edit of the payload template changes the
next call live."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.files import wait_for
from tests.support.process import BridgeProcess

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def engine_url() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "bridge.testing.engine", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        assert "TEST ENGINE" in err and "not an iii engine" in err


def _printed(out: Path) -> list[dict[str, object]]:
    lines = out.read_text().splitlines() if out.exists() else []
    return [json.loads(line.split(": ", 1)[1]) for line in lines if " call #" in line]


def test_the_demo_prints_each_call_and_shows_a_template_edit_live(tmp_path: Path, engine_url: str) -> None:
    shutil.copy(REPO / "bridge.yaml", tmp_path / "bridge.yaml")
    out = tmp_path / "worker.out"
    with open(out, "w") as stdout:
        worker = subprocess.Popen([sys.executable, str(REPO / "examples" / "demo" / "worker.py")],
                                  stdout=stdout, stderr=subprocess.STDOUT, env={**os.environ, "III_URL": engine_url})
    try:
        wait_for(lambda: "waiting for calls" in out.read_text(), 20, "the worker bound")
        with BridgeProcess(tmp_path / "bridge.yaml", engine_url) as bridge:
            bridge.wait_for_log(r"binding \S+ added: inbox → demo::print-file")
            (tmp_path / "inbox" / "hello.json").write_text('{"hello": "world"}')
            wait_for(lambda: len(_printed(out)) == 1, 10, "the first call printed")
            assert _printed(out) == [{"file": "hello.json", "data": {"hello": "world"}}]

            config = tmp_path / "bridge.yaml"
            text = config.read_text()
            line = '      data: "{{ event.content }}"\n'
            assert line in text, "the README's edit no longer fits bridge.yaml"
            config.write_text(text.replace(line, line + '      greeting: "hi from {{ event.name }}"\n'))
            bridge.wait_for_log(r"config reloaded \(bridge\.yaml changed\): changed: inbox")
            (tmp_path / "inbox" / "again.json").write_text('{"hello": "again"}')
            wait_for(lambda: len(_printed(out)) == 2, 10, "the second call printed")
            second = {"file": "again.json", "data": {"hello": "again"}, "greeting": "hi from again.json"}
            assert _printed(out)[1] == second
            assert bridge.stop() == 0
    finally:
        worker.terminate()
        worker.wait(timeout=10)

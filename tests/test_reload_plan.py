"""What a reload does, decided from the parsed configs (no process): which sources are added, changed, removed
or unchanged, and which settings need a restart; and how the status line shows the last reload."""

from __future__ import annotations

from pathlib import Path

from bridge.config import load_config
from bridge.reload import ReloadStats, plan_reload
from bridge.status import StatusLine

BASE = """\
version: 1
engine: {url: "ws://127.0.0.1:49134"}
sources:
  inbox:
    file: {path: ./inbox}
    payload: {name: "{{ event.name }}"}
  orders:
    file: {path: ./orders}
    bind_schema: {$ref: bind.json}
"""


def test_sources_are_compared_by_their_parsed_config_not_their_text(tmp_path: Path) -> None:
    old = load_config(_write(tmp_path, BASE), env={})
    moved = "# a comment moves every line\n\n" + BASE.replace("{name: \"{{ event.name }}\"}",
                                                              "\n      name: \"{{ event.name }}\"")
    plan = plan_reload(old, load_config(_write(tmp_path, moved), env={}))
    assert (plan.added, plan.changed, plan.removed, plan.unchanged, plan.kept) == ((), (), (), ("inbox", "orders"), ())


def test_a_changed_ref_file_changes_the_sources_that_load_it(tmp_path: Path) -> None:
    old = load_config(_write(tmp_path, BASE), env={})
    assert old.schema_files == (tmp_path / "bind.json",)
    (tmp_path / "bind.json").write_text('{"type": "object", "properties": {"x": {"type": "string"}}}')
    plan = plan_reload(old, load_config(tmp_path / "bridge.yaml", env={}))
    assert plan.changed == ("orders",) and plan.unchanged == ("inbox",)


def test_added_removed_and_restart_only_settings(tmp_path: Path) -> None:
    old = load_config(_write(tmp_path, BASE), env={})
    text = BASE.replace("  orders:\n    file: {path: ./orders}\n    bind_schema: {$ref: bind.json}\n",
                        "  audit:\n    file: {path: ./audit}\n")
    text = text.replace("49134", "49135") + "observability: {listen: 127.0.0.1:0}\n"
    plan = plan_reload(old, load_config(_write(tmp_path, text), env={}))
    assert plan.added == ("audit",) and plan.removed == ("orders",) and plan.unchanged == ("inbox",)
    assert plan.kept == ("engine", "observability")
    assert plan.describe() == "changed: none; added: audit; removed: orders; unchanged: inbox"
    assert "restart" in (plan.restart_note() or "")


def test_the_status_line_shows_the_last_reload() -> None:
    stats = ReloadStats()
    assert stats.status_note() is None
    stats.record_rejected(0.0, 2)
    line = StatusLine(_Sink(), lambda: (True, []), note=stats.status_note)
    assert "config reload REFUSED" in line.tick(0.0) and "(2 errors)" in line.tick(1.0)
    stats.record_applied(5.0)
    assert "config reloaded" in line.tick(2.0)
    assert (stats.applied, stats.rejected, stats.last_ok, stats.last_success_s) == (1, 1, True, 5.0)


class _Sink:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        raise OSError("not a terminal")


def _write(tmp_path: Path, text: str) -> Path:
    if not (tmp_path / "bind.json").exists():
        (tmp_path / "bind.json").write_text('{"type": "object"}')
    (tmp_path / "bridge.yaml").write_text(text)
    return tmp_path / "bridge.yaml"

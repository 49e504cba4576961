"""The ``bridge`` command: argument parsing and output only; the work is done by the modules it calls.

Each command is one entry of ``_COMMANDS``: a function that adds its arguments to its subparser and a
function that runs it and returns the exit code (0 ok, 1 the input is invalid, 2 usage or I/O error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from bridge import __version__

if TYPE_CHECKING:
    from bridge.config import BridgeConfig

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


class _Command(NamedTuple):
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", metavar="FILE", type=Path, default=None,
        help="the bridge config (default: $BRIDGE_CONFIG, then ./bridge.yaml)",
    )


def _config_path(args: argparse.Namespace) -> Path:
    """``-c FILE``, else ``$BRIDGE_CONFIG``, else ``./bridge.yaml``."""
    if args.config is not None:
        return Path(args.config)
    return Path(os.environ.get("BRIDGE_CONFIG") or "bridge.yaml")


def _print_error(message: str) -> None:
    print(f"bridge: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# validate


def _configure_validate(parser: argparse.ArgumentParser) -> None:
    _add_config_option(parser)
    parser.add_argument("--format", choices=("text", "json"), default="text",
                        help="one line per problem (text) or a JSON list of problem objects (json)")
    parser.add_argument("--offline", action="store_true",
                        help="do not connect to anything (skips checking Postgres outbox tables)")


def _run_validate(args: argparse.Namespace) -> int:
    from bridge.config import check_config
    from bridge.config.diagnostics import summary

    path = _config_path(args)
    config, problems = check_config(path)
    if config is not None and not args.offline:
        from bridge.sources import REGISTRY

        for spec in REGISTRY.values():
            problems += spec.online_problems(config, str(path))
        if any(p.is_error for p in problems):
            config = None
    if args.format == "json":
        print(json.dumps([p.to_json() for p in problems], indent=2))
    else:
        for problem in problems:
            print(problem.format_text())
        if config is not None:
            count = len(config.sources)
            extra = f", {summary(problems)}" if problems else ""
            print(f"{path}: valid, {count} source{'' if count == 1 else 's'}{extra}")
        else:
            print(f"{path}: {summary(problems)}")
    if any(p.code == "file-unreadable" for p in problems):
        if args.config is None and not os.environ.get("BRIDGE_CONFIG"):
            _print_error("no config given and no ./bridge.yaml here: pass -c FILE or set BRIDGE_CONFIG")
        return EXIT_USAGE
    return EXIT_OK if config is not None else EXIT_INVALID


# ---------------------------------------------------------------------------------------------------------
# schema


def _configure_schema(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tests", action="store_true",
                        help="print the JSON Schema of test files (bridge.test.yaml) instead")


def _run_schema(args: argparse.Namespace) -> int:
    from bridge.config.schemas import bridge_schema

    if args.tests:
        from bridge.casetest import tests_schema

        print(json.dumps(tests_schema(), indent=2, ensure_ascii=False))
        return EXIT_OK
    print(json.dumps(bridge_schema(), indent=2))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------
# up


def _load_or_report(args: argparse.Namespace) -> BridgeConfig | int:
    """Load the config, printing every problem; an int is the exit code to return instead."""
    from bridge.config import check_config

    path = _config_path(args)
    config, problems = check_config(path)
    for problem in problems:
        print(problem.format_text(), file=sys.stderr)
    if any(p.code == "file-unreadable" for p in problems):
        return EXIT_USAGE
    if config is None:
        _print_error(f"{path} is invalid; nothing was started (run `bridge validate` for details)")
        return EXIT_INVALID
    return config


def _configure_up(parser: argparse.ArgumentParser) -> None:
    _add_config_option(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="run the sources and print each rendered payload as a JSON line; no engine")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no live status line (it is shown only when stderr is a terminal)")
    parser.add_argument("--no-reload", action="store_true",
                        help="do not watch the config for changes (SIGHUP still reloads it)")
    parser.epilog = ("The config is reloaded live when it (or a schema file it $refs) changes and on SIGHUP: an "
                     "invalid one is refused with its diagnostics and the running one stays; changed sources "
                     "restart, others are not touched; engine and observability changes need a restart.")


def _run_up(args: argparse.Namespace) -> int:
    import logging

    from bridge import logs
    from bridge.runtime import run_up

    loaded = _load_or_report(args)
    if isinstance(loaded, int):
        return loaded
    logs.configure(loaded.observability.log_format, logging.DEBUG if args.verbose else logging.INFO)
    return run_up(loaded, dry_run=args.dry_run, quiet=args.quiet, config_path=_config_path(args),
                  watch=not args.no_reload)


# ---------------------------------------------------------------------------------------------------------
# docs


def _configure_docs(parser: argparse.ArgumentParser) -> None:
    _add_config_option(parser)
    parser.add_argument("-o", "--output", metavar="FILE", type=Path, default=None,
                        help="write the Markdown to FILE instead of stdout")


def _run_docs(args: argparse.Namespace) -> int:
    from bridge.docs import render_docs

    loaded = _load_or_report(args)
    if isinstance(loaded, int):
        return loaded
    text = render_docs(loaded)
    if args.output is None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        args.output.write_text(text, encoding="utf-8")
    except OSError as exc:
        _print_error(f"cannot write {args.output}: {exc.strerror or exc}")
        return EXIT_USAGE
    print(f"{args.output}: Worker Docs of {len(loaded.sources)} trigger type(s)", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------
# render


def _configure_render(parser: argparse.ArgumentParser) -> None:
    # Here --config is the bind config (DESIGN.md §4); the config file is -c only.
    parser.add_argument("-c", dest="config", metavar="FILE", type=Path, default=None,
                        help="the bridge config (default: $BRIDGE_CONFIG, then ./bridge.yaml)")
    parser.add_argument("source", metavar="SOURCE", help="the source (trigger type id) whose templates to use")
    parser.add_argument("--event", metavar="FILE", required=True,
                        help="a JSON object of the kind's event fields (id and source are filled in); - for stdin")
    parser.add_argument("--config", "--bind-config", dest="bind_config", metavar="JSON", default=None,
                        help="the bind config, as JSON (default {}); checked against the source's bind_schema")
    parser.epilog = ("Prints whether `when` passes and the payload_schema verdict on stderr and the payload on "
                     "stdout. Exit 0: rendered; 1: the event, bind config or payload is invalid, or a template "
                     "failed; 2: usage error, unknown SOURCE, unreadable file.")


def _run_render(args: argparse.Namespace) -> int:
    from bridge import render

    loaded = _load_or_report(args)
    if isinstance(loaded, int):
        return loaded
    return render.run(loaded, args.source, args.event, args.bind_config,
                      stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# test


def _configure_test(parser: argparse.ArgumentParser) -> None:
    _add_config_option(parser)
    parser.add_argument("files", nargs="*", metavar="FILE",
                        help="test files (default: bridge.test.yaml beside the bridge config)")
    parser.add_argument("--format", choices=("text", "json", "junit"), default="text",
                        help="PASS/FAIL lines (text), a JSON list of case results (json), or JUnit XML (junit)")
    parser.add_argument("--update", action="store_true",
                        help="write the actual result into every case that has no expect yet (others are kept)")
    parser.epilog = ("Runs each case's event through the source's when, payload templates and payload_schema, as "
                     "live delivery does, with no server; a condition_function_id is not called. Exit 0: every "
                     "case passed; 1: a case failed, or a file has errors; 2: usage error, unreadable file.")


def _run_test(args: argparse.Namespace) -> int:
    from bridge import testcmd

    return testcmd.run(_config_path(args), args.files, output_format=args.format, update=args.update,
                       stdout=sys.stdout, stderr=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# deadletters


def _configure_deadletters(parser: argparse.ArgumentParser) -> None:
    _add_config_option(parser)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    listing = verbs.add_parser("list", help="one line per dead letter")
    listing.add_argument("--source", help="only this trigger type")
    show = verbs.add_parser("show", help="print dead letters as JSON")
    show.add_argument("refs", nargs="+", metavar="REF", help="as printed by `list` (LINE or FILE:LINE)")
    replay = verbs.add_parser("replay", help="deliver dead letters again to their binding's function")
    replay.add_argument("refs", nargs="*", metavar="REF", help="as printed by `list`")
    replay.add_argument("--all", action="store_true", help="every dead letter not replayed yet")
    replay.add_argument("--source", help="with --all: only this trigger type")
    replay.add_argument("--force", action="store_true",
                        help="deliver records already replayed again (with --all: every record, replayed or not)")
    replay.epilog = ("Each record goes through its source's when, payload template, payload_schema, condition "
                     "function and delivery mode, as in `bridge up`. A record already replayed is refused (exit 1) "
                     "unless --force; concurrent replays wait for each other. Exit 0: every chosen record was "
                     "delivered; 1: some were refused, filtered or failed again, or the engine is unreachable; "
                     "2: usage error.")


def _run_deadletters(args: argparse.Namespace) -> int:
    import asyncio

    from bridge import replay
    from bridge.errors import BridgeError

    loaded = _load_or_report(args)
    if isinstance(loaded, int):
        return loaded
    letters = replay.load(loaded, getattr(args, "source", None))
    try:
        if args.verb == "list":
            replay.format_list(letters, sys.stdout)
            return EXIT_OK
        if args.verb == "show":
            for letter in replay.select(letters, args.refs):
                print(json.dumps({"ref": letter.ref, **letter.record}, indent=2, ensure_ascii=False))
            return EXIT_OK
        if args.all == bool(args.refs):
            _print_error("replay takes either REF... or --all")
            return EXIT_USAGE
        if args.all:
            chosen = letters if args.force else [d for d in letters if d.replayed_at is None]
        else:
            chosen = replay.select(letters, args.refs)
        failures = asyncio.run(replay.replay(loaded, chosen, sys.stdout, force=args.force, every=args.all))
    except BridgeError as exc:
        _print_error(str(exc))
        return EXIT_INVALID
    return EXIT_OK if failures == 0 else EXIT_INVALID


# ---------------------------------------------------------------------------------------------------------
# sql


def _configure_sql(parser: argparse.ArgumentParser) -> None:
    _add_config_option(parser)
    parser.add_argument("source", metavar="SOURCE", help="a postgres source with mode: outbox")


def _run_sql(args: argparse.Namespace) -> int:
    loaded = _load_or_report(args)
    if isinstance(loaded, int):
        return loaded
    ids = [s.id for s in loaded.sources]
    if args.source not in ids:
        _print_error(f"no source {args.source!r} in {_config_path(args)} (sources: {', '.join(ids)})")
        return EXIT_USAGE
    from bridge.sources import spec_of

    source = loaded.source(args.source)
    ddl = spec_of(source).ddl(source)
    if ddl is None:
        _print_error(f"source {args.source!r} is not a postgres source with mode: outbox; it needs no DDL")
        return EXIT_USAGE
    print(ddl)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------
# entry points


_COMMANDS: dict[str, _Command] = {
    "validate": _Command("check bridge.yaml and report every problem", _configure_validate, _run_validate),
    "schema": _Command("print the JSON Schema of bridge.yaml (for editors)", _configure_schema, _run_schema),
    "up": _Command("run the bridge until SIGINT/SIGTERM", _configure_up, _run_up),
    "docs": _Command("print the Worker Docs (Markdown) of every trigger type", _configure_docs, _run_docs),
    "render": _Command("show the payload one event becomes for one bind config (no server needed)",
                       _configure_render, _run_render),
    "test": _Command("run the test cases of bridge.test.yaml against the templates and filters (no server)",
                     _configure_test, _run_test),
    "sql": _Command("print the DDL (table and trigger) of a Postgres outbox source", _configure_sql, _run_sql),
    "deadletters": _Command("list, show and replay dead letters", _configure_deadletters, _run_deadletters),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bridge",
        description="Turn Kafka topics, Postgres notifications and dropped files into iii function calls.",
    )
    parser.add_argument("--version", action="version", version=f"iii-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in _COMMANDS.items():
        command.configure(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code. Never raises (a bug is reported in one line, exit 2)."""
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exc:  # argparse has printed usage or help already
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        return _COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `bridge schema | head`: the reader is gone, nothing left to say
        _silence_stdout()
        return EXIT_OK
    except Exception as exc:
        from bridge.logs import redact_text  # the message may quote a DSN or a password

        _print_error(redact_text(f"internal error: {type(exc).__name__}: {exc} (please report this)"))
        return EXIT_USAGE


def entry() -> None:
    sys.exit(main())

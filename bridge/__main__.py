"""`python -m bridge` is the `bridge` command."""

from bridge.cli import entry

entry()
